from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from importlib import resources

import torch

from accel.cache import DuoSplitLayer, DuoStaticLayer
from accel.layouts import DenseLayout, HeadPart, HeadSplitLayout, StreamingLayout

from .base import Policy

SIGNATURE_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                  "vocab_size")


def model_signature(config) -> dict:
    """What a head map must match: the shape of the model it was calibrated on."""
    cfg = getattr(config, "text_config", None) or config
    return {k: getattr(cfg, k, None) for k in SIGNATURE_KEYS}


def _shipped() -> list:
    return sorted(p for p in resources.files("accel.configs").iterdir()
                  if p.name.startswith("duo_") and p.name.endswith(".json"))


def load_head_map(name: str, config=None) -> tuple[str, dict]:
    """(source, data) of a DuoAttention head map: a .json path, a shipped name (``smollm2`` or ``duo_smollm2``),
    or ``""`` to pick the shipped map whose model signature matches ``config``."""
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"DuoAttention head map {name!r} does not exist; make one with "
                                    "scripts/calibrate_duo.py MODEL --out FILE")
        with open(name) as f:
            return name, json.load(f)
    if name:
        stem = name if name.startswith("duo_") else f"duo_{name}"
        res = resources.files("accel.configs").joinpath(f"{stem}.json")
        if not res.is_file():
            shipped = ", ".join(p.name[4:-5] for p in _shipped()) or "(none)"
            raise ValueError(f"unknown DuoAttention head map {name!r}; shipped: {shipped} (or a .json path from "
                             "scripts/calibrate_duo.py)")
        return str(res), json.loads(res.read_text())
    sig = model_signature(config) if config is not None else None
    for res in _shipped():
        data = json.loads(res.read_text())
        if data.get("model") == sig:
            return str(res), data
    raise ValueError(f"no shipped DuoAttention head map fits this model ({sig}); calibrate one with "
                     "`python scripts/calibrate_duo.py MODEL --out configs/duo_NAME.json` and pass duo_map=PATH")


def check_gates(src: str, gates, config) -> list[list[float]]:
    """``gates`` of a head map, one row of KV-head gates per layer of the model of ``config``, or a ValueError: a
    map with the right signature but other gates (hand-edited, truncated) would fail at every forward."""
    cfg = getattr(config, "text_config", None) or config
    layers, hkv = cfg.num_hidden_layers, cfg.num_key_value_heads or cfg.num_attention_heads
    fix = "calibrate one with scripts/calibrate_duo.py MODEL or pass duo_map=PATH"
    if not isinstance(gates, list) or not all(isinstance(row, list) for row in gates):
        raise ValueError(f"DuoAttention head map {src} has no 'gates' (a list of one row of KV-head gates per "
                         f"layer); {fix}")
    widths = sorted({len(row) for row in gates})
    if len(gates) != layers or widths != [hkv]:
        have = widths[0] if len(widths) == 1 else widths
        raise ValueError(f"DuoAttention head map {src} has {len(gates)} layers x {have} KV heads; this model has "
                         f"{layers} layers x {hkv} KV heads; {fix}")
    if not all(isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g)
               for row in gates for g in row):
        raise ValueError(f"DuoAttention head map {src}: gates must be finite numbers; {fix}")
    return gates


def streaming_assignment(gates: list[list[float]], ratio: float, layers: list[int]) -> dict[int, torch.Tensor]:
    """Bool [Hkv] per layer: the KV heads (over ``layers``) whose gate lies below the ``ratio`` quantile of the
    gates stream, as in DuoAttention's code (``np.quantile``, linear interpolation; heads at the quantile keep full
    attention). With few heads this rounds down: 1 of 3 streams at 0.5, not 2. ``ratio=1`` streams every head."""
    cand = sorted((gates[i][h], i, h) for i in layers for h in range(len(gates[i])))
    out = {i: torch.zeros(len(gates[i]), dtype=torch.bool) for i in range(len(gates))}
    if not cand:
        return out
    vals = torch.tensor([c[0] for c in cand], dtype=torch.float64)
    n_stream = len(cand) if ratio >= 1.0 else int((vals < torch.quantile(vals, ratio)).sum())
    for _, i, h in cand[:n_stream]:
        out[i][h] = True
    return out


@dataclass
class DuoPolicy(Policy):
    """DuoAttention (Xiao et al. 2024, arXiv 2410.10819): retrieval heads keep the full KV cache, streaming heads
    only an attention sink and the recent tokens, in prefill and decode.

    Which KV heads stream comes from a head map: per-head gate values from scripts/calibrate_duo.py (the gate
    optimisation of the paper on synthetic passkey data, weights frozen); heads whose gate lies below the
    ``ratio`` quantile of all gates stream (the paper's rule). The streaming heads' cache (DuoSplitLayer) holds
    ``sink + recent - 1`` tokens, so their KV memory is constant. Sliding-window layers keep the model's own
    window. ``ratio=0`` is dense."""

    name = "duo"
    phases = ("prefill", "decode")
    description = "retrieval heads full KV, streaming heads sink + recent (constant memory)"
    paper = "DuoAttention (arXiv 2410.10819)"

    duo_map: str = ""
    ratio: float = 0.5
    sink: int = 64
    recent: int = 256

    def validate(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"option 'ratio' of policy 'duo' must be in [0, 1], got {self.ratio}")
        if self.sink < 0 or self.recent < 1:
            raise ValueError(f"options 'sink' >= 0 and 'recent' >= 1 of policy 'duo', got {self.sink}, {self.recent}")
        if self.duo_map:
            load_head_map(self.duo_map)

    def check_model(self, model) -> None:
        """Load the head map for ``model`` (error if it was made for another model) and assign streaming heads."""
        cfg = model.config
        src, data = load_head_map(self.duo_map, cfg)
        sig = model_signature(cfg)
        if data.get("model") != sig:
            raise ValueError(f"DuoAttention head map {src} was made for another model ({data.get('model')}); this "
                             f"model is {sig}. Calibrate one with scripts/calibrate_duo.py")
        gates = check_gates(src, data.get("gates"), cfg)
        types = getattr(getattr(cfg, "text_config", None) or cfg, "layer_types", None)
        layers = [i for i in range(len(gates)) if not types or types[i] == "full_attention"]
        self._stream = streaming_assignment(gates, self.ratio, layers)
        self._source = src

    @property
    def calibration_source(self) -> str | None:
        """The head map in use (after accel.patch)."""
        return getattr(self, "_source", None)

    def _stream_heads(self, layer_idx: int) -> torch.Tensor:
        stream = getattr(self, "_stream", None)
        if stream is None:
            raise RuntimeError("policy 'duo' has no head map loaded; use it through accel.patch(model, 'duo')")
        return stream[layer_idx]

    def cache_kind(self, sliding_window, layer_idx):
        if sliding_window is not None:
            return None
        stream = self._stream_heads(layer_idx)
        if not bool(stream.any()):
            return None
        return DuoSplitLayer, {"stream_heads": stream, "sink": self.sink, "recent": self.recent}

    def static_prepare(self, cache, layers, layer_idx: int, sliding_window, **_):
        """At the (eager) prefill over a transformers StaticCache: a layer with streaming heads gets a DuoStaticLayer
        (retrieval heads' full buffer, streaming heads' sink + recent ring); returns it, or None (dense layer)."""
        if sliding_window is not None or not bool(self._stream_heads(layer_idx).any()):
            return None
        if not isinstance(layers[layer_idx], DuoStaticLayer):
            layers[layer_idx] = DuoStaticLayer.from_layer(layers[layer_idx], self._stream_heads(layer_idx),
                                                          self.sink, self.recent)
        return layers[layer_idx]

    def static_decode(self, q, k, v, layer: DuoStaticLayer, *, mask, kv_start, scale, softcap, use_triton: bool):
        """One decode step: retrieval heads attend to their whole buffer (transformers' mask), streaming heads to
        the filled slots of their ring (sink + the newest ``recent`` tokens). Device-side, no sync."""
        from accel.kernels.static_decode import split_static_decode

        if kv_start is not None:
            raise ValueError("policy 'duo' does not support left-padded batches (streaming heads' sink tokens would "
                             "be padding); run prompts one at a time or with equal lengths")
        return split_static_decode(q, layer, mask, scale, softcap, kv_start=kv_start, use_triton=use_triton)

    def plan(self, q, k, ctx):
        return self._split_plan(q, k, ctx, None)

    def chunk_plan(self, q, k, ctx, prefill: Policy):
        """A composition's prefill (``"xattention+duo"``) on top of a filled split cache (a later chunk of a chunked
        prefill, a prompt after a filled cache): the cache returned the retrieval heads only and the streaming
        heads' compacted past in ``stream_kv``, so the retrieval heads run the ``prefill`` policy's plan over their
        full K/V and the streaming heads sink + recent over their store, as in this policy's own chunks. (A first
        fill has every head's K/V, and there the prefill policy plans all heads.)"""
        if not split_chunk(ctx.cache_layer) or ctx.sliding_window is not None:
            return prefill.plan(q, k, ctx)
        return self._split_plan(q, k, ctx, prefill)

    def _split_plan(self, q, k, ctx, prefill: Policy | None):
        if ctx.sliding_window is not None:
            return DenseLayout(window=ctx.sliding_window)
        stream = self._stream_heads(ctx.layer_idx)
        if not bool(stream.any()):
            return DenseLayout()
        if ctx.kv_start is not None:
            raise ValueError(f"policy {self.name!r} does not support left-padded batches (streaming heads' sink "
                             "tokens would be padding); run prompts one at a time or with equal lengths")
        s_idx, r_idx, q_s, q_r = self._head_indices(ctx.layer_idx, stream, q.shape[1] // stream.numel(), q.device)
        window = StreamingLayout(sink=self.sink, window=self.recent)
        layer = ctx.cache_layer
        if split_chunk(layer):
            # the retrieval heads' K/V (k, v) and the streaming heads' compacted past + this call's tokens
            # (accel.layouts index space), from DuoSplitLayer or DuoStaticLayer alike
            sk, sv = layer.stream_kv
            retrieval = DenseLayout()
            if prefill is not None and q_r.numel():
                retrieval = prefill.plan(q.index_select(1, q_r), k, dataclasses.replace(ctx, q_heads=q_r))
                if isinstance(retrieval, HeadSplitLayout):
                    raise TypeError(f"prefill policy {prefill.name!r} splits heads itself and cannot plan the "
                                    f"retrieval heads of {self.name!r}'s chunks")
            parts = [HeadPart(q_r, retrieval), HeadPart(q_s, window, k=sk, v=sv)]
        else:  # every head's K/V is here (first fill, or no cache)
            parts = [HeadPart(q_r, DenseLayout(), kv_heads=r_idx), HeadPart(q_s, window, kv_heads=s_idx)]
        return HeadSplitLayout([p for p in parts if p.q_heads.numel()])


    def _head_indices(self, layer_idx: int, stream: torch.Tensor, group: int, dev) -> tuple:
        """(streaming KV heads, retrieval KV heads, their query heads) on ``dev``, made once per layer and device:
        copying the CPU head map to the GPU at every decode step waited for the GPU twice per layer."""
        memo = self.__dict__.setdefault("_idx_memo", {})
        key = (layer_idx, group, str(dev))
        hit = memo.get(key)
        if hit is None or hit[0] is not stream:  # a new head map (check_model again) replaces the entry
            s_idx, r_idx = stream.nonzero()[:, 0].to(dev), (~stream).nonzero()[:, 0].to(dev)
            ar = torch.arange(group, device=dev)
            hit = memo[key] = (stream, s_idx, r_idx, (s_idx[:, None] * group + ar).flatten(),
                               (r_idx[:, None] * group + ar).flatten())
        return hit[1:]


def split_chunk(layer) -> bool:
    """Whether this call's cache layer split its heads (a DuoAttention layer on top of filled tokens): it returned
    the retrieval heads' K/V only (all of a StaticLayer's streaming-only ring: the store itself) and left the
    streaming heads' visible K/V in ``stream_kv``."""
    return (isinstance(layer, (DuoSplitLayer, DuoStaticLayer)) and not layer.full_call
            and layer.stream_kv is not None)
