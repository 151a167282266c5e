"""Plots of an accel-eval grid: needle depth × length heatmaps per policy, accuracy against length per policy."""

from __future__ import annotations

from pathlib import Path

__all__ = ["needle_heatmaps", "accuracy_vs_length", "plots_available"]


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def needle_heatmaps(cells: list[dict], policies: list[str], lengths: list[int], path: Path,
                    task: str = "niah_single", title: str = "") -> Path | None:
    """One panel per policy: mean score per (needle depth, length) of `task`."""
    rows = [c for c in cells if c["task"] == task]
    if not rows:
        return None
    plt = _plt()
    depths = sorted({s["depth"] for c in rows for s in c["samples"] if s.get("depth") is not None})
    if not depths:
        return None
    fig, axes = plt.subplots(1, len(policies), figsize=(2.2 + 1.0 * len(lengths) * len(policies), 3.6),
                             squeeze=False)
    im = None
    for ax, pol in zip(axes[0], policies):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for c in rows:
            if c["policy"] != pol or c["length"] not in lengths:
                continue
            j = lengths.index(c["length"])
            for i, d in enumerate(depths):
                vals = [s["score"] for s in c["samples"] if s.get("depth") == d]
                if vals:
                    grid[i][j] = sum(vals) / len(vals)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(pol, fontsize=9)
        ax.set_xlabel("prompt tokens")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, f"{grid[i][j]:.1f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="score")
    fig.suptitle(title or f"{task}: needle depth × length", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def accuracy_vs_length(cells: list[dict], policies: list[str], lengths: list[int], tasks: list[str], path: Path,
                       title: str = "") -> Path:
    """Mean score over tasks against prompt length, one line per policy (plus one thin panel per task)."""
    plt = _plt()
    n = len(tasks) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False, sharey=True)
    by = {(c["policy"], c["length"], c["task"]): c["score"] for c in cells}
    for k, (ax, name) in enumerate(zip(axes[0], ["mean over tasks", *tasks])):
        for pol in policies:
            xs, ys = [], []
            for ln in lengths:
                vals = [by[(pol, ln, t)] for t in (tasks if k == 0 else [name]) if (pol, ln, t) in by]
                if vals:
                    xs.append(ln)
                    ys.append(sum(vals) / len(vals))
            ax.plot(xs, ys, marker="o", label=pol)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "accuracy against length", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
