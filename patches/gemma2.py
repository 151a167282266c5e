"""Gemma 2: alternating sliding/global layers, attention logit soft-capping, query_pre_attn_scalar scaling."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter("gemma2", ('gemma2',), "Gemma2Attention")
