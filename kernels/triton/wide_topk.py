"""Exact top-k over long rows in a few launches of many programs per row: TidalDecode's selection layers keep the
best 4096 of ~131072 key positions, a row too long for one program's registers (decode_topk.py holds a row of
pages in one program).

A radix select over the 32-bit order-preserving key of each float (sign flipped, negatives inverted): three rounds
pick the key's digits from the top (11, 11 and 10 bits). In round r every program of a row reads its block of keys,
replays the rounds before it from the row's histograms (a reverse cumsum over 2048 bins names the bin that holds
the k-th largest key among those sharing the digits chosen so far, and how many keys are still needed), and adds a
histogram of the next digit of the keys that share that prefix into the row's histogram of round r with atomics
(``tl.histogram``, then one atomic per non-empty bin). After three rounds the prefix is the k-th largest key T
itself and ``need`` the number of keys equal to T to take. The collect launch writes the keys above T (exactly
k - need of them) at slots reserved with an atomic counter, then the first ``need`` ties (in the order their
programs reserve them). Positions come out unsorted (attention is order-free); which of several tied keys are taken
is not fixed, the count is. Launches: one memset of the histograms, three histogram rounds, one collect, against
torch.topk's eight kernels over a 131072-key row.

Twin: ``torch.topk(s, k, sorted=False).indices`` (the same set when the k-th largest value is not tied).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NBINS = 2048  # 11-bit digits
BLOCK = 4096  # keys per program
WARPS = 8
# TidalDecode's static-cache selection layers take this top-k instead of torch.topk (accel/policies/tidal.py). Off:
# measured slower (H100, 128K: 66 us against torch.topk's 55 for one shared row, 0.27-0.66x with a row per KV head;
# results/bench_decode_wide_topk.md). Likely cause, not profiled: Triton's histogram cost grows with its bins (an
# earlier probe: 256 -> 512 bins, 20 -> 34 us; kernels/triton/NOTES.md), and these have 2048 per program.
ENABLED = False


@triton.jit
def _ordered(x):
    """float32 -> uint32 whose unsigned order is the floats' order (-inf < ... < -0 < +0 < ... < +inf < NaN)."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)


@triton.jit
def _descend(HIST, row, K, ROUNDS: tl.constexpr, NB: tl.constexpr):
    """Replay rounds 0..ROUNDS-1 from the row's histograms: (prefix of the k-th largest key, keys of that prefix
    still needed)."""
    bins = tl.arange(0, NB)
    prefix = tl.zeros([], dtype=tl.uint32)
    need = K
    for r in tl.static_range(ROUNDS):
        h = tl.load(HIST + (row * 3 + r) * NB + bins, cache_modifier=".cg")  # written by other programs' atomics
        above = tl.sum(h, 0) - tl.cumsum(h, 0)  # keys in bins above each bin
        hit = (above < need) & (above + h >= need)  # the one bin holding the need-th largest key
        b = tl.max(tl.where(hit, bins, 0), 0)
        need = need - tl.sum(tl.where(bins == b, above, 0), 0)
        prefix = (prefix << (11 - r // 2)) | b.to(tl.uint32)  # digits of 11, 11, 10 bits
    return prefix, need


@triton.jit
def _hist_kernel(S, HIST, N, K, ssr, ROUND: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    key = _ordered(tl.load(S + row.to(tl.int64) * ssr + offs, mask=ok, other=0.0))
    used: tl.constexpr = 11 * ROUND  # bits fixed by the rounds before this one
    width: tl.constexpr = 11 - ROUND // 2  # this round's digit: 11, 11, 10 bits
    if ROUND > 0:
        prefix, need = _descend(HIST, row, K, ROUND, NB)
        ok = ok & ((key >> (32 - used)) == prefix)
    digit = ((key >> (32 - used - width)) & ((1 << width) - 1)).to(tl.int32)
    h = tl.histogram(digit, NB, mask=ok)
    tl.atomic_add(HIST + (row * 3 + ROUND) * NB + tl.arange(0, NB), h, mask=h > 0, sem="relaxed")


@triton.jit
def _collect_kernel(S, HIST, CNT, OUT, N, K, ssr, sor, BLOCK: tl.constexpr, NB: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    key = _ordered(tl.load(S + row.to(tl.int64) * ssr + offs, mask=ok, other=0.0))
    kth, need = _descend(HIST, row, K, 3, NB)
    gt = ok & (key > kth)
    eq = ok & (key == kth)
    gt_i = gt.to(tl.int32)
    eq_i = eq.to(tl.int32)
    base = tl.atomic_add(CNT + row * 2, tl.sum(gt_i, 0), sem="relaxed")
    tie = tl.atomic_add(CNT + row * 2 + 1, tl.sum(eq_i, 0), sem="relaxed")
    out = OUT + row.to(tl.int64) * sor
    tl.store(out + base + tl.cumsum(gt_i, 0) - 1, offs, mask=gt)
    rank = tie + tl.cumsum(eq_i, 0) - 1  # among the row's ties, in reservation order
    tl.store(out + (K - need) + rank, offs, mask=eq & (rank < need))


def wide_topk(s: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the ``k`` largest entries of each row of ``s`` (float32 [..., N], last dim contiguous), int32
    [..., k], unsorted; into ``out`` (int32 [..., k], last dim contiguous) when given. ``k`` <= N."""
    if s.dtype != torch.float32 or s.stride(-1) != 1:
        raise ValueError(f"wide_topk needs float32 scores with a contiguous last dim, got {s.dtype}, "
                         f"strides {tuple(s.stride())}")
    N = s.shape[-1]
    if not 0 < k <= N:
        raise ValueError(f"wide_topk: k must be in [1, {N}] (the row length), got {k}")
    lead = s.shape[:-1]
    rows = s.reshape(-1, N)  # a view for the contiguous inputs the callers pass
    R = rows.shape[0]
    if out is None:
        out = torch.empty(*lead, k, dtype=torch.int32, device=s.device)
    elif out.shape != (*lead, k) or out.dtype != torch.int32 or out.stride(-1) != 1:
        raise ValueError(f"wide_topk: out must be int32 {(*lead, k)} with a contiguous last dim, got {out.dtype} "
                         f"{tuple(out.shape)}")
    o = out.view(R, k)
    if R == 0:
        return out
    work = torch.zeros(R * (3 * NBINS + 2), dtype=torch.int32, device=s.device)  # histograms + slot counters
    hist, cnt = work[: R * 3 * NBINS], work[R * 3 * NBINS:]
    grid = (R, triton.cdiv(N, BLOCK))
    for r in range(3):
        _hist_kernel[grid](rows, hist, N, k, rows.stride(0), ROUND=r, BLOCK=BLOCK, NB=NBINS, num_warps=WARPS)
    _collect_kernel[grid](rows, hist, cnt, o, N, k, rows.stride(0), o.stride(0), BLOCK=BLOCK, NB=NBINS,
                          num_warps=WARPS)
    return out


def wide_topk_reference(s: torch.Tensor, k: int) -> torch.Tensor:
    """The twin: torch.topk's positions, int32, unsorted."""
    return s.topk(k, dim=-1, sorted=False).indices.to(torch.int32)
