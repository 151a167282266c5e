"""Per-family adapters, looked up by ``config.model_type``."""

from __future__ import annotations

import torch.nn as nn

from .base import FamilyAdapter, UnsupportedModel
from .gemma2 import ADAPTER as GEMMA2
from .gemma3 import ADAPTER as GEMMA3
from .llama import ADAPTER as LLAMA
from .mistral import ADAPTER as MISTRAL
from .qwen2 import ADAPTER as QWEN2
from .qwen3 import ADAPTER as QWEN3

ADAPTERS: tuple[FamilyAdapter, ...] = (LLAMA, QWEN2, QWEN3, MISTRAL, GEMMA2, GEMMA3)


def find_adapter(model: nn.Module) -> FamilyAdapter:
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise UnsupportedModel(
        f"accel does not support {type(model).__name__} (model_type={model_type!r}) yet; supported model types: "
        f"{supported}. Adding a family is one file in patches/."
    )


__all__ = ["ADAPTERS", "FamilyAdapter", "UnsupportedModel", "find_adapter"]
