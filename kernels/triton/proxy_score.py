"""ProxyAttn's proxy-head token-level scores summed per block, in Triton (reference twin:
``accel.policies.proxy.proxy_block_scores``).

Proxy p averages the query heads ``p*per .. p*per+per-1`` (``per`` = heads_per_proxy) and the KV heads they read.
Query rows are sampled every ``stride`` rows: sampled row i is query ``min(i*stride + stride-1, Sq-1)`` (the last of
each ``stride`` rows; the last one clamped to the final query). Each sampled row is softmaxed over its causal keys
at token resolution and the probabilities are summed per (query block, key block): float32
[B, P, ceil(Sq/block), ceil(Sk/block)]; each query-block row sums to its number of sampled rows.

One program per (tile of BLOCK_R sampled rows, batch * proxy); the tile covers whole query blocks (BLOCK_R is a
multiple of block/stride), so every output cell is written by one program, with no atomics. Two loops over the
causally visible key tiles, both tensor-core GEMMs of the pooled query tile against a K tile:
  1. online row max and sum of exp2 (log2 domain: log2(e)/sqrt(D) is folded into the pooled queries);
  2. the same logits again, normalised, reduced in registers into the (query block, key block) cells of the tile
     (reshape-sums), one store per key block.
Each loop runs the unmasked bulk (keys visible to every row of the tile) without bounds checks or masks, then the
1-2 key groups that cross the tile's causal edge with the mask. Keys past the last row's position are never read.

Default ``method="lse"`` (single pass): the first loop alone, restarted per key block, writes each sampled row's
log2-sum-exp2 per key block to a float32 scratch [rows, key blocks] (one proxy's is 64 MB at 128K; proxies go in
groups under LSE_SCRATCH_BYTES); ``_lse_cells`` normalises each row over its blocks and sums each query block's rows:
the same scores with the logits computed once. H200, Llama-3.1-8B heads, structured inputs
(one proxy per KV head / heads_per_proxy=1), two-pass -> single pass: 32K 1.23 -> 0.83 ms / 3.45 -> 2.35 ms,
128K 11.57 -> 8.25 ms / 45.47 -> 32.72 ms, max difference 5e-6; extra peak memory 42 MB at 32K, 320 MB at 128K.

Pooling: a prepass kernel averages the proxy's query heads at the sampled rows only (fp32 sum, scaled by
log2(e)/sqrt(D), rounded to the input dtype for the dots) into [B, P, Sq/stride, D] -- 1/stride of one query head
per proxy, and it makes the main kernel's pooled tile a plain load that goes to shared memory for wgmma like any
operand (pooling inside the main kernel kept it in registers: 210 instead of 172 registers at 128x128, sm_90 AOT).
Keys: when ``per`` divides the GQA group size every head of a proxy reads
one KV head, so the kernel reads K directly (the default, one proxy per GQA group: no pooling at all); otherwise a
cheap prepass averages the KV heads of each proxy (weighted by how many of its query heads read each) into
[B, P, Sk, D]. Memory: the output and the pooled queries (plus the pooled keys when used), never O(rows x Sk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_positive_ints, check_qk, gpu_path
from .online_softmax import row_stats_step

MAX_ROWS_PER_BLOCK = 128  # block // stride: one query block's sampled rows must fit a tile
METHOD = "lse"  # see proxy_scores
LSE_SCRATCH_BYTES = 256 << 20  # per launch of the single-pass kernel (proxies are processed in groups under it)
_LOG2E = 1.4426950408889634


@triton.jit
def _logits(qp, K_base, start, offs_c0, offs_d, pos, Sk, stride_kn, stride_kd,
            MASKED: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """Scaled logits (log2 domain) of the pooled query tile against keys start .. start+BLOCK_C-1; with MASKED,
    keys after each row's position (and past Sk) are -inf."""
    offs_c = start + offs_c0
    if MASKED:  # clamped rows instead of a load mask (keys past Sk are masked below): no spills at 128x128
        kT = tl.load(K_base + tl.minimum(offs_c, Sk - 1)[None, :] * stride_kn + offs_d[:, None] * stride_kd)
    else:
        kT = tl.load(K_base + offs_c[None, :] * stride_kn + offs_d[:, None] * stride_kd)
    if DOT_F32:
        kT = kT.to(tl.float32)
    else:
        kT = kT.to(qp.dtype)
    s = tl.dot(qp, kT, input_precision=PREC)
    if MASKED:
        s = tl.where(offs_c[None, :] <= pos[:, None], s, float("-inf"))
    return s


@triton.jit
def _pool_queries(Q, QP, scale,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_pb, stride_ph, stride_pm, stride_pd,
                  P, PER, Sq, L,
                  STRIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """QP[b, p, i] = scale * mean over the proxy's query heads of q[b, h, min(i*STRIDE + STRIDE-1, Sq-1)]."""
    pid_bp = tl.program_id(1)
    b = (pid_bp // P).to(tl.int64)
    p = (pid_bp % P).to(tl.int64)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs_r < L
    qrow = tl.minimum(offs_r * STRIDE + STRIDE - 1, Sq - 1)
    q_ptrs = Q + b * stride_qb + qrow[:, None] * stride_qm + offs_d[None, :] * stride_qd
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for hh in range(PER):
        acc += tl.load(q_ptrs + (p * PER + hh) * stride_qh, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(QP + b * stride_pb + p * stride_ph + offs_r[:, None] * stride_pm + offs_d[None, :] * stride_pd,
             (acc * (scale / PER)).to(QP.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _row_tile(pid_r, L, Sq, OFF, STRIDE: tl.constexpr, BLOCK_R: tl.constexpr):
    """A tile of sampled rows: (first row, row ids, valid rows, key position each row sees up to, keys the tile's
    last row sees, keys every row of the tile sees)."""
    r0 = pid_r * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    row_valid = offs_r < L
    pos = OFF + tl.minimum(offs_r * STRIDE + STRIDE - 1, Sq - 1)  # keys 0..pos are visible
    r_last = tl.minimum(r0 + BLOCK_R, L) - 1
    n_keys = OFF + tl.minimum(r_last * STRIDE + STRIDE - 1, Sq - 1) + 1
    n_full = OFF + tl.minimum(r0 * STRIDE + STRIDE - 1, Sq - 1) + 1
    return r0, offs_r, row_valid, pos, n_keys, n_full


@triton.jit
def _proxy_score_fwd(
    QP, K, OUT,
    stride_pb, stride_ph, stride_pm, stride_pd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_om, stride_on,
    P, KV_DIV, Sq, Sk, L, OFF, NQ, NK, N_R_TILES,
    STRIDE: tl.constexpr, RPB: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    SUBS: tl.constexpr = BLOCK // BLOCK_C  # key tiles per key block
    NQB: tl.constexpr = BLOCK_R // RPB  # query blocks per row tile

    pid_r = N_R_TILES - 1 - tl.program_id(0)  # longest rows first
    pid_bp = tl.program_id(1)
    b = (pid_bp // P).to(tl.int64)
    p = (pid_bp % P).to(tl.int64)
    K_base = K + b * stride_kb + (p // KV_DIV) * stride_kh

    r0, offs_r, row_valid, pos, n_keys, n_full = _row_tile(pid_r, L, Sq, OFF, STRIDE, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c0 = tl.arange(0, BLOCK_C)
    # pooled query tile (prepass: scaled into the log2 domain, in the dot dtype)
    qp = tl.load(QP + b * stride_pb + p * stride_ph + offs_r[:, None] * stride_pm + offs_d[None, :] * stride_pd,
                 mask=row_valid[:, None], other=0.0)
    g_full = n_full // BLOCK  # key blocks without any masking
    g_all = tl.cdiv(n_keys, BLOCK)

    # pass 1: row max and sum of exp2
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for t in tl.range(0, g_full * SUBS):
        s = _logits(qp, K_base, t * BLOCK_C, offs_c0, offs_d, pos, Sk, stride_kn, stride_kd, False, DOT_F32, PREC)
        m_i, l_i = row_stats_step(m_i, l_i, s, False)
    for t in tl.range(g_full * SUBS, g_all * SUBS, num_stages=1):
        s = _logits(qp, K_base, t * BLOCK_C, offs_c0, offs_d, pos, Sk, stride_kn, stride_kd, True, DOT_F32, PREC)
        m_i, l_i = row_stats_step(m_i, l_i, s, False)  # key 0 is visible to every row: m finite after tile 0

    # pass 2: probabilities summed per (query block, key block). A tile's keys lie in one key block
    # (BLOCK_C <= BLOCK), so the cell sum is a row sum per tile, then a sum over the query block's rows.
    inv_l = tl.where(row_valid, 1.0 / l_i, 0.0)
    offs_qb = r0 // RPB + tl.arange(0, NQB)
    out_base = OUT + b * stride_ob + p * stride_oh
    q_ok = offs_qb < NQ
    for g in tl.range(0, g_full):
        rs = tl.zeros([BLOCK_R], dtype=tl.float32)
        for sub in tl.static_range(SUBS):
            s = _logits(qp, K_base, g * BLOCK + sub * BLOCK_C, offs_c0, offs_d, pos, Sk, stride_kn, stride_kd, False,
                        DOT_F32, PREC)
            rs += tl.sum(tl.math.exp2(s - m_i[:, None]), 1)
        cells = tl.sum(tl.reshape(rs * inv_l, [NQB, RPB]), 1)
        tl.store(out_base + offs_qb * stride_om + g * stride_on, cells, mask=q_ok)
    for g in tl.range(g_full, g_all, num_stages=1):
        rs = tl.zeros([BLOCK_R], dtype=tl.float32)
        for sub in tl.static_range(SUBS):
            s = _logits(qp, K_base, g * BLOCK + sub * BLOCK_C, offs_c0, offs_d, pos, Sk, stride_kn, stride_kd, True,
                        DOT_F32, PREC)
            rs += tl.sum(tl.math.exp2(s - m_i[:, None]), 1)
        cells = tl.sum(tl.reshape(rs * inv_l, [NQB, RPB]), 1)
        tl.store(out_base + offs_qb * stride_om + g * stride_on, cells, mask=q_ok)


@triton.jit
def _proxy_lse_fwd(
    QP, K, LSE,
    stride_pb, stride_ph, stride_pm, stride_pd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lc, stride_lr, stride_lk,
    PC, P0, KV_DIV, Sq, Sk, L, OFF, NK, ROWS, N_R_TILES,
    STRIDE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    """Single pass (``method="lse"``): per sampled row and key block, log2 of the sum of exp2(logits) over the
    block's visible keys, into LSE [B * PC, ROWS, NK] (-inf where the row sees none of the block, 0 on padding
    rows). Grid (row tiles, B * PC): proxies P0 .. P0 + PC - 1 of the pooled queries."""
    SUBS: tl.constexpr = BLOCK // BLOCK_C
    pid_r = N_R_TILES - 1 - tl.program_id(0)  # longest rows first
    pid_c = tl.program_id(1)
    b = (pid_c // PC).to(tl.int64)
    p = (P0 + pid_c % PC).to(tl.int64)
    K_base = K + b * stride_kb + (p // KV_DIV) * stride_kh

    r0, offs_r, row_valid, pos, n_keys, n_full = _row_tile(pid_r, L, Sq, OFF, STRIDE, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c0 = tl.arange(0, BLOCK_C)
    qp = tl.load(QP + b * stride_pb + p * stride_ph + offs_r[:, None] * stride_pm + offs_d[None, :] * stride_pd,
                 mask=row_valid[:, None], other=0.0)
    g_full = n_full // BLOCK
    g_all = tl.cdiv(n_keys, BLOCK)
    out = LSE + pid_c.to(tl.int64) * stride_lc + offs_r * stride_lr
    st_ok = offs_r < ROWS
    for g in tl.range(0, g_full):  # every row sees every key of these blocks
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for sub in tl.static_range(SUBS):
            s = _logits(qp, K_base, g * BLOCK + sub * BLOCK_C, offs_c0, offs_d, pos, Sk, stride_kn, stride_kd,
                        False, DOT_F32, PREC)
            m, acc = row_stats_step(m, acc, s, False)
        tl.store(out + g * stride_lk, tl.where(row_valid, m + tl.math.log2(acc), 0.0), mask=st_ok)
    for g in tl.range(g_full, g_all, num_stages=1):  # blocks crossing the tile's causal edge
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for sub in tl.static_range(SUBS):
            s = _logits(qp, K_base, g * BLOCK + sub * BLOCK_C, offs_c0, offs_d, pos, Sk, stride_kn, stride_kd,
                        True, DOT_F32, PREC)
            m, acc = row_stats_step(m, acc, s, True)  # a row may have no visible key yet
        lse = tl.where(acc > 0, m + tl.math.log2(tl.where(acc > 0, acc, 1.0)), float("-inf"))
        tl.store(out + g * stride_lk, tl.where(row_valid, lse, 0.0), mask=st_ok)
    for g in tl.range(g_all, NK):  # blocks after the tile's last row
        tl.store(out + g * stride_lk, tl.where(row_valid, float("-inf"), 0.0), mask=st_ok)


@triton.jit
def _lse_cells(LSE, OUT, stride_lc, stride_lr, stride_lk, stride_ob, stride_op, stride_om, stride_on,
               PC, P0, L, NK, RPB: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scores of one query block from the single pass's log-sums: per sampled row the max and sum of exp2 over all
    key blocks, then each block's normalised share summed over the query block's rows (padding rows add 0).
    Grid (query blocks, B * PC); reads the scratch twice, writes the output row once."""
    qb = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = pid_c // PC
    p = P0 + pid_c % PC
    offs_r = qb * RPB + tl.arange(0, RPB)
    offs_k0 = tl.arange(0, BLOCK_K)
    row_ok = offs_r < L
    base = LSE + pid_c.to(tl.int64) * stride_lc + offs_r[:, None] * stride_lr
    m = tl.full([RPB], float("-inf"), dtype=tl.float32)
    l = tl.zeros([RPB], dtype=tl.float32)
    for k0 in range(0, NK, BLOCK_K):
        offs_k = k0 + offs_k0
        x = tl.load(base + offs_k[None, :] * stride_lk, mask=row_ok[:, None] & (offs_k < NK)[None, :],
                    other=float("-inf"))
        m, l = row_stats_step(m, l, x, True)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv = tl.where(row_ok & (l > 0), 1.0 / tl.where(l > 0, l, 1.0), 0.0)
    out = OUT + b.to(tl.int64) * stride_ob + p * stride_op + qb * stride_om
    for k0 in range(0, NK, BLOCK_K):
        offs_k = k0 + offs_k0
        x = tl.load(base + offs_k[None, :] * stride_lk, mask=row_ok[:, None] & (offs_k < NK)[None, :],
                    other=float("-inf"))
        cells = tl.sum(tl.math.exp2(x - m_safe[:, None]) * inv[:, None], 0)
        tl.store(out + offs_k * stride_on, cells, mask=offs_k < NK)


def _default_config(q: torch.Tensor) -> dict:
    """Tiles (sampled rows x keys) and launch parameters. On the GPU (bf16/fp16): 64 x 128 with 4 warps (one
    warpgroup) and 3 stages of K tiles in flight for head_dim <= 128 (H100, 8 proxies, stride 8, structured inputs:
    32K 827 -> 617 us, 128K 8.31 -> 7.06 ms against the flash kernel's 128 x 128 / 8 warps; 2 or 4 stages, 32-row,
    64-key and 256-row tiles slower; scripts/tune_plan_kernels.py --proxy, results/tune_proxy_h100.txt), 64 x 64
    for head_dim 256, smaller for float32. Under the interpreter: small tiles."""
    D = q.shape[-1]
    if not gpu_path(q):
        return dict(BLOCK_R=16, BLOCK_C=16, num_warps=4, num_stages=1)
    if q.dtype == torch.float32:
        return dict(BLOCK_R=64, BLOCK_C=32, num_warps=4, num_stages=2)
    if D <= 128:
        return dict(BLOCK_R=64, BLOCK_C=128, num_warps=4, num_stages=3)
    return dict(BLOCK_R=64, BLOCK_C=64, num_warps=8, num_stages=2)


def check_inputs(q: torch.Tensor, k: torch.Tensor, block: int, heads_per_proxy: int, stride: int) -> None:
    """Shape/dtype/device/option checks done before every launch (no device sync). Raises ValueError."""
    check_qk(q, k, "proxy scores", "proxy-score", "accel.policies.proxy.proxy_block_scores")
    check_positive_ints(block=block, heads_per_proxy=heads_per_proxy, stride=stride)
    Hq = q.shape[1]
    if Hq % heads_per_proxy:
        raise ValueError(f"heads_per_proxy ({heads_per_proxy}) must divide the {Hq} query heads")
    if block % stride:
        raise ValueError(f"stride ({stride}) must divide block ({block})")
    rpb = block // stride
    if block & (block - 1) or rpb & (rpb - 1) or rpb > MAX_ROWS_PER_BLOCK:
        raise ValueError(f"block ({block}) and block // stride ({rpb}) must be powers of two, block // stride <= "
                         f"{MAX_ROWS_PER_BLOCK} (sampled rows per query block)")


def pooled_keys(k: torch.Tensor, n_q_heads: int, heads_per_proxy: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, P, Sk, D] in ``dtype``: per proxy, the mean over its query heads of the KV head each reads (the prepass
    for proxies whose heads read several KV heads). One proxy at a time: no [B, Hq, Sk, D] intermediate."""
    B, Hkv, Sk, D = k.shape
    group, per = n_q_heads // Hkv, heads_per_proxy
    P = n_q_heads // per
    out = torch.empty(B, P, Sk, D, dtype=dtype, device=k.device)
    for p in range(P):
        kv = torch.arange(p * per, (p + 1) * per) // group
        heads, counts = torch.unique(kv, return_counts=True)
        acc = torch.zeros(B, Sk, D, dtype=torch.float32, device=k.device)
        for h, c in zip(heads.tolist(), counts.tolist()):
            acc += k[:, h].float() * (c / per)
        out[:, p] = acc.to(dtype)
    return out


def proxy_scores(q: torch.Tensor, k: torch.Tensor, *, block: int = 128, heads_per_proxy: int | None = None,
                 stride: int = 8, config: dict | None = None, method: str | None = None) -> torch.Tensor:
    """ProxyAttn block scores. q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (Sq <= Sk, any strides); ``heads_per_proxy``
    (default: the GQA group size, one proxy per KV head) query heads per proxy. Returns float32
    [B, Hq // heads_per_proxy, ceil(Sq/block), ceil(Sk/block)], equal to
    ``proxy_block_scores(q, k, block, heads_per_proxy, stride)`` (up to the rounding of the pooled queries to the
    input dtype for the tensor-core dots). ``config`` overrides the tiles / launch (BLOCK_R sampled rows, BLOCK_C
    keys per tile, powers of two; num_warps, num_stages) for tuning. ``method``: "two_pass" (the logits twice,
    no scratch) or "lse" (the logits once, per-row block log-sums in a scratch of at most LSE_SCRATCH_BYTES, then a
    softmax over blocks per row); default METHOD."""
    if method not in (None, "two_pass", "lse"):
        raise ValueError(f"proxy_scores: method must be 'two_pass' or 'lse', got {method!r}")
    if heads_per_proxy is None and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) \
            and q.dim() == 4 and k.dim() == 4 and k.shape[1] and q.shape[1] % k.shape[1] == 0:
        heads_per_proxy = q.shape[1] // k.shape[1]
    check_inputs(q, k, block, heads_per_proxy if heads_per_proxy is not None else 1, stride)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    per = heads_per_proxy
    P = Hq // per
    group = Hq // Hkv
    nq, nk = -(-Sq // block), -(-Sk // block)
    out = torch.zeros(B, P, nq, nk, dtype=torch.float32, device=q.device)
    if B == 0 or P == 0 or Sq == 0:
        return out
    rpb = block // stride
    cfg = _default_config(q)
    if config:
        cfg.update(config)
    br, bc = max(cfg["BLOCK_R"], rpb, 16), min(max(cfg["BLOCK_C"], 16), block)  # a key tile inside one key block
    for name, t in (("BLOCK_R", br), ("BLOCK_C", bc)):
        if t & (t - 1):
            raise ValueError(f"config {name}={t} must be a power of two")
    dot_f32 = not gpu_path(q) or q.dtype == torch.float32  # the interpreter's bf16 dot is wrong: fp32 there
    if group % per == 0:
        k_src, kv_div = k, group // per  # every head of a proxy reads KV head p // kv_div: no pooling
    else:
        k_src, kv_div = pooled_keys(k, Hq, per, torch.float32 if dot_f32 else q.dtype), 1
    L = -(-Sq // stride)  # sampled rows
    qp = torch.empty(B, P, L, D, dtype=torch.float32 if dot_f32 else q.dtype, device=q.device)
    _pool_queries[(triton.cdiv(L, 32), B * P)](
        q, qp, _LOG2E / (D**0.5), *q.stride(), *qp.stride(), P, per, Sq, L,
        STRIDE=stride, BLOCK_R=32, BLOCK_D=D, num_warps=4)
    n_r_tiles = triton.cdiv(L, br)
    if (method or METHOD) == "lse":
        return _scores_by_lse(qp, k_src, out, kv_div, Sq, Sk, L, rpb, block, br, bc, dot_f32, cfg, n_r_tiles)
    grid = (n_r_tiles, B * P)
    _proxy_score_fwd[grid](
        qp, k_src, out,
        *qp.stride(), *k_src.stride(), *out.stride(),
        P, kv_div, Sq, Sk, L, Sk - Sq, nq, nk, n_r_tiles,
        STRIDE=stride, RPB=rpb, BLOCK=block, BLOCK_R=br, BLOCK_C=bc, BLOCK_D=D,
        DOT_F32=dot_f32, PREC="ieee" if dot_f32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def _scores_by_lse(qp, k_src, out, kv_div, Sq, Sk, L, rpb, block, br, bc, dot_f32, cfg, n_r_tiles):
    """``method="lse"``: the single-pass kernel writes each sampled row's log2-sum-exp2 per key block; ``_lse_cells``
    normalises each row over its blocks (what the two-pass kernel's first pass is for) and sums each query block's
    rows into the scores. Proxies run in groups whose scratch stays under
    LSE_SCRATCH_BYTES (at 128K one proxy's is 64 MB)."""
    B, P, nq, nk = out.shape
    rows = nq * rpb
    per_proxy = B * rows * nk * 4
    pc = max(1, min(P, LSE_SCRATCH_BYTES // max(per_proxy, 1)))
    scratch = torch.empty(B * pc * rows * nk, dtype=torch.float32, device=out.device)
    for p0 in range(0, P, pc):
        n = min(pc, P - p0)
        lse = scratch[: B * n * rows * nk].view(B * n, rows, nk)
        _proxy_lse_fwd[(n_r_tiles, B * n)](
            qp, k_src, lse, *qp.stride(), *k_src.stride(), *lse.stride(),
            n, p0, kv_div, Sq, Sk, L, Sk - Sq, nk, rows, n_r_tiles,
            STRIDE=block // rpb, BLOCK=block, BLOCK_R=br, BLOCK_C=bc, BLOCK_D=qp.shape[-1],
            DOT_F32=dot_f32, PREC="ieee" if dot_f32 else "tf32",
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        _lse_cells[(nq, B * n)](lse, out, *lse.stride(), *out.stride(), n, p0, L, nk, RPB=rpb,
                                BLOCK_K=min(128, max(16, triton.next_power_of_2(nk))), num_warps=4)
    return out


__all__ = ["proxy_scores", "pooled_keys", "check_inputs"]
