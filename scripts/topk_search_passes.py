"""Counting passes of the decode top-k's search (kernels/triton/decode_topk.py), simulated on the CPU.

The kernel finds the k-th largest page score by a ternary search over an order-preserving int32 image of the float
scores (two cuts per pass, stopping at a cut with exactly k keys at or above it). This replays the same search in
NumPy on score rows like the kernel's, starting from the whole range of keys (up to the +inf of the forced newest
page: the kernel before 2026-12-04) or from the finite keys' range (the kernel now), and prints the passes each takes:

    python scripts/topk_search_passes.py --rows 30

Rows: Quest criticality of random bf16 keys (page 16, k = budget / 16), LServe's 64-token physical pages (the max of 4
logical pages, k = budget / 64), and N(0, 1) scores, each with the newest page forced to +inf.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

def keys_of(scores: np.ndarray) -> np.ndarray:
    """The kernel's order-preserving int image of float32 scores (as int64, so differences do not overflow)."""
    bits = scores.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def ternary_passes(key: np.ndarray, k: int, finite: bool) -> tuple[int, int]:
    """(cut, passes) of the kernel's two-cut search for the k-th largest of ``key`` (all valid): the top k are the
    keys at or above the cut (ties at the cut ranked by index)."""
    from accel.kernels.triton.decode_topk import KEY_INF, KEY_NEG_INF  # the kernel's keys of +-inf

    fin = (key > KEY_NEG_INF.value) & (key < KEY_INF.value)
    top = int((key >= KEY_INF.value).sum())
    lo, hi, c_lo = int(key.min()), int(key.max()), key.size
    if finite and top < k <= top + int(fin.sum()):  # as the kernel: else the cut lies among the infinite keys
        lo, hi, c_lo = int(key[fin].min()), int(key[fin].max()), top + int(fin.sum())
    if c_lo == k:
        hi = lo
    passes = 0
    while lo < hi:
        w = hi - lo + 1
        u1, u2 = lo + max(w // 3, 1), lo + max((2 * w) // 3, 1)
        n1, n2 = int((key >= u1).sum()), int((key >= u2).sum())
        passes += 1
        new_lo = lo
        if n1 >= k:
            new_lo, c_lo = u1, n1
        if n2 >= k:
            new_lo, c_lo = u2, n2
        if n2 < k:
            hi = u2 - 1
        if n1 < k:
            hi = u1 - 1
        lo = new_lo
        if c_lo == k:
            hi = lo
    return lo, passes


def rows(kind: str, n_rows: int, n_pages: int, seed: int = 0):
    """``n_rows`` score rows of ``kind`` ("quest", "lserve", "gaussian") over ``n_pages`` pages of 16 tokens, the
    newest page forced to +inf."""
    from accel.kernels import reference_decode as R

    g = torch.Generator().manual_seed(seed)
    for _ in range(n_rows):
        if kind == "gaussian":
            s = torch.randn(n_pages, generator=g)
        else:
            q = torch.randn(1, 4, 1, 128, generator=g).to(torch.bfloat16)
            kmin, kmax = R.page_bounds(torch.randn(1, 1, n_pages * 16, 128, generator=g).to(torch.bfloat16), 16)
            s = R.quest_scores(q, kmin, kmax).float()[0, 0]
            if kind == "lserve":
                s = s.view(-1, 4).amax(-1)
        s = s.numpy().copy()
        s[-1] = np.inf
        yield s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--budget", type=int, default=4096)
    args = ap.parse_args(argv)
    print("| rows | pages | k | whole range: mean / max passes | finite range: mean / max passes |")
    print("| --- | --- | --- | --- | --- |")
    for kind in ("quest", "lserve", "gaussian"):
        page = 64 if kind == "lserve" else 16
        k = args.budget // page
        n_pages = args.context // 16
        res = {True: [], False: []}
        for s in rows(kind, args.rows, n_pages):
            key = keys_of(s)
            for finite in (False, True):
                t, p = ternary_passes(key, k, finite)
                n_at = int((key >= t).sum())  # exactly k at or above the cut, or k tied at the k-th key
                assert n_at == k or (n_at > k and (key > t).sum() < k), (kind, finite)
                res[finite].append(p)
        print(f"| {kind} | {s.size} | {k} | {np.mean(res[False]):.1f} / {max(res[False])} | "
              f"{np.mean(res[True]):.1f} / {max(res[True])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
