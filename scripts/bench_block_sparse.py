"""Benchmark: Triton block-sparse attention vs FlexAttention (same layout) vs FA4 block-sparse vs dense SDPA / FA4.

Llama-3.1-8B attention shape by default (32 query heads, 8 KV heads, head_dim 128, bf16, causal, batch 1), random
causal 128x128 layouts (first and diagonal blocks always kept) at kept shares of about 3%, 10% and 30% of the causal
blocks. Medians of ``triton.testing.do_bench``. Every baseline runs inside try/except and records an error string
instead of stopping the run. Before timing, each sparse implementation is checked against the torch reference on a
small slice. Writes ``<out>.json`` and ``<out>.md`` (command, device, versions, date).

    PYTHONPATH=. python scripts/bench_block_sparse.py --out results/bench_block_sparse

GPU time: about 2-4 minutes on an H100 with the defaults (most of it FlexAttention compilation and dense 128K SDPA).
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from accel.kernels import reference_sparse as rs  # noqa: E402
from bench_utils import bench  # noqa: E402
from bench_utils import err as _err  # noqa: E402
from accel.kernels.flash import FlashBackend, fa4_block_sparse  # noqa: E402
from accel.kernels.triton.block_sparse import block_sparse_attention  # noqa: E402
from accel.kernels.triton.vertical_slash import plan_vertical_slash, vertical_slash_attention  # noqa: E402
from accel.layouts import BlockLayout, VerticalSlashLayout  # noqa: E402

TRITON_CONFIGS = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages): the default first
    None,
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
]


def pad_indices(idx: torch.Tensor, n: int) -> torch.Tensor:
    if idx.shape[-1] >= n:
        return idx[..., :n].contiguous()
    pad = torch.zeros(*idx.shape[:-1], n - idx.shape[-1], dtype=idx.dtype, device=idx.device)
    return torch.cat([idx, pad], -1).contiguous()


# ------------------------------------------------------------------------------------------------------ baselines


def make_flex(q_len, kv_len, layout: BlockLayout, compile: bool = True):
    """FlexAttention on the same layout: diagonal-crossing blocks get the causal mask_mod, the rest are full."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    nk = -(-kv_len // layout.block_k)
    mc, mi, fc, fi = rs.split_full_partial(layout, q_len, kv_len)
    off = kv_len - q_len

    def causal(b, h, q_idx, kv_idx):
        return q_idx + off >= kv_idx

    bm = BlockMask.from_kv_blocks(mc, pad_indices(mi, nk), fc, pad_indices(fi, nk),
                                  BLOCK_SIZE=(layout.block_q, layout.block_k), mask_mod=causal,
                                  seq_lengths=(q_len, kv_len))
    compiled = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    def run(q, k, v):
        return compiled(q, k, v, block_mask=bm, enable_gqa=True)

    return run


def make_fa4(q_len, kv_len, layout: BlockLayout | None):
    """FA4 (flash_attn.cute) forward, block-sparse when a layout is given; inputs [B, H, S, D] are transposed to
    FA4's [B, S, H, D] once, outside the timed call."""
    from flash_attn.cute import flash_attn_func

    kw = {}
    if layout is not None:  # the same conversion the flash backend uses
        kw["block_sparse_tensors"] = fa4_block_sparse(layout, layout.counts.shape[0], layout.counts.shape[1],
                                                      q_len, kv_len)

    def prepare(q, k, v):
        return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))

    def run(qt, kt, vt):
        out = flash_attn_func(qt, kt, vt, causal=True, **kw)
        return out[0] if isinstance(out, tuple) else out

    return prepare, run


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


# --------------------------------------------------------------------------------------------------------- checks


def correctness(args, device) -> dict:
    """Each sparse implementation vs the torch reference on a small slice (4K, the benchmark's head shape)."""
    S = 4096
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, args.heads, S, args.dim, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, args.kv_heads, S, args.dim, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, args.kv_heads, S, args.dim, device=device, dtype=torch.bfloat16, generator=g)
    layout = rs.random_block_layout(1, args.heads, S, S, args.block, args.block, keep=0.1, device=device)
    ref = rs.block_sparse_attention(q, k, v, layout).float()
    res = {}

    def err(out):
        return float((out.float() - ref).abs().max())

    for name, fn in [
        ("triton", lambda: block_sparse_attention(q, k, v, layout, check=True)),
        ("flex", lambda: make_flex(S, S, layout)(q, k, v)),
        ("fa4", lambda: (lambda p, r: r(*p(q, k, v)).transpose(1, 2))(*make_fa4(S, S, layout))),
        ("fa4_via_accel", lambda: FlashBackend().run(layout, q, k, v, scale=args.dim**-0.5)),
    ]:
        try:
            res[name] = {"max_abs_err": err(fn())}
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is recorded, not fatal
            res[name] = {"error": _err(e)}
    return res


# ----------------------------------------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=800.0, help="dense FLOP floor (H100 bf16 ~800 achievable)")
    ap.add_argument("--baselines", default="triton,flex,fa4,sdpa,fa4_dense")
    ap.add_argument("--tune", action="store_true", default=True, help="time the Triton tile configs at 10%% share")
    ap.add_argument("--no-tune", dest="tune", action="store_false")
    ap.add_argument("--vs", type=int, nargs=2, default=[1000, 6096], metavar=("VERTICAL", "SLASH"),
                    help="vertical-slash section: columns and diagonals per head (MInference defaults); 0 0 skips")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--out", default="results/bench_block_sparse")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_block_sparse needs a CUDA GPU")
    device = torch.device("cuda")
    base = set(args.baselines.split(","))
    t_start = time.time()

    import triton

    meta = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "shape": {"batch": 1, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.dim,
                  "dtype": "bfloat16", "block": args.block, "causal": True},
    }
    try:
        import flash_attn

        meta["versions"]["flash_attn"] = getattr(flash_attn, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        meta["versions"]["flash_attn"] = f"not importable ({_err(e)})"

    results = {"meta": meta, "rows": [], "dense": {}, "tuning": [], "layout_build_ms": {}}
    if not args.skip_check:
        results["correctness"] = correctness(args, device)
        print("correctness:", json.dumps(results["correctness"]), flush=True)

    for S in args.contexts:
        torch.cuda.empty_cache()
        g = torch.Generator(device=device).manual_seed(S)
        q = torch.randn(1, args.heads, S, args.dim, device=device, dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, args.kv_heads, S, args.dim, device=device, dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, args.kv_heads, S, args.dim, device=device, dtype=torch.bfloat16, generator=g)
        causal_flops = 4.0 * args.heads * args.dim * S * (S + 1) / 2  # QK^T and PV over the causal triangle
        floor_ms = causal_flops / (args.peak_tflops * 1e12) * 1e3
        dense = {"dense_floor_ms": floor_ms}
        if "sdpa" in base:
            try:
                dense["sdpa_ms"] = bench(lambda: sdpa(q, k, v))
            except Exception as e:  # noqa: BLE001
                dense["sdpa_error"] = _err(e)
        if "fa4_dense" in base:
            try:
                prep, run = make_fa4(S, S, None)
                qt, kt, vt = prep(q, k, v)
                dense["fa4_dense_ms"] = bench(lambda: run(qt, kt, vt))
                del qt, kt, vt
            except Exception as e:  # noqa: BLE001
                dense["fa4_dense_error"] = _err(e)
        results["dense"][str(S)] = dense
        print(S, "dense", json.dumps(dense), flush=True)

        # layout building cost on the GPU (mask -> layout), for the record
        nq = -(-S // args.block)
        try:
            sel = torch.rand(1, args.heads, nq, nq, device=device) < 0.1
            results["layout_build_ms"][str(S)] = bench(
                lambda: rs.build_block_layout(sel, S, S, args.block, args.block, max_blocks=nq), rep=50)
            del sel
        except Exception as e:  # noqa: BLE001
            results["layout_build_ms"][str(S)] = _err(e)

        for keep in args.keep:
            layout = rs.random_block_layout(1, args.heads, S, S, args.block, args.block, keep=keep, device=device,
                                            seed=int(keep * 1000))
            share = rs.block_layout_density(layout, S, S)
            row = {"context": S, "keep_target": keep, "kept_share": share, "sparse_floor_ms": share * floor_ms}
            if "triton" in base:
                try:
                    row["triton_ms"] = bench(lambda: block_sparse_attention(q, k, v, layout))
                except Exception as e:  # noqa: BLE001
                    row["triton_error"] = _err(e)
                if args.tune and abs(keep - 0.1) < 1e-9:
                    for cfg in TRITON_CONFIGS[1:]:
                        try:
                            ms = bench(lambda: block_sparse_attention(q, k, v, layout, config=cfg))
                            results["tuning"].append({"context": S, "keep": keep, "config": cfg, "ms": ms})
                        except Exception as e:  # noqa: BLE001
                            results["tuning"].append({"context": S, "keep": keep, "config": cfg, "error": _err(e)})
            if "flex" in base:
                try:
                    run = make_flex(S, S, layout)
                    run(q, k, v)  # compile outside the timing
                    row["flex_ms"] = bench(lambda: run(q, k, v))
                except Exception as e:  # noqa: BLE001
                    row["flex_error"] = _err(e)
            if "fa4" in base:
                try:
                    prep, run = make_fa4(S, S, layout)
                    qt, kt, vt = prep(q, k, v)
                    row["fa4_ms"] = bench(lambda: run(qt, kt, vt))
                    del qt, kt, vt
                except Exception as e:  # noqa: BLE001
                    row["fa4_error"] = _err(e)
            for other in ("flex", "fa4"):
                if f"{other}_ms" in row and "triton_ms" in row:
                    row[f"triton_vs_{other}"] = row[f"{other}_ms"] / row["triton_ms"]  # >1: Triton faster
            if "triton_ms" in row:
                row["triton_vs_sparse_floor"] = row["triton_ms"] / row["sparse_floor_ms"]
                if "sdpa_ms" in dense:
                    row["speedup_vs_sdpa"] = dense["sdpa_ms"] / row["triton_ms"]
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            del layout
        if args.vs[0] or args.vs[1]:
            results.setdefault("vertical_slash", []).append(bench_vertical_slash(args, q, k, v, device))
            print(json.dumps(results["vertical_slash"][-1]), flush=True)
        del q, k, v
    results["meta"]["wall_s"] = time.time() - t_start
    write(results, args.out)


def random_vertical_slash(heads, S, n_cols, n_diag, device, seed=0):
    """Random MInference-like layout: sink column 0 and local diagonals 0..63 always; other columns uniform, other
    diagonals skewed towards the main diagonal (offset = S * u**6), as in real heads (uniform ones would touch
    almost every tile at 128K)."""
    g = torch.Generator(device=device).manual_seed(seed)
    cols = torch.randint(0, S, (1, heads, n_cols), device=device, generator=g)
    u = torch.rand(1, heads, n_diag, device=device, generator=g)
    offs = (u**6 * S).long().clamp(max=S - 1)
    cols[..., 0] = 0
    n_local = min(64, n_diag)
    offs[..., :n_local] = torch.arange(n_local, device=device)
    return VerticalSlashLayout(cols, offs)


def bench_vertical_slash(args, q, k, v, device) -> dict:
    """Vertical-slash kernel (plan + attention) vs the equivalent block layout (tiles holding any kept pair) through
    the block-sparse kernel, which computes a superset of the pairs."""
    S = q.shape[2]
    res = {"context": S, "vertical": args.vs[0], "slash": args.vs[1]}
    try:
        layout = random_vertical_slash(args.heads, S, args.vs[0], args.vs[1], device)
        res["plan_ms"] = bench(lambda: plan_vertical_slash(layout, S, S), rep=50)
        plan = plan_vertical_slash(layout, S, S)
        res["kernel_ms"] = bench(lambda: vertical_slash_attention(q, k, v, layout, plan=plan))
        res["mean_slash_tiles"] = float(plan.counts.float().mean())
        res["mean_gathered_columns"] = float(plan.col_counts.float().mean())
        n_tiles = -(-S // plan.block_m)
        res["slash_tile_share"] = res["mean_slash_tiles"] / ((n_tiles + 1) / 2)  # of the causal tiles
        nk = -(-S // plan.block_n)
        tiles = rs.layout_to_block_mask(BlockLayout(plan.counts, plan.indices, plan.block_m, plan.block_n), nk)
        col_tile = (plan.col_indices.long() // plan.block_n).clamp(max=nk - 1)
        valid = torch.arange(plan.col_indices.shape[-1], device=device) < plan.col_counts[..., None]
        tiles = torch.cat([tiles, torch.zeros_like(tiles[..., :1])], -1)
        tiles.scatter_(-1, torch.where(valid, col_tile, nk), True)
        tiles = tiles[..., :nk]
        del plan
        equiv = rs.block_mask_to_layout(tiles, 64, 64)
        res["equivalent_block_share"] = rs.block_layout_density(equiv, S, S)
        res["equivalent_block_ms"] = bench(lambda: block_sparse_attention(q, k, v, equiv))
    except Exception as e:  # noqa: BLE001
        res["error"] = _err(e)
    return res


def _fmt(x, nd=2):
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def write(results, out):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    m = results["meta"]
    lines = [
        "# Block-sparse attention forward",
        "",
        f"- command: `{m['command']}`",
        f"- device: {m['device']}; date: {m['date']}; wall: {m.get('wall_s', 0):.0f} s",
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- shape: {json.dumps(m['shape'])}; medians of triton.testing.do_bench, ms",
        "",
    ]
    if "correctness" in results:
        lines += ["Correctness vs torch reference (4K, kept 10%, bf16 max abs error): " + ", ".join(
            f"{k} {_fmt(v.get('max_abs_err'), 4) if 'max_abs_err' in v else v['error']}"
            for k, v in results["correctness"].items()), ""]
    lines += ["| context | kept share | Triton | Flex | FA4 block-sparse | Flex / Triton | FA4 / Triton | "
              "Triton / sparse floor | SDPA dense | FA4 dense | dense floor |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        d = results["dense"][str(r["context"])]
        lines.append("| " + " | ".join([
            f"{r['context'] // 1024}K", f"{100 * r['kept_share']:.1f}%", _fmt(r.get("triton_ms")),
            _fmt(r.get("flex_ms")), _fmt(r.get("fa4_ms")), _fmt(r.get("triton_vs_flex")),
            _fmt(r.get("triton_vs_fa4")), _fmt(r.get("triton_vs_sparse_floor")), _fmt(d.get("sdpa_ms")),
            _fmt(d.get("fa4_dense_ms")), _fmt(d.get("dense_floor_ms"))]) + " |")
    errors = [f"- {r['context']} @ {r['keep_target']}: {k} = {v}" for r in results["rows"] for k, v in r.items()
              if k.endswith("_error")]
    errors += [f"- dense {s}: {k} = {v}" for s, d in results["dense"].items() for k, v in d.items()
               if k.endswith("_error")]
    if errors:
        lines += ["", "Errors:", *errors]
    if results["tuning"]:
        lines += ["", "Triton tile configs at 10% (default config in the main table):", ""]
        lines += [f"- {t['context'] // 1024}K {json.dumps(t['config'])}: {_fmt(t.get('ms')) if 'ms' in t else t['error']}"
                  for t in results["tuning"]]
    if results.get("vertical_slash"):
        lines += ["", "Vertical-slash (random columns/diagonals per head, 64x64 tiles), ms:", "",
                  "| context | vertical | slash | plan | kernel | equivalent block layout (share) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in results["vertical_slash"]:
            if "error" in r:
                lines.append(f"| {r['context'] // 1024}K | {r['vertical']} | {r['slash']} | error: {r['error']} | | |")
                continue
            lines.append(f"| {r['context'] // 1024}K | {r['vertical']} | {r['slash']} | {_fmt(r.get('plan_ms'))} | "
                         f"{_fmt(r.get('kernel_ms'))} | {_fmt(r.get('equivalent_block_ms'))} "
                         f"({100 * r.get('equivalent_block_share', 0):.1f}%) |")
    if results["layout_build_ms"]:
        lines += ["", "Layout build on the GPU (bool block mask -> BlockLayout, ms): " + ", ".join(
            f"{int(s) // 1024}K {_fmt(v)}" for s, v in results["layout_build_ms"].items())]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
