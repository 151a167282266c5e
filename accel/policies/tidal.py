from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from accel.layouts import DenseLayout, PageSelection

from .base import Policy

PAPER_LAYERS, PAPER_RESELECT = 32, 13  # Llama-3-8B: re-selection at layer 13 of 32


@dataclass
class _StaticHandle:
    """What a layer needs for TidalDecode over a static cache: its cache layer (the device-side length), the shared
    selection buffer, and whether it selects (writes the buffer) or reuses it."""

    layer: Any
    positions: torch.Tensor
    select: bool
    counts: torch.Tensor  # int32 [batch, kv_heads], every entry the positions' width: made once, read every step

    @property
    def cumulative_length(self) -> torch.Tensor:
        return self.layer.cumulative_length


@dataclass
class TidalPolicy(Policy):
    """TidalDecode (Yang et al. 2024, arXiv 2410.05076): position-persistent sparse attention for decode.

    Layers before ``select_layer`` attend densely. The selection layer attends densely too and, from the same
    query, picks the ``budget`` key positions with the highest attention scores (the newest token always among
    them); every following full-attention layer attends only to those positions, until the re-selection layer
    (dense again) picks anew for the layers after it. As in the paper's code (which unions the heads' top keys), one
    set of positions serves every head (``shared=True``): each key is ranked by its best probability over all query
    heads (``group_reduce="max"``; ``"sum"``: their total), so a key any head of the selection layer wants is kept
    for all heads of the layers after it. Head ``h`` of one layer need not do head ``h``'s job in another: with one
    selection per KV head (``shared=False``) SmolLM2-135M lost an 8K needle that only KV head 0 of the re-selection
    layer attended to (results/decode_niah_smollm2_8k). Selections live for one forward call (keyed by the cache
    and the context length, per batch row) and never carry over between steps, generate calls or rows.

    Layer rule: ``select_layer`` (default 2, as in the paper) and ``reselect_layer`` (``-1``: the paper's 13 of 32
    scaled to the model, ``round(13 * n_layers / 32)``, dropped when no full-attention layer would sit between the
    two; ``None``: no re-selection) name layers; each moves to the first full-attention layer at or after it
    (sliding-window layers keep their window and are never sparsified); explicit values must lie inside the model,
    and a full-attention layer must follow the selection layer (else nothing would reuse it: an error).
    Decode attention over token positions runs as a page selection of page size 1 (reference and Triton decode
    kernels). The paper's code uses a budget of 256; ours defaults to 4096 like the other decode policies. The
    selection layers compute q.k over the whole cache once more for scoring (2 of 32 layers). A budget at or above
    the context is dense (density 1.0 in ``accel.stats``)."""

    name = "tidal"
    phases = ("decode",)
    description = "selection layers choose token positions reused by the other layers"
    paper = "TidalDecode (arXiv 2410.05076)"

    budget: int = 4096
    select_layer: int = 2
    reselect_layer: int | None = -1
    shared: bool = True  # one set of positions for every KV head (False: one per KV head, from its query group)
    group_reduce: str = "max"  # over the heads a selection serves: "max" or "sum" of their probabilities

    def validate(self) -> None:
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"option 'budget' of policy 'tidal' must be a positive number of tokens, got "
                             f"{self.budget!r}")
        if self.select_layer < 0:
            raise ValueError(f"option 'select_layer' of policy 'tidal' must be a layer index >= 0, got "
                             f"{self.select_layer}")
        r = self.reselect_layer
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or (r != -1 and r <= self.select_layer)):
            raise ValueError(f"option 'reselect_layer' of policy 'tidal' must be a layer after select_layer "
                             f"({self.select_layer}), -1 (13/32 of the depth) or None (no re-selection), got {r!r}")
        if self.group_reduce not in ("sum", "max"):
            raise ValueError(f"option 'group_reduce' of policy 'tidal' must be 'sum' or 'max', "
                             f"got {self.group_reduce!r}")

    # ------------------------------------------------------------------------------------------- layers
    def check_model(self, model) -> None:
        """Resolve the selection layers for ``model`` (errors for indices outside it)."""
        from accel.patches import find_adapter

        adapter = find_adapter(model)
        mods = adapter.attention_modules(model)
        self.resolve_layers(len(mods), [m.layer_idx for m in mods if adapter.layer_window(m) is None])

    def resolve_layers(self, n_layers: int, full_layers: list[int]) -> tuple[int, int | None]:
        """(selection layer, re-selection layer or None) for a model of ``n_layers`` whose full-attention layers
        are ``full_layers``."""
        fix = f"pass select_layer= / reselect_layer= between 0 and {n_layers - 1}"
        if self.select_layer >= n_layers:
            raise ValueError(f"option 'select_layer' of policy 'tidal' is {self.select_layer} but the model has "
                             f"{n_layers} layers; {fix}")
        r = self.reselect_layer
        if r is not None and r >= n_layers:
            raise ValueError(f"option 'reselect_layer' of policy 'tidal' is {r} but the model has {n_layers} "
                             f"layers; {fix}, or reselect_layer=None")

        def first_full(i):
            return next((j for j in sorted(full_layers) if j >= i), None)

        sel = first_full(self.select_layer)
        if sel is None:
            raise ValueError(f"policy 'tidal': no full-attention layer at or after select_layer={self.select_layer} "
                             f"(sliding-window layers keep their window and are never sparsified); full-attention "
                             f"layers: {sorted(full_layers)}")
        resel = None
        if r == -1:  # scaled; dropped when no layer would reuse the first selection
            resel = first_full(round(PAPER_RESELECT * n_layers / PAPER_LAYERS))
            if resel is not None and not any(sel < j < resel for j in full_layers):
                resel = None
        elif r is not None:
            resel = first_full(r)
            if resel is None or resel == sel:
                raise ValueError(f"policy 'tidal': no full-attention layer after the selection layer {sel} at or "
                                 f"after reselect_layer={r}; full-attention layers: {sorted(full_layers)}; pass "
                                 "another reselect_layer or reselect_layer=None")
        full = sorted(full_layers)
        if sel == full[-1]:  # no layer after it would attend to its positions: every layer would decode dense
            fix = (f"pass select_layer= between 0 and {full[-2]}" if len(full) > 1 else
                   "TidalDecode needs two or more; use another decode policy (e.g. quest)")
            raise ValueError(f"policy 'tidal': the selection layer {sel} (select_layer={self.select_layer}) is the "
                             "last full-attention layer, so no layer would reuse its positions (sliding-window layers "
                             f"keep their window and are never sparsified); full-attention layers: {full}; {fix}")
        self._layers = (sel, resel if resel is not None and resel > sel else None)
        return self._layers

    def _resolved(self) -> tuple[int, int | None]:
        layers = getattr(self, "_layers", None)
        if layers is None:
            raise RuntimeError("policy 'tidal' has no resolved selection layers; use it through accel.patch(model, "
                               "'tidal') or call resolve_layers(n_layers, full_layers)")
        return layers

    # -------------------------------------------------------------------------------------------- scoring
    def score(self, q: torch.Tensor, k: torch.Tensor, scale=None, softcap=None, kv_start=None,
              length: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 [B, 1, Sk] (``shared``) or [B, Hkv, Sk]: the selection layer's attention probabilities of the
        newest query, reduced over all query heads or over each KV head's query group. ``length`` (a static
        cache's filled length, a tensor): keys at or past it are left out of the softmax."""
        B, Hq, _, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        logits = torch.matmul(q[:, :, -1].reshape(B, Hkv, Hq // Hkv, D), k.transpose(-1, -2)).float()
        logits = logits * (D**-0.5 if scale is None else scale)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        if kv_start is not None:
            pad = torch.arange(Sk, device=q.device)[None, :] < kv_start.to(q.device).long()[:, None]
            logits = logits.masked_fill(pad[:, None, None, :], float("-inf"))
        if length is not None:
            logits = torch.where(torch.arange(Sk, device=q.device) < length, logits, float("-inf"))
        p = torch.softmax(logits, dim=-1)  # [B, Hkv, g, Sk]
        return self._reduce(p)

    def _reduce(self, p: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, g, Sk] probabilities -> [B, 1, Sk] over every query head (``shared``), else [B, Hkv, Sk] over
        each KV head's query group."""
        dims = (1, 2) if self.shared else 2
        r = p.sum(dims) if self.group_reduce == "sum" else p.amax(dims)
        return r[:, None] if self.shared else r

    def _probs(self, logits2: torch.Tensor, lse: torch.Tensor, kv_heads: int, length: torch.Tensor,
               kv_start: torch.Tensor | None) -> torch.Tensor:
        """``score`` from what the dense decode kernel hands back (base-2 scores [B, Hq, Sk], natural lse
        [B, Hq, 1]): the same probabilities, with the keys it did not attend to (past the length, left padding)
        set to 0."""
        B, Hq, Sk = logits2.shape
        pos = torch.arange(Sk, device=logits2.device)
        visible = pos < length
        if kv_start is not None:
            visible = visible & (pos[None, :] >= kv_start.to(pos.device).long()[:, None])[:, None, :]
        p = torch.where(visible, torch.exp2(logits2 - lse * 1.4426950408889634), 0.0)
        return self._reduce(p.view(B, kv_heads, Hq // kv_heads, Sk))

    def select(self, q, k, scale=None, softcap=None, kv_start=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``budget`` positions per (row, KV head), the newest always kept: int32 [B, Hkv, n] ascending (with
        ``shared``, one row per batch row expanded over the KV heads, no copy) and counts int32 [B, Hkv]."""
        s = self.score(q, k, scale, softcap, kv_start)
        s[..., -1] = float("inf")
        n = min(self.budget, s.shape[-1])
        pos = s.topk(n, dim=-1).indices.sort(-1).values.to(torch.int32).contiguous()
        pos = pos.expand(q.shape[0], k.shape[1], n)
        return pos, torch.full(pos.shape[:2], n, dtype=torch.int32, device=pos.device)

    # ------------------------------------------------------------------------------------- static cache
    def static_prepare(self, cache, layers, layer_idx: int, sliding_window, *, batch: int, kv_heads: int, device,
                       **_):
        """At the (eager) prefill over a transformers StaticCache. Selection layers and the layers reusing their
        positions get a handle: the cache layer (its device-side length) and the selection buffer of their
        selection layer, int32 [batch, kv_heads, min(budget, cache length)], shared through the cache (a static
        address, so the compiled step writes and reads it in place). Layers before the selection layer and
        sliding-window layers decode dense (None). With ``shared`` the buffer has one row of positions per batch
        row ([batch, 1, n]), expanded over the KV heads where it is read."""
        sel, resel = self._resolved()
        if sliding_window is not None or layer_idx < sel:
            return None
        src = resel if resel is not None and layer_idx >= resel else sel
        n = min(self.budget, layers[layer_idx].max_cache_len)
        slots = self._store().setdefault(cache, {})
        rows = 1 if self.shared else kv_heads
        buf = slots.get(("static", src))
        if buf is None or buf.shape != (batch, rows, n) or buf.device != torch.device(device):
            buf = slots[("static", src)] = torch.zeros(batch, rows, n, dtype=torch.int32, device=device)
            torch._dynamo.mark_static_address(buf)
        counts = slots.get(("static_counts", src))
        if counts is None or counts.shape != (batch, kv_heads) or counts.device != buf.device:
            counts = slots[("static_counts", src)] = torch.full((batch, kv_heads), n, dtype=torch.int32,
                                                                device=device)
            torch._dynamo.mark_static_address(counts)
        return _StaticHandle(layers[layer_idx], buf, layer_idx in (sel, resel), counts)

    def static_decode(self, q, k, v, handle: "_StaticHandle", *, mask, kv_start, scale, softcap, use_triton: bool):
        """One decode step over a static cache, on the device. A selection layer scores the filled keys (the
        length read from the cache layer, no sync), writes the top ``budget`` positions into the shared buffer and
        attends densely: with ``use_triton`` in one pass over K and V (the dense decode kernel hands back its
        scores and log-sum-exp, from which the probabilities follow), else it scores with torch and returns None
        (the caller attends). A reusing layer attends to those positions (page size 1) with keys past the length
        masked, so a budget above the context is dense."""
        length = handle.cumulative_length
        positions = handle.positions
        if handle.select:
            out = None
            if use_triton:  # an opaque op, as below
                from accel.kernels.paged_decode_op import dense_decode_scores

                sc = float(scale if scale is not None else q.shape[-1] ** -0.5)
                out, lse, logits = dense_decode_scores(q, k, v, sc, float(softcap or 0.0), kv_start,
                                                       length.reshape(1))
                s = self._probs(logits, lse, k.shape[1], length, kv_start)
            else:
                s = self.score(q, k, scale, softcap, kv_start, length=length)  # [B, Hkv, S], float32
            pos = torch.arange(s.shape[-1], device=s.device)
            s = torch.where(pos == length - 1, float("inf"), s)  # the newest token, always
            # unsorted: attention is order-free, and sorting the top-k cost a radix sort per selection layer (a radix
            # select of our own, kernels/triton/NOTES.md "wide_topk", measured slower than torch.topk and removed)
            positions.copy_(s.topk(positions.shape[-1], dim=-1, sorted=False).indices)
            return out
        counts = handle.counts
        kv_end = length.reshape(1).expand(q.shape[0])
        if use_triton:  # an opaque op: a fullgraph compile does not trace the Triton launch wrapper
            from accel.kernels.paged_decode_op import paged_decode

            scale = float(scale if scale is not None else q.shape[-1] ** -0.5)
            # shared: the [B, 1, n] buffer as it is (the op expands it over the KV heads)
            return paged_decode(q, k, v, positions, counts, 1, scale, float(softcap or 0.0), kv_start, kv_end)
        from accel.kernels.reference_decode import paged_decode_attention

        positions = positions.expand(q.shape[0], k.shape[1], positions.shape[-1])  # shared: one row for all heads
        return paged_decode_attention(q, k, v, positions, counts, 1, scale=scale, softcap=softcap, kv_start=kv_start,
                                      kv_end=kv_end)

    # --------------------------------------------------------------------------------------------- plan
    def _store(self):
        store = getattr(self, "_selections", None)
        if store is None:  # per cache (one generate call); entries are overwritten each forward call
            store = self._selections = weakref.WeakKeyDictionary()
        return store

    def selection(self, cache) -> dict | None:
        """The selection of the current forward call for ``cache`` (layer, kv_len, positions, counts), or None."""
        return self._store().get(cache) if cache is not None else None

    def plan(self, q, k, ctx):
        if ctx.sliding_window is not None:
            return DenseLayout(window=ctx.sliding_window)
        sel, resel = self._resolved()
        i, kv_len = ctx.layer_idx, k.shape[2]
        if q.shape[2] != 1 or i < sel or self.budget >= kv_len:
            return DenseLayout()  # prefill, layers before the selection, or a budget covering the context
        if ctx.cache is None:
            raise RuntimeError("policy 'tidal' shares token positions across layers through the KV cache; decode "
                               "with use_cache=True")
        if i == sel or i == resel:
            pos, counts = self.select(q, k, ctx.scale, ctx.softcap, ctx.kv_start)
            self._store()[ctx.cache] = {"layer": i, "kv_len": kv_len, "positions": pos, "counts": counts}
            return DenseLayout()  # the selection layer itself attends to everything
        src = resel if resel is not None and i > resel else sel
        entry = self._store().get(ctx.cache)
        if entry is None or entry["layer"] != src or entry["kv_len"] != kv_len or entry["positions"].shape[0] != q.shape[0]:
            raise RuntimeError(f"policy 'tidal': layer {i} found no token selection of layer {src} from this forward "
                               "call (the selection layers must run before the layers that reuse their positions)")
        return PageSelection(pages=entry["positions"], counts=entry["counts"], page_size=1,
                             tokens=min(self.budget, kv_len))
