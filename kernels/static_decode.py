"""Quest decode over a static cache as one opaque op (``torch.ops.accel.quest_static_decode``).

Page scoring, masking of the pages past the filled length, top-k and the split-KV attention over the chosen pages
run on the device with the length read from a tensor: no host sync and fixed shapes, so a ``torch.compile``d decode
step (transformers' static cache path) captures it in its CUDA graph. Registered as a custom op so dynamo does not
trace the Triton launch wrappers; the fake implementation gives the output's shape.

On the GPU the selection is the Triton top-k kernel reading the length from the device (pages past it are never
chosen); the torch twin takes ``topk`` over every page with the unfilled ones at -inf, so with fewer filled pages
than ``n_keep`` it also returns pages past the length, whose keys ``kv_end`` masks in the attention. Either way the
result equals attending to every filled key when the budget covers the context."""

from __future__ import annotations

import torch

from .reference_decode import paged_decode_attention as _ref_attention
from .reference_decode import quest_scores as _ref_scores


def _quest_static_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                         length: torch.Tensor, kv_start: torch.Tensor | None, n_keep: int, page_size: int,
                         group_reduce: str, scale: float, softcap: float, use_triton: bool,
                         keep_first: bool = False) -> torch.Tensor:
    if use_triton:
        from .triton.decode_attention import paged_decode_attention as attention
        from .triton.decode_score import quest_scores
        from .triton.decode_topk import select_pages

        from .triton import select_attend as fused

        scores = quest_scores(q, kmin, kmax, group_reduce=group_reduce, page_size=page_size, kv_start=kv_start)
        if fused.ENABLED:  # the top-k inside the split launch (kernels/triton/select_attend.py)
            return fused.select_attend(q, k, v, scores, n_keep, kv_len=length, page_size=page_size, scale=scale,
                                       softcap=softcap or None, kv_start=kv_start, keep_first=keep_first)
        pages, counts = select_pages(scores, n_keep, kv_len=length, page_size=page_size, keep_first=keep_first)
    else:
        attention = _ref_attention
        pages, counts = _select_torch(q, kmin, kmax, length, kv_start, n_keep, page_size, group_reduce, keep_first)
    return attention(q, k, v, pages, counts, page_size, scale=scale, softcap=softcap or None, kv_start=kv_start,
                     kv_end=length.reshape(1).expand(q.shape[0]))


def _select_torch(q, kmin, kmax, length, kv_start, n_keep: int, page_size: int, group_reduce: str,
                  keep_first: bool = False):
    """The selection in torch ops (CPU, or backend='reference'): where + topk over every page of the buffer (page 0
    forced in with ``keep_first``, as the dynamic plan does)."""
    B, Hkv, n_pages = kmin.shape[0], kmin.shape[1], kmin.shape[2]
    scores = _ref_scores(q, kmin, kmax, group_reduce=group_reduce, page_size=page_size, kv_start=kv_start)
    pg = torch.arange(n_pages, device=q.device)
    filled = (length.to(q.device) + page_size - 1) // page_size  # pages holding at least one key
    valid = (pg < filled)[None, :]
    if kv_start is not None:  # pages entirely in the left padding
        valid = valid & ((pg + 1)[None, :] * page_size > kv_start.to(q.device).long()[:, None])
    # unfilled pages keep +-inf bounds (NaN scores): `where`, not arithmetic, drops them
    scores = torch.where(valid[:, None, :], scores, float("-inf"))
    scores = torch.where((pg == filled - 1)[None, None, :], float("inf"), scores)  # the newest page, always
    if keep_first:
        scores = torch.where((pg == 0)[None, None, :], float("inf"), scores)
    pages = scores.topk(min(n_keep, n_pages), dim=-1).indices.to(torch.int32)
    counts = torch.full((B, Hkv), pages.shape[-1], dtype=torch.int32, device=q.device)
    return pages, counts


def dense_static_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None,
                        softcap: float | None) -> torch.Tensor:
    """Dense one-token attention over a static buffer with a boolean mask ([B, 1, 1, S], True = attend), native
    GQA: torch SDPA, or plain torch for tanh soft-capping (Gemma 2), which SDPA has no hook for."""
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                enable_gqa=q.shape[1] != k.shape[1])
    g = q.shape[1] // k.shape[1]
    s = torch.matmul(q, k.repeat_interleave(g, 1).transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    s = (torch.tanh(s / softcap) * softcap).masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s.float(), -1).to(v.dtype), v.repeat_interleave(g, 1))


def split_static_decode(q: torch.Tensor, layer, mask: torch.Tensor | None, scale: float | None,
                        softcap: float | None, *, kv_start: torch.Tensor | None = None,
                        use_triton: bool = False) -> torch.Tensor:
    """One-token attention over a DuoStaticLayer (accel.cache): retrieval KV heads over their whole buffer up to the
    filled length, streaming KV heads over the filled slots of their sink + recent ring. Device-side, no sync.

    ``use_triton``: the split-KV kernel with a KV-head map, once per part, each writing its query heads of one
    output (no gather of q, no scatter of outputs); the retrieval part masks by ``layer.cumulative_length`` and
    ``kv_start`` (left padding). Otherwise torch SDPA with transformers' ``mask`` (which covers the padding)."""
    group = q.shape[1] // layer.num_heads
    if use_triton:
        out = q.new_empty(*q.shape[:3], layer.v_head_dim)
        if layer.retrieval_idx.numel():  # retrieval heads and the ring in one launch
            _mapped_attention(q, layer.keys, layer.values, layer.retrieval_idx, group, out, scale=scale,
                              softcap=softcap, kv_start=kv_start, kv_end=layer.cumulative_length, ring=_ring(layer))
            return out
        return _ring_decode_triton(q, layer, group, out, scale, softcap)
    ar = torch.arange(group, device=q.device)
    q_r = (layer.retrieval_idx[:, None] * group + ar).flatten()
    out = q.new_empty(*q.shape[:3], layer.v_head_dim)
    if q_r.numel():
        out.index_copy_(1, q_r, dense_static_decode(q.index_select(1, q_r), layer.keys, layer.values, mask, scale,
                                                    softcap))
    q_s, out_s = _ring_decode(q, layer, group, ar, layer.cumulative_length, scale, softcap)
    out.index_copy_(1, q_s, out_s)
    return out


def _mapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: torch.Tensor, group: int,
                      out: torch.Tensor, pages=None, counts=None, page_size: int = 16, **kw) -> None:
    """The Triton split-KV kernel over the KV heads ``kv_heads`` of a layer (k, v hold only those), reading and
    writing their query heads of the full ``q`` / ``out``."""
    from .triton.decode_attention import paged_decode_attention

    paged_decode_attention(q, k, v, pages, counts, page_size, kv_heads=kv_heads, group=group, out=out, **kw)


def _ring(layer) -> tuple | None:
    """The streaming heads' ring as the split-KV kernel's second source, or None when no head streams."""
    return (layer.skeys, layer.svalues, layer.stream_idx) if layer.stream_idx.numel() else None


def _ring_decode_triton(q: torch.Tensor, layer, group: int, out: torch.Tensor, scale: float | None,
                        softcap: float | None) -> torch.Tensor:
    """The streaming KV heads into their query heads of ``out``: attention is order-free, so the ring's filled
    slots are its first min(length, ring) (the kernel clips ``kv_end`` to the ring size)."""
    if layer.stream_idx.numel():
        _mapped_attention(q, layer.skeys, layer.svalues, layer.stream_idx, group, out, scale=scale, softcap=softcap,
                          kv_end=layer.cumulative_length)
    return out


def _ring_decode(q: torch.Tensor, layer, group: int, ar: torch.Tensor, length: torch.Tensor, scale: float | None,
                 softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The streaming KV heads of a DuoStaticLayer over the filled slots of their sink + recent ring: (their query
    head indices, their outputs)."""
    q_s = (layer.stream_idx[:, None] * group + ar).flatten()
    ring = layer.skeys.shape[2]
    filled = (torch.arange(ring, device=q.device) < length).expand(q.shape[0], 1, 1, ring)
    return q_s, dense_static_decode(q.index_select(1, q_s), layer.skeys, layer.svalues, filled, scale, softcap)


def lserve_static_decode(q: torch.Tensor, layer, *, budget: int, page_size: int, physical_page_size: int,
                         scale: float | None, softcap: float | None, use_triton: bool,
                         reuse: "LServeReuse | None" = None) -> torch.Tensor:
    """One LServe decode step over a static cache layer, on the device. ``layer`` is a PagedStaticLayer (every KV
    head selects) or an LServeStaticLayer (streaming heads over their sink + recent ring, the others select).
    Selection as in the dynamic policy: Quest criticality per logical page (group max), each physical page the max
    of its logical pages, the newest physical page always, the top ``budget // physical_page_size``; pages past the
    filled length are never chosen and keys past it are masked, so a budget above the context is dense.

    ``reuse`` (an ``LServeReuse``: persistent selection buffers, the length at the last selection, ``steps``): the
    selection is made only when ``steps`` tokens have been added since the last one (or on the first step), as the
    dynamic policy's ``reuse_steps``; in between, the scoring and top-k kernels see it on the device (the graph
    stays fixed) and the kept pages are reused, plus the physical page begun since, if any.
    Without it the selection is made every step. With ``use_triton`` the retrieval heads' scoring and attention
    read the full query through a KV-head map and write their heads of one output, as the ring does."""
    from accel.kernels import reference_decode as R

    split = hasattr(layer, "retrieval_idx")
    if split and layer.retrieval_idx.numel() == 0:  # every KV head of this layer streams
        return split_static_decode(q, layer, None, scale, softcap, use_triton=use_triton)
    hkv = layer.num_heads
    group = q.shape[1] // hkv
    length = layer.cumulative_length
    r = physical_page_size // page_size
    n_phys = -(-layer.kmin.shape[2] // r)
    n_keep = min(budget // physical_page_size, n_phys)
    if use_triton:  # Triton scoring and top-k: pages past the length score NaN and are never chosen
        from accel.kernels.triton.decode_score import quest_scores
        from accel.kernels.triton.decode_topk import select_pages

        heads = dict(kv_heads=layer.retrieval_idx, group=group) if split else {}
        # with reuse, both kernels decide on the device whether this step selects (a row's selection is kept for
        # ``steps`` tokens), and the top-k does the bookkeeping: the begun page, the count to attend to
        s = quest_scores(q, layer.kmin, layer.kmax, group_reduce="max", page_size=page_size, merge=r,
                         reuse=None if reuse is None else (reuse.sel_len, length, reuse.steps),
                         **heads)  # [B, Hr, n_phys]: each physical page the max of its logical pages
        out = None if reuse is None else (reuse.pages, reuse.counts)
        pages, counts = select_pages(s, n_keep, kv_len=length, page_size=physical_page_size, out=out,
                                     reuse=None if reuse is None else (reuse.sel_len, reuse.steps, reuse.live))
    else:
        ar = torch.arange(group, device=q.device)
        q_r = (layer.retrieval_idx[:, None] * group + ar).flatten() if split else None
        qr = q.index_select(1, q_r) if split else q
        s = R.quest_scores(qr, layer.kmin, layer.kmax, group_reduce="max", page_size=page_size)
        s = torch.where(torch.arange(s.shape[-1], device=q.device) * page_size < length, s, float("-inf"))
        s = _physical_max(s, r)
        newest = (length - 1) // physical_page_size
        s = torch.where(torch.arange(s.shape[-1], device=q.device) == newest, float("inf"), s)
        pages = s.topk(n_keep, dim=-1).indices.sort(-1).values.to(torch.int32).contiguous()
        counts = torch.full(pages.shape[:2], n_keep, dtype=torch.int32, device=q.device)
        if reuse is not None:  # the bookkeeping the top-k kernel does with ``reuse``, in torch
            reselect = (reuse.sel_len == 0) | (length - reuse.sel_len >= reuse.steps)  # [B, Hr]
            reuse.pages[..., :n_keep].copy_(torch.where(reselect[..., None], pages, reuse.pages[..., :n_keep]))
            reuse.counts.copy_(torch.where(reselect, counts, reuse.counts))
            reuse.sel_len.copy_(torch.where(reselect, length, reuse.sel_len))
            # the physical page begun since the selection (at most one: steps <= physical page size), in the slot
            # after the kept ones; counted only when it is not among them
            newest = ((length - 1) // physical_page_size).to(torch.int32)
            begun = newest > (reuse.sel_len - 1) // physical_page_size
            reuse.pages.scatter_(-1, reuse.counts[..., None].long(), newest.expand(*reuse.counts.shape, 1))
            pages, counts = reuse.pages, reuse.counts + begun.to(torch.int32)
    if use_triton:
        kw = dict(scale=scale, softcap=softcap, kv_end=length)
        if not split:
            from accel.kernels.triton.decode_attention import paged_decode_attention

            return paged_decode_attention(q, layer.keys, layer.values, pages, counts, physical_page_size, **kw)
        out = q.new_empty(*q.shape[:3], layer.v_head_dim)
        _mapped_attention(q, layer.keys, layer.values, layer.retrieval_idx, group, out, pages, counts,
                          physical_page_size, ring=_ring(layer), **kw)
        return out
    out_r = R.paged_decode_attention(qr, layer.keys, layer.values, pages, counts, physical_page_size, scale=scale,
                                     softcap=softcap, kv_end=length.reshape(1).expand(q.shape[0]))
    if not split:
        return out_r
    out = q.new_empty(*q.shape[:3], layer.v_head_dim)
    out.index_copy_(1, q_r, out_r.to(out.dtype))
    q_s, out_s = _ring_decode(q, layer, group, ar, length, scale, softcap)
    out.index_copy_(1, q_s, out_s)
    return out


class LServeReuse:
    """LServe's selection state over a static cache, at fixed addresses for a captured step, per (row, retrieval KV
    head): the kept physical pages (one spare slot for a page begun since), their count, the count to attend to this
    step (``live``: plus the begun page) and the length at the last selection (``sel_len``, 0: select at the next
    step). int32, contiguous: the Triton kernels index them by program."""

    def __init__(self, batch: int, heads: int, n_keep: int, steps: int, device):
        self.steps = steps
        self.pages = torch.zeros(batch, heads, n_keep + 1, dtype=torch.int32, device=device)
        self.counts = torch.zeros(batch, heads, dtype=torch.int32, device=device)
        self.live = torch.zeros(batch, heads, dtype=torch.int32, device=device)
        self.sel_len = torch.zeros(batch, heads, dtype=torch.int32, device=device)
        for t in (self.pages, self.counts, self.live, self.sel_len):
            torch._dynamo.mark_static_address(t)


def _physical_max(s: torch.Tensor, r: int) -> torch.Tensor:
    """Logical page scores [B, H, n_log] -> physical page scores [B, H, ceil(n_log / r)]: the max of each run of
    ``r`` (a NaN of an unfilled logical page only reaches the newest physical page, which is always kept)."""
    pad = (-s.shape[-1]) % r
    if pad:
        s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
    return s.unflatten(-1, (-1, r)).amax(-1)


@torch.library.custom_op("accel::quest_static_decode", mutates_args=())
def quest_static_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                        length: torch.Tensor, kv_start: torch.Tensor | None, n_keep: int, page_size: int,
                        group_reduce: str, scale: float, softcap: float, use_triton: bool,
                        keep_first: bool = False) -> torch.Tensor:
    """q [B, Hq, 1, D]; k, v the static buffers [B, Hkv, S, D]; kmin/kmax [B, Hkv, ceil(S / page_size), D];
    ``length`` 0-d int tensor, keys filled (the current one included); ``softcap`` 0 for none; ``keep_first``:
    page 0 always selected (Quest's ``keep_first_page``). Returns [B, Hq, 1, Dv]."""
    return _quest_static_decode(q, k, v, kmin, kmax, length, kv_start, n_keep, page_size, group_reduce, scale,
                                softcap, use_triton, keep_first)


@quest_static_decode.register_fake
def _(q, k, v, kmin, kmax, length, kv_start, n_keep, page_size, group_reduce, scale, softcap, use_triton,
      keep_first=False):
    return q.new_empty(q.shape[0], q.shape[1], 1, v.shape[-1])


__all__ = ["quest_static_decode", "dense_static_decode", "split_static_decode", "lserve_static_decode",
           "LServeReuse"]
