"""Quest page scoring in Triton: criticality of every KV page for the newest query, one score per KV head.

Same function as ``kernels.reference_decode.quest_scores``. For each query head the criticality of a page is
``sum_d max(q_d * max_d, q_d * min_d) = relu(q) . kmax + min(q, 0) . kmin`` — two small matmuls per tile. The query
heads of one KV group are packed into the M rows of those matmuls (padded to 16) and reduced by ``max`` (default),
``sum`` or ``max_norm`` (``max`` after subtracting each head's bound over the whole cache), so the page metadata
is read once per KV head. Grid: (B * Hkv, cdiv(n_pages, BLOCK_P)). Float8 bounds (``reference_decode.BOUNDS_FP8``,
half the bytes) are widened to q's dtype in registers (exact) before the matmuls.

``max_norm``'s ceilings come from the box of every page's bounds (elementwise min of kmin, max of kmax over the
pages: ``_page_box_kernel``, programs split over the pages and folded with float atomics, order-free so
deterministic); each scoring program turns its KV head's box into its query heads' ceilings. Computed in torch, the
box cost a float32 copy of both bound tensors per layer (159 against 48 us per layer at 128K, H100).

With a KV-head map (``kv_heads``, ``group``) the bounds hold a subset of the layer's KV heads (LServe's retrieval
heads) and q stays the full layer's query: program ``j`` reads query heads ``kv_heads[j] * group + g``, so the
query heads of the subset are never gathered into a new tensor first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference_decode import BOUNDS_FP8, GROUP_REDUCES
from .checks import device_ints, head_map
from .decode_topk import check_reuse, reused


# P (pages) and the strides of scores [B, H, P] grow during decode: not specialised, or each divisible-by-16 count
# compiles a variant mid-decode
@triton.jit(do_not_specialize=["P", "sob", "soh"])
def _quest_score_kernel(Q, KMIN, KMAX, KV_START, HEADS, OUT, SEL, KV_LEN, BOX,
                        sqb, sqh, sqd, smb, smh, smp, smd, sxb, sxh, sxp, sxd, sob, soh, sop,
                        Hkv, G, P, PAGE, STEPS,
                        REDUCE_MAX: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_HEADS: tl.constexpr,
                        HAS_BOX: tl.constexpr, WIDEN: tl.constexpr,
                        DOT_F32: tl.constexpr,
                        IEEE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_REUSE: tl.constexpr, MERGE: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv  # the KV head of the bounds (of the map, with HAS_HEADS)
    if HAS_REUSE:  # LServe's static form re-scores only every few steps, decided on the device (fixed graph)
        if reused(SEL, pid, tl.load(KV_LEN), STEPS):
            return
    hq0 = h * G  # its first query head
    if HAS_HEADS:
        hq0 = tl.load(HEADS + h).to(tl.int32) * G
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    g_ok = offs_g < G
    q = tl.load(Q + b * sqb + (hq0 + offs_g)[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None], other=0.0)
    p_ok = offs_p < P
    kmax = tl.load(KMAX + b * sxb + h * sxh + offs_p[:, None] * sxp + offs_d[None, :] * sxd, mask=p_ok[:, None],
                   other=0.0)
    kmin = tl.load(KMIN + b * smb + h * smh + offs_p[:, None] * smp + offs_d[None, :] * smd, mask=p_ok[:, None],
                   other=0.0)
    if WIDEN:  # float8 bounds -> q's dtype (every e5m2 value is exact in bf16 / fp16 / fp32)
        kmax = kmax.to(tl.float32).to(Q.dtype.element_ty)
        kmin = kmin.to(tl.float32).to(Q.dtype.element_ty)
    # the sign split in float32 (exact, then cast back so both dot operands match): the interpreter compares bf16
    # tiles by their raw bits in maximum/minimum (negative values win), and triton 3.6 on the GPU returns float32
    # from them anyway
    qf = q.to(tl.float32)
    q_pos = tl.maximum(qf, 0.0).to(kmax.dtype)
    q_neg = tl.minimum(qf, 0.0).to(kmin.dtype)
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
    if HAS_BOX:  # "max_norm": each query head's bounds relative to its bound over the whole cache (its box)
        lo = tl.load(BOX + ((b * Hkv + h) * 2) * BLOCK_D + offs_d)
        hi = -tl.load(BOX + ((b * Hkv + h) * 2 + 1) * BLOCK_D + offs_d)
        ceil = tl.sum(tl.maximum(qf, 0.0) * hi[None, :] + tl.minimum(qf, 0.0) * lo[None, :], axis=1)
        s = s - ceil[:, None]
    if REDUCE_MAX:
        s = tl.where(g_ok[:, None], s, float("-inf"))
        score = tl.max(s, axis=0)
    else:
        score = tl.sum(s, axis=0)  # padded rows are zero queries: they add 0
    if HAS_KV_START:
        start = tl.load(KV_START + b)
        score = tl.where((offs_p + 1) * PAGE <= start, float("-inf"), score)
    if MERGE == 1:
        tl.store(OUT + b * sob + h * soh + offs_p * sop, score, mask=p_ok)
    else:  # LServe: a physical page scores the max of its MERGE logical pages (no separate launch for it)
        score = tl.max(tl.reshape(tl.where(p_ok, score, float("-inf")), (BLOCK_P // MERGE, MERGE)), axis=1)
        offs_m = tl.program_id(1) * (BLOCK_P // MERGE) + tl.arange(0, BLOCK_P // MERGE)
        tl.store(OUT + b * sob + h * soh + offs_m * sop, score, mask=offs_m * MERGE < P)


@triton.jit
def _page_box_kernel(KMIN, KMAX, BOX, smb, smh, smp, smd, sxb, sxh, sxp, sxd, Hkv, P, SPAN,
                     BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """BOX[b, h] = (min over pages of kmin, -max over pages of kmax), float32 [2, D] per (batch, KV head); both
    kept as minima so one +inf fill initialises them. Pages never written hold +-inf bounds: they drop out."""
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    lo = tl.full([BLOCK_D], float("inf"), tl.float32)
    nhi = tl.full([BLOCK_D], float("inf"), tl.float32)
    p_end = tl.minimum(tl.program_id(1) * SPAN + SPAN, P)
    for p0 in range(tl.program_id(1) * SPAN, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ok = (offs_p < p_end)[:, None]
        mn = tl.load(KMIN + b * smb + h * smh + offs_p[:, None] * smp + offs_d[None, :] * smd, mask=ok,
                     other=float("inf")).to(tl.float32)
        mx = tl.load(KMAX + b * sxb + h * sxh + offs_p[:, None] * sxp + offs_d[None, :] * sxd, mask=ok,
                     other=float("-inf")).to(tl.float32)
        lo = tl.minimum(lo, tl.min(mn, axis=0))
        nhi = tl.minimum(nhi, tl.min(-mx, axis=0))
    base = BOX + ((b * Hkv + h) * 2) * BLOCK_D + offs_d
    tl.atomic_min(base, lo, sem="relaxed")
    tl.atomic_min(base + BLOCK_D, nhi, sem="relaxed")


def page_box(kmin: torch.Tensor, kmax: torch.Tensor, programs: int = 256) -> torch.Tensor:
    """float32 [B, Hkv, 2, D]: per (batch, KV head) the min of kmin and the *negated* max of kmax over every page
    (the box ``reference_decode.head_bounds`` reads), in two launches (a fill, then about ``programs`` programs split
    over the pages). Pages with +-inf bounds (never written) drop out."""
    B, Hkv, P, D = kmin.shape
    box = torch.full((B, Hkv, 2, D), float("inf"), dtype=torch.float32, device=kmin.device)
    # 32-page tiles, 4 warps: the configuration timed on the H100 (Triton 3.6: 72 registers; Triton 3.9 spills 8 B,
    # allowed in tests/test_compile_check.py)
    block_p = 16 if _interpreting() else 32
    splits = max(1, min(triton.cdiv(P, block_p), triton.cdiv(programs, max(1, B * Hkv))))
    span = triton.cdiv(triton.cdiv(P, splits), block_p) * block_p
    _page_box_kernel[(B * Hkv, triton.cdiv(P, span))](kmin, kmax, box, *kmin.stride(), *kmax.stride(), Hkv, P, span,
                                                      BLOCK_P=block_p, BLOCK_D=D, num_warps=4)
    return box


# decided once, when Triton wrapped the kernel: ``type()`` of a kernel inside torch.compile's trace is an error
# ("TritonKernelVariable() has no type"), which broke TidalDecode's compiled static decode
_INTERPRETED = type(_quest_score_kernel).__name__ == "InterpretedFunction"


def _interpreting() -> bool:
    return _INTERPRETED


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *, group_reduce: str = "max",
                 page_size: int = 16, kv_start: torch.Tensor | None = None, block_p: int | None = None,
                 kv_heads: torch.Tensor | None = None, group: int | None = None,
                 reuse: tuple[torch.Tensor, torch.Tensor, int] | None = None, merge: int = 1,
                 num_warps: int | None = None) -> torch.Tensor:
    """q [B, Hq, 1, D]; kmin/kmax [B, Hkv, P, D] (any strides). Returns float32 scores [B, Hkv, P], or with
    ``merge`` (a power of two) [B, Hkv, ceil(P / merge)]: the max over each run of ``merge`` pages (LServe's
    physical page over its logical pages).

    Head map: ``kv_heads`` (int32 or int64 [Hkv], on q's device) names the layer KV head each head of the bounds
    is, ``group`` (required with it) the query heads per KV head; q is the full layer's query and only query heads
    ``kv_heads[j] * group + g`` are read. Head ids are not range-checked (that would sync).

    ``reuse`` (LServe over a static cache): ``(sel_len, kv_len, steps)``, the rows' lengths at their last selection
    (int32 [B, Hkv], 0: none), the cache's device-side length and the reuse period; a row whose selection is fewer
    than ``steps`` tokens old is not scored (its scores are left unwritten), as ``select_pages`` keeps its pages.
    ``block_p`` / ``num_warps`` override the launch (pages per program, warps). Defaults 64 pages and 2 warps: over a
    32-layer graph at 128K (cold L2) they beat the other 8 of {32, 64, 128} x {2, 4, 8} or tie within 2%, 4-10% faster
    than 4 warps (results/bench_decode_score_tiles.md)."""
    if q.dim() == 4:
        q = q[:, :, -1]
    B, Hq, D = q.shape
    Hkv, P = kmin.shape[1], kmin.shape[2]
    if group_reduce not in GROUP_REDUCES:
        raise ValueError(f"group_reduce must be one of {GROUP_REDUCES}, got {group_reduce!r}")
    if group_reduce == "max_norm" and kv_heads is not None:
        raise ValueError("quest_scores: group_reduce='max_norm' takes no kv_heads map")
    kv_heads, G = head_map(kv_heads, group, Hq, Hkv, q.device, "quest_scores")
    if D < 16 or D & (D - 1):
        raise ValueError(f"quest_scores: head_dim {D} must be a power of two >= 16")
    if merge < 1 or merge & (merge - 1):
        raise ValueError(f"quest_scores: merge must be a power of two, got {merge}")
    out = torch.empty(B, Hkv, -(-P // merge), dtype=torch.float32, device=q.device)
    if B * Hkv * P == 0:
        return out
    interp = _interpreting()
    block_p = max(block_p or (32 if interp else 64), merge)
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    box = page_box(kmin, kmax) if group_reduce == "max_norm" else None
    widen = kmin.dtype == BOUNDS_FP8
    cdt = q.dtype if widen else kmin.dtype  # the matmuls' operand dtype
    q = q.to(cdt)
    sel, length, steps = out, out, 0
    if reuse is not None:
        sel, length, steps = reuse
        check_reuse(sel, None, None, B, Hkv, "quest_scores")
        length = device_ints(length, q.device)
    grid = (B * Hkv, triton.cdiv(P, block_p))
    _quest_score_kernel[grid](
        q, kmin, kmax, kv_start if kv_start is not None else out, kv_heads if kv_heads is not None else out, out,
        sel, length, box if box is not None else out,
        *q.stride(), *kmin.stride(), *kmax.stride(), *out.stride(),
        Hkv, G, P, page_size, int(steps),
        REDUCE_MAX=group_reduce != "sum", HAS_KV_START=kv_start is not None, HAS_HEADS=kv_heads is not None,
        HAS_BOX=box is not None, WIDEN=widen,
        DOT_F32=interp and cdt != torch.float32, IEEE=cdt == torch.float32 and not interp,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_P=block_p, BLOCK_D=D, HAS_REUSE=reuse is not None,
        MERGE=merge, num_warps=num_warps or 2,
    )
    return out


__all__ = ["quest_scores", "page_box"]
