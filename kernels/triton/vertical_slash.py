"""Triton vertical-slash attention forward (MInference 1.0) for ``VerticalSlashLayout``, exact.

Reference twin: ``kernels.reference_sparse.vertical_slash_attention``. Key j is visible to the query at position p
when j is a kept column ("vertical") or ``p - j`` a kept diagonal offset ("slash"), and ``j <= p``.

Decomposition (one fused kernel, the conversion runs in torch on the device, no Python loops over blocks):

1. ``plan_vertical_slash`` turns the layout into, per (batch, layout head, query tile of ``block_m`` queries):
   - the key tiles of ``block_n`` keys that any kept diagonal crosses inside this query tile (a BlockLayout);
   - the kept columns that lie outside those tiles and are not after the tile's last query (a column list);
   - per (batch, layout head) lookup tables of kept offsets and kept columns over 0..Sk-1 (int8).
2. The kernel runs one program per (query tile, batch * query head) and one online softmax over
   (a) the listed key tiles with the exact element mask ``(diag[p - j] or col[j]) and j <= p`` and
   (b) the remaining columns, gathered ``block_n`` at a time, with the causal mask ``j <= p``.
   Every visible (query, key) pair is counted exactly once: a column inside a listed tile is counted by (a) only.

MInference's own kernel widens slashes to whole blocks; this one keeps the layout's semantics exactly, so it equals
the reference (and, with every offset kept, dense causal attention). A plan can be reused for several layers that
share a layout (``plan=``). GQA reads KV head ``h // (Hq // Hkv)``; K/V are never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from accel.layouts import VerticalSlashLayout

from ..reference_sparse import block_mask_to_layout, validate_vertical_slash_layout
from .checks import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, check_qkv
from .online_softmax import softmax_step



@dataclass
class VerticalSlashPlan:
    """Kernel metadata for one (layout, q_len, kv_len). Heads/batch are the layout's (B_L, H_L)."""

    counts: torch.Tensor  # [B_L, H_L, n_q_tiles] int32: key tiles crossed by slashes
    indices: torch.Tensor  # [B_L, H_L, n_q_tiles, max_tiles] int32
    col_counts: torch.Tensor  # [B_L, H_L, n_q_tiles] int32: columns outside those tiles
    col_indices: torch.Tensor  # [B_L, H_L, n_q_tiles, max_cols] int32, ascending
    diag_table: torch.Tensor  # [B_L, H_L, Sk] int8: offset kept
    col_table: torch.Tensor  # [B_L, H_L, Sk] int8: column kept
    q_len: int
    kv_len: int
    block_m: int
    block_n: int


def _table(values: torch.Tensor, n: int) -> torch.Tensor:
    v = values.long()
    v = torch.where((v >= 0) & (v < n), v, n)
    t = torch.zeros(*values.shape[:2], n + 1, dtype=torch.int8, device=values.device)
    t.scatter_(-1, v, 1)
    return t[..., :n].contiguous()


def plan_vertical_slash(layout: VerticalSlashLayout, q_len: int, kv_len: int, block_m: int = 64,
                        block_n: int = 64, *, chunk: int = 256) -> VerticalSlashPlan:
    """Convert a vertical-slash layout into the kernel's tiles + columns (torch, on the layout's device; memory
    O(chunk * n_k_tiles + n_q_tiles * n_cols) per head)."""
    dev = layout.columns.device
    diag = _table(layout.offsets, kv_len)
    colt = _table(layout.columns, kv_len)
    BL, HL = diag.shape[:2]
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    off = kv_len - q_len
    # prefix count of kept offsets: n_off(<= d) for d in [-1, Sk)
    csum = torch.cat([torch.zeros(BL, HL, 1, dtype=torch.int32, device=dev), diag.cumsum(-1, dtype=torch.int32)], -1)
    n_idx = torch.arange(nk, device=dev)
    # kept columns, ascending and unique (dropped ones become kv_len)
    cols = layout.columns.long()
    cols = torch.where((cols >= 0) & (cols < kv_len), cols, kv_len).sort(-1).values
    if cols.shape[-1] > 1:
        dup = torch.cat([torch.zeros_like(cols[..., :1], dtype=torch.bool), cols[..., 1:] == cols[..., :-1]], -1)
        cols = torch.where(dup, kv_len, cols).sort(-1).values
    col_tile = (cols // block_n).clamp(max=nk - 1)
    touched_all, keep_cols = [], []
    for s in range(0, nq, chunk):
        m = torch.arange(s, min(nq, s + chunk), device=dev)
        p0 = off + m * block_m
        p1 = off + torch.clamp((m + 1) * block_m, max=q_len) - 1
        # tile n is crossed by an offset d with p0 - d <= n*bn + bn - 1 and p1 - d >= n*bn
        d_lo = (p0[:, None] - n_idx[None, :] * block_n - block_n + 1).clamp(min=0)
        d_hi = p1[:, None] - n_idx[None, :] * block_n  # may be negative: no offset
        d_hi = d_hi.clamp(min=-1, max=kv_len - 1)
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
    return VerticalSlashPlan(tiles.counts, tiles.indices, col_counts, col_indices.contiguous(), diag, colt,
                             q_len, kv_len, block_m, block_n)


@triton.jit
def _vertical_slash_fwd(
    Q, K, V, O, LSE, CNT, IDX, CCNT, CIDX, DTAB, CTAB,
    qk_scale, softcap,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ik,
    stride_ccb, stride_cch, stride_ccm,
    stride_cib, stride_cih, stride_cim, stride_cik,
    stride_tb, stride_th,
    H, Sq, Sk, GROUP, LAYOUT_GROUP, N_M_TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, RETURN_LSE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
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
    qpos = offs_m + (Sk - Sq)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    K_base = K + b * stride_kb + kvh * stride_kh
    V_base = V + b * stride_vb + kvh * stride_vh
    dtab = DTAB + b * stride_tb + lh * stride_th
    ctab = CTAB + b * stride_tb + lh * stride_th

    # (a) key tiles crossed by kept diagonals: exact element mask
    cnt = tl.load(CNT + b * stride_cb + lh * stride_ch + pid_m * stride_cm)
    idx_row = IDX + b * stride_ib + lh * stride_ih + pid_m * stride_im
    for t in range(0, cnt):
        start_n = tl.load(idx_row + t * stride_ik) * BLOCK_N
        offs_n = start_n + offs_j
        in_k = offs_n < Sk
        kT = tl.load(K_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=in_k[None, :], other=0.0)
        v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=in_k[:, None], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
        qk = tl.dot(q, kT, input_precision=PREC)
        dist = qpos[:, None] - offs_n[None, :]
        causal = dist >= 0
        on_diag = tl.load(dtab + tl.minimum(tl.maximum(dist, 0), Sk - 1), mask=causal, other=0) != 0
        on_col = tl.load(ctab + offs_n, mask=in_k, other=0) != 0
        keep = causal & (on_diag | on_col[None, :])
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, qk, v, keep, qk_scale, softcap, True, SOFTCAP, PREC, UPCAST)

    # (b) kept columns outside those tiles, gathered BLOCK_N at a time
    ccnt = tl.load(CCNT + b * stride_ccb + lh * stride_cch + pid_m * stride_ccm)
    cidx_row = CIDX + b * stride_cib + lh * stride_cih + pid_m * stride_cim
    for c0 in range(0, ccnt, BLOCK_N):
        valid = c0 + offs_j < ccnt
        cols = tl.load(cidx_row + (c0 + offs_j) * stride_cik, mask=valid, other=0)
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


def _check(q, k, v, layout):
    if not isinstance(layout, VerticalSlashLayout):
        raise ValueError(f"expected a VerticalSlashLayout, got {type(layout).__name__}")
    check_qkv(q, k, v, "vertical-slash")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    for t in (layout.columns, layout.offsets):
        if t.dim() != 3 or t.shape[0] not in (B, 1) or t.shape[1] == 0 or Hq % t.shape[1]:
            raise ValueError(f"VerticalSlashLayout tensors must be [B or 1, H_L, n] with H_L dividing {Hq}, got "
                             f"{tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"VerticalSlashLayout is on {t.device} but q is on {q.device}")


def vertical_slash_attention(q, k, v, layout: VerticalSlashLayout, *, scale=None, softcap=None, return_lse=False,
                             check=False, plan: VerticalSlashPlan | None = None, block_m: int = 64,
                             block_n: int = 64, num_warps: int | None = None, num_stages: int | None = None):
    """Exact vertical-slash causal attention. q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D]. Returns out (q's dtype) and
    with ``return_lse`` lse [B, Hq, Sq] float32 (natural log; -inf and output 0 for rows that see no key).
    ``check=True`` validates the layout's contents first. ``plan`` (from ``plan_vertical_slash``) skips the
    conversion, e.g. for layers sharing a layout."""
    _check(q, k, v, layout)
    if check:
        validate_vertical_slash_layout(layout, q, k)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    if plan is None:
        plan = plan_vertical_slash(layout, Sq, Sk, block_m, block_n)
    elif (plan.q_len, plan.kv_len) != (Sq, Sk):
        raise ValueError(f"plan was made for q_len={plan.q_len}, kv_len={plan.kv_len}, not {Sq}, {Sk}")
    out = torch.empty(B, Hq, Sq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq if return_lse else 1, dtype=torch.float32, device=q.device)
    if Sq == 0 or B == 0:
        return (out, lse[..., :Sq]) if return_lse else out

    def bcast(t):
        t = t.expand(B, *t.shape[1:])
        if t.shape[-1] == 0:
            t = torch.zeros(*t.shape[:-1], 1, dtype=t.dtype, device=t.device)
        return t

    counts, indices = bcast(plan.counts), bcast(plan.indices)
    ccounts, cindices = bcast(plan.col_counts), bcast(plan.col_indices)
    dtab, ctab = bcast(plan.diag_table), bcast(plan.col_table)
    upcast = q.dtype == torch.bfloat16 and not q.is_cuda
    n_m = -(-Sq // plan.block_m)
    if num_warps is None:
        num_warps = 4 if D <= 64 else 8
    if num_stages is None:
        num_stages = 2 if q.is_cuda else 1
    _vertical_slash_fwd[(n_m, B * Hq)](
        q, k, v, out, lse, counts, indices, ccounts, cindices, dtab, ctab,
        scale, float(softcap) if softcap is not None else 1.0,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0), lse.stride(1), lse.stride(2),
        *counts.stride(), *indices.stride(), *ccounts.stride(), *cindices.stride(),
        dtab.stride(0), dtab.stride(1),
        Hq, Sq, Sk, Hq // Hkv, Hq // counts.shape[1], n_m,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_D=D,
        SOFTCAP=softcap is not None, RETURN_LSE=return_lse,
        PREC="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )
    return (out, lse) if return_lse else out


__all__ = ["vertical_slash_attention", "plan_vertical_slash", "VerticalSlashPlan"]
