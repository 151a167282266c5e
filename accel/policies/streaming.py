from __future__ import annotations

from dataclasses import dataclass

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
