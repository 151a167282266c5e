"""Compile every Triton kernel of accel for a GPU on a machine without one, as the GPU would run it.

Triton's driver is faked (device 0, a CUDA target of the chosen compute capability) and each launch only compiles
(``warmup``): the real launch wrappers run on CPU tensors at model shapes and pick their GPU configurations (tiles,
bf16 dots, FP8 operands; ``kernels.triton.checks.COMPILE_ONLY``), the kernel goes through Triton's whole pipeline
and ptxas, and ``cuobjdump`` reads its registers and spills off the cubin. What it catches that the interpreter
tests cannot: code the interpreter runs but the compiler refuses (constexpr misuse, unsupported ops, layouts), and
register spills or shared memory past the SM's limit at the GPU tiles (a tile race compiles all its candidates). Outputs are not computed (kernel outputs
are zeros), so a case checks compilation, not results: the interpreter tests and tests/test_gpu.py do that.

    python scripts/compile_check.py                      # every case, sm_90 (H100 / H200)
    python scripts/compile_check.py --only decode --arch 90 --json /tmp/cc.json

Run it with the Triton the GPU machine has (``pip install --target DIR triton==X`` and ``PYTHONPATH=DIR``) to
compile with that version. Exit status 1 when a kernel fails to compile or needs more shared memory than the SM
has; spills are listed (``--strict``: they fail too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: kernels must be JIT functions, not interpreted

# the GPU machine's shape for wrappers that size grids by SM count (H100 / H200 have 132 SMs)
SMS = 132
# dynamic shared memory per block an SM offers, by compute capability (CUDA programming guide)
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _install_fakes(arch: int) -> list[dict]:
    """Fake Triton's active driver and torch.cuda's device queries; make every kernel launch compile only.
    Returns the list the compiled kernels are recorded in."""
    import torch
    import triton
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    driver.set_active(_Driver())
    props = SimpleNamespace(multi_processor_count=SMS, name=f"compile-only sm_{arch}", major=arch // 10,
                            minor=arch % 10, total_memory=80 << 30)
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.get_device_capability = lambda *a, **k: (arch // 10, arch % 10)
    torch.cuda.is_current_stream_capturing = lambda: False

    from accel.kernels.triton import checks

    checks.COMPILE_ONLY = True
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    records: list[dict] = []
    seen: set = set()  # compiled kernels' hashes: each is reported once
    original = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        if hasattr(kernel, "result"):
            kernel = kernel.result()
        key = kernel.hash if hasattr(kernel, "hash") else id(kernel)
        if key in seen:
            return kernel
        seen.add(key)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True).stdout
        fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
        md = kernel.metadata
        records.append(dict(kernel=self.fn.__name__, regs=int(fields.get("REG", -1)),
                            spill=int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
                            smem=int(md.shared), warps=int(md.num_warps), stages=int(md.num_stages)))
        return kernel

    jit.JITFunction.run = compile_only
    from accel import autopick

    autopick._time_ms = lambda fn: (fn(), 0.0)[1]  # tile races compile every candidate and keep the first
    torch.empty = _zeros_like_empty(torch.empty)  # launches write nothing: keep downstream inputs defined
    return records


def _zeros_like_empty(empty):
    def zeros(*args, **kwargs):
        return empty(*args, **kwargs).zero_()
    return zeros


def _cases():
    """(name, callable) pairs: each calls launch wrappers the way the policies do by default, at Llama-3.1-8B's
    heads (32 query / 8 KV, head_dim 128, bf16) unless the name says otherwise."""
    import torch

    from accel.kernels import reference_sparse as rs
    from accel.kernels.triton import (antidiag_score, block_sparse, block_topk, decode_append, decode_attention,
                                      decode_score, decode_topk, fa4_layout, flash_fwd, flex_estimate, flex_layout,
                                      fp8_quant, lastq_score, mass_threshold, pooled_score, proxy_score,
                                      select_attend, vertical_slash)
    from accel.layouts import VerticalSlashLayout

    bf = torch.bfloat16
    g = torch.Generator().manual_seed(0)

    def qkv(Hq=32, Hkv=8, S=4096, D=128, dtype=bf, Sq=None):
        return (torch.randn(1, Hq, Sq or S, D, generator=g).to(dtype),
                torch.randn(1, Hkv, S, D, generator=g).to(dtype), torch.randn(1, Hkv, S, D, generator=g).to(dtype))

    cases = []

    def case(name):
        def wrap(fn):
            cases.append((name, fn))
            return fn
        return wrap

    # ---- prefill: dense and sparse attention
    for D, dtype in ((128, bf), (256, bf), (64, torch.float16), (128, torch.float32)):
        @case(f"prefill/flash_fwd causal D{D} {str(dtype)[6:]}")
        def _(D=D, dtype=dtype):
            q, k, v = qkv(D=D, dtype=dtype)
            flash_fwd.flash_attention(q, k, v, causal=True, return_lse=True)

    @case("prefill/flash_fwd window + softcap + sink (Gemma 2 local layer) D256")
    def _():
        q, k, v = qkv(D=256, Hq=16)
        flash_fwd.flash_attention(q, k, v, causal=True, window=4096 // 4, softcap=50.0, sink=4)

    for D in (128, 256):
        @case(f"prefill/block_sparse D{D}")
        def _(D=D):
            q, k, v = qkv(D=D)
            layout = rs.random_block_layout(1, 32, 4096, 4096, keep=0.2)
            block_sparse.block_sparse_attention(q, k, v, layout, return_lse=True)

    @case("prefill/vertical_slash")
    def _():
        q, k, v = qkv()
        cols = torch.randint(0, 4096, (1, 32, 1000), generator=g)
        offs = torch.randint(0, 4096, (1, 32, 200), generator=g)
        offs[..., 0] = 0
        vertical_slash.vertical_slash_attention(q, k, v, VerticalSlashLayout(cols, offs))

    @case("prefill/fa4_layout")
    def _():
        layout = rs.random_block_layout(1, 8, 4096, 4096, keep=0.2)
        fa4_layout.fa4_split(layout, 1, 32, 4096, 4096)

    # ---- prefill: estimation (XAttention, MInference, FlexPrefill, ProxyAttn)
    for method, fp8 in (("one_pass", True), ("one_pass", False), ("two_pass", False)):
        @case(f"estimate/antidiag {method}{' fp8' if fp8 else ''}")
        def _(method=method, fp8=fp8):
            q, k, _ = qkv()
            antidiag_score.antidiagonal_scores(q, k, block=128, stride=8, method=method, fp8=fp8)

    @case("estimate/fp8_quant centred")
    def _():
        fp8_quant.quantize_fp8(qkv()[1], group=8, center=True)

    for method in ("scratch", "gather"):
        @case(f"estimate/lastq {method}")
        def _(method=method):
            q, k, _ = qkv()
            lastq_score.lastq_scores(q, k, 64, method=method)

    @case("estimate/pooled + mean_pool")
    def _():
        q, k, _ = qkv()
        pooled_score.pooled_scores(q, k, block=128)

    for method in ("lse", "two_pass"):
        @case(f"estimate/proxy {method}")
        def _(method=method):
            q, k, _ = qkv()
            proxy_score.proxy_scores(q, k, block=128, stride=8, method=method)

    @case("estimate/block_topk threshold + top-n layouts")
    def _():
        scores = torch.rand(1, 32, 32, 32, generator=g)
        # max_blocks given: the kept counts the first launch would write are not computed here
        block_topk.threshold_layout(scores, 0.9, 4096, 4096, max_blocks=32)
        block_topk.topn_layout(scores, torch.full((1, 32, 32), 4, dtype=torch.int32), 4096, 4096, max_blocks=32)

    @case("estimate/flex mass_search + flex_estimate + flex_layout")
    def _():
        from accel.kernels.reference_estimation import block_means

        q, k, _ = qkv()
        B, Hq, S, D = q.shape
        vs = torch.rand(2, B, Hq, S, generator=g)
        k_pool = block_means(k, 128)
        search = mass_threshold.mass_search([vs.view(2 * B * Hq, S)], 0.9)
        mass_threshold.search_cuts(search)
        est = flex_estimate.flex_estimate(vs, search, q, k_pool, block=128, n_last=128, tau=0.1, min_blocks=8,
                                          scale=D**-0.5)
        flex_layout.flex_layout_tables(est.cols, est.dcs, S, S, 128)

    # ---- decode: Quest / LServe / TidalDecode / DuoAttention kernels over a static cache at 8K
    S, P = 8192, 512
    kv_len = torch.tensor(S, dtype=torch.int32)

    @case("decode/quest_scores")
    def _():
        q, k, _ = qkv(S=S, Sq=1)
        kmin = torch.randn(1, 8, P, 128, generator=g).to(bf)
        decode_score.quest_scores(q, kmin, kmin + 1, page_size=16)
        decode_score.quest_scores(q, kmin.to(torch.float8_e5m2), (kmin + 1).to(torch.float8_e5m2), page_size=16)
        decode_score.quest_scores(q, kmin.to(torch.float8_e5m2), (kmin + 1).to(torch.float8_e5m2), page_size=16,
                                  group_reduce="max_norm")  # the page box (float atomics) and the ceiling

    @case("decode/select_pages")
    def _():
        scores = torch.randn(1, 8, P, generator=g)
        decode_topk.select_pages(scores, 256, kv_len=kv_len, page_size=16, keep_first=True)

    @case("decode/select_attend (Quest's top-k in the split pass, 128K + 48 tokens of pages)")
    def _():
        q, k, v = qkv(S=S, Sq=1)
        scores = torch.randn(1, 8, 8195, generator=g)
        for splits in (1, 16):  # 16: an H100's / H200's batch-1 launch (132 SMs), one 256-key tile a program
            select_attend.select_attend(q, k, v, scores, 256, kv_len=kv_len, page_size=16, n_splits=splits)
        stamps = torch.zeros(8 * 16 * select_attend.SLOTS.value, dtype=torch.int64)  # the timer probe's variant
        select_attend.select_attend(q, k, v, scores, 256, kv_len=kv_len, page_size=16, n_splits=16, stamps=stamps)

    @case("decode/split-KV paged")
    def _():
        q, k, v = qkv(S=S, Sq=1)
        pages = torch.randint(0, P, (1, 8, 256), generator=g, dtype=torch.int32)
        counts = torch.full((1, 8), 256, dtype=torch.int32)
        decode_attention.paged_decode_attention(q, k, v, pages, counts, 16, kv_end=kv_len)

    @case("decode/split-KV dense + logits (TidalDecode selection)")
    def _():
        q, k, v = qkv(S=S, Sq=1)
        decode_attention.paged_decode_attention(q, k, v, return_lse=True, logits=torch.zeros(1, 32, S))

    @case("decode/split-KV head map + ring (DuoAttention)")
    def _():
        q, k, v = qkv(S=S, Sq=1)
        heads, ring_heads = torch.arange(0, 8, 2, dtype=torch.int32), torch.arange(1, 8, 2, dtype=torch.int32)
        decode_attention.paged_decode_attention(
            q, k[:, :4], v[:, :4], kv_heads=heads, group=4, kv_end=kv_len,
            ring=(k[:, 4:, :320], v[:, 4:, :320], ring_heads), out=torch.zeros(1, 32, 1, 128, dtype=bf))

    @case("decode/split-KV paged D256 softcap (Gemma 2)")
    def _():
        q, k, v = qkv(Hq=16, S=S, Sq=1, D=256)
        pages = torch.randint(0, P, (1, 8, 256), generator=g, dtype=torch.int32)
        decode_attention.paged_decode_attention(q, k, v, pages, torch.full((1, 8), 256, dtype=torch.int32), 16,
                                                kv_end=kv_len, softcap=50.0)

    @case("decode/append (ring + page bounds)")
    def _():
        _, k, v = qkv(S=S, Sq=1)
        k_new, v_new = k[:, :, :1].clone(), v[:, :, :1].clone()
        kv_map = decode_append.append_map(torch.arange(0, 8, 2), torch.arange(1, 8, 2), 8)
        kmin = torch.zeros(1, 4, P, 128, dtype=bf)
        decode_append.append_token(k_new, v_new, torch.tensor(100), k[:, :4].clone(), v[:, :4].clone(),
                                   kv_map=kv_map, ring=(torch.zeros(1, 4, 320, 128, dtype=bf),
                                                        torch.zeros(1, 4, 320, 128, dtype=bf), 64, 256),
                                   bounds=(kmin, kmin.clone()))
        kmin8 = kmin.to(torch.float8_e5m2)  # float8 bounds: folded with outward rounding
        decode_append.append_token(k_new, v_new, torch.tensor(100), k.clone(), v.clone(), bounds=(kmin8, kmin8.clone()))

    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--only", default=None, help="run the cases whose name contains this string")
    ap.add_argument("--json", default=None, help="write the per-kernel records here")
    ap.add_argument("--strict", action="store_true", help="register spills fail the case too")
    args = ap.parse_args(argv)
    records = _install_fakes(args.arch)

    import triton

    limit = SMEM_LIMIT.get(args.arch, 99 * 1024)
    cases = [c for c in _cases() if args.only is None or args.only in c[0]]
    if not cases:
        print(f"no case matches --only {args.only!r}", file=sys.stderr)
        return 2
    print(f"Triton {triton.__version__}, sm_{args.arch}, {len(cases)} cases", flush=True)
    rows, failed = [], []
    for name, fn in cases:
        start, t0 = len(records), time.time()
        try:
            fn()
            error = None
        except Exception as e:  # noqa: BLE001 - report every case, then fail at the end
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
            if os.environ.get("COMPILE_CHECK_TRACE"):
                traceback.print_exc()
        new = records[start:]
        bad = [r for r in new if r["smem"] > limit or (args.strict and r["spill"])]
        status = "FAIL" if error or bad else "ok"
        kernels = ", ".join(f"{r['kernel']} {r['regs']}r/{r['smem'] // 1024}K/{r['warps']}w"
                            + (f" SPILL {r['spill']}B" if r["spill"] else "")
                            + (" SMEM>LIMIT" if r["smem"] > limit else "") for r in new) or "(cached)"
        print(f"{status:4} {name:58} {time.time() - t0:5.1f}s  {kernels}" + (f"\n     {error}" if error else ""),
              flush=True)
        rows.append(dict(case=name, error=error, kernels=new))
        if status == "FAIL":
            failed.append(name)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(triton=triton.__version__, arch=args.arch, cases=rows), indent=1))
    spills = sorted({r["kernel"] for row in rows for r in row["kernels"] if r["spill"]})
    print(f"{len(cases) - len(failed)}/{len(cases)} cases compiled" + (f"; failed: {failed}" if failed else "")
          + (f"; kernels with spills in some configuration: {', '.join(spills)}" if spills else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
