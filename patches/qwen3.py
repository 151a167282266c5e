"""Qwen3: per-head q/k RMSNorm (applied by the model before the attention call); optional sliding layers."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter("qwen3", ('qwen3',), "Qwen3Attention")
