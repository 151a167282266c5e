"""Cumulative-mass cut of long rows in Triton, without sorting: the entries of each row that FlexPrefill's
cumulative budget keeps (the fewest largest entries whose sum reaches ``gamma`` of the row sum).

For non-negative float32 the int32 bit pattern is monotone in the value, so the cut is the largest bit pattern
``t`` whose mass ``sum(x[x >= t])`` still reaches the target. A 16-ary search finds it exactly in 8 passes: each
pass is one kernel that sums the mass above 16 candidate cuts per row at once (a [BLOCK, 16] compare tile, one
atomic add per program and cut); each program first replays the narrowing from the earlier passes' sums, so the
passes launch back to back with no torch ops in between (those cost more CPU time than the GPU work). Sorting a
row of 1M entries (the query-aware block map at 128K) cost 5 ms per plan on the H200; the passes read the row 8
times instead.

A prep launch over the same grid writes each program's partial row sum and maximum and zeroes the pass sums: the
row target (``gamma`` x the sum of the partials, in a fixed order) and the search's upper end come from those, so
no torch op runs before the passes either (the clamp / sum / amax / zeros prologue was seven ops per cut). One
search can cover two groups of rows of different lengths (FlexPrefill's token-level column / diagonal mass and its
pooled block maps: one set of passes instead of two), and a consumer kernel can read a row's cut in-kernel
(``cut_of``) instead of a separate cut launch.

Equal to the sort-based cut except on exact ties at the cut (all tied entries are kept); the float atomics make
the summation order, and so a cut exactly at the boundary, run-dependent. Twin: ``mass_cut_torch``."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

N_CUTS = 16
PASSES = 8  # 17^8 > 2^31: the interval of bit patterns shrinks to one value
MAX_SPLITS = 256  # programs per row (the pass programs each re-read a row's partials: keep that short)
_PART = tl.constexpr(64)  # partials read per step
_PASSES_C, _N_CUTS_C = tl.constexpr(PASSES), tl.constexpr(N_CUTS)  # the same, readable in kernels


@triton.jit
def _row_target(WS, gamma, r, R, S):
    """Target mass (``gamma`` x the row sum) and the search's upper end (max bit pattern + 1) of row ``r`` from the
    prep partials WS[0, r, :S] (sums) and WS[1, r, :S] (maxima), summed in a fixed order."""
    total = tl.zeros([], tl.float32)
    top = tl.zeros([], tl.float32)
    for s0 in range(0, S, _PART):
        offs = s0 + tl.arange(0, _PART)
        ok = offs < S
        total += tl.sum(tl.load(WS + r * S + offs, mask=ok, other=0.0), 0)
        top = tl.maximum(top, tl.max(tl.load(WS + (R + r) * S + offs, mask=ok, other=0.0), 0))
    return gamma * total, top.to(tl.int32, bitcast=True).to(tl.int64) + 1


@triton.jit
def _narrow(SUMS, target, hi0, r, R, n_pass, NC: tl.constexpr):
    """Replay the search so far from the per-pass sums: the interval [lo, hi) of row ``r`` after ``n_pass``
    passes. Cheap (16 values per pass), so every program recomputes it and no host work runs between passes."""
    j = tl.arange(1, NC + 1).to(tl.int64)
    lo = tl.zeros([], tl.int64)  # mass at or above lo reaches the target
    hi = hi0  # mass at or above hi does not
    for p in range(n_pass):
        cuts = lo + ((hi - lo) * j) // (NC + 1)  # increasing; the good ones (mass >= target) come first
        ok = tl.load(SUMS + (p * R + r) * NC + tl.arange(0, NC)) >= target
        new_lo = tl.max(tl.where(ok, cuts, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, cuts), axis=0)
        lo = new_lo
    return lo, hi


@triton.jit
def cut_of(WS, gamma, r, R, S):
    """The finished search's cut of row ``r`` (int32 bit pattern; 1 for a row without mass: nothing kept), for
    kernels that consume a ``MassSearch`` (WS = its workspace; R, S = its rows and splits)."""
    target, hi0 = _row_target(WS, gamma, r, R, S)
    lo, hi = _narrow(WS + 2 * R * S, target, hi0, r, R, _PASSES_C, _N_CUTS_C)
    return tl.where(target > 0, lo, 1).to(tl.int32)


@triton.jit
def _row_span(X0, X1, R0, n0, n1, sx0, sx1, r, span):
    """Row ``r``'s base pointer and length (rows below R0 in X0, the rest in X1) and this program's span start."""
    in1 = r >= R0
    base = tl.where(in1, X1 + (r - R0).to(tl.int64) * sx1, X0 + r.to(tl.int64) * sx0)
    n = tl.where(in1, n1, n0)
    return base, n, tl.program_id(1) * span


@triton.jit
def _mass_prep_kernel(X0, X1, WS, R0, R, S, n0, n1, sx0, sx1, span, NC: tl.constexpr, NP: tl.constexpr,
                      BLOCK: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    base, n, start = _row_span(X0, X1, R0, n0, n1, sx0, sx1, r, span)
    acc = tl.zeros([BLOCK], tl.float32)
    top = tl.zeros([BLOCK], tl.float32)
    for off in range(start, tl.minimum(start + span, n), BLOCK):
        offs = off + tl.arange(0, BLOCK)
        x = tl.maximum(tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32), 0.0)
        acc += x
        top = tl.maximum(top, x)
    tl.store(WS + r * S + s, tl.sum(acc, 0))  # every split writes (0 past the row's end): no zeroing needed
    tl.store(WS + (R + r) * S + s, tl.max(top, 0))
    if s == 0:  # the pass sums take atomic adds: zero this row's
        p = tl.arange(0, NP)[:, None]
        c = tl.arange(0, NC)[None, :]
        tl.store(WS + 2 * R * S + (p * R + r) * NC + c, tl.zeros([NP, NC], tl.float32))


@triton.jit
def _mass_above_kernel(X0, X1, WS, gamma, R0, R, S, n0, n1, sx0, sx1, n_pass, span, NC: tl.constexpr,
                       BLOCK: tl.constexpr):
    r = tl.program_id(0)
    base, n, start = _row_span(X0, X1, R0, n0, n1, sx0, sx1, r, span)
    if start < n:
        target, hi0 = _row_target(WS, gamma, r, R, S)
        SUMS = WS + 2 * R * S
        lo, hi = _narrow(SUMS, target, hi0, r, R, n_pass, NC)
        j = tl.arange(1, NC + 1).to(tl.int64)
        cuts = (lo + ((hi - lo) * j) // (NC + 1)).to(tl.int32)
        mass = tl.zeros([NC], tl.float32)
        # a span of several blocks per program: one atomic add per span, not per block
        for off in range(start, tl.minimum(start + span, n), BLOCK):
            offs = off + tl.arange(0, BLOCK)
            x = tl.maximum(tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32), 0.0)
            bits = x.to(tl.int32, bitcast=True)
            mass += tl.sum(tl.where(bits[:, None] >= cuts[None, :], x[:, None], 0.0), axis=0)
        tl.atomic_add(SUMS + (n_pass * R + r) * NC + tl.arange(0, NC), mass)


@triton.jit
def _cut_kernel(WS, CUT, gamma, R, S):
    r = tl.program_id(0)
    tl.store(CUT + r, cut_of(WS, gamma, r, R, S))


class MassSearch(NamedTuple):
    """A finished search: ``ws`` float32 workspace (partials, then the pass sums), ``rows`` (all groups), ``splits``
    (programs per row), ``gamma``. Row r of group 1 is row ``rows_0 + r``."""

    ws: torch.Tensor
    rows: int
    splits: int
    gamma: float


# about this many programs per pass: on the H100 at 32K (FlexPrefill's 64 token rows of 32K + 32 block rows of 64K)
# 1024 took 252 us for the ten launches against 300 us with 2048 and 275 with 512; at 128K 1024 and 2048 tie (1.95
# ms); 2048-entry blocks were 2-3x slower at every count (scripts/tune_plan_kernels.py,
# results/tune_plan_kernels_h100.txt)
PROGRAMS = 1024


def mass_search(xs: Sequence[torch.Tensor], gamma: float, block: int = 1024, programs: int = PROGRAMS) -> MassSearch:
    """Run the search over the rows of one or two float32 matrices [rows_i, n_i] (unit last stride; the rows of
    ``xs[1]`` follow those of ``xs[0]``). Nine launches and one allocation, no host sync; read the cuts with
    ``cut_of`` in a kernel or with ``mass_cut``."""
    if not 1 <= len(xs) <= 2:
        raise ValueError(f"mass_search takes one or two row groups, got {len(xs)}")
    for x in xs:
        if x.dim() != 2 or x.dtype != torch.float32 or (x.shape[1] > 1 and x.stride(1) != 1):
            raise ValueError(f"row groups must be float32 [rows, n] with unit last stride, got {x.dtype} "
                             f"{tuple(x.shape)}")
    x0, x1 = xs[0], xs[-1]
    r0 = x0.shape[0]
    rows = r0 + (x1.shape[0] if len(xs) == 2 else 0)
    # about ``programs`` programs whatever the shape (32K programs adding to 16 sums per row contended on atomics)
    blocks = sum(x.shape[0] * triton.cdiv(x.shape[1], block) for x in xs)
    longest = max(triton.cdiv(x.shape[1], block) for x in xs)
    span = block * max(triton.cdiv(blocks, programs), triton.cdiv(longest, MAX_SPLITS), 1)
    splits = max(1, triton.cdiv(longest * block, span))
    ws = torch.empty(2 * rows * splits + PASSES * rows * N_CUTS, dtype=torch.float32, device=x0.device)
    if rows == 0:
        return MassSearch(ws, 0, splits, float(gamma))
    n1 = x1.shape[1] if len(xs) == 2 else 0
    args = (x0, x1, ws)
    geo = (r0, rows, splits, x0.shape[1], n1, x0.stride(0), x1.stride(0))
    grid = (rows, splits)
    _mass_prep_kernel[grid](*args, *geo, span, NC=N_CUTS, NP=PASSES, BLOCK=block)
    for p in range(PASSES):
        _mass_above_kernel[grid](*args, float(gamma), *geo, p, span, NC=N_CUTS, BLOCK=block)
    return MassSearch(ws, rows, splits, float(gamma))


def mass_cut(x: torch.Tensor, gamma: float, block: int = 1024, programs: int = PROGRAMS) -> torch.Tensor:
    """x [..., n] non-negative (negatives count as 0) -> int32 [...]: the bit pattern of the cut; keep
    ``x.float().view(int32) >= cut``. Rows with no mass get cut 1 (keep only entries with mass: none).
    Ten launches whatever the row length: no host work or sync between the passes."""
    lead, n = x.shape[:-1], x.shape[-1]
    xf = x.reshape(-1, n).float().contiguous()
    return search_cuts(mass_search([xf], gamma, block=block, programs=programs)).reshape(lead)


def search_cuts(search: MassSearch) -> torch.Tensor:
    """int32 [rows]: every row's cut of a finished search (one launch), group 1's rows after group 0's."""
    cut = torch.empty(search.rows, dtype=torch.int32, device=search.ws.device)
    if search.rows:
        _cut_kernel[(search.rows,)](search.ws, cut, search.gamma, search.rows, search.splits)
    return cut


def mass_cut_torch(x: torch.Tensor, gamma: float, steps: int = 31) -> torch.Tensor:
    """``mass_cut`` by binary search in torch ops (any device): the Triton kernel's twin."""
    xf = x.float().clamp_min(0)
    bits = xf.view(torch.int32)
    target = gamma * xf.sum(-1, keepdim=True)
    lo = torch.zeros_like(target, dtype=torch.int32)
    hi = bits.amax(-1, keepdim=True) + 1
    for _ in range(steps):
        mid = lo + (hi - lo) // 2
        ok = (xf * (bits >= mid)).sum(-1, keepdim=True) >= target
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return torch.where(target > 0, lo, 1).squeeze(-1)


__all__ = ["mass_cut", "mass_cut_torch", "mass_search", "search_cuts", "MassSearch", "cut_of"]
