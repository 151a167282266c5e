"""Plots of the GPU benchmark results (run on any machine after the JSON files are committed; needs matplotlib).

    python scripts/plot_results.py            # every results/*.json it knows, PNG next to each
    python scripts/plot_results.py results/bench_e2e_llama8b_sweep.json   # just these

- bench_block_sparse.json -> bench_block_sparse.png: time against kept share, Triton / FA4 / Flex, per context,
  with the dense FA4 and SDPA times as lines;
- bench_prefill.json -> bench_prefill.png: speedup over dense FA4 of each policy's attention stage (estimation +
  sparse attention), per context, split into plan and attention;
- bench_e2e_*.json -> bench_e2e_*.png: time-to-first-token speedup against transformers sdpa per run and context.
"""

from __future__ import annotations

import argparse
import json
import os


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_block_sparse(path: str) -> str:
    plt = _plt()
    with open(path) as f:
        res = json.load(f)
    contexts = sorted({r["context"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4))
    axes = axes if len(contexts) > 1 else [axes]
    for ax, S in zip(axes, contexts):
        rows = sorted((r for r in res["rows"] if r["context"] == S), key=lambda r: r["kept_share"])
        x = [100 * r["kept_share"] for r in rows]
        for key, label, style in (("triton_ms", "accel Triton", "o-"), ("fa4_ms", "FA4 block-sparse", "s--"),
                                  ("flex_ms", "FlexAttention", "^:"), ("sparse_floor_ms", "FLOP floor", "k-")):
            pts = [(xi, r[key]) for xi, r in zip(x, rows) if key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=label, lw=1 if key == "sparse_floor_ms" else 1.8)
        dense = res["dense"].get(str(S), {})
        for key, label, color in (("fa4_dense_ms", "FA4 dense", "tab:red"), ("sdpa_ms", "SDPA dense", "tab:gray")):
            if key in dense:
                ax.axhline(dense[key], color=color, ls="--", lw=1, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("kept share of causal 128x128 blocks (%)")
        ax.set_ylabel("ms")
        ax.set_title(f"{S // 1024}K tokens, {res['meta']['device']}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Block-sparse attention forward, Llama-3.1-8B heads (32/8/128), bf16")
    fig.tight_layout()
    out = path[:-5] + ".png"
    fig.savefig(out, dpi=110)
    return out


def plot_prefill(path: str) -> str:
    plt = _plt()
    with open(path) as f:
        res = json.load(f)
    ctxs = res["contexts"]
    fig, axes = plt.subplots(1, len(ctxs), figsize=(5.5 * len(ctxs), 4))
    axes = axes if len(ctxs) > 1 else [axes]
    for ax, c in zip(axes, ctxs):
        ref = c["dense"].get("fa4_ms") or c["dense"].get("sdpa_ms")
        rows = [p for p in c["policies"] if "total_ms" in p]
        names = [p["policy"] for p in rows]
        plan = [p["plan_ms"] for p in rows]
        attn = [p["total_ms"] - p["plan_ms"] for p in rows]
        ax.bar(names, attn, label="sparse attention")
        ax.bar(names, plan, bottom=attn, label="estimation + selection")
        ax.axhline(ref, color="tab:red", ls="--", label="dense FA4" if c["dense"].get("fa4_ms") else "dense SDPA")
        top = ref * 1.25  # bars slower than dense are clipped at the top (their label says so)
        for i, p in enumerate(rows):
            ax.text(i, min(p["total_ms"], top * 0.9), f"{ref / p['total_ms']:.1f}x\nrecall {p['recall']:.2f}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, top)
        ax.set_ylabel("ms")
        ax.set_title(f"{c['context'] // 1024}K tokens")
        ax.tick_params(axis="x", labelrotation=20)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Prefill attention stage per layer, {res['meta']['device']}")
    fig.tight_layout()
    out = path[:-5] + ".png"
    fig.savefig(out, dpi=110)
    return out


def plot_e2e(path: str) -> str:
    """TTFT speedup against transformers sdpa per run and context; with decode rows, a second panel of eager decode
    tokens/s against sdpa's."""
    plt = _plt()
    with open(path) as f:
        res = json.load(f)
    rows = [r for r in res["rows"] if "ttft_s" in r]
    ctxs = sorted({r["context"] for r in rows})
    runs = list(dict.fromkeys(r["run"] for r in rows))
    panels = [("ttft_s", "time-to-first-token speedup vs transformers sdpa", False)]
    if any("decode_tok_s" in r for r in rows):
        panels.append(("decode_tok_s", "eager decode tokens/s vs transformers sdpa", True))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors  # up to 20 runs, each its own colour
    for ax, (key, label, higher) in zip(axes[0], panels):
        base = {r["context"]: r[key] for r in rows if r["run"] == "sdpa" and key in r}
        for i, run in enumerate(runs):
            pts = [(r["context"] // 1024, r[key] / base[r["context"]] if higher else base[r["context"]] / r[key])
                   for r in rows if r["run"] == run and r["context"] in base and key in r]
            if pts:
                ax.plot(*zip(*pts), "os^vD"[i % 5] + "-", color=colors[i % 20], label=run)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([c // 1024 for c in ctxs], [f"{c // 1024}K" for c in ctxs])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{res['meta']['model']} ({res['meta']['device']})")
    fig.tight_layout()
    out = path[:-5] + ".png"
    fig.savefig(out, dpi=110)
    return out


def plot_static_decode(path: str) -> str:
    """Decode tokens/s over a static cache against accel dense (same SDPA, native GQA), per run and batch."""
    plt = _plt()
    with open(path) as f:
        res = json.load(f)
    rows = [r for r in res["rows"] if "tok_s" in r]
    base = {(r["context"], r["batch"]): r["tok_s"] for r in rows if r["run"] == "dense"}
    ctxs = sorted({r["context"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in dict.fromkeys(r["run"] for r in rows):
        if run == "dense":
            continue
        for batch in sorted({r["batch"] for r in rows}):
            pts = [(r["context"] // 1024, r["tok_s"] / base[(r["context"], batch)]) for r in rows
                   if r["run"] == run and r["batch"] == batch and (r["context"], batch) in base]
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{run}, batch {batch}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([c // 1024 for c in ctxs], [f"{c // 1024}K" for c in ctxs])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s vs accel dense")
    ax.set_title(f"decode over a static cache, {res['meta']['mode']} ({res['meta']['device']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = path[:-5] + ".png"
    fig.savefig(out, dpi=110)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results")
    ap.add_argument("files", nargs="*", help="plot only these JSON files (default: every known one under --results)")
    args = ap.parse_args(argv)
    paths = args.files or [os.path.join(args.results, n) for n in sorted(os.listdir(args.results))]
    for path in paths:
        name = os.path.basename(path)
        fn = {"bench_block_sparse.json": plot_block_sparse, "bench_prefill.json": plot_prefill}.get(name)
        if fn is None and name.startswith("bench_e2e_") and name.endswith(".json"):
            fn = plot_e2e
        if fn is None and name.startswith("bench_static_decode") and name.endswith(".json"):
            fn = plot_static_decode
        if fn is not None:
            print(fn(path))


if __name__ == "__main__":
    main()
