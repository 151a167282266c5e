"""End-to-end decode speed over transformers' static cache, without Python overhead: every run's decode step is
captured once as a CUDA graph (``--mode graph``, eager kernels) or compiled by ``torch.compile(mode=
"reduce-overhead")`` (``--mode compile``, what ``generate`` does with a static cache), then replayed.

A Llama-3.1-8B-shaped model with random weights (speed depends on shapes only). Each run: a StaticCache of
``context + steps + 16`` slots, a 16-token eager prefill (installs the policy's cache layers), the rest of the
context filled with random keys/values written through the layers' own ``update`` (so Quest's page bounds are
built the way decode builds them), a warm-up, then ``--steps`` timed steps, each feeding its greedy token back.
Runs: ``sdpa`` (transformers' own attention), ``dense`` (accel, dense decode) and decode policies with a static
form (``quest``, ``tidal``, ``duo`` and ``lserve`` with random gates at ``ratio`` 0.5, ``quest:budget=2048``). Tokens/s = batch * steps / time.

    python scripts/bench_static_decode.py --contexts 131072 --batches 1 4 --out results/bench_static_decode
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_e2e import build_model, model_config, speed_head_map  # noqa: E402
from bench_utils import err as _err  # noqa: E402
from bench_utils import kernel_switches, meta_lines, parse_spec, write_json, write_markdown  # noqa: E402

import accel  # noqa: E402


def fill(cache, n: int, chunk: int = 8192) -> None:
    """Append ``n`` random tokens to every layer through its own update (page bounds included)."""
    dev = cache.layers[0].keys.device
    g = torch.Generator(device=dev).manual_seed(0)
    for layer in cache.layers:
        B, H, D = layer.batch_size, layer.num_heads, layer.k_head_dim
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            k = torch.randn(B, H, m, D, device=dev, dtype=layer.keys.dtype, generator=g)
            v = torch.randn(B, H, m, D, device=dev, dtype=layer.keys.dtype, generator=g)
            layer.update(k, v)


def filled_cache(model, ctx: int, batch: int, steps: int):
    """A StaticCache of ``ctx + steps + 16`` slots holding ``ctx`` tokens plus two eager decode steps: a 16-token
    eager prefill (installs the patched policy's cache layers), random keys/values through the layers' own update,
    two eager steps (the hooks run, kernels compile). Returns (cache, the last greedy token)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ctx + steps + 16)
    tok = torch.randint(10, 1000, (batch, 16), device=model.device)
    out = model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
    fill(cache, ctx - 16)
    tok = out.logits[:, -1:].argmax(-1)
    for _ in range(2):
        tok = model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return cache, tok


def patch_decode(model, run: str, model_name: str) -> None:
    """Patch ``model`` for a decode run ``POLICY[:key=value,...]`` (dense prefill, backend auto); duo and lserve get
    a head map with random gates (random weights: any heads may stream) unless the run names one."""
    name, opts = parse_spec(run)
    if name in ("duo", "lserve") and "duo_map" not in opts:
        opts["duo_map"] = speed_head_map(model, f"/tmp/accel_duo_{model_name}.json")
    accel.patch(model, {"prefill": "dense", "decode": name}, backend="auto", **opts)


def run_one(model, run: str, ctx: int, batch: int, args) -> dict:
    row = {"run": run, "context": ctx, "batch": batch, "mode": args.mode}
    patched = run != "sdpa"
    switches = kernel_switches(run)  # POLICY[:opts][@twolaunch...]
    try:
        spec = switches.__enter__()
        if patched:
            patch_decode(model, spec, args.model)
        else:
            model.set_attn_implementation("sdpa")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            cache, static_tok = filled_cache(model, ctx, batch, args.steps)
            if args.mode == "graph":
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    static_tok = model(static_tok, past_key_values=cache, use_cache=True,
                                       logits_to_keep=1).logits.argmax(-1)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    nxt = model(static_tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)

                def step():
                    graph.replay()
                    static_tok.copy_(nxt)
            else:
                compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
                t0 = time.perf_counter()
                for _ in range(3):  # compile + cudagraph warm-up
                    static_tok = compiled(static_tok, past_key_values=cache, use_cache=True,
                                          logits_to_keep=1).logits.argmax(-1).clone()
                torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - t0

                def step():
                    nonlocal static_tok
                    static_tok = compiled(static_tok, past_key_values=cache, use_cache=True,
                                          logits_to_keep=1).logits.argmax(-1).clone()
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            if args.profile:
                row["profile"] = profile_steps(step, args, f"{run}_{ctx // 1024}k_b{batch}")
        row["step_ms"] = dt / args.steps * 1e3
        row["tok_s"] = batch * args.steps / dt
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["kv_cache_gib"] = accel.cache_bytes(cache) / 2**30
        if patched:
            row["backends"] = accel.stats(model).get("backends_used")
        del cache
    except Exception as e:  # noqa: BLE001 - a run that cannot run is recorded, not fatal
        row["error"] = _err(e)
    finally:
        switches.__exit__(None, None, None)
        if patched:
            accel.unpatch(model)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def profile_steps(step, args, tag: str, n: int = 4) -> str:
    """Kernel table (CUDA time per step, top rows) of ``n`` replayed steps; written next to ``--out``. Returns the
    path (or the table when there is no ``--out``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=80, max_name_column_width=90)
    total = sum(e.self_device_time_total for e in prof.key_averages()) / n / 1e3
    text = f"# {tag}: {n} steps, {total:.3f} ms of kernel time per step\n{table}"
    print(text, flush=True)
    if not args.out:
        return text
    path = f"{args.out}_profile_{tag}.txt"
    with open(path, "w") as f:
        f.write(text)
    return os.path.relpath(path, ROOT)


def write(results: dict, out: str) -> None:
    write_json(results, out)
    m = results["meta"]
    lines = [f"# Decode over a static cache, {m['mode']} ({m['model']})", "", *meta_lines(m),
             f"- random weights, bf16; {m['steps']} timed greedy steps after warm-up; the whole step replayed as a CUDA "
             "graph; speedup = tokens/s against the dense baseline at the same context and batch: `sdpa` "
             "(transformers' attention, unpatched) when it ran, else `dense` (patched, dense decode)", "",
             "| context | batch | run | step ms | tokens/s | vs dense | KV GiB | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['context'] // 1024}K | {r['batch']} | {r['run']} | error: {r['error']} | | | | |")
            continue
        same = [b for b in results["rows"] if b["context"] == r["context"] and b["batch"] == r["batch"]
                and "tok_s" in b]
        base = next((b for name in ("sdpa", "dense") for b in same if b["run"] == name), None)
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "—"
        lines.append(f"| {r['context'] // 1024}K | {r['batch']} | {r['run']} | {r['step_ms']:.2f} | {r['tok_s']:.1f} "
                     f"| {ratio} | {r['kv_cache_gib']:.2f} | {r['peak_gib']:.1f} |")
    write_markdown(lines, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama8b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--runs", nargs="+", default=["sdpa", "dense", "quest", "tidal", "duo", "lserve"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--mode", choices=("graph", "compile"), default="graph")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="also write each run's kernel table (torch profiler)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_static_decode needs a CUDA GPU")
    torch._dynamo.config.recompile_limit = 64
    t0 = time.time()
    model = build_model(model_config(args.model, max(args.contexts) + args.steps + 16))
    rows = [run_one(model, run, ctx, b, args) for ctx in args.contexts for b in args.batches for run in args.runs]
    import transformers
    import triton

    meta = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
            "device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "versions": {"torch": torch.__version__, "triton": triton.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "model": args.model, "mode": args.mode, "steps": args.steps, "wall_s": time.time() - t0}
    if args.out:
        write({"meta": meta, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
