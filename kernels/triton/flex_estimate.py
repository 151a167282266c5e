"""FlexPrefill's per-head estimate in one launch: from the last query block's column / diagonal mass and the pooled
keys, everything the layout needs per (batch, query head).

Torch twin: the torch path of ``accel.policies.flexprefill.FlexPrefillPolicy.estimate`` (``block_sums``,
``tokens_to_cover``, the pooled last-block softmax and its square-root Jensen-Shannon divergence) followed by
``top_n_mask`` on the column and offset block sums. That path is ~60 small torch ops per plan (divisions, xlogy x4,
clamps, wheres, a matmul, a softmax, a stack, fills) plus two top-n launches, and at 32K (256 key blocks) the plan
was bound by the CPU issuing them. Here one program per (batch, query head):

1. reads its rows of the raw last-query sums ``vs`` [2, B*H, Sk] (vertical, slash; not yet divided by the number
   of queries ``n_last``): block sums (times ``1/n_last``, a power of two in the policy: exact), and the token
   counts the cumulative budget keeps (entries at or above the row's cut from ``mass_threshold.mass_search``, read
   with ``cut_of``: the search ran on the raw sums, whose cut is the scaled one's scaled back exactly); the mean of
   the last ``n_last`` queries and its logits against the pooled keys of the head's KV head. Block sums and logits
   go to the output rows (chunks of key blocks: coalesced loads);
2. after a barrier reloads the whole rows (n_k_blocks <= MAX_N, in registers): softmax of the logits, divergence
   against the column-block distribution, the query-aware flag (divergence < tau), the block budgets
   (``ceil(tokens / block)`` clamped to [min_blocks, n_k_blocks], min_blocks for query-aware heads), the sink block
   set to inf in both block rows, and their top-n masks (bisection over an order-preserving int32 image, ties to
   the lower index: ``block_topk.topn_mask``'s rule), written as the layout kernel's tables: kept columns (int8) and
   the prefix count of kept offset blocks (kernels/triton/flex_layout.py);
3. optionally (``pooled_rows``: the search also covered the heads' pooled block maps) the head's query-aware cut,
   and its slot for the layout kernel: the head's own row, or -1 when the head is not query-aware (no host sync to
   pick the query-aware heads).

Float results (block sums, probabilities, the divergence) match the torch path to rounding (summation order, exp /
log); the counts and flags are equal unless the divergence lands within rounding of tau or a count exactly on a
boundary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .block_topk import MAX_N, topn_select
from .mass_threshold import MassSearch, cut_of


@triton.jit
def _topn(x, ok, n):
    """Bool mask of the n largest entries of x (valid where ``ok``; 1 <= n <= count(ok)), ties to the lower index."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving: signed int order == float order
    return topn_select(key, ok, n)[2]


@triton.jit
def _xlogy(x, y):  # torch.special.xlogy: 0 where x == 0 (log(1) there: no 0 * -inf)
    return x * tl.log(tl.where(x == 0.0, 1.0, y))


@triton.jit
def _flex_estimate_kernel(
    VS, WS, Q, KP, BLK, INTS, COLS, DCS,
    gamma, tau, scale, inv_nl,
    R, S,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    H, GROUP, Sq, Sk, NK, NL, MIN_BLOCKS,
    BS: tl.constexpr, BLOCK_D: tl.constexpr, CH: tl.constexpr, RB: tl.constexpr, NK_PAD: tl.constexpr,
    POOLED_ROWS: tl.constexpr,
):
    bh = tl.program_id(0)
    BH = tl.num_programs(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kvh = h // GROUP
    cut_v = cut_of(WS, gamma, bh, R, S)
    cut_s = cut_of(WS, gamma, BH + bh, R, S)

    # mean of the last NL queries (float32)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + h * stride_qh
    qm = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(0, NL, RB):
        ri = r0 + tl.arange(0, RB)
        rows = (Sq - NL + ri).to(tl.int64)
        x = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=(ri < NL)[:, None],
                    other=0.0)
        qm += tl.sum(x.to(tl.float32), 0)
    qm = qm / NL

    # phase 1, chunks of CH key blocks: block sums, kept-token counts, logits -> the output rows
    v_row = VS + bh.to(tl.int64) * Sk
    s_row = VS + (BH + bh).to(tl.int64) * Sk
    blk_v = BLK + bh.to(tl.int64) * NK
    blk_s = BLK + (BH + bh).to(tl.int64) * NK
    blk_e = BLK + (2 * BH + bh).to(tl.int64) * NK
    kp_base = KP + b * stride_kb + kvh * stride_kh
    cnt_v = tl.zeros([], tl.int32)
    cnt_s = tl.zeros([], tl.int32)
    for c0 in range(0, NK, CH):
        blocks = c0 + tl.arange(0, CH)
        bok = blocks < NK
        tok = blocks[:, None] * BS + tl.arange(0, BS)[None, :]
        tm = tok < Sk
        xv = tl.load(v_row + tok, mask=tm, other=0.0)
        xs = tl.load(s_row + tok, mask=tm, other=0.0)
        cnt_v += tl.sum(tl.sum((tm & (tl.maximum(xv, 0.0).to(tl.int32, bitcast=True) >= cut_v)).to(tl.int32), 1), 0)
        cnt_s += tl.sum(tl.sum((tm & (tl.maximum(xs, 0.0).to(tl.int32, bitcast=True) >= cut_s)).to(tl.int32), 1), 0)
        tl.store(blk_v + blocks, tl.sum(xv, 1) * inv_nl, mask=bok)
        tl.store(blk_s + blocks, tl.sum(xs, 1) * inv_nl, mask=bok)
        kp = tl.load(kp_base + blocks[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                     mask=bok[:, None], other=0.0)
        tl.store(blk_e + blocks, tl.sum(kp * qm[None, :], 1) * scale, mask=bok)
    tl.debug_barrier()  # the rows were written by other threads of this program

    # phase 2, whole rows in registers
    offs = tl.arange(0, NK_PAD)
    ok = offs < NK
    v = tl.load(blk_v + offs, mask=ok, other=0.0)
    s = tl.load(blk_s + offs, mask=ok, other=0.0)
    lg = tl.load(blk_e + offs, mask=ok, other=float("-inf"))
    e = tl.where(ok, tl.exp(lg - tl.max(lg, 0)), 0.0)
    est = e / tl.sum(e, 0)
    tl.store(blk_e + offs, est, mask=ok)
    mid = (est + v) / 2
    js = 0.5 * tl.sum(_xlogy(est, est) - _xlogy(est, mid), 0) + 0.5 * tl.sum(_xlogy(v, v) - _xlogy(v, mid), 0)
    qa = tl.sqrt(tl.maximum(js, 0.0)) < tau
    n_v = tl.minimum(tl.maximum((cnt_v + BS - 1) // BS, MIN_BLOCKS), NK)
    n_s = tl.minimum(tl.maximum((cnt_s + BS - 1) // BS, MIN_BLOCKS), NK)
    n_v = tl.where(qa, MIN_BLOCKS, n_v)
    n_s = tl.where(qa, MIN_BLOCKS, n_s)
    tl.store(INTS + bh, n_v)
    tl.store(INTS + BH + bh, n_s)
    tl.store(INTS + 2 * BH + bh, tl.where(qa, bh, -1))
    if POOLED_ROWS:
        tl.store(INTS + 3 * BH + bh, cut_of(WS, gamma, 2 * BH + bh, R, S))
    # the sink column block and the local diagonal band always count
    v = tl.where(offs == 0, float("inf"), v)
    s = tl.where(offs == 0, float("inf"), s)
    tl.store(blk_v + offs, v, mask=offs == 0)
    tl.store(blk_s + offs, s, mask=offs == 0)
    cols = _topn(v, ok, n_v)
    diags = _topn(s, ok, n_s).to(tl.int32)
    tl.store(COLS + bh.to(tl.int64) * NK + offs, cols.to(tl.int8), mask=ok)
    dcs_row = DCS + bh.to(tl.int64) * (NK + 1)
    tl.store(dcs_row + 1 + offs, tl.cumsum(diags, 0), mask=ok)  # dcs[x] = kept offset blocks below x
    tl.store(dcs_row + offs, tl.zeros([NK_PAD], tl.int32), mask=offs == 0)


class FlexEstimate(NamedTuple):
    """``blk`` float32 [3, B, H, nk]: column block mass, offset block mass (both with the sink block set to inf),
    the pooled last-block probabilities; ``ints`` int32 [4, B, H]: n_vert, n_slash, slot (the head's flat index if
    query-aware, else -1), query-aware cut (when the search had pooled rows); ``cols`` int8 [B, H, nk] and ``dcs``
    int32 [B, H, nk + 1]: the top-n tables of kernels/triton/flex_layout.py."""

    blk: torch.Tensor
    ints: torch.Tensor
    cols: torch.Tensor
    dcs: torch.Tensor


def flex_estimate(vs: torch.Tensor, search: MassSearch, q: torch.Tensor, k_pool: torch.Tensor, *, block: int,
                  n_last: int, tau: float, min_blocks: int, scale: float, pooled_rows: bool = False) -> FlexEstimate:
    """FlexPrefill's per-head estimate (see the module docstring). ``vs`` float32 [2, B, H, Sk] contiguous: the
    last ``n_last`` queries' summed column and diagonal mass (``lastq_scores(..., stacked=True)``); ``search``: the
    mass search whose first 2*B*H rows are ``vs``'s (then, with ``pooled_rows``, the B*H heads' pooled block maps);
    ``q`` [B, H, Sq, D]; ``k_pool`` float32 [B, Hkv, nk, D] (``mean_pool(k, block)``)."""
    if vs.dim() != 4 or vs.shape[0] != 2 or vs.dtype != torch.float32 or not vs.is_contiguous():
        raise ValueError(f"vs must be contiguous float32 [2, B, H, Sk], got {vs.dtype} {tuple(vs.shape)}")
    if k_pool.dim() != 4 or k_pool.dtype != torch.float32 or q.dim() != 4 or q.shape[-1] != k_pool.shape[-1]:
        raise ValueError(f"k_pool must be float32 [B, Hkv, nk, D] and q [B, H, Sq, D], got {k_pool.dtype} "
                         f"{tuple(k_pool.shape)}, {tuple(q.shape)}")
    _, B, H, Sk = vs.shape
    Hkv, nk, D = k_pool.shape[1], k_pool.shape[2], k_pool.shape[3]
    if (nk != -(-Sk // block) or nk > MAX_N or tuple(q.shape[:2]) != (B, H) or k_pool.shape[0] != B or Hkv == 0
            or H % Hkv):
        raise ValueError(f"k_pool {tuple(k_pool.shape)} / q {tuple(q.shape)} do not fit vs {tuple(vs.shape)} at "
                         f"block {block} (at most MAX_N={MAX_N} key blocks)")
    if search.rows != (3 if pooled_rows else 2) * B * H:
        raise ValueError(f"the mass search has {search.rows} rows; expected {(3 if pooled_rows else 2) * B * H}")
    if not 1 <= n_last <= q.shape[2] or not 1 <= min_blocks <= nk:
        raise ValueError(f"n_last={n_last} must be in [1, {q.shape[2]}] and min_blocks={min_blocks} in [1, {nk}]")
    dev = vs.device
    blk = torch.empty(3, B, H, nk, dtype=torch.float32, device=dev)
    ints = torch.empty(4, B, H, dtype=torch.int32, device=dev)
    cols = torch.empty(B, H, nk, dtype=torch.int8, device=dev)
    dcs = torch.empty(B, H, nk + 1, dtype=torch.int32, device=dev)
    if B * H == 0 or nk == 0:
        return FlexEstimate(blk, ints, cols, dcs)
    nk_pad = max(16, triton.next_power_of_2(nk))
    ch = max(1, 2048 // max(block, D))  # 2048-element tiles: 92 regs, no spills on sm_90 (4096: 168 regs)
    _flex_estimate_kernel[(B * H,)](
        vs, search.ws, q, k_pool, blk, ints, cols, dcs,
        search.gamma, float(tau), float(scale), 1.0 / n_last,
        search.rows, search.splits,
        *q.stride(), *k_pool.stride(),
        H, H // Hkv, q.shape[2], Sk, nk, n_last, min_blocks,
        BS=block, BLOCK_D=D, CH=ch, RB=max(1, min(32, 2048 // D)), NK_PAD=nk_pad, POOLED_ROWS=pooled_rows,
        num_warps=8 if nk_pad > 1024 else 4)
    return FlexEstimate(blk, ints, cols, dcs)


__all__ = ["flex_estimate", "FlexEstimate"]
