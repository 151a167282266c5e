from __future__ import annotations

from dataclasses import dataclass

from accel.layouts import DenseLayout

from .base import Policy


@dataclass
class DensePolicy(Policy):
    """Exact attention through the best available kernel; sliding-window layers keep the model's own window."""

    name = "dense"
    description = "exact attention through the fastest available kernel"
    paper = "-"

    def plan(self, q, k, ctx):
        return DenseLayout(window=ctx.sliding_window)
