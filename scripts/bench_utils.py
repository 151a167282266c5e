"""Helpers shared by the GPU benchmark scripts."""

from __future__ import annotations

import contextlib


def err(e: BaseException) -> str:
    """One line describing an exception, for a results table cell."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def bench(fn, rep: int = 100, warmup: int = 25) -> float:
    """Median milliseconds of ``triton.testing.do_bench``."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def parse_spec(text: str) -> tuple[str, dict]:
    """``"quest:budget=2048,page_size=16"`` -> ("quest", {"budget": 2048, "page_size": 16}) (values as the CLI's
    ``--option`` reads them: ints, floats, true/false, none, strings)."""
    from accel.cli import parse_value

    name, _, opts = text.partition(":")
    kw = {}
    for item in filter(None, opts.split(",")):
        key, _, val = item.partition("=")
        kw[key] = parse_value(val)
    return name, kw


def model_policy_spec(entry: str, model_name: str) -> tuple[str, dict]:
    """A demo-model policy entry ``POLICY[@map|@fp8][:key=value,...]`` -> (policy name, options): ``@map`` adds
    ``head_map=vertical_slash_<model_name>`` (the shipped MInference head map), ``@fp8`` ``estimate_dtype="fp8"``;
    options as ``parse_spec`` reads them (they override the suffix's)."""
    head, opts = parse_spec(entry)
    if head.endswith("@map"):
        return head[:-4], {"head_map": f"vertical_slash_{model_name}", **opts}
    if head.endswith("@fp8"):
        return head[:-4], {"estimate_dtype": "fp8", **opts}
    return head, opts


# (the @radix, @fused and @widetopk switches of results/bench_decode_floor_opts_b1.md went with the options they
# set: measured slower and removed, kernels/triton/NOTES.md)
SWITCHES = {"selattend": ("select_attend", "ENABLED", True), "twolaunch": ("select_attend", "ENABLED", False)}


@contextlib.contextmanager
def kernel_switches(run: str):
    """A decode run ``POLICY[:opts][@switch...]``: yields ``POLICY[:opts]`` with the switches set on the kernel
    modules for the run, restored after: ``@selattend`` / ``@twolaunch`` (Quest's top-k inside the split launch or its own, select_attend.ENABLED)."""
    import importlib

    spec, *names = run.split("@")
    saved = []
    try:
        for name in names:
            if name not in SWITCHES:
                raise ValueError(f"unknown switch @{name} in {run!r}: use one of "
                                 + ", ".join(f"@{k}" for k in SWITCHES))
            mod, attr, value = SWITCHES[name]
            mod = importlib.import_module(f"accel.kernels.triton.{mod}")
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, value)
        yield spec
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)


def write_json(results: dict, out: str) -> None:
    """``out + ".json"``, creating its folder."""
    import json
    import os

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(results, f, indent=1)


def write_markdown(lines: list[str], out: str) -> None:
    """``out + ".md"`` from the table's lines, also printed."""
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def graph_of(run):
    """``run`` (no arguments, no host sync) captured as a CUDA graph, after one call on a side stream as capture
    requires, and replayed three times."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_ms(graph, reps: int = 20) -> float:
    """Median ms of one replay of ``graph`` (CUDA events around each)."""
    import torch

    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def meta_lines(m: dict) -> list[str]:
    """The markdown header bullets every results file carries: command, device and date, versions."""
    return [f"- command: `{m['command']}`", f"- device: {m['device']}; date: {m['date']}; wall {m.get('wall_s', 0):.0f} s",
            f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}"]


def compiled_decode(model, cache, tok, steps: int) -> dict:
    """Greedy decode over a static ``cache`` with the step compiled by ``torch.compile(mode="reduce-overhead",
    fullgraph=True)`` (what ``generate`` does with a static cache on a GPU): two eager steps (the policy's hooks
    install their layers, kernels compile), three compiled warm-ups (compilation and CUDA-graph capture, timed as
    ``compile_s``), two replays, then ``steps`` timed replays each feeding its greedy token back. ``tok`` [B, 1]."""
    import time

    import torch

    kw = dict(past_key_values=cache, use_cache=True, logits_to_keep=1)
    with torch.no_grad():
        for _ in range(2):
            tok = model(tok, **kw).logits.argmax(-1)
        torch.cuda.synchronize()
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        t0 = time.perf_counter()
        for _ in range(3):
            tok = compiled(tok, **kw).logits.argmax(-1).clone()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            tok = compiled(tok, **kw).logits.argmax(-1).clone()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            tok = compiled(tok, **kw).logits.argmax(-1).clone()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    return {"step_ms": dt / steps * 1e3, "tok_s": tok.shape[0] * steps / dt, "compile_s": compile_s}
