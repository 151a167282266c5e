from __future__ import annotations

from dataclasses import dataclass

import torch

from accel.cache import DuoStaticLayer
from accel.layouts import DenseLayout, StreamingLayout

from .base import Policy, require_positive


@dataclass
class StreamingPolicy(Policy):
    """Attention sink + recent window (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453; MInference's A-shape).

    In decode the layer's cache keeps only ``sink + window`` tokens, so its KV memory stops growing."""

    name = "streaming"
    description = "attention sink + local window; constant KV memory in decode (StreamingLLM)"
    paper = "StreamingLLM (arXiv 2309.17453)"

    sink: int = 128
    window: int = 4096

    def validate(self) -> None:
        require_positive(self, "window")
        if self.sink < 0:
            raise ValueError(f"option 'sink' of policy 'streaming' must be >= 0, got {self.sink}")

    def plan(self, q, k, ctx):
        if ctx.sliding_window is not None:
            # the model's own sliding-window layers keep their window (no sink there)
            return DenseLayout(window=ctx.sliding_window)
        return StreamingLayout(sink=self.sink, window=self.window)

    def cache_limit(self, sliding_window):
        if sliding_window is not None:
            return None
        return self.sink, self.window

    def static_prepare(self, cache, layers, layer_idx: int, sliding_window, *, kv_heads: int, **_):
        """At the (eager) prefill over a transformers StaticCache: the layer's K/V move to a ring of ``sink +
        window`` slots (a DuoStaticLayer whose heads all stream), so its memory is constant there too. The model's
        own sliding-window layers keep transformers' layer (None)."""
        if sliding_window is not None:
            return None
        if not isinstance(layers[layer_idx], DuoStaticLayer):
            layers[layer_idx] = DuoStaticLayer.from_layer(layers[layer_idx], torch.ones(kv_heads, dtype=torch.bool),
                                                          self.sink, self.window)
        return layers[layer_idx]

    def static_decode(self, q, k, v, layer: DuoStaticLayer, *, mask, kv_start, scale, softcap, use_triton: bool):
        """One decode step over the ring: sink + the newest ``window`` tokens. Device-side, no sync."""
        from accel.kernels.static_decode import split_static_decode

        return split_static_decode(q, layer, mask, scale, softcap, use_triton=use_triton)
