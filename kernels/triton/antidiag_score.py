"""XAttention's strided antidiagonal block scores in Triton (reference twin:
``accel.policies.xattention.antidiagonal_block_scores``).

Strided query row r gathers queries ``r*stride + (stride-1-i)`` and strided key column c gathers keys
``c*stride + i`` (i = 0..stride-1), so the strided logit is ``sum_i q[r*stride+stride-1-i] . k[c*stride+i]``, scaled
by ``1/sqrt(D)/stride``. It is softmaxed over the causally visible strided columns of its row and the probabilities
are summed into [B, Hq, ceil(Sq/block), ceil(Sk/block)] float32 block scores. Nothing strided is materialised: the
kernel is a GEMM over the flattened ``stride*D`` dimension whose K loop runs ``stride`` steps of ``D``, each
loading a [BLOCK_R, D] tile of queries (rows ``r*stride + stride-1-i``) and a [BLOCK_C, D] tile of keys
(rows ``c*stride + i``) straight from q and k. Memory: the output only.

One program per (strided row tile, batch * query head) runs two loops over the visible column tiles:
  1. online softmax statistics (row max and sum of exp2) in the log2 domain, log2(e) folded into the scale;
  2. the same logits again, normalised, reduced into the (query block, key block) cells the tile covers
     (tiles are whole blocks: BLOCK_R and BLOCK_C are multiples of block/stride; a reshape-sum does the reduction).
Each loop is flattened over (column tile, i) so that Triton pipelines the q/k tile loads like a GEMM K loop; the
softmax epilogue runs on the last i of each tile. Column tiles beyond the last row's causal limit are never visited,
and the causal/length mask is applied only to tiles that cross the first row's limit.

Causality at strided granularity (queries are the last Sq of Sk keys, off = Sk - Sq): column c is visible from row r
iff ``c*stride <= off + r*stride + stride - 1`` and ``c*stride < Sk``, i.e. ``c <= r + (off + stride - 1)//stride``
and ``c < ceil(Sk/stride)``; rows with ``r*stride >= Sq`` see nothing. Queries/keys past the ends load as zeros
(the reference pads with zeros). GQA reads KV head ``h // (Hq // Hkv)``; K is never repeated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, check_positive_ints, check_qk, gpu_path

MAX_ROWS_PER_BLOCK = 128  # block // stride: one block's strided rows must fit a tile
_LOG2E = 1.4426950408889634


@triton.jit
def _logits(acc, Q_base, K_base, offs_r, offs_c, offs_d, i, Sq, Sk,
            stride_qm, stride_qd, stride_kn, stride_kd,
            STRIDE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += q[rows r*STRIDE + STRIDE-1-i] @ k[rows c*STRIDE + i]^T for one i of the antidiagonal."""
    qrow = offs_r * STRIDE + (STRIDE - 1 - i)
    krow = offs_c * STRIDE + i
    q = tl.load(Q_base + qrow[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qrow[:, None] < Sq, other=0.0)
    kT = tl.load(K_base + krow[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=krow[None, :] < Sk, other=0.0)
    if UPCAST:  # the interpreter's dot mishandles bfloat16 (stored as uint16): compute it in float32
        q = q.to(tl.float32)
        kT = kT.to(tl.float32)
    return tl.dot(q, kT, acc, input_precision=PREC)


@triton.jit
def _antidiag_score_fwd(
    Q, K, OUT,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_om, stride_on,
    H, GROUP, Sq, Sk, LQ, LK, DIAG, NQ, NK, N_R_TILES,
    STRIDE: tl.constexpr, RPB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_r = N_R_TILES - 1 - tl.program_id(0)  # longest rows first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP
    Q_base = Q + b * stride_qb + h * stride_qh
    K_base = K + b * stride_kb + kvh * stride_kh

    r0 = pid_r * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_r < LQ
    row_lim = offs_r + DIAG  # last visible strided column of each row
    r_last = tl.minimum(r0 + BLOCK_R, LQ) - 1
    n_cols = tl.minimum(r_last + DIAG + 1, LK)  # columns any row of the tile sees
    n_full = tl.minimum(r0 + DIAG + 1, LK)  # columns every row of the tile sees
    n_iter = tl.cdiv(n_cols, BLOCK_C) * STRIDE

    # pass 1: row max and sum of exp2 (log2 domain)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for it in tl.range(0, n_iter):
        i = it % STRIDE
        start_c = (it // STRIDE) * BLOCK_C
        offs_c = start_c + tl.arange(0, BLOCK_C)
        acc = _logits(acc, Q_base, K_base, offs_r, offs_c, offs_d, i, Sq, Sk,
                      stride_qm, stride_qd, stride_kn, stride_kd, STRIDE, PREC, UPCAST)
        if i == STRIDE - 1:
            s = acc * qk_scale
            if start_c + BLOCK_C > n_full:
                s = tl.where((offs_c[None, :] <= row_lim[:, None]) & (offs_c[None, :] < LK), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)

    # pass 2: normalised probabilities, summed per (query block, key block)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(row_valid & (l_i > 0.0), 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    offs_qb = r0 // RPB + tl.arange(0, BLOCK_R // RPB)
    out_base = OUT + b * stride_ob + h * stride_oh
    for it in tl.range(0, n_iter):
        i = it % STRIDE
        start_c = (it // STRIDE) * BLOCK_C
        offs_c = start_c + tl.arange(0, BLOCK_C)
        acc = _logits(acc, Q_base, K_base, offs_r, offs_c, offs_d, i, Sq, Sk,
                      stride_qm, stride_qd, stride_kn, stride_kd, STRIDE, PREC, UPCAST)
        if i == STRIDE - 1:
            s = acc * qk_scale
            if start_c + BLOCK_C > n_full:
                s = tl.where((offs_c[None, :] <= row_lim[:, None]) & (offs_c[None, :] < LK), s, float("-inf"))
            p = tl.math.exp2(s - m_safe[:, None]) * inv_l[:, None]
            p = tl.sum(tl.reshape(p, [BLOCK_R // RPB, RPB, BLOCK_C]), 1)
            cells = tl.sum(tl.reshape(p, [BLOCK_R // RPB, BLOCK_C // RPB, RPB]), 2)
            offs_kb = start_c // RPB + tl.arange(0, BLOCK_C // RPB)
            tl.store(out_base + offs_qb[:, None] * stride_om + offs_kb[None, :] * stride_on, cells,
                     mask=(offs_qb[:, None] < NQ) & (offs_kb[None, :] < NK))
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)


def _default_config(q: torch.Tensor) -> dict:
    """Tiles (strided rows x strided columns) and launch parameters. On the GPU (H100, bf16, head_dim 128):
    128 x 64 with 8 warps and 3 stages of q/k tiles in flight; smaller for head_dim 256 and float32. Under the
    interpreter: small tiles (fewer wasted masked elements on tiny inputs)."""
    D = q.shape[-1]
    if not gpu_path(q):
        return dict(BLOCK_R=16, BLOCK_C=16, num_warps=4, num_stages=1)
    if q.dtype == torch.float32:
        return dict(BLOCK_R=64, BLOCK_C=32, num_warps=4, num_stages=2)
    if D <= 128:
        return dict(BLOCK_R=128, BLOCK_C=64, num_warps=8, num_stages=3)
    return dict(BLOCK_R=64, BLOCK_C=64, num_warps=8, num_stages=2)


def check_inputs(q: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> None:
    """Shape/dtype/device/option checks done before every launch (no device sync). Raises ValueError."""
    check_qk(q, k, "antidiagonal scores", "antidiagonal-score",
             "accel.policies.xattention.antidiagonal_block_scores")
    check_positive_ints(block=block, stride=stride)
    if block % stride:
        raise ValueError(f"stride ({stride}) must divide block ({block})")
    rpb = block // stride
    if rpb & (rpb - 1) or rpb > MAX_ROWS_PER_BLOCK:
        raise ValueError(f"block // stride ({block} // {stride} = {rpb}) must be a power of two <= "
                         f"{MAX_ROWS_PER_BLOCK} (strided rows per block)")


METHODS = ("auto", "two_pass", "one_pass")


# The one-pass kernel reads more than it computes at 128x64 tiles (about 43 FLOP per byte of L2 traffic), so wider
# column tiles win: on the H200 at 128K 128x256/8/2 20.6 ms, 128x256/16/2 21.9, 128x128/8/3 21.7-24.8, 128x64/8/3
# 27.4-34.3 (results/bench_estimation_xattn.md, bench_estimation_tune.md); all compile without spills for sm_90
# (kernels/triton/NOTES.md). The first call per shape bucket times them and keeps the fastest.
ONEPASS_CANDIDATES = [
    dict(BLOCK_R=128, BLOCK_C=256, num_warps=8, num_stages=2),
    dict(BLOCK_R=128, BLOCK_C=256, num_warps=16, num_stages=2),
    dict(BLOCK_R=128, BLOCK_C=128, num_warps=8, num_stages=3),
    dict(BLOCK_R=128, BLOCK_C=64, num_warps=8, num_stages=3),
]


# FP8 operands take half the shared memory per tile: deeper K pipelines fit (H200, 128 x 256 / 8 warps: 32K
# 1.043 -> 0.946 ms with 4 stages, 128K 12.09 -> 10.59 ms; see antidiag_score_onepass.antidiagonal_scores_onepass)
# TMA=True: the same tiles read through TMA descriptors over quantize_fp8's whole-group copies (H100, quantisation
# included: 32K 0.847 -> 0.823 ms, 128K 10.26 -> 9.77 ms; kernels/triton/NOTES.md)
ONEPASS_FP8_CANDIDATES = [
    dict(BLOCK_R=128, BLOCK_C=256, num_warps=8, num_stages=4),
    dict(BLOCK_R=128, BLOCK_C=256, num_warps=8, num_stages=3),
    dict(BLOCK_R=128, BLOCK_C=256, num_warps=8, num_stages=2),
    dict(BLOCK_R=128, BLOCK_C=128, num_warps=8, num_stages=4),
    dict(BLOCK_R=128, BLOCK_C=256, num_warps=8, num_stages=4, TMA=True),
    dict(BLOCK_R=128, BLOCK_C=256, num_warps=8, num_stages=3, TMA=True),
    dict(BLOCK_R=128, BLOCK_C=128, num_warps=8, num_stages=4, TMA=True),
]


def _measured_onepass_config(q, k, block, stride, scratch_bytes, fp8: bool = False) -> dict:
    """The fastest of ONEPASS_CANDIDATES (ONEPASS_FP8_CANDIDATES with ``fp8``) for this shape bucket, timed once
    per process (accel.autopick)."""
    from accel.autopick import _bucket, fastest_config

    from . import antidiag_score_onepass as op

    key = ("antidiag_onepass", q.shape[1], k.shape[1], q.shape[-1], q.dtype, block, stride,
           _bucket(q.shape[2]), _bucket(k.shape[2]), str(q.device), fp8)
    candidates = ONEPASS_FP8_CANDIDATES if fp8 else ONEPASS_CANDIDATES
    return fastest_config(key, candidates, lambda c: op.antidiagonal_scores_onepass(
        q, k, block=block, stride=stride, config=c, scratch_bytes=scratch_bytes, fp8=fp8))


def antidiagonal_scores(q: torch.Tensor, k: torch.Tensor, *, block: int = 128, stride: int = 8,
                        config: dict | None = None, method: str = "auto",
                        scratch_bytes: int | None = None, fp8: bool = False) -> torch.Tensor:
    """XAttention block scores. q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (Sq <= Sk, any strides); returns float32
    [B, Hq, ceil(Sq/block), ceil(Sk/block)], equal to ``antidiagonal_block_scores(q, k, block, stride)``: each
    query-block row sums to its number of strided rows that hold a query. ``config`` overrides the tiles / launch
    (BLOCK_R, BLOCK_C: strided rows / columns per tile, powers of two; num_warps, num_stages) for tuning.

    ``method``: "two_pass" (this file's kernel: row statistics, then probabilities; memory = output), "one_pass"
    (antidiag_score_onepass.py: half the tensor-core work, float32 scratch of at most ``scratch_bytes``, default
    512 MB, at least one head's: (Sq/stride) x (Sk/block) x 4 B), "auto" = one_pass on CUDA when one head's
    scratch fits the budget, else two_pass (always two_pass under the CPU interpreter).

    ``fp8``: the one-pass kernel on FP8 copies of q and centred k, one scale per strided row or column
    (``antidiagonal_scores_onepass``); needs the one-pass method (auto picks it; two_pass raises)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if fp8 and method == "two_pass":
        raise ValueError("fp8 estimation runs on the one-pass kernel: use method='auto' or 'one_pass'")
    if method != "two_pass":
        check_inputs(q, k, block, stride)
        from . import antidiag_score_onepass as op

        budget = op.DEFAULT_SCRATCH_BYTES if scratch_bytes is None else scratch_bytes
        if fp8 or method == "one_pass" or (gpu_path(q) and op.scratch_bytes_per_head(
                q, k, block=block, stride=stride, config=config) <= budget):
            if config is None and gpu_path(q) and q.dtype != torch.float32 and q.shape[-1] <= 128:
                config = _measured_onepass_config(q, k, block, stride, scratch_bytes, fp8)
            return op.antidiagonal_scores_onepass(q, k, block=block, stride=stride, config=config,
                                                  scratch_bytes=scratch_bytes, fp8=fp8)
    check_inputs(q, k, block, stride)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    nq, nk = -(-Sq // block), -(-Sk // block)
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.float32, device=q.device)
    if B == 0 or Hq == 0 or Sq == 0:
        return out
    rpb = block // stride
    cfg = _default_config(q)
    if config:
        cfg.update(config)
    br, bc = max(cfg["BLOCK_R"], rpb, 16), max(cfg["BLOCK_C"], rpb, 16)
    for name, t in (("BLOCK_R", br), ("BLOCK_C", bc)):
        if t & (t - 1):
            raise ValueError(f"config {name}={t} must be a power of two")
    lq, lk = -(-Sq // stride), -(-Sk // stride)  # strided rows / columns that hold a query / key
    diag = (Sk - Sq + stride - 1) // stride  # row r sees columns c <= r + diag
    upcast = q.dtype == torch.bfloat16 and not gpu_path(q)
    n_r_tiles = triton.cdiv(lq, br)
    grid = (n_r_tiles, B * Hq)
    _antidiag_score_fwd[grid](
        q, k, out,
        _LOG2E / (D**0.5) / stride,
        *q.stride(), *k.stride(), *out.stride(),
        Hq, Hq // Hkv, Sq, Sk, lq, lk, diag, nq, nk, n_r_tiles,
        STRIDE=stride, RPB=rpb, BLOCK_R=br, BLOCK_C=bc, BLOCK_D=D,
        PREC="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


__all__ = ["antidiagonal_scores", "check_inputs", "METHODS", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]
