"""Quest page scoring in Triton: criticality of every KV page for the newest query, one score per KV head.

Same function as ``kernels.reference_decode.quest_scores``. For each query head the criticality of a page is
``sum_d max(q_d * max_d, q_d * min_d) = relu(q) . kmax + min(q, 0) . kmin`` — two small matmuls per tile. The query
heads of one KV group are packed into the M rows of those matmuls (padded to 16) and reduced by ``max`` (default)
or ``sum``, so the page metadata is read once per KV head. Grid: (B * Hkv, cdiv(n_pages, BLOCK_P)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quest_score_kernel(Q, KMIN, KMAX, KV_START, OUT, SKIP,
                        sqb, sqh, sqd, smb, smh, smp, smd, sxb, sxh, sxp, sxd, sob, soh, sop,
                        Hkv, G, P, PAGE,
                        REDUCE_MAX: tl.constexpr, HAS_KV_START: tl.constexpr, DOT_F32: tl.constexpr,
                        IEEE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_SKIP: tl.constexpr):
    if HAS_SKIP:  # a device-side flag: LServe's static form re-scores only every few steps, in a fixed graph
        if tl.load(SKIP) != 0:
            return
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    g_ok = offs_g < G
    q = tl.load(Q + b * sqb + (h * G + offs_g)[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None], other=0.0)
    p_ok = offs_p < P
    kmax = tl.load(KMAX + b * sxb + h * sxh + offs_p[:, None] * sxp + offs_d[None, :] * sxd, mask=p_ok[:, None],
                   other=0.0)
    kmin = tl.load(KMIN + b * smb + h * smh + offs_p[:, None] * smp + offs_d[None, :] * smd, mask=p_ok[:, None],
                   other=0.0)
    zero = tl.zeros_like(q)
    # triton 3.6 returns float32 from maximum/minimum on bf16 tiles: cast back so both dot operands match
    q_pos = tl.maximum(q, zero).to(kmax.dtype)
    q_neg = tl.minimum(q, zero).to(kmin.dtype)
    if DOT_F32:
        q_pos = q_pos.to(tl.float32)
        q_neg = q_neg.to(tl.float32)
        kmax = kmax.to(tl.float32)
        kmin = kmin.to(tl.float32)
    if IEEE:
        s = tl.dot(q_pos, tl.trans(kmax), input_precision="ieee")
        s = tl.dot(q_neg, tl.trans(kmin), s, input_precision="ieee")
    else:
        s = tl.dot(q_pos, tl.trans(kmax))
        s = tl.dot(q_neg, tl.trans(kmin), s)
    if REDUCE_MAX:
        s = tl.where(g_ok[:, None], s, float("-inf"))
        score = tl.max(s, axis=0)
    else:
        score = tl.sum(s, axis=0)  # padded rows are zero queries: they add 0
    if HAS_KV_START:
        start = tl.load(KV_START + b)
        score = tl.where((offs_p + 1) * PAGE <= start, float("-inf"), score)
    tl.store(OUT + b * sob + h * soh + offs_p * sop, score, mask=p_ok)


# decided once, when Triton wrapped the kernel: ``type()`` of a kernel inside torch.compile's trace is an error
# ("TritonKernelVariable() has no type"), which broke TidalDecode's compiled static decode
_INTERPRETED = type(_quest_score_kernel).__name__ == "InterpretedFunction"


def _interpreting() -> bool:
    return _INTERPRETED


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *, group_reduce: str = "max",
                 page_size: int = 16, kv_start: torch.Tensor | None = None, block_p: int | None = None,
                 skip: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, 1, D]; kmin/kmax [B, Hkv, P, D] (any strides). Returns float32 scores [B, Hkv, P]. ``skip``: a
    device-side int32 flag; when nonzero the kernel returns at once and the scores are left unwritten."""
    if q.dim() == 4:
        q = q[:, :, -1]
    B, Hq, D = q.shape
    Hkv, P = kmin.shape[1], kmin.shape[2]
    if group_reduce not in ("max", "sum"):
        raise ValueError(f"group_reduce must be 'max' or 'sum', got {group_reduce!r}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if D < 16 or D & (D - 1):
        raise ValueError(f"quest_scores: head_dim {D} must be a power of two >= 16")
    G = Hq // Hkv
    out = torch.empty(B, Hkv, P, dtype=torch.float32, device=q.device)
    if B * Hkv * P == 0:
        return out
    interp = _interpreting()
    block_p = block_p or (32 if interp else 64)
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    q = q.to(kmin.dtype)
    grid = (B * Hkv, triton.cdiv(P, block_p))
    _quest_score_kernel[grid](
        q, kmin, kmax, kv_start if kv_start is not None else out, out, skip if skip is not None else out,
        *q.stride(), *kmin.stride(), *kmax.stride(), *out.stride(),
        Hkv, G, P, page_size,
        REDUCE_MAX=group_reduce == "max", HAS_KV_START=kv_start is not None,
        DOT_F32=interp and kmin.dtype != torch.float32, IEEE=kmin.dtype == torch.float32 and not interp,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_P=block_p, BLOCK_D=D, HAS_SKIP=skip is not None,
    )
    return out


__all__ = ["quest_scores"]
