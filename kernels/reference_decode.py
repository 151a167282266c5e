"""Reference twins of the decode kernels (plain torch, runs anywhere): per-page key bounds, Quest page scoring,
top-k page selection within a token budget, and attention over selected pages.

Conventions (accel.layouts): keys 0..Sk-1; page ``p`` covers keys ``p*page .. min((p+1)*page, Sk) - 1``; the one
decode query sits at key index ``Sk - 1``. GQA: query head ``h`` reads KV head ``h // group``; one selection per KV
head serves its whole query group (the kernel loads each selected page once per group). ``kv_start`` ([B] int,
left padding): keys before it are masked, pages entirely before it are never selected. A KV-head map
(``kv_heads`` [Hsel] with ``group``): K/V or the page bounds hold only those KV heads of the layer while q (and the
attention output) are the full layer's, query head ``kv_heads[j] * group + g`` reading head ``j``; here a gather
and a scatter, in the kernels an index.
"""

from __future__ import annotations

import math

import torch

GROUP_REDUCES = ("max", "sum")

# Page bounds in one byte (Quest / LServe ``page_bounds="fp8"``): float8_e5m2 has +-inf (unfilled pages keep them,
# and a key past its range rounds to them) and 2 mantissa bits. Each bound is rounded outward, the min down and the
# max up, so it still bounds every key of its page and Quest's criticality stays an upper bound; the scoring reads
# half the bytes of bf16 bounds.
BOUNDS_FP8 = torch.float8_e5m2
FP8_BOUND_MAX = 57344.0  # largest finite e5m2
_E5M2_INF, _E5M2_NEG_INF = 0x7C, 0xFC


def fp8_outward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """x (float) -> float8_e5m2: the nearest e5m2 value at or above x (``up``) or at or below it. Same arithmetic as
    the append kernel's (kernels/triton/decode_append.py): the step of x's binade from its exact exponent, a
    ceil / floor onto that grid, +-inf past the finite range in the outward direction only."""
    xf = x.float()
    e = (torch.frexp(xf).exponent - 1).clamp(-14, 127)  # floor(log2|x|); subnormals share 2^-14's step; 0 -> -14
    step = torch.ldexp(torch.ones_like(xf), e - 2)  # 2 mantissa bits
    y = (torch.ceil(xf / step) if up else torch.floor(xf / step)) * step
    y = y.clamp(-FP8_BOUND_MAX, float("inf")) if up else y.clamp(float("-inf"), FP8_BOUND_MAX)
    y = torch.where(torch.isinf(xf), xf, y)  # +-inf stay (frexp's exponent of inf is 0: its step is meaningless)
    return y.to(BOUNDS_FP8)  # on the grid or past it outward: the cast is exact, or +-inf


def cast_bounds(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds into their storage dtype: rounded outward for ``BOUNDS_FP8``, else a plain cast."""
    if dtype == BOUNDS_FP8:
        return fp8_outward(lo, up=False), fp8_outward(hi, up=True)
    return lo.to(dtype), hi.to(dtype)


def page_bounds(keys: torch.Tensor, page_size: int, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page elementwise min and max of the keys: [B, H, Sk, D] -> two [B, H, ceil(Sk/page), D], in ``dtype``
    (default the keys'; ``BOUNDS_FP8`` rounds them outward)."""
    B, H, S, D = keys.shape
    n_pages = -(-S // page_size)
    pad = n_pages * page_size - S
    if pad:
        lo = torch.cat([keys, keys.new_full((B, H, pad, D), float("inf"))], dim=-2)
        hi = torch.cat([keys, keys.new_full((B, H, pad, D), float("-inf"))], dim=-2)
    else:
        lo = hi = keys
    lo, hi = lo.unflatten(-2, (n_pages, page_size)).amin(-2), hi.unflatten(-2, (n_pages, page_size)).amax(-2)
    return cast_bounds(lo, hi, dtype or keys.dtype)


def _mapped_heads(kv_heads: torch.Tensor, group: int | None, device) -> torch.Tensor:
    """The query heads of a KV-head map, in its order: kv_heads[j] * group + g."""
    if group is None:
        raise ValueError("kv_heads needs group (query heads per KV head)")
    return (kv_heads.to(device).long()[:, None] * group + torch.arange(group, device=device)).flatten()


GROUP_REDUCES = ("max", "sum", "max_norm")


def head_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Each query head's Quest bound over the whole cache (the box of every page's bounds): float32 [B, Hq] from q
    [B, Hq, D] and kmin/kmax [B, Hkv, P, D]. Pages never written keep +inf / -inf bounds and drop out of the box.
    ``group_reduce="max_norm"`` subtracts it, so a head whose bounds run large (wide key ranges) does not rank the
    pages for its whole group: a page scores how close it comes to its head's own ceiling."""
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    qf = q.float().reshape(B, Hkv, Hq // Hkv, D)
    hi, lo = kmax.float().amax(2)[:, :, None], kmin.float().amin(2)[:, :, None]
    return (qf.clamp_min(0) * hi + qf.clamp_max(0) * lo).sum(-1).reshape(B, Hq)


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *, group_reduce: str = "max",
                 page_size: int = 16, kv_start: torch.Tensor | None = None, kv_heads: torch.Tensor | None = None,
                 group: int | None = None) -> torch.Tensor:
    """Quest criticality per (batch, KV head, page): for each query head ``sum_d max(q_d * max_d, q_d * min_d)``
    (an upper bound of q.k over the page), reduced over the query heads of the KV group by ``max`` or ``sum``, or
    ``max_norm``: the max after subtracting each head's bound over the whole cache (``head_bounds``).

    q: [B, Hq, 1, D] (or [B, Hq, D]); kmin/kmax: [B, Hkv, P, D]. Returns float32 [B, Hkv, P]; pages entirely in
    the left padding get -inf. ``kv_heads``/``group``: kmin/kmax hold those KV heads of the layer, q is full."""
    if q.dim() == 4:
        q = q[:, :, -1]
    if group_reduce not in GROUP_REDUCES:
        raise ValueError(f"group_reduce must be one of {GROUP_REDUCES}, got {group_reduce!r}")
    if kv_heads is not None:
        if group_reduce == "max_norm":
            raise ValueError("quest_scores: group_reduce='max_norm' takes no kv_heads map")
        q = q.index_select(1, _mapped_heads(kv_heads, group, q.device))
    B, Hq, D = q.shape
    Hkv, P = kmin.shape[1], kmin.shape[2]
    g = Hq // Hkv
    qf = q.float().reshape(B, Hkv, g, D)
    # max(q*M, q*m) = relu(q)*M + min(q, 0)*m: two matmuls
    s = torch.matmul(qf.clamp_min(0), kmax.float().transpose(-1, -2)) + torch.matmul(
        qf.clamp_max(0), kmin.float().transpose(-1, -2))  # [B, Hkv, g, P]
    if group_reduce == "max_norm":
        s = s - head_bounds(q, kmin, kmax).reshape(B, Hkv, g, 1)
    s = s.sum(2) if group_reduce == "sum" else s.amax(2)
    if kv_start is not None:
        page_end = (torch.arange(P, device=q.device) + 1) * page_size
        s = s.masked_fill(page_end[None, None, :] <= kv_start.to(q.device).long()[:, None, None], float("-inf"))
    return s


def select_pages(scores: torch.Tensor, k: int, *, kv_len: int, page_size: int, keep_first: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` pages per (batch, KV head), always including the last (newest, possibly partial) page and, with
    ``keep_first``, page 0. Returns ``pages`` int32 [B, Hkv, k'] in ascending page order and ``counts`` int32
    [B, Hkv] (``k' = min(k, n_pages)``). Ties go to the lower page index."""
    B, H, P = scores.shape
    k = min(k, P)
    s = scores.float().clone()
    s[..., (kv_len - 1) // page_size] = float("inf")
    if keep_first:
        s[..., 0] = float("inf")
    # stable descending order: equal scores keep ascending page order
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    pages = order.sort(-1).values.to(torch.int32)
    counts = torch.full((B, H), k, dtype=torch.int32, device=scores.device)
    return pages.contiguous(), counts


def paged_decode_attention(q, k, v, pages, counts, page_size: int, *, scale=None, softcap=None, kv_start=None,
                           kv_end=None, return_lse: bool = False, kv_heads: torch.Tensor | None = None,
                           group: int | None = None, out: torch.Tensor | None = None):
    """Attention of the newest query over the selected pages. q: [B, Hq, 1, D]; k, v: [B, Hkv, Sk, D];
    pages [B, Hkv, n] int32 (the first ``counts`` entries valid). ``pages=None`` means every key (dense decode).
    Keys past Sk (or ``kv_end`` [B], a static cache's filled length) and before ``kv_start`` are masked. Returns out
    [B, Hq, 1, Dv] in q's dtype (and float32 lse). ``kv_heads``/``group``: k/v hold those KV heads of the layer, q is
    the full layer's and only their query heads are written (others 0, lse -inf); ``out``: write into it."""
    if kv_heads is not None:
        B, Hq = q.shape[:2]
        qh = _mapped_heads(kv_heads, group, q.device)
        o, l = paged_decode_attention(q.index_select(1, qh), k, v, pages, counts, page_size, scale=scale,
                                      softcap=softcap, kv_start=kv_start, kv_end=kv_end, return_lse=True)
        if out is None:
            out = q.new_zeros(B, Hq, 1, v.shape[-1])
        out.index_copy_(1, qh, o.to(out.dtype))
        if not return_lse:
            return out
        return out, torch.full((B, Hq, 1), -math.inf, device=q.device).index_copy_(1, qh, l)
    if out is not None:
        res = paged_decode_attention(q, k, v, pages, counts, page_size, scale=scale, softcap=softcap,
                                     kv_start=kv_start, kv_end=kv_end, return_lse=return_lse)
        o = res[0] if return_lse else res
        out.copy_(o)
        return (out, res[1]) if return_lse else out
    B, Hq, Sq, D = q.shape
    if Sq != 1:
        raise ValueError(f"paged decode attention takes one query per row, got {Sq}")
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    if pages is None:
        idx = torch.arange(Sk, device=q.device).expand(B, Hkv, Sk)
        valid = torch.ones(B, Hkv, Sk, dtype=torch.bool, device=q.device)
    else:
        n = pages.shape[-1]
        slot_ok = torch.arange(n, device=q.device)[None, None, :] < counts[..., None]
        idx = (pages.long()[..., None] * page_size + torch.arange(page_size, device=q.device)).flatten(-2)
        valid = slot_ok[..., None].expand(B, Hkv, n, page_size).flatten(-2) & (idx < Sk)
        idx = idx.clamp_max(Sk - 1)
    if kv_start is not None:
        valid = valid & (idx >= kv_start.to(q.device).long().reshape(-1).expand(B)[:, None, None])
    if kv_end is not None:
        valid = valid & (idx < kv_end.to(q.device).long().reshape(-1).expand(B)[:, None, None])
    ks = torch.gather(k.float(), 2, idx[..., None].expand(-1, -1, -1, D))
    vs = torch.gather(v.float(), 2, idx[..., None].expand(-1, -1, -1, v.shape[-1]))
    qf = q.float().reshape(B, Hkv, g, D)
    s = torch.matmul(qf, ks.transpose(-1, -2)) * scale  # [B, Hkv, g, N]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    o = torch.matmul(p, vs) / l.clamp_min(1e-30)
    o = torch.where(l > 0, o, torch.zeros_like(o))
    out = o.reshape(B, Hq, 1, -1).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(l[..., 0] > 0, m[..., 0] + torch.log(l[..., 0]), -math.inf).reshape(B, Hq, 1)
    return out, lse


def gather_selected(pages, counts, page_size: int, kv_len: int) -> torch.Tensor:
    """Bool [B, Hkv, kv_len]: which keys a page selection covers (for tests and recall measurement)."""
    B, H, n = pages.shape
    spill = kv_len + page_size  # slots past the count write here, then get cut off
    keep = torch.zeros(B, H, spill + 1, dtype=torch.bool, device=pages.device)
    slot_ok = torch.arange(n, device=pages.device)[None, None, :] < counts[..., None]
    idx = (pages.long()[..., None] * page_size + torch.arange(page_size, device=pages.device)).flatten(-2)
    idx = torch.where(slot_ok[..., None].expand(B, H, n, page_size).flatten(-2), idx.clamp_max(spill), spill)
    keep.scatter_(2, idx, True)
    return keep[..., :kv_len]
