"""scripts/compile_check.py: every launched Triton kernel compiles for the H100 / H200 (sm_90) at the GPU tiles, on
this CPU machine, with shared memory within the SM's limit. The interpreter tests check results; this checks that
the code the GPU runs compiles at all (the interpreter accepts programs the compiler refuses)."""

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _launched_kernels() -> set[str]:
    """Names of the @triton.jit functions some wrapper launches (``name[grid](...)``) in kernels/triton."""
    import triton

    import accel.kernels.triton as pkg

    names = set()
    for mod in pkgutil.iter_modules(pkg.__path__):
        m = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        src = Path(m.__file__).read_text()
        jitted = {n for n, v in vars(m).items()
                  if isinstance(v, (triton.runtime.JITFunction, triton.runtime.interpreter.InterpretedFunction))}
        names |= {n for n in jitted if re.search(rf"\b{n}\[", src)}
    return names


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cc")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp / "triton"))  # compile everything, nothing from a cache
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_check.py"), "--json", str(tmp / "cc.json")],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((tmp / "cc.json").read_text())


def test_every_case_compiles_within_shared_memory(report):
    assert report["arch"] == 90
    for row in report["cases"]:
        assert row["error"] is None, (row["case"], row["error"])
        for k in row["kernels"]:
            assert 0 < k["regs"] <= 255 and k["smem"] <= 227 * 1024, (row["case"], k)


# Known small decode spills, bytes at most: select_attend's 256-key tile at 16 warps (its batch-1 launch) is capped
# at 128 registers a thread; Triton 3.9 (this machine's) spills 24 B there, the GPU image's Triton 3.6 none (115
# registers), and that launch measured faster than two 128-key tiles on the GPU (kernels/triton/NOTES.md).
# Quest max_norm's page box ([32, D] tiles, 4 warps, two float atomic_min): Triton 3.9 spills 8 B (80 registers),
# Triton 3.6 none (72); that configuration is the one measured on the H100 (results/bench_decode_floor_quest_norm_box_
# h100.md); 8 warps or 16-page tiles spill on neither but were not timed.
ALLOWED_DECODE_SPILLS = {"_select_attend_kernel": 32, "_page_box_kernel": 8}


def test_decode_kernels_do_not_spill(report):
    """The decode kernels run once per layer and step at a few microseconds each: a register spill there is local
    memory traffic on the critical path (the prefill kernels' known spills are listed in kernels/triton/NOTES.md)."""
    spills = [(row["case"], k["kernel"], k["spill"]) for row in report["cases"] if row["case"].startswith("decode/")
              for k in row["kernels"] if k["spill"] > ALLOWED_DECODE_SPILLS.get(k["kernel"], 0)]
    assert not spills, spills


def test_every_launched_kernel_has_a_case(report):
    """A new kernel without a case here would not be compiled for the GPU before it reaches one."""
    compiled = {k["kernel"] for row in report["cases"] for k in row["kernels"]}
    missing = _launched_kernels() - compiled
    assert not missing, f"add a case to scripts/compile_check.py for {sorted(missing)}"


def test_gpu_configurations_were_compiled(report):
    """The wrappers took their GPU paths (not the interpreter's): bf16 tensor-core tiles of 8 warps for the prefill
    attention and the XAttention estimate, the FP8 estimate among them."""
    by_case = {row["case"]: row["kernels"] for row in report["cases"]}
    flash = by_case["prefill/flash_fwd causal D128 bfloat16"][0]
    assert flash["warps"] == 8 and flash["smem"] > 64 * 1024
    assert any(k["kernel"] == "_quant_fp8_kernel" for k in by_case["estimate/antidiag one_pass fp8"])
