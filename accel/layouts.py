"""Layouts: what a policy decides, as plain data. A backend turns a layout into attention output.

Index-space convention shared by every layout and kernel: keys are indexed 0..Sk-1 as they sit in the KV tensor
after the cache update, and query i of Sq sits at key index ``Sk - Sq + i``. Causality, windows and sinks are all
expressed in this space, which stays exact for compacted caches (sliding-window and sink+window layers keep the
recent tokens contiguous, so distances between recent keys and new queries are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DenseLayout:
    """Every causal key; ``window`` restricts to the last ``window`` keys (sliding-window layers, e.g. Gemma)."""

    window: int | None = None

    def density(self, q_len: int, kv_len: int) -> float:
        return _mask_density(q_len, kv_len, sink=0, window=self.window)


@dataclass(frozen=True)
class StreamingLayout:
    """Attention sink plus local window (StreamingLLM / A-shape): key j is kept for query position p when
    ``j < sink`` or ``p - j < window`` (and ``j <= p``)."""

    sink: int
    window: int

    def density(self, q_len: int, kv_len: int) -> float:
        return _mask_density(q_len, kv_len, sink=self.sink, window=self.window)


@dataclass
class BlockLayout:
    """Block-sparse layout: per (batch, head, query block), ``counts`` valid entries of ``indices`` (int32 key-block
    ids). Same format as FlashAttention-4 and FlexAttention block masks. Causality inside diagonal blocks is applied
    by the kernel."""

    counts: torch.Tensor  # [B, H, n_q_blocks] int32
    indices: torch.Tensor  # [B, H, n_q_blocks, max_blocks] int32
    block_q: int = 128
    block_k: int = 128
    # True when every row's valid indices are strictly ascending (the builders guarantee it): the Triton kernel then
    # finds the blocks that need no causal mask by binary search and runs them in a branch-free, pipelined loop
    ascending: bool = False


@dataclass
class VerticalSlashLayout:
    """MInference vertical-slash: per (batch, head) kept key columns and kept diagonals (offset = query pos - key)."""

    columns: torch.Tensor  # [B, H, n_cols] int64 key indices
    offsets: torch.Tensor  # [B, H, n_diag] int64 diagonal offsets (0 = main diagonal)


@dataclass
class PageSelection:
    """Decode: per (batch, KV head) selected KV pages of ``page_size`` tokens."""

    pages: torch.Tensor  # [B, H_kv, n_pages] int32, ascending page ids (page p = keys p*page_size ..)
    counts: torch.Tensor  # [B, H_kv] int32, valid entries of ``pages``
    page_size: int = 16
    tokens: int | None = None  # host-side: keys each head attends to (for density without a device sync)

    def density(self, q_len: int, kv_len: int) -> float | None:
        return None if self.tokens is None else min(1.0, self.tokens / max(kv_len, 1))


@dataclass
class SplitPageSelection:
    """Decode over a split (DuoAttention-style) cache layer in one pass: the retrieval KV heads ``kv_heads`` of the
    attention call's K/V over their ``selection`` of pages, and the streaming KV heads ``ring_heads`` over their own
    store ``ring_k`` / ``ring_v``, every slot of which the query sees (sink + recent; ``stream`` is that mask, for
    density). Head ids are layer KV heads, ``group`` query heads each; ``q_heads`` / ``ring_q_heads`` are their query
    heads; together they are every query head of the layer. The Triton backend runs both in one split-KV launch and
    one combine (LServe over the dynamic cache: no gather of the query, no scatter of the outputs, no second
    attention call)."""

    selection: PageSelection
    kv_heads: torch.Tensor  # [Hr] layer KV head of each of k/v's heads
    q_heads: torch.Tensor  # [Hr * group] their query heads
    ring_k: torch.Tensor  # [B, Hs, S2, D]
    ring_v: torch.Tensor  # [B, Hs, S2, Dv]
    ring_heads: torch.Tensor  # [Hs]
    ring_q_heads: torch.Tensor  # [Hs * group]
    group: int
    stream: StreamingLayout

    def density(self, q_len: int, kv_len: int) -> float | None:
        d = self.selection.density(q_len, kv_len)
        if d is None:
            return None
        nr, ns = self.q_heads.numel(), self.ring_q_heads.numel()
        return (d * nr + self.stream.density(q_len, kv_len) * ns) / max(nr + ns, 1)


def _mask_density(q_len: int, kv_len: int, sink: int, window: int | None) -> float:
    """Share of causally visible (query, key) pairs that a sink+window mask keeps (host arithmetic, no sync)."""
    if window is None:
        return 1.0
    if q_len == 1:  # a decode step, at every layer: plain arithmetic (numpy's overhead is most of the call)
        return (min(kv_len, window) + min(max(kv_len - window, 0), sink)) / max(kv_len, 1)
    pos = np.arange(kv_len - q_len, kv_len, dtype=np.int64)
    causal = pos + 1
    recent = np.minimum(causal, window)
    sinks = np.clip(pos - window + 1, 0, sink)  # sink keys older than the window
    return float((recent + sinks).sum() / causal.sum())


@dataclass
class HeadPart:
    """One group of query heads inside a HeadSplitLayout: ``layout`` over its own K/V (``k``/``v`` given, e.g. a
    compacted streaming store) or over the KV heads ``kv_heads`` of the tensors the attention call received
    (``None``: all of them)."""

    q_heads: torch.Tensor  # [n] int64 query head ids
    layout: object
    kv_heads: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


@dataclass
class HeadSplitLayout:
    """Heads of one layer under different layouts (DuoAttention: retrieval heads dense over the full KV, streaming
    heads sink + recent over their constant-size store). accel.attention runs each part on its own backend."""

    parts: list

    def density(self, q_len: int, kv_len: int) -> float | None:
        tot = n = 0.0
        for part in self.parts:
            d = part.layout.density(q_len, kv_len) if hasattr(part.layout, "density") else None
            if d is None:
                return None
            tot += d * part.q_heads.numel()
            n += part.q_heads.numel()
        return tot / n if n else None
