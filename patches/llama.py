"""Llama 2/3.x, SmolLM2: plain GQA attention with RoPE."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter("llama", ('llama',), "LlamaAttention")
