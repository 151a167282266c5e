from __future__ import annotations

from dataclasses import dataclass

import torch

from accel.cache import PagedKVLayer, PagedStaticLayer
from accel.kernels.reference_decode import BOUNDS_FP8, GROUP_REDUCES
from accel.layouts import DenseLayout, PageSelection

from .base import Policy

PAGE_SIZES = (8, 16, 32, 64, 128)  # what the decode kernels take
LAYER_MAP_FORMAT = "accel-quest-layers/1"
# what a layer map's calibration records and a policy must share for the map to hold
CALIBRATED_SETTINGS = ("page_size", "group_reduce", "keep_first_page", "page_bounds")


def load_layer_map(name: str, config, settings: dict | None = None) -> tuple[str, dict] | None:
    """(source, data) of a Quest layer map for a model of ``config``: ``"auto"`` the shipped one that fits the model
    and, given ``settings``, was calibrated with them (None when there is none), a shipped name or a .json path (an
    error when missing or made for another model)."""
    from .threshold_map import load_model_map

    def fits(data: dict) -> bool:  # a model may ship one map per scoring rule (max, max_norm)
        cal = data.get("calibration") or {}
        return all(cal.get(k, v) == v for k, v in (settings or {}).items())

    return load_model_map(name, config, "quest", LAYER_MAP_FORMAT, "quest layer map",
                          "scripts/calibrate_quest.py MODEL", "layer_map='none'", fits)


def quest_scores(q, layer: PagedKVLayer, group_reduce: str, kv_start=None) -> torch.Tensor:
    """Criticality of every page (float32 [B, Hkv, n_pages]), Triton on CUDA, torch elsewhere."""
    if q.device.type == "cuda":
        from accel.kernels.triton.decode_score import quest_scores as fn
    else:
        from accel.kernels.reference_decode import quest_scores as fn
    return fn(q, layer.kmin, layer.kmax, group_reduce=group_reduce, page_size=layer.page_size, kv_start=kv_start)


def select_pages(scores, k, kv_len, page_size, keep_first):
    if scores.device.type == "cuda":
        from accel.kernels.triton.decode_topk import select_pages as fn
    else:
        from accel.kernels.reference_decode import select_pages as fn
    return fn(scores, k, kv_len=kv_len, page_size=page_size, keep_first=keep_first)



def require_paged_layer(policy: str, layer, kv_len: int, page_size: int, layer_idx: int) -> PagedKVLayer:
    """This layer's page-bounds cache layer, holding ``kv_len`` tokens in pages of ``page_size``, or a clear error."""
    if not isinstance(layer, PagedKVLayer) or layer.get_seq_length() != kv_len:
        raise RuntimeError(
            f"policy {policy!r} needs the page-bounds cache layer on layer {layer_idx} (installed by "
            f"accel.patch for generate and for caches passed as past_key_values); got {type(layer).__name__}. "
            "Do not pass a StaticCache / cache_implementation to generate with this policy.")
    if layer.page_size != page_size:
        raise RuntimeError(f"cache layer pages hold {layer.page_size} tokens but policy {policy!r} uses "
                           f"page_size={page_size}; start a new cache after re-patching")
    return layer

PAGE_BOUNDS = ("fp8", "exact")


def bounds_dtype(page_bounds: str) -> torch.dtype | None:
    """The cache's page-bound dtype for option ``page_bounds`` (None: the keys' dtype)."""
    return BOUNDS_FP8 if page_bounds == "fp8" else None


def check_page_bounds(policy) -> None:
    if policy.page_bounds not in PAGE_BOUNDS:
        raise ValueError(f"option 'page_bounds' of policy {policy.name!r} must be one of {PAGE_BOUNDS} ('fp8': "
                         f"float8 bounds rounded outward, half the bytes; 'exact': the keys' dtype), got "
                         f"{policy.page_bounds!r}")


@dataclass
class QuestPolicy(Policy):
    """Quest (Tang et al. 2024, arXiv 2406.10774): query-aware KV page selection for decode.

    The cache keeps each page's elementwise key min/max (PagedKVLayer, updated incrementally). Per decode step a
    page's criticality is ``sum_d max(q_d * max_d, q_d * min_d)``, an upper bound of q.k over the page; the top
    ``budget // page_size`` pages (the newest, partial page always among them) are attended to. The first
    ``dense_layers`` layers stay dense, as in the paper.

    Layer map: the bound is not equally faithful in every layer. On SmolLM2-135M at 8K it ranks the needle page of
    layer 18's retrieval head 395th of 511 (0.02 of that head's mass kept at budget 4096, against 0.999 for an
    oracle of the same budget; results/quest_selection.md), which is enough to lose the needle, while the other
    layers keep 0.96-1.0. ``scripts/calibrate_quest.py MODEL`` finds such layers on synthetic passkey prompts (a
    head whose selected pages hold less than ``floor`` of what the oracle's hold) and writes a map of layers to
    leave dense, ``configs/quest_<model>[_<rule>][_exact].json``. ``layer_map``: ``"auto"`` (default) uses the
    shipped map made for the model with the policy's page size, group reduction, first-page rule and page-bound
    storage (``--page-bounds``: the maps score pages from the bounds as the cache stores them); ``"none"`` selects in
    every layer from ``dense_layers`` on; a shipped name or a .json path names a map (an error when it does not
    fit). The budget does not gate it: a larger budget keeps a superset of the pages the calibration saw, a smaller
    one keeps less in every layer, so the map's layers are then the least that should stay dense. The map's layers
    add to the first ``dense_layers``; ``accel.stats(model)["calibration"]`` names the map in use.

    Quest's code is multi-head only; with GQA one selection per KV head serves its query group, scored by the
    ``max`` (default) or ``sum`` of the group's criticalities, so each selected page is read once per group.
    ``group_reduce="max_norm"`` takes the max after subtracting each query head's bound over the whole cache, so a
    head whose keys span wide ranges (large bounds everywhere) does not rank the pages for the others. It is not
    better everywhere: in the 8K calibrations Gemma-3's layer 17 goes from 0.17 to 0.97 of the oracle's share at
    worst (its max_norm map lists no layer), SmolLM2's layers 14 and 17 from 0.87 to 0.98, but SmolLM2's layer 7
    from 0.77 to 0.003 (its map lists 7 and 18, against 18 with ``max``; with float8 bounds 7, 18 and 23). Not the
    default: it adds a reduction over the page bounds per layer (a compiled 128K step's attention 2.41 against 1.54
    ms with ``max``, H100). A
    budget at or above the context attends to everything (the layout is dense and ``accel.stats`` records decode
    density 1.0).

    ``page_bounds``: ``"fp8"`` (default) stores the page bounds as float8_e5m2 rounded outward (min down, max up:
    still bounds of every key, so the criticality stays an upper bound), half the bytes the scoring reads and half
    the metadata memory of bf16 bounds; ``"exact"`` keeps them in the keys' dtype, as the paper does. At the
    default budget the two choose alike (SmolLM2 8K: same needles, same continuation); at very small budgets the
    looser float8 bounds cost accuracy (budget 512 at 8K: one needle of three lost that exact bounds keep), so
    pass ``"exact"`` there (results/decode_niah_smollm2_8k_bounds)."""

    name = "quest"
    phases = ("decode",)
    description = "query-aware KV page selection from per-page key min/max within a token budget"
    paper = "Quest (arXiv 2406.10774)"

    page_size: int = 16
    budget: int = 4096
    dense_layers: int = 2
    group_reduce: str = "max"
    keep_first_page: bool = False
    layer_map: str = "auto"  # "auto" | "none" | shipped name | .json path (see the docstring)
    page_bounds: str = "fp8"  # "fp8" (float8_e5m2, rounded outward) | "exact" (the keys' dtype)

    none_options = ("layer_map",)

    def validate(self) -> None:
        check_page_bounds(self)
        if not isinstance(self.layer_map, str) or not self.layer_map:
            raise ValueError(f"option 'layer_map' of policy {self.name!r} must be 'auto', 'none', a shipped map name "
                             f"or a .json path, got {self.layer_map!r}")
        if self.page_size not in PAGE_SIZES:
            raise ValueError(f"option 'page_size' of policy {self.name!r} must be one of {PAGE_SIZES} (the sizes the "
                             f"decode kernels take), got {self.page_size}")
        if self.budget < self.page_size * (2 if self.keep_first_page else 1):
            raise ValueError(f"option 'budget' of policy {self.name!r} must cover at least the newest page "
                             f"({self.page_size} tokens{', plus the first page' if self.keep_first_page else ''}), "
                             f"got {self.budget}")
        if self.dense_layers < 0:
            raise ValueError(f"option 'dense_layers' of policy {self.name!r} must be >= 0, got {self.dense_layers}")
        if self.group_reduce not in GROUP_REDUCES:
            raise ValueError(f"option 'group_reduce' of policy {self.name!r} must be one of {GROUP_REDUCES}, "
                             f"got {self.group_reduce!r}")

    def check_model(self, model) -> None:
        """Called by accel.patch: load the layer map for ``model`` (see the docstring); ``dense_layers`` must leave a
        layer to select in."""
        self._map_dense, self._map_source = self._layer_map(model)
        n = (getattr(model.config, "text_config", None) or model.config).num_hidden_layers
        if self.dense_layers >= n:  # every layer would decode dense: quest would silently do nothing
            raise ValueError(f"option 'dense_layers' of policy {self.name!r} is {self.dense_layers} but the model has "
                             f"{n} layers, so every layer would decode dense; pass dense_layers between 0 and "
                             f"{n - 1}")

    def _layer_map(self, model) -> tuple[frozenset, str | None]:
        """(layers the map leaves dense, its source) for ``model``, or (empty, None) without a map that applies."""
        if self.layer_map == "none":
            return frozenset(), None
        found = load_layer_map(self.layer_map, model.config, {k: getattr(self, k) for k in CALIBRATED_SETTINGS})
        if found is None:
            return frozenset(), None
        src, data = found
        cal = data.get("calibration") or {}
        differs = {k: cal[k] for k in CALIBRATED_SETTINGS if k in cal and getattr(self, k) != cal[k]}
        if differs:  # layers chosen for other pages / scores say nothing about these
            if self.layer_map == "auto":
                return frozenset(), None  # the shipped map does not apply: select in every layer
            raise ValueError(f"quest layer map {src} was calibrated with "
                             + ", ".join(f"{k}={v}" for k, v in differs.items())
                             + "; this policy has " + ", ".join(f"{k}={getattr(self, k)}" for k in differs)
                             + ". Calibrate one for these settings (scripts/calibrate_quest.py) or pass "
                             "layer_map='none'")
        cfg = getattr(model.config, "text_config", None) or model.config
        bad = [i for i in data.get("dense_layers", [None])
               if not isinstance(i, int) or not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"quest layer map {src}: dense_layers must be layer indices, got {bad}")
        return frozenset(data["dense_layers"]), src

    @property
    def calibration_source(self) -> str | None:
        """The layer map in use (None: none)."""
        return getattr(self, "_map_source", None)

    def _selects(self, sliding_window, layer_idx) -> bool:
        return (sliding_window is None and layer_idx >= self.dense_layers
                and layer_idx not in getattr(self, "_map_dense", ()))

    def cache_kind(self, sliding_window, layer_idx):
        if not self._selects(sliding_window, layer_idx):
            return None
        return PagedKVLayer, {"page_size": self.page_size, "bounds_dtype": bounds_dtype(self.page_bounds)}

    def static_prepare(self, cache, layers, layer_idx: int, sliding_window, **_):
        """At the (eager) prefill over a transformers StaticCache: a selecting layer's StaticLayer becomes a
        PagedStaticLayer (page bounds); returns it as the handle ``static_decode`` gets, or None (dense layer)."""
        if not self._selects(sliding_window, layer_idx):
            return None
        if not isinstance(layers[layer_idx], PagedStaticLayer):
            layers[layer_idx] = PagedStaticLayer.from_layer(layers[layer_idx], page_size=self.page_size,
                                                            bounds_dtype=bounds_dtype(self.page_bounds))
        return layers[layer_idx]

    def static_decode(self, q, k, v, layer: PagedStaticLayer, *, mask, kv_start, scale, softcap, use_triton: bool):
        """One decode step over a static cache, all on the device (compiles into a CUDA graph): the same selection
        as ``plan`` with the length read from ``layer.cumulative_length`` (kernels/static_decode.py)."""
        from accel.kernels.static_decode import quest_static_decode

        return quest_static_decode(
            q, k, v, layer.kmin, layer.kmax, layer.cumulative_length, kv_start, self.budget // self.page_size,
            self.page_size, self.group_reduce, float(scale if scale is not None else q.shape[-1] ** -0.5),
            float(softcap or 0.0), use_triton, self.keep_first_page)

    def score(self, q: torch.Tensor, layer: PagedKVLayer, kv_start=None) -> torch.Tensor:
        return quest_scores(q, layer, self.group_reduce, kv_start)

    def plan(self, q, k, ctx):
        if ctx.sliding_window is not None:
            return DenseLayout(window=ctx.sliding_window)
        kv_len = k.shape[2]
        n_pages = -(-kv_len // self.page_size)
        n_keep = self.budget // self.page_size
        if not self._selects(None, ctx.layer_idx) or q.shape[2] != 1 or n_keep >= n_pages:
            return DenseLayout()  # budget covers the context: exact (recorded as density 1.0)
        layer = require_paged_layer(self.name, ctx.cache_layer, kv_len, self.page_size, ctx.layer_idx)
        kv_start = getattr(ctx, "kv_start", None)
        scores = self.score(q, layer, kv_start)
        pages, counts = select_pages(scores, n_keep, kv_len, self.page_size, self.keep_first_page)
        return PageSelection(pages=pages, counts=counts, page_size=self.page_size,
                             tokens=min(n_keep * self.page_size, kv_len))
