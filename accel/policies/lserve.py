from __future__ import annotations

from dataclasses import dataclass

import torch

from accel.cache import LServeStaticLayer, PagedKVLayer, PagedSplitLayer, PagedStaticLayer
from accel.layouts import (DenseLayout, HeadPart, HeadSplitLayout, PageSelection, SplitPageSelection,
                           StreamingLayout)

from .duo import DuoPolicy
from .quest import PAGE_SIZES, bounds_dtype, check_page_bounds, require_paged_layer, select_pages

LOGICAL_PAGE_SIZES = (8, 16, 32, 64)


@dataclass
class LServePolicy(DuoPolicy):
    """LServe (Yang et al. 2025, arXiv 2502.14866): static streaming heads plus dynamic page selection, for prefill
    and decode.

    Static part (DuoAttention's head maps, loaded as policy 'duo' does): the ``ratio`` share of KV heads with the
    lowest gates stream (sink + recent, constant KV memory in a PagedSplitLayer) in prefill and decode.
    Dynamic part (decode, the other heads): hierarchical paging. Key min/max are kept per *logical* page of
    ``page_size`` tokens and scored with Quest's criticality (GQA: max over the query group); a *physical* page of
    ``physical_page_size`` tokens (the unit the decode kernel reads) scores the max of its logical pages, and the
    top ``budget // physical_page_size`` physical pages are attended to, the newest among them. The selection is
    reused for ``reuse_steps`` decode steps (re-selected every ``reuse_steps``; a physical page begun since then is
    added), which LServe shows costs little accuracy and divides the scoring cost. Retrieval heads run dense in
    prefill, or under the prefill policy of a composition (``"xattention+lserve"``). A budget at or above the
    context attends to every retrieval key (density 1.0 in ``accel.stats``); ``ratio=0`` needs no head map and
    with such a budget is exactly dense. Over a transformers StaticCache (and torch.compile) the layer becomes an
    LServeStaticLayer and the selection runs on the device every ``reuse_steps`` (``static_decode``; there
    ``reuse_steps`` <= ``physical_page_size``). ``page_bounds`` as Quest's: float8 bounds rounded outward by
    default, ``"exact"`` for the keys' dtype."""

    name = "lserve"
    phases = ("prefill", "decode")
    description = "streaming heads + hierarchical page selection reused across steps"
    paper = "LServe (arXiv 2502.14866)"

    page_size: int = 16  # logical page: key bounds and scoring
    physical_page_size: int = 64  # selection unit, what the decode kernel reads
    budget: int = 4096
    reuse_steps: int = 4
    page_bounds: str = "fp8"  # "fp8" (float8_e5m2, rounded outward) | "exact" (the keys' dtype)

    def validate(self) -> None:
        super().validate()
        check_page_bounds(self)
        if self.page_size not in LOGICAL_PAGE_SIZES:
            raise ValueError(f"option 'page_size' (logical page) of policy 'lserve' must be one of "
                             f"{LOGICAL_PAGE_SIZES}, got {self.page_size}")
        if self.physical_page_size not in PAGE_SIZES:
            raise ValueError(f"option 'physical_page_size' of policy 'lserve' must be one of {PAGE_SIZES} (the sizes "
                             f"the decode kernels take), got {self.physical_page_size}")
        if self.physical_page_size % self.page_size:
            raise ValueError(f"option 'physical_page_size' ({self.physical_page_size}) of policy 'lserve' must be a "
                             f"multiple of 'page_size' ({self.page_size}); e.g. page_size=16, physical_page_size=64")
        if self.budget < self.physical_page_size:
            raise ValueError(f"option 'budget' of policy 'lserve' must cover at least one physical page "
                             f"({self.physical_page_size} tokens), got {self.budget}")
        if self.reuse_steps < 1:
            raise ValueError(f"option 'reuse_steps' of policy 'lserve' must be >= 1 (1: select every step), "
                             f"got {self.reuse_steps}")

    def check_model(self, model) -> None:
        if self.ratio == 0 and not self.duo_map:  # no streaming heads: no head map needed
            cfg = getattr(model.config, "text_config", None) or model.config
            hkv = cfg.num_key_value_heads or cfg.num_attention_heads
            self._stream = {i: torch.zeros(hkv, dtype=torch.bool) for i in range(cfg.num_hidden_layers)}
            self._source = None
            return
        super().check_model(model)

    def cache_kind(self, sliding_window, layer_idx):
        if sliding_window is not None:
            return None
        stream = self._stream_heads(layer_idx)
        if bool(stream.any()):
            return PagedSplitLayer, {"stream_heads": stream, "sink": self.sink, "recent": self.recent,
                                     "page_size": self.page_size, "bounds_dtype": bounds_dtype(self.page_bounds)}
        return PagedKVLayer, {"page_size": self.page_size, "bounds_dtype": bounds_dtype(self.page_bounds)}

    def static_prepare(self, cache, layers, layer_idx: int, sliding_window, *, batch: int, kv_heads: int, device,
                       tokens: int = 1, **_):
        """At the (eager) prefill over a transformers StaticCache: an LServeStaticLayer (streaming heads' ring,
        retrieval heads' buffer with logical-page bounds) where this layer has streaming heads, a PagedStaticLayer
        where it has none; None for sliding-window layers (their own window, dense). With ``reuse_steps`` > 1 the
        layer also gets its selection buffers (``LServeReuse``; this runs before every eager forward), cleared by
        any multi-token forward (a prefill or a chunk): the next decode step selects afresh."""
        from accel.kernels.static_decode import LServeReuse

        if sliding_window is not None:
            return None
        if self.reuse_steps > self.physical_page_size:
            # the static selection buffer has one spare slot for a physical page begun since the selection; the
            # dynamic cache appends every begun page, so only this path limits reuse_steps
            raise ValueError(f"policy 'lserve' over a static cache takes reuse_steps <= physical_page_size "
                             f"({self.physical_page_size}), got {self.reuse_steps}: lower reuse_steps to <= "
                             f"{self.physical_page_size}, or decode with the default dynamic cache")
        stream = self._stream_heads(layer_idx)
        layer = layers[layer_idx]
        if bool(stream.any()):
            if not isinstance(layer, LServeStaticLayer):
                layers[layer_idx] = LServeStaticLayer.from_layer(layer, stream, self.sink, self.recent, self.page_size,
                                                                 bounds_dtype(self.page_bounds))
        elif not isinstance(layer, PagedStaticLayer) or layer.page_size != self.page_size:
            layers[layer_idx] = PagedStaticLayer.from_layer(layer, self.page_size, bounds_dtype(self.page_bounds))
        layer = layers[layer_idx]
        if self.reuse_steps == 1:
            layer.lserve_reuse = None
            return layer
        n_log = -(-layer.max_cache_len // self.page_size)  # ceil: logical pages of the buffer
        n_phys = -(-n_log // (self.physical_page_size // self.page_size))
        heads = int((~stream).sum()) if bool(stream.any()) else kv_heads
        n_keep = min(self.budget // self.physical_page_size, n_phys)
        reuse = getattr(layer, "lserve_reuse", None)
        if reuse is None or reuse.pages.shape != (batch, heads, n_keep + 1) or reuse.steps != self.reuse_steps:
            layer.lserve_reuse = LServeReuse(batch, heads, n_keep, self.reuse_steps, device)
        elif tokens > 1:
            reuse.sel_len.zero_()
        return layer

    def static_decode(self, q, k, v, layer, *, mask, kv_start, scale, softcap, use_triton: bool):
        """One decode step, on the device (kernels/static_decode.py ``lserve_static_decode``): the selection is
        made every ``reuse_steps`` tokens as in the dynamic form, decided on the device so the compiled step
        stays one fixed graph."""
        from accel.kernels.static_decode import lserve_static_decode

        if kv_start is not None:
            raise ValueError("policy 'lserve' does not support left-padded batches (streaming heads' sink tokens "
                             "would be padding); run prompts one at a time or with equal lengths")
        return lserve_static_decode(q, layer, budget=self.budget, page_size=self.page_size,
                                    physical_page_size=self.physical_page_size, scale=scale, softcap=softcap,
                                    use_triton=use_triton, reuse=getattr(layer, "lserve_reuse", None))

    def plan(self, q, k, ctx):
        if ctx.sliding_window is not None:
            return DenseLayout(window=ctx.sliding_window)
        layer = ctx.cache_layer
        memo = getattr(layer, "plan_cache", None)
        if q.shape[2] != 1:  # prefill: DuoAttention's (streaming heads sink + recent, the others dense)
            if memo is not None:
                memo.pop(self.name, None)
            return super().plan(q, k, ctx)
        if isinstance(layer, PagedSplitLayer) and not layer.full_call:
            return self._split_step(q, k, layer, memo, ctx)
        if isinstance(layer, PagedSplitLayer) or bool(self._stream_heads(ctx.layer_idx).any()):
            return super().plan(q, k, ctx)  # first fill of the cache is this one-token call: duo's split
        return self._select(q, k.shape[2], layer, memo, ctx)

    def _split_step(self, q, k, layer: PagedSplitLayer, memo, ctx):
        """A decode step over a split layer (k, v: the retrieval heads' paged store): the retrieval heads' page
        selection, scored from the full query through a KV-head map, and the streaming heads over their store of
        sink + recent keys, all of which the query sees. With both kinds of heads and a selecting budget that is
        one SplitPageSelection (the Triton backend runs both groups in one split-KV launch); otherwise duo's head
        split with the retrieval part selected."""
        if ctx.kv_start is not None:
            return super().plan(q, k, ctx)  # duo refuses left padding, with its error
        stream = self._stream_heads(ctx.layer_idx)
        group = q.shape[1] // stream.numel()
        s_idx, r_idx, q_s, q_r = self._head_indices(ctx.layer_idx, stream, group, q.device)  # made once per layer
        sk, sv = layer.stream_kv
        streaming = HeadPart(q_s, StreamingLayout(sink=self.sink, window=self.recent), k=sk, v=sv)
        if not r_idx.numel():  # every KV head of this layer streams
            return HeadSplitLayout([streaming])
        sel = self._select(q, k.shape[2], layer.paged, memo, ctx, kv_heads=r_idx, group=group)
        if isinstance(sel, PageSelection) and s_idx.numel() and sk.shape[2] <= self.sink + self.recent:
            return SplitPageSelection(sel, r_idx, q_r, sk, sv, s_idx, q_s, group, streaming.layout)
        # the budget covers the context (retrieval heads dense)
        return HeadSplitLayout([p for p in (HeadPart(q_r, sel), streaming) if p.q_heads.numel()])

    def chunk_plan(self, q, k, ctx, prefill):
        """A composition's chunk on top of a filled cache (``"flexprefill+lserve"``): duo's split (the retrieval
        heads under ``prefill``, the streaming heads over their store); the next decode step selects afresh."""
        memo = getattr(ctx.cache_layer, "plan_cache", None)
        if memo is not None:
            memo.pop(self.name, None)
        return super().chunk_plan(q, k, ctx, prefill)

    def physical_scores(self, q: torch.Tensor, layer: PagedKVLayer, kv_start=None, kv_heads=None,
                        group: int | None = None) -> torch.Tensor:
        """Float32 [B, Hkv, n_physical]: each physical page scores the max Quest criticality of its logical pages.
        ``kv_heads`` / ``group``: the bounds hold those KV heads of the layer and ``q`` is the full query."""
        r = self.physical_page_size // self.page_size
        if q.device.type == "cuda":  # Triton: the max over each physical page's logical pages inside the kernel
            from accel.kernels.triton.decode_score import quest_scores as fn

            return fn(q, layer.kmin, layer.kmax, group_reduce="max", page_size=self.page_size, kv_start=kv_start,
                      kv_heads=kv_heads, group=group, merge=r)
        from accel.kernels.reference_decode import quest_scores as fn
        from accel.kernels.static_decode import _physical_max

        return _physical_max(fn(q, layer.kmin, layer.kmax, group_reduce="max", page_size=self.page_size,
                                kv_start=kv_start, kv_heads=kv_heads, group=group), r)

    def _select(self, q, kv_len: int, layer, memo, ctx, kv_heads=None, group: int | None = None):
        P = self.physical_page_size
        n_keep = self.budget // P
        if n_keep >= -(-kv_len // P):
            return DenseLayout()  # budget covers the context: exact (recorded as density 1.0)
        require_paged_layer(self.name, layer, kv_len, self.page_size, ctx.layer_idx)
        last = (kv_len - 1) // P
        hit = memo.get(self.name)
        if hit is not None and 0 <= kv_len - hit[0] < self.reuse_steps and hit[1].shape[0] == q.shape[0]:
            pages, counts, last0 = hit[1], hit[2], (hit[0] - 1) // P
            if last > last0:  # physical pages begun since the selection: always attend to the newest tokens
                new = torch.arange(last0 + 1, last + 1, device=pages.device, dtype=pages.dtype)
                pages = torch.cat([pages, new.expand(*pages.shape[:2], -1)], dim=-1)
                counts = counts + (last - last0)
        else:
            scores = self.physical_scores(q, layer, ctx.kv_start, kv_heads=kv_heads, group=group)
            pages, counts = select_pages(scores, n_keep, kv_len, P, False)
            memo[self.name] = (kv_len, pages, counts)
        return PageSelection(pages=pages, counts=counts, page_size=P, tokens=min(pages.shape[-1] * P, kv_len))
