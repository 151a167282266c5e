"""XAttention's strided antidiagonal block scores in ONE pass over the strided GEMM (reference twin:
``accel.policies.xattention.antidiagonal_block_scores``; two-pass kernel: ``antidiag_score.py``, whose docstring
describes the strided logits, the causality and the GQA indexing shared here).

The two-pass kernel computes every strided logit twice (row max / sum, then the normalised probabilities). Here each
program (strided row tile, batch * query head) visits its column tiles once, keeping the online row max m and sum l
(log2 domain), and writes for every (row r, key block kb) of the tile one float32 partial into a scratch buffer:

    v[r, kb] = log2( sum_{c in kb} exp2(s_rc - m_r(t)) ) + (m_r(t) - m0_r)

where m_r(t) is the running max after the tile that holds kb and m0_r the row max after the first tile (column 0,
visible to every row). v is log2(sum_{c in kb} exp2(s_rc - m0_r)) evaluated without overflow, and it is small for the
cells that matter (|m_r(t) - m0_r| is the growth of the row max after the first tile), so its float32 rounding costs
~1e-6 relative after exp2. After the loop (same program, behind a CTA barrier) the epilogue reads the tile's partials
back, rescales ``exp2(v - (m_final - m0)) / l_final`` and sums the block/stride rows of each query block into the
output cells. One float per (strided row, key block): 1/(block/stride) of the logits, i.e. the log2 + exp2 of the
partials cost 1/16 of one pass's exp2 at block 128 / stride 8.

Scratch [heads in a chunk, key blocks (padded to whole column tiles), strided rows (padded to whole row tiles)]
float32, rows contiguous (a tile's store is BLOCK_C/RPB runs of BLOCK_R floats). At 128K with stride 8 / block 128
that is 16384 x 1024 x 4 B = 64 MB per head; (batch, head) pairs run in chunks that fit ``scratch_bytes`` (default
``DEFAULT_SCRATCH_BYTES``), one launch per chunk, so peak memory is the budget (at least one head's scratch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .antidiag_score import _LOG2E, _logits, check_inputs
from .checks import gpu_path

DEFAULT_SCRATCH_BYTES = 512 << 20


@triton.jit
def _antidiag_onepass_fwd(
    Q, K, OUT, SCR, SQ, SK,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_om, stride_on,
    stride_sh, stride_sk,
    BH0, H, HKV, GROUP, Sq, Sk, LQ, LK, DIAG, NQ, NK, N_R_TILES,
    STRIDE: tl.constexpr, RPB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr, EPI_KB: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    HAS_DQ: tl.constexpr, TMA: tl.constexpr,
):
    NKB_T: tl.constexpr = BLOCK_C // RPB  # key blocks per column tile
    pid_r = N_R_TILES - 1 - tl.program_id(0)  # longest rows first
    pid_s = tl.program_id(1)  # (batch, head) slot inside this chunk
    bh = BH0 + pid_s
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kvh = h // GROUP
    kv_pair = (bh // H) * HKV + (bh % H) // GROUP  # K's (batch, kv head) row: TMA coordinate, scale row
    if TMA:
        Q_base = Q
        K_base = K
    else:
        Q_base = Q + b * stride_qb + h * stride_qh
        K_base = K + b * stride_kb + kvh * stride_kh
    S_base = SCR + pid_s.to(tl.int64) * stride_sh

    r0 = pid_r * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_r < LQ
    row_scale = tl.full([BLOCK_R], qk_scale, tl.float32)
    if HAS_DQ:  # FP8 operands: strided row r is q's token group r, column c k's group c (one scale each)
        row_scale = row_scale * tl.load(SQ + bh.to(tl.int64) * LQ + offs_r, mask=row_valid, other=0.0)
    SK_base = SK + kv_pair.to(tl.int64) * LK
    row_lim = offs_r + DIAG  # last visible strided column of each row
    r_last = tl.minimum(r0 + BLOCK_R, LQ) - 1
    n_cols = tl.minimum(r_last + DIAG + 1, LK)  # columns any row of the tile sees
    n_full = tl.minimum(r0 + DIAG + 1, LK)  # columns every row of the tile sees
    n_tiles = tl.cdiv(n_cols, BLOCK_C)
    n_iter = n_tiles * STRIDE

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    m0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for it in tl.range(0, n_iter):
        i = it % STRIDE
        start_c = (it // STRIDE) * BLOCK_C
        offs_c = start_c + tl.arange(0, BLOCK_C)
        if TMA:  # Q, K: descriptors over [pairs, groups, STRIDE * D] (one row per strided row / column)
            qt = Q.load([bh, r0, (STRIDE - 1 - i) * BLOCK_D]).reshape(BLOCK_R, BLOCK_D)
            kt = K.load([kv_pair, start_c, i * BLOCK_D]).reshape(BLOCK_C, BLOCK_D)
            acc = tl.dot(qt, kt.T, acc)
        else:
            acc = _logits(acc, Q_base, K_base, offs_r, offs_c, offs_d, i, Sq, Sk,
                          stride_qm, stride_qd, stride_kn, stride_kd, STRIDE, PREC, UPCAST)
        if i == STRIDE - 1:
            s = acc * row_scale[:, None]
            if HAS_DQ:
                s = s * tl.load(SK_base + offs_c, mask=offs_c < LK, other=0.0)[None, :]
            if start_c + BLOCK_C > n_full:
                s = tl.where((offs_c[None, :] <= row_lim[:, None]) & (offs_c[None, :] < LK), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            e = tl.sum(tl.reshape(p, [BLOCK_R, NKB_T, RPB]), 2)  # [BLOCK_R, NKB_T] partial sums per key block
            l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(e, 1)
            m_i = m_new
            m0 = tl.where(start_c == 0, m_safe, m0)
            v = tl.where(e > 0.0, tl.math.log2(tl.maximum(e, 1e-37)) + (m_safe - m0)[:, None], float("-inf"))
            offs_kb = start_c // RPB + tl.arange(0, NKB_T)
            tl.store(S_base + offs_kb[None, :] * stride_sk + offs_r[:, None], v)
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)

    # epilogue: the tile's partials, rescaled to the final max and sum, reduced over each query block's rows
    tl.debug_barrier()  # partials were stored by other threads of this program
    m_rel = tl.where(m_i == float("-inf"), 0.0, m_i) - m0
    inv_l = tl.where(row_valid & (l_i > 0.0), 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    n_kb = n_tiles * NKB_T  # key blocks written by this program
    offs_qb = r0 // RPB + tl.arange(0, BLOCK_R // RPB)
    out_base = OUT + b * stride_ob + h * stride_oh
    for kb0 in tl.range(0, n_kb, EPI_KB):
        offs_kb = kb0 + tl.arange(0, EPI_KB)
        kb_ok = offs_kb < n_kb
        v = tl.load(S_base + offs_kb[:, None] * stride_sk + offs_r[None, :], mask=kb_ok[:, None],
                    other=float("-inf"))  # [EPI_KB, BLOCK_R]
        p = tl.math.exp2(v - m_rel[None, :]) * inv_l[None, :]
        cells = tl.sum(tl.reshape(p, [EPI_KB, BLOCK_R // RPB, RPB]), 2)  # [EPI_KB, query blocks of the tile]
        tl.store(out_base + offs_qb[None, :] * stride_om + offs_kb[:, None] * stride_on, cells,
                 mask=(offs_qb[None, :] < NQ) & (kb_ok & (offs_kb < NK))[:, None])


def default_config(q: torch.Tensor) -> dict:
    """Tiles (strided rows x strided columns), epilogue key blocks per step, launch parameters. GPU choices come
    from the sm_90 register report in NOTES.md (no spills) and the H200 sweeps at 128K (bf16, head_dim 128, one
    run: 128x256/8/2 20.6 ms, 128x256/16/2 21.9, 128x128/8/3 24.8, 128x128/8/2 25.1, 128x64/8/3 34.3); interpreter:
    small tiles."""
    D = q.shape[-1]
    if not gpu_path(q):
        return dict(BLOCK_R=16, BLOCK_C=16, EPI_KB=8, num_warps=4, num_stages=1)
    if q.dtype == torch.float32:
        return dict(BLOCK_R=64, BLOCK_C=32, EPI_KB=32, num_warps=4, num_stages=2)
    if D <= 128:  # wider column tiles: fewer q re-reads from L2 per FLOP (see NOTES.md)
        return dict(BLOCK_R=128, BLOCK_C=256, EPI_KB=32, num_warps=8, num_stages=2)
    return dict(BLOCK_R=64, BLOCK_C=64, EPI_KB=32, num_warps=8, num_stages=2)


def _tiles(q: torch.Tensor, block: int, stride: int, config: dict | None) -> dict:
    rpb = block // stride
    cfg = default_config(q)
    if config:
        cfg.update(config)
    cfg["BLOCK_R"], cfg["BLOCK_C"] = max(cfg["BLOCK_R"], rpb, 16), max(cfg["BLOCK_C"], rpb, 16)
    cfg["EPI_KB"] = max(cfg.get("EPI_KB", 32), 1)
    for name in ("BLOCK_R", "BLOCK_C", "EPI_KB"):
        t = cfg[name]
        if t & (t - 1):
            raise ValueError(f"config {name}={t} must be a power of two")
    return cfg


def scratch_bytes_per_head(q: torch.Tensor, k: torch.Tensor, *, block: int = 128, stride: int = 8,
                           config: dict | None = None) -> int:
    """Scratch one (batch, query head) pair needs: padded strided rows x padded key blocks x 4 bytes."""
    cfg = _tiles(q, block, stride, config)
    lq, lk = -(-q.shape[2] // stride), -(-k.shape[2] // stride)
    lqp = triton.cdiv(lq, cfg["BLOCK_R"]) * cfg["BLOCK_R"]
    nkp = triton.cdiv(lk, cfg["BLOCK_C"]) * (cfg["BLOCK_C"] // (block // stride))
    return lqp * nkp * 4


def antidiagonal_scores_onepass(q: torch.Tensor, k: torch.Tensor, *, block: int = 128, stride: int = 8,
                                config: dict | None = None, scratch_bytes: int | None = None,
                                fp8: bool = False) -> torch.Tensor:
    """Same contract as ``antidiag_score.antidiagonal_scores`` (float32 [B, Hq, ceil(Sq/block), ceil(Sk/block)]),
    one pass over the strided GEMM. ``scratch_bytes`` bounds the float32 scratch (default DEFAULT_SCRATCH_BYTES):
    (batch, head) pairs run in chunks of ``scratch_bytes // scratch_bytes_per_head`` (at least one) per launch.
    ``config``: BLOCK_R, BLOCK_C (powers of two), EPI_KB (key blocks per epilogue step), num_warps, num_stages,
    TMA (with ``fp8``: operand tiles through TMA descriptors over ``fp8_quant.grouped_view``; same results).

    ``fp8``: the strided GEMM on float8_e4m3 copies of q and of the centred k, each group of ``stride`` tokens (one
    strided row or column) scaled to the e4m3 range (kernels/triton/fp8_quant.py); the row's and the column's
    scales multiply each logit. Centring k shifts each row's logits by a constant, which the row softmax cancels.
    Twin: the torch estimate on ``dequantize_fp8`` of the same copies (``fp8_operands``)."""
    check_inputs(q, k, block, stride)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    nq, nk = -(-Sq // block), -(-Sk // block)
    rpb = block // stride
    cfg = _tiles(q, block, stride, config)
    if fp8 and gpu_path(q) and "num_stages" not in (config or {}):
        # FP8 tiles take half the shared memory: two more K stages in flight (H200, 128 x 256 / 8 warps, structured
        # inputs: 32K 1.043 -> 0.946 ms, 128K 12.09 -> 10.59 ms; 3 stages 0.951 / 10.67, 128 x 128 / 4 stages
        # 1.036 / 11.77, 256 x 128 tiles 1.11+ / 12.97+)
        cfg["num_stages"] = 4
    br, bc = cfg["BLOCK_R"], cfg["BLOCK_C"]
    lq, lk = -(-Sq // stride), -(-Sk // stride)
    diag = (Sk - Sq + stride - 1) // stride
    n_r_tiles = triton.cdiv(lq, br)
    lqp, nkp = n_r_tiles * br, triton.cdiv(lk, bc) * (bc // rpb)
    per_head = lqp * nkp * 4
    if lqp * nkp >= 2**31:  # int32 offsets inside one pair's scratch (~1.5M tokens at stride 8, block 128)
        raise ValueError(f"one-pass scratch of {lqp} x {nkp} floats per head is too large (>= 2^31 elements); "
                         "use method='two_pass'")
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.float32, device=q.device)
    if B == 0 or Hq == 0 or Sq == 0:
        return out
    budget = DEFAULT_SCRATCH_BYTES if scratch_bytes is None else scratch_bytes
    n_bh = B * Hq
    chunk = max(1, min(n_bh, budget // per_head))
    scratch = torch.empty(chunk, nkp, lqp, dtype=torch.float32, device=q.device)
    upcast = q.dtype == torch.bfloat16 and not gpu_path(q)
    prec = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    sq = sk = out  # unused pointers unless fp8
    tma = bool(cfg.get("TMA", False))
    if tma and not fp8:
        raise ValueError("config TMA=True needs fp8=True (the descriptors cover quantize_fp8's whole-group copies)")
    if fp8:
        (q, sq), (k, sk) = fp8_operands(q, k, stride)  # scales [B, Hq, lq] and [B, Hkv, lk]
        upcast, prec = False, "tf32"
    qa, ka = q, k
    if tma:  # strided row r of q is group r of quantize_fp8's copy, column c of k group c: 2-D tiles per head
        from triton.tools.tensor_descriptor import TensorDescriptor

        from .fp8_quant import grouped_view

        qa = TensorDescriptor.from_tensor(grouped_view(q, stride), [1, br, D])
        ka = TensorDescriptor.from_tensor(grouped_view(k, stride), [1, bc, D])
    for bh0 in range(0, n_bh, chunk):
        n = min(chunk, n_bh - bh0)
        _antidiag_onepass_fwd[(n_r_tiles, n)](
            qa, ka, out, scratch, sq, sk,
            _LOG2E / (D**0.5) / stride,
            *q.stride(), *k.stride(), *out.stride(), scratch.stride(0), scratch.stride(1),
            bh0, Hq, Hkv, Hq // Hkv, Sq, Sk, lq, lk, diag, nq, nk, n_r_tiles,
            STRIDE=stride, RPB=rpb, BLOCK_R=br, BLOCK_C=bc, BLOCK_D=D, EPI_KB=cfg["EPI_KB"],
            PREC=prec, UPCAST=upcast, HAS_DQ=fp8, TMA=tma,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out


def fp8_operands(q: torch.Tensor, k: torch.Tensor, stride: int):
    """((q8, q_scale), (k8, k_scale)): the FP8 copies the ``fp8`` estimate multiplies, one scale per group of
    ``stride`` tokens (k centred on ``fp8_quant.center_vector``)."""
    from .fp8_quant import quantize_fp8

    return quantize_fp8(q, group=stride), quantize_fp8(k, group=stride, center=True)


__all__ = ["antidiagonal_scores_onepass", "fp8_operands", "scratch_bytes_per_head", "DEFAULT_SCRATCH_BYTES",
           "default_config"]
