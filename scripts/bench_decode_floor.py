"""Every decode policy's attention of one decode step against dense and against its byte floor (GPU).

The attention alone, as a compiled static-cache step runs it: for each layer of a Llama-3.1-8B-shaped model (random
weights) patched with the policy, ``accel.attention._static_decode`` (the function the patched attention calls for a
one-token step over transformers' StaticCache) over the filled cache, with a random query; the layers' calls compiled
together by ``torch.compile`` (as in the compiled step: the policies' torch ops fused by inductor, the Triton
kernels opaque; ``--eager`` skips it) and captured as one CUDA graph, so the L2 is as cold as in a model step (a
single layer replayed alone keeps its selected pages in L2), and replayed. No projections, no cache append: only
what the attention of a step reads and computes (page scoring, top-k, split-KV attention and its combine; dense
layers through SDPA, as ``dense`` runs).

Byte floor = bytes a dense step's attention reads / bytes the policy's step must read, over the same layers (K and V
of every position read; quest and lserve also their page bounds; duo and lserve's streaming heads their sink +
recent ring; tidal's selection layers are dense layers whose attention also hands back the scores it ranks keys
by; layers a policy keeps dense count as dense). The share of the floor reached = (speedup against dense) / floor.

With the length frozen across replays, ``lserve`` (re-selection every 4 steps) measures the steps that reuse the
selection and ``lserve:reuse_steps=1`` the steps that select; the table adds their 4-step cycle (1 selecting + 3
reusing) when both ran.

    python scripts/bench_decode_floor.py --batches 1 4 --out results/bench_decode_floor
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_e2e import build_model, model_config  # noqa: E402
from bench_static_decode import filled_cache, patch_decode  # noqa: E402
from bench_utils import err as _err  # noqa: E402
from bench_utils import graph_of, kernel_switches, meta_lines, replay_ms, write_json, write_markdown  # noqa: E402

import accel  # noqa: E402

RUNS = ["dense", "quest", "tidal", "duo", "lserve", "lserve:reuse_steps=1"]


def _patched(model) -> list:
    mods = [m for m in model.modules() if hasattr(m, "_accel")]
    if not mods:
        raise ValueError("the model is not patched: accel.patch it first")
    return mods


def attention_calls(model, cache, batch: int, seed: int = 1) -> list:
    """One callable per patched attention layer: its one-token static-cache attention over ``cache`` (filled) with a
    fixed random query, transformers' boolean mask of the filled slots, default scale. Each returns [B, 1, Hq, D]."""
    from accel.attention import _static_decode

    cfg = getattr(model.config, "text_config", None) or model.config
    hq = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    dev = cache.layers[0].keys.device
    g = torch.Generator(device=dev).manual_seed(seed)
    calls = []
    for mod in _patched(model):
        state = mod._accel
        layer = cache.layers[state.layer_idx]
        k, v = layer.keys, layer.values  # what the cache update hands the attention (Duo: the retrieval heads)
        S = k.shape[2]
        mask = (torch.arange(S, device=dev) < layer.cumulative_length).view(1, 1, 1, S).expand(batch, 1, 1, S)
        q = torch.randn(batch, hq, 1, d, device=dev, dtype=k.dtype, generator=g)
        calls.append(functools.partial(_first, _static_decode, state, q, k, v, mask, d**-0.5, None))
    return calls


def _first(fn, *args):
    return fn(*args)[0]  # the attention function's (output, weights)


def attention_bytes(model, cache) -> tuple[int, int]:
    """(policy, dense): bytes one decode step's attention must read over every patched layer at the cache's length.
    See the module docstring for what each policy reads; LServe with reuse (``reuse_steps`` > 1) counts a reusing
    step (selected pages only), without it a selecting step (page bounds + selected pages)."""
    return byte_totals(layer_reads(model, cache))


def byte_totals(reads: list[tuple[list[int], int]]) -> tuple[int, int]:
    """(policy, dense) bytes of a step from ``layer_reads``."""
    return sum(sum(p) for p, _ in reads), sum(d for _, d in reads)


def layer_reads(model, cache) -> list[tuple[list[int], int]]:
    """Per patched layer: (the policy's reads as dependent launches, in bytes; the dense layer's bytes). A layer
    that selects pages must read their bounds before it can read them (two launches: Quest, LServe's selecting
    steps); every other layer's reads can go in one launch (``--launch-floor`` times these chains)."""
    out = []
    for mod in _patched(model):
        state = mod._accel
        layer, handle, policy = cache.layers[state.layer_idx], state.static_layer, state.spec.decode
        L = int(layer.cumulative_length)
        B, D, el = layer.keys.shape[0], layer.keys.shape[-1], layer.keys.element_size()

        def kv(heads: int, n: int) -> int:  # K and V of n positions
            return 2 * B * heads * n * D * el

        def bounds(heads: int, page: int) -> int:  # key min and max of every filled page
            return 2 * B * heads * -(-L // page) * D * layer.kmin.element_size()

        dense = kv(layer.num_heads, L)
        if handle is None:  # a layer the policy keeps dense
            out.append(([dense], dense))
            continue
        if policy.name == "tidal":  # a selection layer attends densely and ranks keys by those scores
            out.append(([kv(layer.num_heads, L if handle.select else min(policy.budget, L))], dense))
            continue
        hr = layer.keys.shape[1]  # retrieval heads (Duo / LServe layers) or every head (a paged layer)
        ring = getattr(layer, "skeys", None)
        ring_b = kv(ring.shape[1], min(L, ring.shape[2])) if ring is not None else 0
        if policy.name == "quest":
            reads = [bounds(hr, policy.page_size), ring_b + kv(hr, min(policy.budget, L))]
        elif policy.name == "lserve":
            phys = policy.physical_page_size
            n_keep = min(policy.budget // phys, -(-L // phys))
            reused = getattr(layer, "lserve_reuse", None) is not None
            pages = ring_b + kv(hr, n_keep * phys)
            reads = [pages] if reused else [bounds(hr, policy.page_size), pages]
        else:  # duo / streaming: the retrieval heads' whole buffer
            reads = [ring_b + kv(hr, L)]
        out.append(([r for r in reads if r], dense))
    return out


def graph_ms(run, reps: int = 20, profile: str | None = None) -> float:
    """Median ms of one replay of a CUDA graph holding one call of ``run`` (warmed up before). ``profile``: also
    write the kernel table of 4 replays (torch profiler, CUDA time per replay) to that path."""
    graph = graph_of(run)
    ms = replay_ms(graph, reps)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(4):
                graph.replay()
            torch.cuda.synchronize()
        with open(profile, "w") as f:
            f.write("# kernel time of 4 replays (one decode step's attention each)\n"
                    + p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    return ms


def run_one(model, run: str, ctx: int, batch: int, args) -> dict:
    """``run``: a policy spec (``quest``, ``quest:group_reduce=max_norm``), optionally with kernel switches
    (``quest@twolaunch``: bench_utils.kernel_switches)."""
    row = {"run": run, "context": ctx, "batch": batch}
    switches = kernel_switches(run)
    try:
        patch_decode(model, switches.__enter__(), args.model)
        torch.cuda.empty_cache()
        with torch.no_grad():
            cache, _ = filled_cache(model, ctx, batch, 16)
            calls = attention_calls(model, cache, batch)
            before = _paths(model)
            outs = [c() for c in calls]  # eager warm-up (kernels compile; LServe selects once)
            bad = [i for i, o in enumerate(outs) if not bool(torch.isfinite(o).all())]
            if bad:
                raise RuntimeError(f"non-finite attention output in layers {bad}")
            row["paths"] = {k: v - before.get(k, 0) for k, v in _paths(model).items()}

            def step():
                return [c() for c in calls]

            if not args.eager:  # as the compiled model step runs it: torch ops fused by inductor
                step = torch.compile(step, fullgraph=True)
                for _ in range(2):
                    step()
            tag = run.replace(":", "_").replace("=", "")
            path = f"{args.out}_profile_{tag}_b{batch}.txt" if args.profile and args.out else None
            row["attn_ms"] = graph_ms(step, args.reps, profile=path)
        reads = layer_reads(model, cache)
        row["policy_bytes"], row["dense_bytes"] = byte_totals(reads)
        row["layers"] = len(calls)
        del cache, calls, outs
        if args.launch_floor:
            from read_floor import launch_floor_ms

            torch.cuda.empty_cache()
            row["launch_floor"] = launch_floor_ms([r for r, _ in reads])
            row["dense_launch_floor"] = launch_floor_ms([[d] for _, d in reads])
    except Exception as e:  # noqa: BLE001 - a run that cannot run is recorded, not fatal
        row["error"] = _err(e)
    finally:
        switches.__exit__(None, None, None)
        accel.unpatch(model)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print(row, flush=True)
    return row


def _paths(model) -> dict:
    """Decode attention paths taken so far, summed over layers (static-paged: the policy's own decode)."""
    total: dict = {}
    for mod in _patched(model):
        for k, v in mod._accel.backends_used.items():
            total[k] = total.get(k, 0) + v
    return total


def _cycle(rows: list) -> dict | None:
    """LServe's 4-step cycle (one selecting step, three reusing) from its two runs, when both ran."""
    sel = next((r for r in rows if r["run"] == "lserve:reuse_steps=1" and "attn_ms" in r), None)
    reu = next((r for r in rows if r["run"] == "lserve" and "attn_ms" in r), None)
    if sel is None or reu is None:
        return None
    row = {"run": "lserve, 4-step cycle", "context": sel["context"], "batch": sel["batch"],
           "attn_ms": (sel["attn_ms"] + 3 * reu["attn_ms"]) / 4, "layers": sel["layers"],
           "policy_bytes": (sel["policy_bytes"] + 3 * reu["policy_bytes"]) / 4, "dense_bytes": sel["dense_bytes"]}
    if "launch_floor" in sel and "launch_floor" in reu:
        row["launch_floor"] = {"ms": (sel["launch_floor"]["ms"] + 3 * reu["launch_floor"]["ms"]) / 4}
        row["dense_launch_floor"] = sel["dense_launch_floor"]
    return row


def _launch_cells(r: dict, speed: float, floor: float) -> str:
    """The launch-floor columns of a row: the speedup a graph of plain reads reaches with the policy's launches per
    layer, that as a share of the byte floor, and the share of it the policy reaches."""
    if "launch_floor" not in r:
        return " | | |"
    reach = r["dense_launch_floor"]["ms"] / r["launch_floor"]["ms"]
    return f" {reach:.2f}x | {reach / floor:.0%} | {speed / reach:.0%} |"


def write(results: dict, out: str) -> None:
    write_json(results, out)
    m = results["meta"]
    lines = [f"# Decode attention of every policy against its byte floor ({m['model']})", "", *meta_lines(m),
             f"- the attention of one decode step alone (every layer's `_static_decode` over the filled static cache, "
             f"random queries, {'launched eagerly' if m.get('eager') else 'compiled by torch.compile'}, all layers "
             "in one CUDA graph, median of replays); floor = dense bytes / policy bytes "
             "read per step (scripts/bench_decode_floor.py says what each policy reads); share = speedup / floor", "",
             "| context | batch | run | attention ms/step | us/layer | vs dense | byte floor | share of floor | "
             "GB read | TB/s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    launch = any("launch_floor" in r for r in results["rows"])
    if launch:  # three more columns (see _launch_cells)
        lines[-2] += " launch floor | launch floor / byte floor | share of launch floor |"
        lines[-1] += " --- | --- | --- |"
    groups: dict = {}
    for r in results["rows"]:
        groups.setdefault((r["context"], r["batch"]), []).append(r)
    for (ctx, batch), rows in groups.items():
        cyc = _cycle(rows)
        base = next((r for r in rows if r["run"] == "dense" and "attn_ms" in r), None)
        for r in rows + ([cyc] if cyc else []):
            if "error" in r:
                lines.append(f"| {ctx // 1024}K | {batch} | {r['run']} | error: {r['error']} | | | | | | |")
                continue
            speed = base["attn_ms"] / r["attn_ms"] if base else float("nan")
            floor = r["dense_bytes"] / r["policy_bytes"]
            lines.append(f"| {ctx // 1024}K | {batch} | {r['run']} | {r['attn_ms']:.3f} | "
                         f"{r['attn_ms'] * 1e3 / r['layers']:.1f} | {speed:.2f}x | {floor:.2f}x | {speed / floor:.0%} | "
                         f"{r['policy_bytes'] / 1e9:.2f} | {r['policy_bytes'] / r['attn_ms'] / 1e9:.2f} |"
                         + (_launch_cells(r, speed, floor) if launch else ""))
    if launch:
        lines += ["", "launch floor: dense's reads over the policy's reads, each timed as a CUDA graph of plain read "
                  "kernels (scripts/read_floor.py), one launch per dependent read of a layer (Quest and a selecting "
                  "LServe step: the page bounds, then the pages; every other layer: one): a measured bound that kernels "
                  "which also compute should not beat with that many launches per layer; launch floor / byte floor "
                  "is the share of the byte floor within their reach."]
    write_markdown(lines, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama8b")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--runs", nargs="+", default=RUNS)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="also write each run's kernel table next to --out")
    ap.add_argument("--launch-floor", action="store_true",
                    help="also time each run's reads alone, one plain read kernel per dependent launch of a layer "
                         "(scripts/read_floor.py): the best speedup that many launches per layer allow")
    ap.add_argument("--eager", action="store_true",
                    help="capture the attention calls as launched eagerly (default: torch.compile them first, as "
                         "the compiled model step does, so the policies' torch ops are fused)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_floor needs a CUDA GPU")
    t0 = time.time()
    model = build_model(model_config(args.model, args.context + 32))
    rows = [run_one(model, run, args.context, b, args) for b in args.batches for run in args.runs]
    import transformers
    import triton

    meta = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
            "device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "versions": {"torch": torch.__version__, "triton": triton.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "model": args.model, "eager": args.eager, "wall_s": time.time() - t0}
    if args.out:
        write({"meta": meta, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
