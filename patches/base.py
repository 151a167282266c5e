"""What differs between model families, in one small dataclass. Everything else is shared."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class FamilyAdapter:
    family: str
    model_types: tuple[str, ...]  # config.model_type values
    attention_class: str  # class name of the attention module, e.g. "LlamaAttention"
    window_from_config: bool = False  # Mistral passes config.sliding_window to every layer

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        mods = [m for m in model.modules() if type(m).__name__ == self.attention_class]
        if not mods:
            raise UnsupportedModel(f"found no {self.attention_class} modules in {type(model).__name__}")
        return mods

    def layer_window(self, module: nn.Module) -> int | None:
        """The model's own sliding window for this layer (None: full attention)."""
        if self.window_from_config:
            return getattr(module.config, "sliding_window", None)
        return getattr(module, "sliding_window", None)

    def check(self, model: nn.Module) -> None:
        """Raise for configurations accel cannot run exactly."""
        cfg = model.config
        if getattr(cfg, "use_bidirectional_attention", False) or getattr(cfg, "is_causal", True) is False:
            raise UnsupportedModel(
                f"{type(model).__name__} is configured for bidirectional attention; accel only accelerates causal "
                "language models (set use_bidirectional_attention=False)"
            )
