"""Gemma 3 text models: 5 sliding layers per global layer, q/k norms, query_pre_attn_scalar scaling.
(The multimodal wrapper attends bidirectionally within images and is not supported.)"""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter("gemma3", ("gemma3_text",), "Gemma3Attention")
