"""Cumulative-mass cut of long rows in Triton, without sorting: the entries of each row that FlexPrefill's
cumulative budget keeps (the fewest largest entries whose sum reaches ``gamma`` of the row sum).

For non-negative float32 the int32 bit pattern is monotone in the value, so the cut is the largest bit pattern
``t`` whose mass ``sum(x[x >= t])`` still reaches the target. A 16-ary search finds it exactly in 8 passes: each
pass is one kernel that sums the mass above 16 candidate cuts per row at once (a [BLOCK, 16] compare tile, one
atomic add per program and cut), then a few tiny torch ops narrow the interval. Sorting a row of 1M entries (the
query-aware block map at 128K) cost 5 ms per plan on the H200; the passes read the row 8 times instead.

Equal to the sort-based cut except on exact ties at the cut (all tied entries are kept); the float atomics make
the summation order, and so a cut exactly at the boundary, run-dependent. Twin: ``mass_cut_torch``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

N_CUTS = 16
PASSES = 8  # 17^8 > 2^31: the interval of bit patterns shrinks to one value


@triton.jit
def _mass_above_kernel(X, CUTS, OUT, n, sxr, NC: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + r * sxr + offs, mask=offs < n, other=0.0).to(tl.float32)
    x = tl.maximum(x, 0.0)
    bits = x.to(tl.int32, bitcast=True)
    cuts = tl.load(CUTS + r * NC + tl.arange(0, NC))
    mass = tl.sum(tl.where(bits[:, None] >= cuts[None, :], x[:, None], 0.0), axis=0)
    tl.atomic_add(OUT + r * NC + tl.arange(0, NC), mass)


def mass_cut(x: torch.Tensor, gamma: float, block: int = 1024) -> torch.Tensor:
    """x [..., n] non-negative (negatives count as 0) -> int32 [...]: the bit pattern of the cut; keep
    ``x.float().view(int32) >= cut``. Rows with no mass get cut 1 (keep only entries with mass: none)."""
    lead, n = x.shape[:-1], x.shape[-1]
    xf = x.reshape(-1, n).float().contiguous()
    rows = xf.shape[0]
    target = gamma * xf.clamp_min(0).sum(-1)  # [R]
    lo = torch.zeros(rows, dtype=torch.int64, device=x.device)  # mass at or above lo reaches the target
    hi = xf.clamp_min(0).view(torch.int32).amax(-1).long() + 1  # mass at or above hi does not
    j = torch.arange(1, N_CUTS + 1, device=x.device)
    out = torch.empty(rows, N_CUTS, dtype=torch.float32, device=x.device)
    grid = (rows, triton.cdiv(n, block))
    for _ in range(PASSES):
        cuts = lo[:, None] + ((hi - lo)[:, None] * j) // (N_CUTS + 1)  # increasing; the last below hi
        out.zero_()
        _mass_above_kernel[grid](xf, cuts.to(torch.int32).contiguous(), out, n, xf.stride(0), NC=N_CUTS, BLOCK=block)
        ok = out >= target[:, None]  # monotone: true for the first few cuts
        n_ok = ok.sum(-1)  # cuts[n_ok - 1] is the largest good one
        new_lo = torch.where(n_ok > 0, cuts.gather(1, (n_ok - 1).clamp_min(0)[:, None])[:, 0], lo)
        new_hi = torch.where(n_ok < N_CUTS, cuts.gather(1, n_ok.clamp_max(N_CUTS - 1)[:, None])[:, 0], hi)
        lo, hi = new_lo, new_hi
    lo = torch.where(target > 0, lo, 1)
    return lo.to(torch.int32).reshape(lead)


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


__all__ = ["mass_cut", "mass_cut_torch"]
