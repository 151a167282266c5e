"""The Triton split-KV decode attention as an opaque op (``torch.ops.accel.paged_decode``) for compiled decode steps.

Dynamo would otherwise trace the launch wrapper of ``kernels.triton.decode_attention`` (device queries, grid
arithmetic) inside a ``torch.compile(fullgraph=True)`` step; as a custom op the compiled graph holds one call and the
CUDA graph captures its launches. Used by TidalDecode's static-cache decode; Quest and LServe have their own ops."""

from __future__ import annotations

import torch


@torch.library.custom_op("accel::paged_decode", mutates_args=())
def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, counts: torch.Tensor,
                 page_size: int, scale: float, softcap: float, kv_start: torch.Tensor | None,
                 kv_end: torch.Tensor | None) -> torch.Tensor:
    """``paged_decode_attention`` of kernels/triton/decode_attention.py; ``softcap`` 0 for none."""
    from .triton.decode_attention import paged_decode_attention

    return paged_decode_attention(q, k, v, pages, counts, page_size, scale=scale, softcap=softcap or None,
                                  kv_start=kv_start, kv_end=kv_end)


@paged_decode.register_fake
def _(q, k, v, pages, counts, page_size, scale, softcap, kv_start, kv_end):
    return q.new_empty(q.shape[0], q.shape[1], 1, v.shape[-1])


__all__ = ["paged_decode"]
