"""Mistral: config.sliding_window (when set) applies to every layer."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter("mistral", ('mistral',), "MistralAttention", window_from_config=True)
