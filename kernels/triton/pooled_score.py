"""FlexPrefill's query-aware block estimate in Triton: mean-pooled query blocks against mean-pooled key blocks, scaled,
causal block mask, softmax per query block -> float32 [B, Hq, nq, nk]. Torch twin:
``accel.kernels.reference_estimation.pooled_scores_reference`` (and ``block_means`` /
``pooled_scores_from_pooled`` for the two steps).

Two kernels:
  1. ``mean_pool``: [B, H, S, D] -> float32 [B, H, ceil(S/block), D], one program per (pooled block, batch * head),
     summing [ROWS, D] tiles in float32; the last partial block averages its real rows. This is the whole cost at
     long context (it reads q and k once: about 1.3 GB at 128K for 32/8 heads x 128, ~0.45 ms at 3 TB/s).
  2. ``pooled_block_scores``: per (tile of BLOCK_M pooled query rows, batch * query head), two loops over pooled
     key tiles up to the tile's causal limit: online row max / sum of exp2, then the normalised probabilities
     stored; tiles past the limit are stored as zeros (no separate memset). GQA reads pooled KV head h // group
     (pooled keys are never repeated). Query block m sees key block n iff ``n*block <= Sk - Sq + min((m+1)*block,
     Sq) - 1`` (bottom-right aligned, as ``causal_block_mask``). The dot runs in exact float32 (see ``_default_config``).

Why pooling is not fused into the score kernel: the pooled tensors are 1/block of the inputs (16 MB of pooled q at
128K), so fusing q pooling would save ~1% of the traffic, and fusing k pooling would make every query tile re-read
all of K. Pooled keys are also reused by the policy (the last-block estimate that picks each head's pattern).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, gpu_path, interpreting
from .online_softmax import row_stats_step

_LOG2E = 1.4426950408889634


@triton.jit
def _mean_pool_fwd(
    X, OUT,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, S, HEADS,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SUBSET: tl.constexpr,
):
    n = tl.program_id(0)
    pid_out = tl.program_id(1)
    pid_bh = tl.load(HEADS + pid_out) if SUBSET else pid_out  # flat (batch * H + head) of the pooled head
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    base = X + b * stride_xb + h * stride_xh
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    s0 = n.to(tl.int64) * BLOCK
    for r in tl.range(0, BLOCK, ROWS):
        offs_r = r + tl.arange(0, ROWS)
        rows = s0 + offs_r
        x = tl.load(base + rows[:, None] * stride_xs + offs_d[None, :] * stride_xd,
                    mask=(rows[:, None] < S) & (offs_r[:, None] < BLOCK), other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    count = tl.minimum(S - s0, BLOCK).to(tl.float32)
    ob = tl.where(SUBSET, 0, b)
    oh = tl.where(SUBSET, pid_out, h).to(tl.int64)
    tl.store(OUT + ob * stride_ob + oh * stride_oh + n * stride_on + offs_d * stride_od, acc / count)


@triton.jit
def _pooled_logits(q, KP_base, offs_n, offs_d, stride_kn, stride_kd, NK, lim, n0, qk_scale,
                   BLOCK_N: tl.constexpr, PREC: tl.constexpr, ALL_VISIBLE):
    # loaded [BLOCK_N, D] and transposed in the dot: float32 (tf32) MMAs want both operands K-major
    kp = tl.load(KP_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                 mask=offs_n[:, None] < NK, other=0.0)
    s = tl.dot(q, tl.trans(kp), input_precision=PREC) * qk_scale
    if n0 + BLOCK_N - 1 > ALL_VISIBLE:  # tile crosses some row's causal limit
        s = tl.where(offs_n[None, :] <= lim[:, None], s, float("-inf"))
    return s


@triton.jit
def _pooled_score_fwd(
    QP, KP, OUT,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_om, stride_on,
    H, GROUP, Sq, Sk, NQ, NK, BLOCK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.cdiv(NQ, BLOCK_M) - 1 - tl.program_id(0)  # longest rows first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < NQ
    q = tl.load(QP + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_valid[:, None], other=0.0)
    # last visible key block of each row (bottom-right aligned causal block mask)
    last_pos = Sk - Sq + tl.minimum((offs_m + 1) * BLOCK, Sq) - 1
    lim = tl.where(row_valid, tl.minimum(last_pos // BLOCK, NK - 1), -1)
    all_visible = tl.min(tl.where(row_valid, lim, NK), 0)  # blocks <= this are visible to every valid row
    n_end = tl.max(lim, 0) + 1
    KP_base = KP + b * stride_kb + kvh * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in tl.range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _pooled_logits(q, KP_base, offs_n, offs_d, stride_kn, stride_kd, NK, lim, n0, qk_scale,
                           BLOCK_N, PREC, all_visible)
        m_i, l_i = row_stats_step(m_i, l_i, s, True)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(row_valid & (l_i > 0.0), 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    out_base = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
    for n0 in tl.range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _pooled_logits(q, KP_base, offs_n, offs_d, stride_kn, stride_kd, NK, lim, n0, qk_scale,
                           BLOCK_N, PREC, all_visible)
        p = tl.math.exp2(s - m_safe[:, None]) * inv_l[:, None]
        tl.store(out_base + offs_n[None, :] * stride_on, p, mask=row_valid[:, None] & (offs_n[None, :] < NK))
    n_zero = tl.cdiv(n_end, BLOCK_N) * BLOCK_N
    for n0 in tl.range(n_zero, NK, BLOCK_N):  # invisible tiles: zeros
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_base + offs_n[None, :] * stride_on, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                 mask=row_valid[:, None] & (offs_n[None, :] < NK))


def _default_config(x: torch.Tensor) -> dict:
    """Pooling rows per load (ROWS) and score tiles (BLOCK_M pooled query rows x BLOCK_N pooled key blocks, float32
    tiles, dot precision PREC). GPU: 64 x 32 with exact float32 FMAs ("ieee": the pooled matmul is ~9 GFLOP at
    128K, and tf32x3 dots on float32 tiles spill registers at every tile size tried on sm_90: 255 regs + 300-900
    bytes of stack, ieee 64 x 32 compiles to 168 regs, no stack); 32 x 32 for head_dim 256. Interpreter: small."""
    D = x.shape[-1]
    if not gpu_path(x):
        return dict(ROWS=16, BLOCK_M=16, BLOCK_N=16, PREC="ieee", num_warps=4, num_stages=1)
    # ROWS: one load per 128-token block at head_dim 128 (H100, 32 heads: q at 32K 171 -> 109 us, k 51 -> 40; at
    # 128K q 645 -> 375, k 170 -> 109 against ROWS 32; 8 warps slower at every ROWS), 16K elements a load
    rows = min(128, 16384 // D)
    if D <= 128:
        return dict(ROWS=rows, BLOCK_M=64, BLOCK_N=32, PREC="ieee", num_warps=4, num_stages=2)
    return dict(ROWS=rows, BLOCK_M=32, BLOCK_N=32, PREC="ieee", num_warps=4, num_stages=2)


def _check_tensor(x, name: str, dtypes) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a tensor [batch, heads, seq, head_dim]; got {tuple(getattr(x, 'shape', ()))}")
    if x.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {x.shape[-1]} is not supported by the Triton pooled-score kernel; "
                         f"supported: {SUPPORTED_HEAD_DIMS}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {', '.join(str(d).replace('torch.', '') for d in dtypes)}, "
                         f"got {x.dtype}")
    if not gpu_path(x) and not interpreting():
        raise ValueError("the Triton pooled-score kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors; "
                         "accel.kernels.reference_estimation.pooled_scores_reference is the torch version)")


def _check_block(block) -> None:
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")


def check_inputs(q: torch.Tensor, k: torch.Tensor, block: int) -> None:
    """Shape/dtype/device/option checks done before every launch (no device sync). Raises ValueError."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a tensor [batch, heads, seq, head_dim]; got "
                             f"{tuple(getattr(x, 'shape', ()))}")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    _check_tensor(q, "q", SUPPORTED_DTYPES)
    _check_tensor(k, "k", SUPPORTED_DTYPES)
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of KV heads {Hkv}")
    if Sq > Sk:
        raise ValueError(f"pooled scores need Sq <= Sk (queries are the last Sq keys), got Sq={Sq} Sk={Sk}")
    if k.dtype != q.dtype:
        raise ValueError(f"q and k must share one dtype of float16/bfloat16/float32, got {q.dtype}, {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device}, {k.device}")
    _check_block(block)


def mean_pool(x: torch.Tensor, block: int, *, heads: torch.Tensor | None = None,
              config: dict | None = None) -> torch.Tensor:
    """Mean over sequence blocks: x [B, H, S, D] (any strides, float16/bfloat16/float32) -> float32
    [B, H, ceil(S/block), D]; the last partial block averages its real rows. Twin: ``block_means``.

    ``heads`` (int tensor of flat ``batch * H + head`` indices): pool only those heads, in that order, into
    [1, len(heads), ceil(S/block), D], reading nothing else (FlexPrefill pools the queries of its query-aware heads
    only)."""
    _check_tensor(x, "x", SUPPORTED_DTYPES)
    _check_block(block)
    B, H, S, D = x.shape
    n = -(-S // block)
    subset = heads is not None
    if subset:
        heads = heads.to(device=x.device, dtype=torch.int64).reshape(-1).contiguous()
        out = torch.empty(1, heads.numel(), n, D, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(B, H, n, D, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    cfg = _default_config(x)
    if config:
        cfg.update(config)
    rows = min(cfg["ROWS"], 1 << (block - 1).bit_length())
    _mean_pool_fwd[(n, out.shape[0] * out.shape[1])](x, out, *x.stride(), *out.stride(), H, S,
                                                     heads if subset else out, BLOCK=block, ROWS=rows, BLOCK_D=D,
                                                     SUBSET=subset, num_warps=4)
    return out


def pooled_block_scores(q_pool: torch.Tensor, k_pool: torch.Tensor, *, q_len: int, kv_len: int, block: int,
                        scale: float | None = None, config: dict | None = None) -> torch.Tensor:
    """softmax over causally visible key blocks of ``q_pool k_pool^T * scale`` (default 1/sqrt(D)): q_pool float32
    [B, Hq, ceil(q_len/block), D], k_pool float32 [B, Hkv, ceil(kv_len/block), D] -> float32 [B, Hq, nq, nk], zeros
    where invisible. Twin: ``pooled_scores_from_pooled``."""
    for name, t in (("q_pool", q_pool), ("k_pool", k_pool)):
        _check_tensor(t, name, (torch.float32,))
    _check_block(block)
    B, Hq, nq, D = q_pool.shape
    Hkv, nk = k_pool.shape[1], k_pool.shape[2]
    if k_pool.shape[0] != B or k_pool.shape[3] != D or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k_pool {tuple(k_pool.shape)} does not fit q_pool {tuple(q_pool.shape)} (batch, head_dim, "
                         "query heads a multiple of KV heads)")
    if q_len > kv_len or nq != -(-q_len // block) or nk != -(-kv_len // block):
        raise ValueError(f"pooled shapes ({nq}, {nk} blocks) do not match q_len={q_len}, kv_len={kv_len} "
                         f"(q_len <= kv_len) at block {block}")
    if q_pool.device != k_pool.device:
        raise ValueError(f"q_pool and k_pool must be on one device, got {q_pool.device}, {k_pool.device}")
    out = torch.empty(B, Hq, nq, nk, dtype=torch.float32, device=q_pool.device)
    if out.numel() == 0:
        return out
    cfg = _default_config(q_pool)
    if config:
        cfg.update(config)
    for name in ("BLOCK_M", "BLOCK_N"):
        t = cfg[name]
        if not isinstance(t, int) or t < 16 or t & (t - 1):
            raise ValueError(f"config {name}={t!r} must be a power of two >= 16")
    scale = D**-0.5 if scale is None else float(scale)
    grid = (triton.cdiv(nq, cfg["BLOCK_M"]), B * Hq)
    _pooled_score_fwd[grid](
        q_pool, k_pool, out, scale * _LOG2E,
        *q_pool.stride(), *k_pool.stride(), *out.stride(),
        Hq, Hq // Hkv, q_len, kv_len, nq, nk, block,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=D, PREC=cfg["PREC"] if gpu_path(q_pool) else "ieee",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def pooled_scores(q: torch.Tensor, k: torch.Tensor, *, block: int = 128, scale: float | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """FlexPrefill's query-aware estimate. q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (Sq <= Sk, any strides): float32
    [B, Hq, ceil(Sq/block), ceil(Sk/block)], each row a softmax over its causally visible key blocks. Equal to
    ``pooled_scores_reference(q, k, block, scale)``. ``config`` overrides ROWS, BLOCK_M, BLOCK_N, PREC ("ieee",
    "tf32x3", "tf32"), num_warps, num_stages."""
    check_inputs(q, k, block)
    return pooled_block_scores(mean_pool(q, block, config=config), mean_pool(k, block, config=config),
                               q_len=q.shape[2], kv_len=k.shape[2], block=block, scale=scale, config=config)


__all__ = ["pooled_scores", "pooled_block_scores", "mean_pool", "check_inputs", "SUPPORTED_HEAD_DIMS",
           "SUPPORTED_DTYPES"]
