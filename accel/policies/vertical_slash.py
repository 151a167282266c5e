"""MInference 1.0 vertical-slash policy, and its estimation helpers (last-query attention, column and diagonal
mass) that FlexPrefill shares."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from importlib import resources

import torch

from accel.kernels.reference_estimation import (block_means, block_sums, diagonal_sums,  # noqa: F401 (re-exported)
                                                last_query_attention, lastq_scores_reference)
from accel.layouts import DenseLayout, VerticalSlashLayout

from .base import Policy, require_positive


def _use_triton(q: torch.Tensor) -> bool:
    """The Triton estimation kernels run for CUDA tensors they support (else the exact torch twins run)."""
    from accel.kernels.triton.checks import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    return q.is_cuda and q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES


def last_query_scores(q: torch.Tensor, k: torch.Tensor, n_last: int,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's estimate: the last ``min(n_last, Sq)`` queries' causal softmax mass summed per key column and per
    diagonal offset (query position - key), float32 ``(vertical, slash)`` [B, Hq, Sk] each. On CUDA the Triton
    kernels (the diagonal sums read the probabilities back from a float16 scratch of at most 1.5 GiB, processed in
    chunks of KV heads), else its torch twin ``lastq_scores_reference``."""
    if _use_triton(q):
        from accel.kernels.triton.lastq_score import lastq_scores

        return lastq_scores(q, k, n_last, scale=scale)
    return lastq_scores_reference(q, k, n_last, scale)


# ------------------------------------------------------------------------------------------------ the policy

PATTERNS = ("vertical_slash", "a_shape", "block_sparse")
SINK_COLUMNS = 30  # MInference always keeps the first 30 columns ...
LOCAL_DIAGONALS = 100  # ... and the 100 diagonals nearest the main one (both count within the budgets)
BS_BLOCK = 64  # MInference's block-sparse pattern works on 64-token blocks
# the options each pattern's sizes live in (a head map's "sizes" may fix them)
SIZE_OPTIONS = {"vertical_slash": ("vertical_size", "slash_size"), "a_shape": ("a_shape_sink", "a_shape_window"),
                "block_sparse": ("block_count",)}


def _read_head_map(path: str) -> dict:
    return _read_head_map_cached(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_head_map_cached(path: str, mtime: int) -> dict:
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("patterns"), list):
        raise ValueError(f"head map {path} must be a JSON object with a 'patterns' list (one row per layer); "
                         "make one with scripts/search_patterns.py MODEL")
    for i, row in enumerate(data["patterns"]):
        if row is None:
            continue
        bad = [p for p in row if p not in PATTERNS]
        if bad:
            raise ValueError(f"head map {path}, layer {i}: unknown pattern(s) {bad}; valid: {PATTERNS}")
    dense = data.get("dense_layers", [])
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(
            data["patterns"]) for i in dense):
        raise ValueError(f"head map {path}: 'dense_layers' must be a list of layer indices below "
                         f"{len(data['patterns'])}, got {dense!r}")
    sizes = data.get("sizes")
    if sizes is not None:
        if not isinstance(sizes, dict) or set(sizes) - set(PATTERNS):
            raise ValueError(f"head map {path}: 'sizes' must map patterns {PATTERNS} to their options, got {sizes!r}")
        for pat, opts in sizes.items():
            ok = isinstance(opts, dict) and set(opts) <= set(SIZE_OPTIONS[pat]) and all(
                isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if o == "a_shape_sink" else v > 0)
                for o, v in opts.items())
            if not ok:
                raise ValueError(f"head map {path}: sizes of {pat!r} must be positive ints among "
                                 f"{SIZE_OPTIONS[pat]}, got {opts!r}")
    return data


NO_MAP = ("", "none")  # head_map values that run every head as vertical-slash


def shipped_head_map(model) -> str | None:
    """The shipped head map (configs/vertical_slash_*.json) made for ``model``'s class, layer and head counts, if
    any: what ``head_map="auto"`` runs."""
    cfg = getattr(model.config, "text_config", None) or model.config
    sig = (type(model).__name__, cfg.num_hidden_layers, cfg.num_attention_heads)
    for res in sorted(resources.files("accel.configs").iterdir(), key=lambda r: r.name):
        if res.name.startswith("vertical_slash_") and res.name.endswith(".json"):
            data = _read_head_map(str(res))
            if (data.get("model_class"), data.get("num_layers"), data.get("num_heads")) == sig:
                return str(res)
    return None


def resolve_head_map(name: str) -> str:
    """A head map path: an existing .json file, or the name of one shipped in configs/ (without .json)."""
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"head map file {name!r} does not exist; make one with "
                                    "scripts/search_patterns.py MODEL --out FILE")
        return name
    res = resources.files("accel.configs").joinpath(f"{name}.json")
    if not res.is_file():
        shipped = sorted(p.name[:-5] for p in resources.files("accel.configs").iterdir()  # not other policies' maps
                         if p.name.startswith("vertical_slash_") and p.name.endswith(".json"))
        raise ValueError(f"unknown head map {name!r}; shipped head maps: {', '.join(shipped) or '(none)'} "
                         "(or a path to a .json file from scripts/search_patterns.py)")
    return str(res)


@dataclass
class VerticalSlashPolicy(Policy):
    """MInference 1.0 (Jiang et al. 2024, arXiv 2407.02490): the last ``last_q`` queries' exact attention picks,
    per head, the top ``vertical_size`` key columns and top ``slash_size`` diagonals (the first 30 columns and the
    100 nearest diagonals always, as in MInference). A per-head pattern can come from an offline search
    (``head_map``: a JSON from scripts/search_patterns.py, shipped for the demo models as
    ``vertical_slash_smollm2`` / ``vertical_slash_gemma3``):

    - ``vertical_slash``: as above;
    - ``a_shape``: the first ``a_shape_sink`` columns and the ``a_shape_window`` nearest diagonals (StreamingLLM);
    - ``block_sparse``: MInference ranks 64-token key blocks per 64-query block with pooled q/k. One layout type
      serves a whole layer here, so a mixed layer is one ``VerticalSlashLayout`` and this pattern is approximated
      in it: the ``block_count`` key blocks with the most last-query attention become full columns, plus one
      block's width of local diagonals.

    ``head_map="auto"`` (default) runs the shipped map made for the patched model's architecture when there is one
    (MInference ships a searched config per model and runs it), else every head as vertical-slash; ``"none"``
    (or ``""``) never uses a map. A map found by ``"auto"`` does not apply when a size option it fixes is set
    (those options then run every head as vertical-slash at the given sizes).

    A map may leave whole layers dense (``dense_layers``, MInference's ``starting_layer`` generalised to a list of
    layer indices): on Gemma-3-270M at 32736 tokens, the vertical-slash layout in its first global layer (layer 5)
    alone loses the depth-0.5 needle dense finds (float32, CPU; with layers 11 or 17 alone sparse it is found), so
    the shipped Gemma-3 map runs layer 5 dense (chosen by hand with the procedure ``scripts/search_patterns.py
    --needle-check`` scripts; the map's ``search.dense_layers`` says on which prompts).

    A head map made by the current search also fixes each pattern's sizes (its ``sizes``): MInference's search is
    kernel-aware, every pattern of a head compared at one cost, and a head runs its pattern at the cost it was
    chosen at (by default MInference's 1000 + 6096 = 7096 keys per query row: A-shape sink 256 + window 6840,
    block-sparse 110 blocks of 64). Maps without ``sizes`` (older searches) run the patterns at the options below;
    with ``sizes`` those options cannot be set too (an error says so).

    Budgets at or above the context length keep everything (dense). Contexts no longer than ``last_q`` run dense
    (density 1.0 in stats).

    Defaults: MInference's vertical 1000 / slash 6096 / last_q 64. The A-shape sink is 256 (it was 128; with the
    SmolLM2 map, searched at 3K tokens and 512 keys per row before maps carried sizes, 0.981 -> 0.983 mean recall at
    2K-4K). The Gemma-3 map is searched at 16K with sizes (MInference's 7096 keys per row for every pattern), a
    static pattern only where it keeps 0.9 of the mass: 0.899 / 0.963 mean recall at 16K / 8K (one A-shape head of
    12; no map 0.895 / 0.961, the earlier 3K map without sizes 0.806 / 0.902); the best-recall choice (0.959 at 16K,
    A-shape on two diffuse heads) lost the 16K needle that vertical-slash finds
    (results/recall_sweep_vs_sizes/recall_sweep.md)."""

    name = "vertical_slash"
    phases = ("prefill",)
    description = "per-head vertical columns + slash diagonals from the last queries (A-shape / block-sparse heads)"
    paper = "MInference 1.0 (arXiv 2407.02490)"
    none_options = ("head_map",)

    vertical_size: int = 1000
    slash_size: int = 6096
    last_q: int = 64
    head_map: str = "auto"  # "auto" | "none" | shipped name | .json path (see the docstring)
    a_shape_sink: int = 256  # 128 before (see the docstring)
    a_shape_window: int = 1024
    block_count: int = 100

    def validate(self) -> None:
        require_positive(self, "vertical_size", "slash_size", "last_q", "a_shape_window", "block_count")
        if self.a_shape_sink < 0:
            raise ValueError(f"option 'a_shape_sink' of policy 'vertical_slash' must be >= 0, got {self.a_shape_sink}")
        if self.head_map not in NO_MAP + ("auto",):
            clash, fixed = self._size_clash(resolve_head_map(self.head_map))
            if clash:
                raise ValueError(f"head map {self.head_map!r} fixes the pattern sizes it was searched with "
                                 f"({', '.join(f'{o}={fixed[o]}' for o in clash)}); drop "
                                 f"{', '.join(clash)}, or search a map at other sizes (scripts/search_patterns.py "
                                 "--budget)")

    def _size_clash(self, path: str) -> tuple[list[str], dict]:
        """(the size options set away from their defaults that the map at ``path`` fixes, the map's sizes)."""
        fixed = sizes_flat(_read_head_map(path).get("sizes") or {})
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [o for o in fixed if getattr(self, o) != defaults[o]], fixed

    def map_path(self) -> str | None:
        """The head map this policy runs: a named one, the shipped one ``"auto"`` found for the patched model
        (``check_model``), or None."""
        if self.head_map in NO_MAP:
            return None
        if self.head_map == "auto":
            return getattr(self, "_auto_map", None)
        return resolve_head_map(self.head_map)

    def sized(self) -> VerticalSlashPolicy:
        """This policy with the head map's pattern sizes applied (itself without a map or map sizes)."""
        path = self.map_path()
        sizes = _read_head_map(path).get("sizes") if path else None
        return dataclasses.replace(self, head_map="none", **sizes_flat(sizes)) if sizes else self

    def dense_layer(self, layer_idx: int) -> bool:
        """Whether the head map leaves ``layer_idx`` dense."""
        path = self.map_path()
        return bool(path) and layer_idx in _read_head_map(path).get("dense_layers", ())

    def head_patterns(self, layer_idx: int, n_heads: int, heads: list[int] | None = None) -> list[str]:
        """The pattern of each of the ``n_heads`` query heads of ``q``; ``heads``: their ids among the layer's heads
        when ``q`` holds a subset (a composition's retrieval heads on a chunk; check_model matched the map)."""
        path = self.map_path()
        if not path:
            return ["vertical_slash"] * n_heads
        rows = _read_head_map(path)["patterns"]
        if heads is not None:
            row = rows[layer_idx] if layer_idx < len(rows) else None
            return [row[h] for h in heads] if row else ["vertical_slash"] * n_heads
        if layer_idx >= len(rows) or (rows[layer_idx] is not None and len(rows[layer_idx]) != n_heads):
            have = len(rows[layer_idx]) if layer_idx < len(rows) and rows[layer_idx] is not None else None
            raise ValueError(f"head map {path!r} was made for another model: it has {len(rows)} layers "
                             f"({have} heads at layer {layer_idx}), this call is layer {layer_idx} with {n_heads} "
                             "query heads; run scripts/search_patterns.py for this model")
        return rows[layer_idx] or ["vertical_slash"] * n_heads

    @property
    def calibration_source(self) -> str | None:
        """The head map in use, if any."""
        return self.map_path()

    def check_model(self, model) -> None:
        """Called by accel.patch: ``"auto"`` finds the shipped map for the model (none when a size option it fixes
        is set); a named head map must match the model's layer and head counts."""
        if self.head_map == "auto":
            found = shipped_head_map(model)
            self._auto_map = found if found and not self._size_clash(found)[0] else None
            return
        if self.head_map in NO_MAP:
            return
        data = _read_head_map(resolve_head_map(self.head_map))
        cfg = getattr(model.config, "text_config", None) or model.config
        layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
        rows = data["patterns"]
        widths = {len(r) for r in rows if r is not None}
        if len(rows) != layers or widths - {heads}:
            raise ValueError(f"head map {self.head_map!r} was made for {data.get('model', 'another model')} "
                             f"({len(rows)} layers x {sorted(widths)} heads); this model has {layers} layers x "
                             f"{heads} heads. Run scripts/search_patterns.py for this model, or pass head_map='none'")

    def plan(self, q, k, ctx):
        if ctx.sliding_window is not None:
            return DenseLayout(window=ctx.sliding_window)
        kv_len = k.shape[2]
        if self.dense_layer(ctx.layer_idx):
            return DenseLayout()  # the head map leaves this layer dense: recorded as density 1.0
        heads = None if ctx.q_heads is None else ctx.q_heads.tolist()
        patterns = self.head_patterns(ctx.layer_idx, q.shape[1], heads)
        pol = self.sized()
        covers = {"vertical_slash": pol.slash_size >= kv_len, "a_shape": pol.a_shape_window >= kv_len,
                  "block_sparse": pol.block_count * BS_BLOCK >= kv_len}
        if kv_len <= self.last_q or all(covers[p] for p in patterns):
            return DenseLayout()  # every head keeps everything: recorded as density 1.0
        return pol.build(q, k, patterns, pol.vertical_size, pol.slash_size)

    def build(self, q, k, patterns, vertical_size, slash_size) -> VerticalSlashLayout:
        """The layout for per-head ``patterns`` (also used by scripts/search_patterns.py with search budgets).
        Built for all heads of a pattern at once with tensor ops (one device sync, only for block-sparse heads when
        the last key block is partial); rows padded with -1 to the widest row."""
        B, H = q.shape[:2]
        Sk, dev = k.shape[2], q.device
        heads = {p: [h for h, x in enumerate(patterns) if x == p] for p in PATTERNS}
        vertical = slash = None
        if heads["vertical_slash"] or heads["block_sparse"]:
            vertical, slash = last_query_scores(q, k, self.last_q)
        parts = []  # (query heads, columns [B, n, w], offsets [B, n, w]), -1 = padding
        if heads["vertical_slash"]:
            idx = torch.tensor(heads["vertical_slash"], device=dev)
            v = vertical[:, idx]
            v[..., :SINK_COLUMNS] = float("inf")
            c = v.topk(min(vertical_size, Sk), dim=-1).indices.sort(dim=-1).values
            sl = slash[:, idx]
            sl[..., :LOCAL_DIAGONALS] = float("inf")
            o = sl.topk(min(slash_size, Sk), dim=-1).indices.sort(dim=-1).values
            parts.append((idx, c, o))
        if heads["a_shape"]:
            idx = torch.tensor(heads["a_shape"], device=dev)
            c = torch.arange(min(self.a_shape_sink, Sk), device=dev).expand(B, len(idx), -1)
            o = torch.arange(min(self.a_shape_window, Sk), device=dev).expand(B, len(idx), -1)
            parts.append((idx, c, o))
        if heads["block_sparse"]:  # approximated by whole-block columns + one block of local diagonals
            idx = torch.tensor(heads["block_sparse"], device=dev)
            blk = block_sums(vertical[:, idx], BS_BLOCK)
            blk[..., 0] = float("inf")
            top = blk.topk(min(self.block_count, blk.shape[-1]), dim=-1).indices
            c = (top[..., None] * BS_BLOCK + torch.arange(BS_BLOCK, device=dev)).flatten(-2)
            c = c.masked_fill(c >= Sk, Sk).sort(dim=-1).values  # columns past the end sort last ...
            width = c.shape[-1] if Sk % BS_BLOCK == 0 else int((c < Sk).sum(-1).max())
            c = c[..., :width].masked_fill(c[..., :width] >= Sk, -1)  # ... and become padding
            o = torch.arange(min(BS_BLOCK, Sk), device=dev).expand(B, len(idx), -1)
            parts.append((idx, c, o))
        return VerticalSlashLayout(columns=_scatter_rows(B, H, [(i, c) for i, c, _ in parts], dev),
                                   offsets=_scatter_rows(B, H, [(i, o) for i, _, o in parts], dev))


def sizes_flat(sizes: dict) -> dict[str, int]:
    """A head map's per-pattern ``sizes`` as one dict of policy options."""
    return {o: v for opts in sizes.values() for o, v in opts.items()}


def _scatter_rows(B: int, H: int, parts: list, device) -> torch.Tensor:
    """[B, H, width] int64 filled with -1, each part's [B, n, w] rows placed at its heads (width >= 1)."""
    width = max([1] + [t.shape[-1] for _, t in parts])
    out = torch.full((B, H, width), -1, dtype=torch.int64, device=device)
    for idx, t in parts:  # one per pattern
        out[:, idx, : t.shape[-1]] = t
    return out
