"""Triton block-sparse attention forward for ``BlockLayout`` (reference twin: kernels/reference_sparse.py).

One program per (query tile, batch * query head). It reads the row's ``counts`` entry and loops over that many
key-block indices; each key block is processed in ``block_k // BLOCK_N`` sub-tiles with an online softmax in the
log2 domain (log2(e) folded into the scale). The causal mask is computed only for tiles that cross the row tile's
diagonal (or the end of the keys). GQA reads KV head ``h // (Hq // Hkv)``; K/V are never repeated. Query i of Sq sits
at key position ``Sk - Sq + i``. Optional outputs: the log-sum-exp (float32, natural log; -inf for rows that see no
key, whose output is 0) so partial results can be merged, and Gemma-style logit soft-capping.

Query tiles are launched longest-row-first (last query blocks first) so that causal work balances across SMs, and
query heads that share a KV head are adjacent in the grid so their K/V tiles are reused from L2.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from accel.layouts import BlockLayout

from ..reference_sparse import SUPPORTED_BLOCK_SIZES, validate_block_layout
from .checks import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, check_qkv, gpu_path
from .online_softmax import softmax_step

_LOG2E = 1.4426950408889634


@triton.jit
def _tile(acc, l_i, m_i, q, qpos, K_base, V_base, start_n, Sk, qk_scale, softcap,
          stride_kn, stride_kd, stride_vn, stride_vd,
          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr, EVEN_N: tl.constexpr,
          SOFTCAP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kT_ptrs = K_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if EVEN_N:
        kT = tl.load(kT_ptrs)
        v = tl.load(v_ptrs)
    else:
        kT = tl.load(kT_ptrs, mask=offs_n[None, :] < Sk, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < Sk, other=0.0)
    if UPCAST:  # the interpreter's dot mishandles bfloat16 (stored as uint16): compute it in float32
        kT = kT.to(tl.float32)
    qk = tl.dot(q, kT, input_precision=PREC)
    keep = qpos[:, None] >= offs_n[None, :]
    return softmax_step(acc, l_i, m_i, qk, v, keep, qk_scale, softcap, MASK, SOFTCAP, PREC, UPCAST)


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, LSE, CNT, IDX,
    qk_scale, softcap,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ik,
    H, Sq, Sk, GROUP, LAYOUT_GROUP, N_M_TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, LAYOUT_BK: tl.constexpr,
    M_PER_BLOCK: tl.constexpr, N_PER_BLOCK: tl.constexpr, EVEN_N: tl.constexpr,
    SOFTCAP: tl.constexpr, RETURN_LSE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ASCENDING: tl.constexpr, LOG_MAX_BLOCKS: tl.constexpr, EDGE_STAGES: tl.constexpr,
):
    pid_m = N_M_TILES - 1 - tl.program_id(0)  # longest rows first
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    lh = h // LAYOUT_GROUP
    row = pid_m // M_PER_BLOCK

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Sq, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = offs_m + (Sk - Sq)
    first_qpos = start_m + (Sk - Sq)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    K_base = K + b * stride_kb + kvh * stride_kh
    V_base = V + b * stride_vb + kvh * stride_vh
    cnt = tl.load(CNT + b * stride_cb + lh * stride_ch + row * stride_cm)
    idx_row = IDX + b * stride_ib + lh * stride_ih + row * stride_im
    if ASCENDING:
        # Rows are ascending, so the blocks every query of this tile sees in full (last key <= first query) are a
        # prefix: binary-search its length, then run it without masks in a branch-free loop that Triton can
        # software-pipeline (a branch inside the loop body would stop the pipelining), and the rest masked.
        lo = 0
        hi = cnt
        for _ in tl.static_range(LOG_MAX_BLOCKS):
            mid = (lo + hi) // 2
            kb_mid = tl.load(idx_row + mid * stride_ik, mask=lo < hi, other=0)
            full = (lo < hi) & ((kb_mid + 1) * LAYOUT_BK - 1 <= first_qpos)
            lo = tl.where(full, mid + 1, lo)
            hi = tl.where(full | (lo >= hi), hi, mid)
        for j in range(0, lo):
            kb = tl.load(idx_row + j * stride_ik)
            for sub in tl.static_range(N_PER_BLOCK):
                acc, l_i, m_i = _tile(acc, l_i, m_i, q, qpos, K_base, V_base, kb * LAYOUT_BK + sub * BLOCK_N, Sk,
                                      qk_scale, softcap, stride_kn, stride_kd, stride_vn, stride_vd,
                                      BLOCK_N, BLOCK_D, False, True, SOFTCAP, PREC, UPCAST)
        for j in tl.range(lo, cnt, num_stages=EDGE_STAGES):
            kb = tl.load(idx_row + j * stride_ik)
            for sub in tl.static_range(N_PER_BLOCK):
                acc, l_i, m_i = _tile(acc, l_i, m_i, q, qpos, K_base, V_base, kb * LAYOUT_BK + sub * BLOCK_N, Sk,
                                      qk_scale, softcap, stride_kn, stride_kd, stride_vn, stride_vd,
                                      BLOCK_N, BLOCK_D, True, EVEN_N, SOFTCAP, PREC, UPCAST)
    else:  # any order: decide per tile
        for j in range(0, cnt):
            kb = tl.load(idx_row + j * stride_ik)
            for sub in tl.static_range(N_PER_BLOCK):
                start_n = kb * LAYOUT_BK + sub * BLOCK_N
                if start_n + BLOCK_N - 1 > first_qpos:  # crosses the diagonal (or the end of the keys)
                    acc, l_i, m_i = _tile(acc, l_i, m_i, q, qpos, K_base, V_base, start_n, Sk, qk_scale, softcap,
                                          stride_kn, stride_kd, stride_vn, stride_vd,
                                          BLOCK_N, BLOCK_D, True, EVEN_N, SOFTCAP, PREC, UPCAST)
                else:
                    acc, l_i, m_i = _tile(acc, l_i, m_i, q, qpos, K_base, V_base, start_n, Sk, qk_scale, softcap,
                                          stride_kn, stride_kd, stride_vn, stride_vd,
                                          BLOCK_N, BLOCK_D, False, True, SOFTCAP, PREC, UPCAST)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < Sq)
    if RETURN_LSE:
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse, mask=offs_m < Sq)


def _default_config(q: torch.Tensor, block_q: int, block_k: int) -> dict:
    """Tile sizes and launch parameters. On the GPU: BLOCK_M 128 / BLOCK_N 64 with 8 warps and 3 stages for
    head_dim 128 (H100); smaller tiles for head_dim 256 and float32. Under the interpreter: the largest tiles."""
    D = q.shape[-1]
    if not gpu_path(q):
        return dict(BLOCK_M=min(block_q, 128), BLOCK_N=min(block_k, 128), num_warps=4, num_stages=1)
    if q.dtype == torch.float32:
        bm, bn, warps, stages = 64, 32, 4, 2
    elif D <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    elif D <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        # head_dim 256 under triton 3.6 (H200, scripts/diag_hd256.py): any num_stages=2 asked for 288-292 KB of
        # shared memory (limit 227 KB), 64x32 tiles included; unpipelined 64x64 tiles need 96 KB
        return dict(BLOCK_M=min(64, block_q), BLOCK_N=min(64, block_k), num_warps=4, num_stages=1, edge_stages=1)
    return dict(BLOCK_M=min(bm, block_q), BLOCK_N=min(bn, block_k), num_warps=warps, num_stages=stages)


def check_inputs(q, k, v, layout) -> None:
    """Shape/dtype/device checks done before every launch (cheap, no device sync). Raises ValueError."""
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"expected a BlockLayout, got {type(layout).__name__}")
    check_qkv(q, k, v, "block-sparse")
    B, Hq, Sq, D = q.shape
    for name, bs in (("block_q", layout.block_q), ("block_k", layout.block_k)):
        if bs not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"BlockLayout.{name}={bs} is not supported; use one of {SUPPORTED_BLOCK_SIZES}")
    c, i = layout.counts, layout.indices
    if c.dim() != 3 or i.dim() != 4 or tuple(i.shape[:3]) != tuple(c.shape):
        raise ValueError(f"BlockLayout counts [B, H, n_q_blocks] / indices [B, H, n_q_blocks, max_blocks] expected, "
                         f"got {tuple(c.shape)} / {tuple(i.shape)}")
    if c.dtype != torch.int32 or i.dtype != torch.int32:
        raise ValueError(f"BlockLayout counts and indices must be int32, got {c.dtype} / {i.dtype}")
    if c.device != q.device or i.device != q.device:
        raise ValueError(f"BlockLayout is on {c.device} but q is on {q.device}")
    if c.shape[0] not in (B, 1) or c.shape[1] == 0 or Hq % c.shape[1]:
        raise ValueError(f"layout batch/heads {tuple(c.shape[:2])} must be ({B} or 1, a divisor of {Hq})")
    nq = -(-Sq // layout.block_q)
    if c.shape[2] != nq:
        raise ValueError(f"layout has {c.shape[2]} query blocks but Sq={Sq} with block_q={layout.block_q} needs {nq}")


def block_sparse_attention(q, k, v, layout: BlockLayout, *, scale=None, softcap=None, return_lse=False,
                           check=False, config: dict | None = None):
    """Block-sparse causal attention. q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D] (any strides, last dim need not be
    contiguous); layout with block sizes in SUPPORTED_BLOCK_SIZES. Returns out [B, Hq, Sq, D] in q's dtype, and with
    ``return_lse`` also lse [B, Hq, Sq] float32 (natural log). ``check=True`` validates the layout's contents first
    (device sync). ``config`` overrides tiles/launch (BLOCK_M, BLOCK_N, num_warps, num_stages) for tuning."""
    check_inputs(q, k, v, layout)
    if check:
        validate_block_layout(layout, q, k)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    out = torch.empty(B, Hq, Sq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq if return_lse else 1, dtype=torch.float32, device=q.device)
    if Sq == 0 or B == 0 or Hq == 0:
        return (out, lse[..., :Sq]) if return_lse else out
    cfg = _default_config(q, layout.block_q, layout.block_k)
    if config:
        cfg.update(config)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if layout.block_q % bm or layout.block_k % bn:
        raise ValueError(f"tile {bm}x{bn} must divide the layout blocks {layout.block_q}x{layout.block_k}")
    counts = layout.counts.expand(B, -1, -1)
    indices = layout.indices.expand(B, -1, -1, -1)
    if indices.shape[-1] == 0:  # no block anywhere: keep a valid pointer
        indices = torch.zeros(*indices.shape[:3], 1, dtype=torch.int32, device=q.device)
    upcast = q.dtype == torch.bfloat16 and not gpu_path(q)
    n_m_tiles = triton.cdiv(Sq, bm)
    grid = (n_m_tiles, B * Hq)
    _block_sparse_fwd[grid](
        q, k, v, out, lse, counts, indices,
        scale, float(softcap) if softcap is not None else 1.0,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0), lse.stride(1), lse.stride(2),
        *counts.stride(), *indices.stride(),
        Hq, Sq, Sk, Hq // Hkv, Hq // counts.shape[1], n_m_tiles,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, LAYOUT_BK=layout.block_k,
        M_PER_BLOCK=layout.block_q // bm, N_PER_BLOCK=layout.block_k // bn, EVEN_N=Sk % bn == 0,
        SOFTCAP=softcap is not None, RETURN_LSE=return_lse,
        PREC="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
        ASCENDING=bool(layout.ascending), LOG_MAX_BLOCKS=max(1, indices.shape[-1].bit_length()),
        EDGE_STAGES=cfg.get("edge_stages", cfg["num_stages"]),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return (out, lse) if return_lse else out


__all__ = ["block_sparse_attention", "check_inputs", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]
