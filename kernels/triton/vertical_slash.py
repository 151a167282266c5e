"""Triton vertical-slash attention forward (MInference 1.0) for ``VerticalSlashLayout``, exact.

Reference twin: ``kernels.reference_sparse.vertical_slash_attention``. Key j is visible to the query at position p
when j is a kept column ("vertical") or ``p - j`` a kept diagonal offset ("slash"), and ``j <= p``.

Decomposition (plan in torch on the layout's device, no Python loops over tiles; memory O(layout + H_L * Sk)):

1. Slash chunks in offset space. A kept offset d crosses the query tile [p0, p0 + BM) on the contiguous keys
   [p0 - d, p0 + BM - 1 - d]; in "relative" coordinates r = p0 - j that is r in [d - BM + 1, d], the same for every
   query tile. ``plan_vertical_slash`` merges the sorted kept offsets of a head into groups (gap < BM + BN) and
   tiles each group's r-range [g_lo - BM + 1, g_hi] bottom-up by chunks of BN; chunk e covers r in [e - BN + 1, e],
   i.e. keys [p0 - e, p0 - e + BN) of tile p0 (unaligned). Chunks are disjoint (groups are >= BM + BN apart, the
   last chunk overruns its group by < BN) and sorted by e, so a query tile's chunks are a prefix (e <= p0 + BN - 1)
   of the head's list: a run of nearby diagonals costs its key range once, an isolated diagonal one chunk (not the
   two aligned tiles it crosses). The main-diagonal group starts at r = -(BM - 1), so its chunks are the tile's
   own causal tiles.
2. Chunks whose whole offset window [e - BN + 1, e + BM - 1] is kept and causal are "full": they need no mask and
   run in a branch-free pipelined loop (keys [p0 - e, ...] with e <= p0: always in range). The other chunks run
   masked: per row one int64 of visibility bits, ``WIN[e + i]`` (bit t of ``WIN[x]`` = offset x - t kept: the
   diagonals, causal by construction) | ``CWIN[start]`` (bit t = column start + t kept, one word per chunk) below
   the row's causal limit, minus keys < 0; then one bit test per element, no per-element gathers.
3. Kept columns not inside any chunk of the tile (``COV[r]``: r covered by a chunk, the same table for every tile)
   and not after the tile's last query, gathered BN at a time from the head's sorted column list (a prefix).

Every visible (query, key) pair is counted exactly once. MInference's own kernel widens slashes to whole blocks;
this one keeps the layout's semantics exactly, so it equals the reference (and, with every offset kept, dense
causal attention). A plan can be reused for several layers sharing a layout (``plan=``). GQA reads KV head
``h // (Hq // Hkv)``; K/V are never repeated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from accel.layouts import VerticalSlashLayout

from ..reference_sparse import block_mask_to_layout, validate_vertical_slash_layout
from .checks import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, check_qkv, gpu_path  # noqa: F401
from .online_softmax import softmax_step

_BIG = 1 << 30  # padding of the sorted lists (never counted)


@dataclass
class VerticalSlashPlan:
    """Kernel metadata for one (layout, q_len, kv_len, block_m, block_n). Heads/batch are the layout's (B_L, H_L).

    ``work`` [B_L, H_L, n_q_tiles, 4] int32 per query tile: partial chunks (prefix of ``part``), full chunks with
    keys >= 0 (prefix of ``full``), full chunks including the one straddling key 0, and gathered-column candidates
    (prefix of ``cols``). The aligned-tile view of the previous plan (``counts``/``indices``/``col_counts``/
    ``col_indices``) is computed on demand, for statistics and the equivalent-block-layout benchmark."""

    work: torch.Tensor  # [B_L, H_L, nq, 4] int32
    part: torch.Tensor  # [B_L, H_L, n_part] int32, chunk descriptors e ascending, padded with _BIG
    full: torch.Tensor  # [B_L, H_L, n_full] int32
    cols: torch.Tensor  # [B_L, H_L, n_cols] int32 kept columns ascending unique, padded with _BIG
    win: torch.Tensor  # [B_L, H_L, Sk + 2 BM + BN] int64: bit t of win[x + BM] = offset x - t kept
    cwin: torch.Tensor  # [B_L, H_L, Sk + BM + 2 BN] int64: bit t of cwin[s + BN] = column s + t kept
    cov: torch.Tensor  # [B_L, H_L, Sk + BM] int8: cov[r + BM - 1] = r covered by a chunk
    q_len: int
    kv_len: int
    block_m: int
    block_n: int
    layout: VerticalSlashLayout | None = None
    _aligned: tuple | None = field(default=None, repr=False)

    # ---- statistics -------------------------------------------------------------------------------------------
    def chunk_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, masked) chunks per query tile, [B_L, H_L, nq] each."""
        c = self.work.long()
        return c[..., 1], c[..., 0] + c[..., 2] - c[..., 1]

    def stats(self) -> dict:
        """Work per query tile vs the causal 64x64-equivalent tile count (means over heads and tiles)."""
        full, masked = self.chunk_counts()
        nq = self.work.shape[2]
        p0 = (self.kv_len - self.q_len) + torch.arange(nq, device=full.device) * self.block_m
        causal = (p0 + self.block_m + self.block_n - 1) // self.block_n  # key tiles of BN up to the tile's end
        scale = self.block_m * self.block_n
        return {
            "full_chunks": float(full.float().mean()), "masked_chunks": float(masked.float().mean()),
            "column_candidates": float(self.work[..., 3].float().mean()),
            "chunk_share": float((full + masked).float().sum(-1).mean() / causal.float().sum()),
            "full_share": float(full.float().sum(-1).mean() / causal.float().sum()),
            "tile_elems": scale,
        }

    # ---- the aligned-tile view (statistics / benchmark's equivalent block layout) -----------------------------
    def _aligned_view(self):
        if self._aligned is None:
            if self.layout is None:
                raise ValueError("this plan was made without its layout")
            self._aligned = _aligned_tiles(self.layout, self.q_len, self.kv_len, self.block_m, self.block_n)
        return self._aligned

    @property
    def counts(self):  # [B_L, H_L, nq] aligned key tiles crossed by kept diagonals
        return self._aligned_view()[0]

    @property
    def indices(self):  # [B_L, H_L, nq, max_tiles] (BlockLayout indices of those tiles)
        return self._aligned_view()[1]

    @property
    def col_counts(self):  # [B_L, H_L, nq]: kept columns outside those tiles, not after the tile
        return self._aligned_view()[2]

    @property
    def col_indices(self):
        return self._aligned_view()[3]


def _table(values: torch.Tensor, n: int) -> torch.Tensor:
    v = values.long()
    v = torch.where((v >= 0) & (v < n), v, n)
    t = torch.zeros(*values.shape[:2], n + 1, dtype=torch.int8, device=values.device)
    t.scatter_(-1, v, 1)
    return t[..., :n].contiguous()


def _sorted_unique(values: torch.Tensor, n: int) -> torch.Tensor:
    """[B, H, L] -> ascending unique values in [0, n) per row, padded with _BIG (int64)."""
    v = values.long()
    v = torch.where((v >= 0) & (v < n), v, _BIG).sort(-1).values
    if v.shape[-1] > 1:
        dup = torch.cat([torch.zeros_like(v[..., :1], dtype=torch.bool), v[..., 1:] == v[..., :-1]], -1)
        v = torch.where(dup, _BIG, v).sort(-1).values
    return v


def _aligned_tiles(layout, q_len, kv_len, block_m, block_n, chunk=256):
    """The previous kernel's plan: aligned key tiles crossed by kept diagonals (BlockLayout counts/indices) and the
    kept columns outside them. Memory O(n_q_tiles * (n_k_tiles + n_cols)): statistics / benchmarks only."""
    dev = layout.columns.device
    diag = _table(layout.offsets, kv_len)
    BL, HL = diag.shape[:2]
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    off = kv_len - q_len
    csum = torch.cat([torch.zeros(BL, HL, 1, dtype=torch.int32, device=dev), diag.cumsum(-1, dtype=torch.int32)], -1)
    n_idx = torch.arange(nk, device=dev)
    cols = _sorted_unique(layout.columns, kv_len).clamp(max=kv_len)
    col_tile = (cols // block_n).clamp(max=nk - 1)
    touched_all, keep_cols = [], []
    for s in range(0, nq, chunk):
        m = torch.arange(s, min(nq, s + chunk), device=dev)
        p0 = off + m * block_m
        p1 = off + torch.clamp((m + 1) * block_m, max=q_len) - 1
        d_lo = (p0[:, None] - n_idx[None, :] * block_n - block_n + 1).clamp(min=0)
        d_hi = (p1[:, None] - n_idx[None, :] * block_n).clamp(min=-1, max=kv_len - 1)
        hi = torch.gather(csum, -1, (d_hi + 1).reshape(1, 1, -1).expand(BL, HL, -1))
        lo = torch.gather(csum, -1, d_lo.clamp(max=kv_len).reshape(1, 1, -1).expand(BL, HL, -1))
        touched = ((hi - lo) > 0).reshape(BL, HL, len(m), nk) & (d_hi >= d_lo)
        touched_all.append(touched)
        in_tile = torch.gather(touched, -1, col_tile[:, :, None, :].expand(-1, -1, len(m), -1))
        keep_cols.append((cols[:, :, None, :] <= p1[:, None]) & ~in_tile)
    touched = torch.cat(touched_all, 2)
    keep = torch.cat(keep_cols, 2)
    tiles = block_mask_to_layout(touched, block_m, block_n)
    col_counts = keep.sum(-1, dtype=torch.int32)
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
    max_cols = int(col_counts.max()) if col_counts.numel() else 0
    col_indices = torch.gather(cols[:, :, None, :].expand_as(keep), -1, order[..., :max_cols]).to(torch.int32)
    return tiles.counts, tiles.indices, col_counts, col_indices.contiguous()


def _scatter_rows(row: torch.Tensor, val: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Values grouped by row (rows ascending, order kept) -> [n_rows, max_per_row] padded with _BIG."""
    cnt = torch.bincount(row, minlength=n_rows)
    width = max(1, int(cnt.max())) if row.numel() else 1
    start = torch.cumsum(cnt, 0) - cnt
    pos = torch.arange(row.numel(), device=row.device) - start[row]
    out = torch.full((n_rows, width), _BIG, dtype=torch.int64, device=row.device)
    out[row, pos] = val
    return out


def _window_table(diag: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """diag int8 [N, Sk] -> int64 [N, Sk + 2 BM + BN]; bit t of out[x + BM] = diag[x - t] (0 outside [0, Sk))."""
    N, Sk = diag.shape
    size = Sk + 2 * block_m + block_n
    pad = torch.zeros(N, size + 64, dtype=torch.int64, device=diag.device)
    pad[:, 64 + block_m: 64 + block_m + Sk] = diag.long()  # pad[y + 64] = diag[y - BM]
    ext = size + 56
    b8 = torch.zeros(N, ext, dtype=torch.int64, device=diag.device)  # b8[y + 56]: bits t < 8 of diag at y - t
    for t in range(8):
        b8 |= pad[:, 8 - t: 8 - t + ext] << t
    win = torch.zeros(N, size, dtype=torch.int64, device=diag.device)
    for k in range(8):
        win |= b8[:, 56 - 8 * k: 56 - 8 * k + size] << (8 * k)
    return win


def _column_window_table(colt: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """colt int8 [N, Sk] -> int64 [N, Sk + BM + 2 BN]; bit t of out[s + BN] = colt[s + t] (0 outside [0, Sk))."""
    N, Sk = colt.shape
    size = Sk + block_m + 2 * block_n
    pad = torch.zeros(N, size + 64, dtype=torch.int64, device=colt.device)
    pad[:, block_n: block_n + Sk] = colt.long()  # pad[y] = colt[y - BN]
    ext = size + 56
    b8 = torch.zeros(N, ext, dtype=torch.int64, device=colt.device)  # b8[y]: bits t < 8 of colt at y - BN + t
    for t in range(8):
        b8 |= pad[:, t: t + ext] << t
    cwin = torch.zeros(N, size, dtype=torch.int64, device=colt.device)
    for k in range(8):
        cwin |= b8[:, 8 * k: 8 * k + size] << (8 * k)
    return cwin


def plan_vertical_slash(layout: VerticalSlashLayout, q_len: int, kv_len: int, block_m: int = 64,
                        block_n: int = 64) -> VerticalSlashPlan:
    """Convert a vertical-slash layout into the kernel's chunk lists and tables (torch, on the layout's device,
    memory O(layout + H_L * (Sk + n_q_tiles)); a few host syncs for list sizes). ``block_n`` <= 64."""
    if not 1 <= block_n <= 64 or block_m < 1:
        raise ValueError(f"block_n must be in [1, 64] (one int64 of mask bits per row), got {block_n}")
    dev = layout.columns.device
    BM, BN = block_m, block_n
    diag = _table(layout.offsets, kv_len)
    BL, HL = diag.shape[:2]
    N = BL * HL
    nq = -(-q_len // BM)
    off = kv_len - q_len

    # groups of kept offsets (gap < BM + BN) -> chunk descriptors e, ascending per head
    d = _sorted_unique(layout.offsets, kv_len).reshape(N, -1)
    valid = d < _BIG
    prev = torch.cat([torch.full_like(d[:, :1], -_BIG), d[:, :-1]], 1)
    nxt = torch.cat([d[:, 1:], torch.full_like(d[:, :1], _BIG)], 1)
    is_start = valid & (d - prev >= BM + BN)
    is_end = valid & (nxt - d >= BM + BN)
    rows = torch.arange(N, device=dev)[:, None].expand_as(d)
    g_row, g_lo, g_hi = rows[is_start], d[is_start], d[is_end]
    n_ch = (g_hi - g_lo + BM + BN - 1) // BN
    gi = torch.repeat_interleave(torch.arange(g_lo.numel(), device=dev), n_ch)
    k = torch.arange(gi.numel(), device=dev) - (torch.cumsum(n_ch, 0) - n_ch)[gi]
    e = g_lo[gi] - BM + (k + 1) * BN
    row = g_row[gi]
    # full: offsets [e - BN + 1, e + BM - 1] all kept and >= 0
    csum = torch.cat([torch.zeros(N, 1, dtype=torch.int64, device=dev), diag.reshape(N, -1).long().cumsum(-1)], 1)
    lo_o, hi_o = e - BN + 1, e + BM - 1
    ok = (lo_o >= 0) & (hi_o <= kv_len - 1)
    n_kept = csum[row, (hi_o + 1).clamp(0, kv_len)] - csum[row, lo_o.clamp(0, kv_len)]
    is_full = ok & (n_kept == BM + BN - 1)
    full = _scatter_rows(row[is_full], e[is_full], N)
    part = _scatter_rows(row[~is_full], e[~is_full], N)
    # r covered by some chunk: r in [e - BN + 1, e]; table index r + BM - 1 over r in [-(BM - 1), Sk]
    size = kv_len + BM
    diff = torch.zeros(N, size + 1, dtype=torch.int32, device=dev)
    one = torch.ones_like(e, dtype=torch.int32)
    diff.index_put_((row, (e - BN + 1 + BM - 1).clamp(0, size)), one, accumulate=True)
    diff.index_put_((row, (e + 1 + BM - 1).clamp(0, size)), -one, accumulate=True)
    cov = (diff.cumsum(-1)[:, :size] > 0).to(torch.int8)

    cols = _sorted_unique(layout.columns, kv_len).reshape(N, -1)
    if cols.shape[-1] == 0:
        cols = torch.full((N, 1), _BIG, dtype=torch.int64, device=dev)
    p0 = off + torch.arange(nq, device=dev) * BM
    p1 = torch.clamp(p0 + BM - 1, max=kv_len - 1)

    def count(seq, x):
        return torch.searchsorted(seq.contiguous(), x[None, :].expand(N, -1).contiguous(), right=True)

    counts = torch.stack([count(part, p0 + BN - 1), count(full, p0), count(full, p0 + BN - 1), count(cols, p1)], -1)

    def shape(t, dtype):
        return t.to(dtype).reshape(BL, HL, *t.shape[1:]).contiguous()

    return VerticalSlashPlan(
        shape(counts, torch.int32), shape(part.clamp(max=_BIG), torch.int32), shape(full, torch.int32),
        shape(cols, torch.int32), shape(_window_table(diag.reshape(N, -1), BM, BN), torch.int64),
        shape(_column_window_table(_table(layout.columns, kv_len).reshape(N, -1), BM, BN), torch.int64),
        shape(cov, torch.int8), q_len, kv_len, BM, BN, layout)


@triton.jit
def _chunk(acc, l_i, m_i, q, qpos, p0, e, K_base, V_base, WIN, CWIN, Sk, qk_scale, softcap,
           stride_kn, stride_kd, stride_vn, stride_vd,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
           SOFTCAP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Keys [p0 - e, p0 - e + BLOCK_N). MASK: exact vertical-slash + causal + bounds mask; else all visible."""
    start = p0 - e
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kT_ptrs = K_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASK:
        in_k = (offs_n >= 0) & (offs_n < Sk)
        kT = tl.load(kT_ptrs, mask=in_k[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=in_k[:, None], other=0.0)
    else:
        kT = tl.load(kT_ptrs)
        v = tl.load(v_ptrs)
    if UPCAST:
        kT = kT.to(tl.float32)
    qk = tl.dot(q, kT, input_precision=PREC)
    if MASK:
        # One int64 of visibility bits per row (bit jj: key start + jj), built on [BLOCK_M] vectors; one bit test
        # per element. Diagonal bits (WIN: zero for offsets < 0, so causal) | column bits (CWIN: one word per
        # chunk) below the row's causal limit, without keys < 0 (the chunk straddling key 0).
        rows = tl.arange(0, BLOCK_M)
        w = tl.load(WIN + (e + BLOCK_M + rows))
        cb = tl.load(CWIN + (start + BLOCK_N))
        lim = (rows + e + 1).to(tl.int64)  # key start + jj <= row's position  <=>  jj < lim
        one = tl.full([BLOCK_M], 1, tl.int64)
        low = tl.where(lim >= 64, -1, (one << tl.minimum(tl.maximum(lim, 0), 63)) - 1)
        neg = tl.full([BLOCK_M], -1, tl.int64) << tl.maximum(-start, 0).to(tl.int64)
        w = (w | (cb & low)) & neg
        jj = tl.arange(0, BLOCK_N)
        lo = w.to(tl.int32)  # per element a 32-bit test: fewer registers than int64 shifts
        if BLOCK_N > 32:
            hi = (w >> 32).to(tl.int32)
            word = tl.where(jj[None, :] < 32, lo[:, None], hi[:, None])
        else:
            word = lo[:, None]
        keep = ((word >> (jj[None, :] & 31)) & 1) != 0
    else:
        keep = qk > 0.0  # unused
    return softmax_step(acc, l_i, m_i, qk, v, keep, qk_scale, softcap, MASK, SOFTCAP, PREC, UPCAST)


@triton.jit
def _vertical_slash_fwd(
    Q, K, V, O, LSE, CNT, PART, FULL, COLS, WIN, CWIN, COV,
    qk_scale, softcap,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_cb, stride_ch, stride_cm,
    stride_pb, stride_ph, stride_fb, stride_fh, stride_lcb, stride_lch,
    stride_wb, stride_wh, stride_tb, stride_th, stride_vcb, stride_vch,
    H, Sq, Sk, GROUP, LAYOUT_GROUP, N_M_TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, RETURN_LSE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    MASKED_STAGES: tl.constexpr,
):
    pid_m = N_M_TILES - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    lh = h // LAYOUT_GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=offs_m[:, None] < Sq, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    p0 = pid_m * BLOCK_M + (Sk - Sq)
    qpos = offs_m + (Sk - Sq)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    K_base = K + b * stride_kb + kvh * stride_kh
    V_base = V + b * stride_vb + kvh * stride_vh
    cnt_row = CNT + b * stride_cb + lh * stride_ch + pid_m * stride_cm
    n_part = tl.load(cnt_row)
    n_full = tl.load(cnt_row + 1)
    n_full2 = tl.load(cnt_row + 2)
    n_cols = tl.load(cnt_row + 3)
    part = PART + b * stride_pb + lh * stride_ph
    full = FULL + b * stride_fb + lh * stride_fh
    win = WIN + b * stride_wb + lh * stride_wh
    cwin = CWIN + b * stride_tb + lh * stride_th

    # (a) full chunks: every pair visible, no mask, branch-free -> software-pipelined
    for t in range(0, n_full):
        e = tl.load(full + t)
        acc, l_i, m_i = _chunk(acc, l_i, m_i, q, qpos, p0, e, K_base, V_base, win, cwin, Sk, qk_scale, softcap,
                               stride_kn, stride_kd, stride_vn, stride_vd,
                               BLOCK_M, BLOCK_N, BLOCK_D, False, SOFTCAP, PREC, UPCAST)
    # (b) partial chunks (and the full chunk straddling key 0): exact mask
    for t in tl.range(0, n_part, num_stages=MASKED_STAGES):
        e = tl.load(part + t)
        acc, l_i, m_i = _chunk(acc, l_i, m_i, q, qpos, p0, e, K_base, V_base, win, cwin, Sk, qk_scale, softcap,
                               stride_kn, stride_kd, stride_vn, stride_vd,
                               BLOCK_M, BLOCK_N, BLOCK_D, True, SOFTCAP, PREC, UPCAST)
    for t in tl.range(n_full, n_full2, num_stages=1):
        e = tl.load(full + t)
        acc, l_i, m_i = _chunk(acc, l_i, m_i, q, qpos, p0, e, K_base, V_base, win, cwin, Sk, qk_scale, softcap,
                               stride_kn, stride_kd, stride_vn, stride_vd,
                               BLOCK_M, BLOCK_N, BLOCK_D, True, SOFTCAP, PREC, UPCAST)

    # (c) kept columns <= the tile's last query that no chunk of this tile covers, gathered BLOCK_N at a time
    colr = COLS + b * stride_lcb + lh * stride_lch
    cov = COV + b * stride_vcb + lh * stride_vch + (p0 + BLOCK_M - 1)
    for c0 in tl.range(0, n_cols, BLOCK_N, num_stages=MASKED_STAGES):
        inl = c0 + offs_j < n_cols
        cols = tl.load(colr + c0 + offs_j, mask=inl, other=0)
        valid = inl & (tl.load(cov - cols, mask=inl, other=1) == 0)
        kT = tl.load(K_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=valid[None, :], other=0.0)
        v = tl.load(V_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=valid[:, None], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
        qk = tl.dot(q, kT, input_precision=PREC)
        keep = valid[None, :] & (qpos[:, None] >= cols[None, :])
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, qk, v, keep, qk_scale, softcap, True, SOFTCAP, PREC, UPCAST)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=offs_m[:, None] < Sq)
    if RETURN_LSE:
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse, mask=offs_m < Sq)


def default_config(q: torch.Tensor) -> dict:
    """Tiles and launch parameters: sm_90 compiles without spills (NOTES.md, vertical_slash.py section). BLOCK_N <= 64
    (one int64 of mask bits per row). Under the interpreter: 64 x 64, one stage."""
    D = q.shape[-1]
    if not gpu_path(q):
        return dict(block_m=64, block_n=64, num_warps=4, num_stages=1, masked_stages=1)
    if q.dtype == torch.float32:  # exact fp32 dots on CUDA cores: larger tiles spill
        cfg = dict(block_m=32, block_n=16, num_warps=8, num_stages=1, masked_stages=1)
    elif D <= 128:
        cfg = dict(block_m=64, block_n=64, num_warps=4, num_stages=3, masked_stages=3)
    else:
        cfg = dict(block_m=64, block_n=32, num_warps=8, num_stages=2, masked_stages=2)
    # tuning hook for GPU A/B runs with unchanged scripts, e.g. ACCEL_VS_CONFIG='{"num_warps": 8}' (block sizes
    # apply only to plans made inside vertical_slash_attention)
    cfg.update(json.loads(os.environ.get("ACCEL_VS_CONFIG") or "{}"))
    return cfg


def _check(q, k, v, layout):
    if not isinstance(layout, VerticalSlashLayout):
        raise ValueError(f"expected a VerticalSlashLayout, got {type(layout).__name__}")
    check_qkv(q, k, v, "vertical-slash")
    B, Hq, Sq, D = q.shape
    for t in (layout.columns, layout.offsets):
        if t.dim() != 3 or t.shape[0] not in (B, 1) or t.shape[1] == 0 or Hq % t.shape[1]:
            raise ValueError(f"VerticalSlashLayout tensors must be [B or 1, H_L, n] with H_L dividing {Hq}, got "
                             f"{tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"VerticalSlashLayout is on {t.device} but q is on {q.device}")


def vertical_slash_attention(q, k, v, layout: VerticalSlashLayout, *, scale=None, softcap=None, return_lse=False,
                             check=False, plan: VerticalSlashPlan | None = None, block_m: int | None = None,
                             block_n: int | None = None, num_warps: int | None = None,
                             num_stages: int | None = None, masked_stages: int | None = None):
    """Exact vertical-slash causal attention. q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D]. Returns out (q's dtype) and
    with ``return_lse`` lse [B, Hq, Sq] float32 (natural log; -inf and output 0 for rows that see no key).
    ``check=True`` validates the layout's contents first. ``plan`` (from ``plan_vertical_slash``) skips the
    conversion, e.g. for layers sharing a layout; its block sizes are the kernel's tiles."""
    _check(q, k, v, layout)
    if check:
        validate_vertical_slash_layout(layout, q, k)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    cfg = default_config(q)
    if plan is None:
        plan = plan_vertical_slash(layout, Sq, Sk, block_m or cfg["block_m"], block_n or cfg["block_n"])
    elif (plan.q_len, plan.kv_len) != (Sq, Sk):
        raise ValueError(f"plan was made for q_len={plan.q_len}, kv_len={plan.kv_len}, not {Sq}, {Sk}")
    out = torch.empty(B, Hq, Sq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq if return_lse else 1, dtype=torch.float32, device=q.device)
    if Sq == 0 or B == 0:
        return (out, lse[..., :Sq]) if return_lse else out

    def bcast(t):
        return t.expand(B, *t.shape[1:])

    counts, part, full, cols = bcast(plan.work), bcast(plan.part), bcast(plan.full), bcast(plan.cols)
    win, cwin, cov = bcast(plan.win), bcast(plan.cwin), bcast(plan.cov)
    upcast = q.dtype == torch.bfloat16 and not gpu_path(q)
    n_m = -(-Sq // plan.block_m)
    _vertical_slash_fwd[(n_m, B * Hq)](
        q, k, v, out, lse, counts, part, full, cols, win, cwin, cov,
        scale, float(softcap) if softcap is not None else 1.0,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0), lse.stride(1), lse.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2),
        part.stride(0), part.stride(1), full.stride(0), full.stride(1), cols.stride(0), cols.stride(1),
        win.stride(0), win.stride(1), cwin.stride(0), cwin.stride(1), cov.stride(0), cov.stride(1),
        Hq, Sq, Sk, Hq // Hkv, Hq // counts.shape[1], n_m,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_D=D,
        SOFTCAP=softcap is not None, RETURN_LSE=return_lse,
        PREC="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
        MASKED_STAGES=masked_stages or cfg["masked_stages"],
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return (out, lse) if return_lse else out


__all__ = ["vertical_slash_attention", "plan_vertical_slash", "VerticalSlashPlan", "default_config"]
