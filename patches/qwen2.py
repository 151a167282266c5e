"""Qwen2/2.5: q/k/v biases; optional sliding-window layers (layer_types) keep their window."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter("qwen2", ('qwen2',), "Qwen2Attention")
