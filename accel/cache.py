"""Cache layers that make decode-policy memory savings real.

``SinkWindowLayer`` stores only the first ``sink`` tokens and the last ``window - 1`` (what the next query can
see), so a streaming layer's KV memory is constant in the context length. Compacted keys stay in the index-space
convention of accel.layouts: sinks first, then a contiguous run of recent tokens ending at the newest one."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SinkWindowLayer(DynamicLayer):
    is_sliding = False
    is_croppable = False

    def __init__(self, sink: int, window: int):
        super().__init__()
        self.sink, self.window = sink, window
        self.cumulative_length = 0

    @classmethod
    def from_layer(cls, layer: DynamicLayer, sink: int, window: int) -> "SinkWindowLayer":
        """Take over a plain DynamicLayer (possibly already filled, e.g. a prompt cache built before patching)."""
        new = cls(sink, window)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
            new.lazy_initialization(layer.keys, layer.values)
            new.cumulative_length = layer.keys.shape[-2]
            new.keys, new.values = new._compact(layer.keys), new._compact(layer.values)
        return new

    def _compact(self, x: torch.Tensor) -> torch.Tensor:
        keep_recent = self.window - 1
        if x.shape[-2] <= self.sink + keep_recent:
            return x
        recent = x[..., x.shape[-2] - keep_recent :, :] if keep_recent > 0 else x[..., :0, :]
        # clone: slices of the full tensor would keep the whole context alive
        return torch.cat([x[..., : self.sink, :], recent], dim=-2).clone()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        full_k = torch.cat([self.keys, key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = self._compact(full_k), self._compact(full_v)
        return full_k, full_v

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if self.keys is None else self.keys.shape[-2]
        return stored + query_length, max(self.cumulative_length - stored, 0)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(
            "a streaming (sink + window) cache layer has dropped old tokens and cannot be cropped; assisted or "
            "speculative decoding needs policy='dense' for decode"
        )


def cache_bytes(cache: Cache | None) -> int:
    """Bytes held by the key/value tensors of a transformers cache (what the cache really stores)."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
