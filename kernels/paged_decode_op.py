"""The Triton split-KV decode attention as an opaque op (``torch.ops.accel.paged_decode``) for compiled decode steps.

Dynamo would otherwise trace the launch wrapper of ``kernels.triton.decode_attention`` (device queries, grid
arithmetic) inside a ``torch.compile(fullgraph=True)`` step; as a custom op the compiled graph holds one call and the
CUDA graph captures its launches. Used by TidalDecode's static-cache decode (its sparse layers, its selection
layers' dense attention with scores); Quest and LServe have their own ops."""

from __future__ import annotations

import torch


@torch.library.custom_op("accel::paged_decode", mutates_args=())
def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, counts: torch.Tensor,
                 page_size: int, scale: float, softcap: float, kv_start: torch.Tensor | None,
                 kv_end: torch.Tensor | None) -> torch.Tensor:
    """``paged_decode_attention`` of kernels/triton/decode_attention.py; ``softcap`` 0 for none. ``pages`` may hold
    one row per batch row ([B, 1, n], TidalDecode's shared selection): expanded over the KV heads here, inside the
    op, where the view is free (expanded outside, inductor wrote it out every layer and step)."""
    from .triton.decode_attention import paged_decode_attention

    if pages.shape[1] == 1 and k.shape[1] > 1:
        pages = pages.expand(pages.shape[0], k.shape[1], pages.shape[2])
    return paged_decode_attention(q, k, v, pages, counts, page_size, scale=scale, softcap=softcap or None,
                                  kv_start=kv_start, kv_end=kv_end)


@paged_decode.register_fake
def _(q, k, v, pages, counts, page_size, scale, softcap, kv_start, kv_end):
    return q.new_empty(q.shape[0], q.shape[1], 1, v.shape[-1])


@torch.library.custom_op("accel::dense_decode_scores", mutates_args=())
def dense_decode_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float,
                        kv_start: torch.Tensor | None,
                        kv_end: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense one-token attention over every key that also hands back its scores: (out [B, Hq, 1, Dv], lse float32
    [B, Hq, 1], logits float32 [B, Hq, Sk] in base 2; entries of keys not attended are undefined: mask them), so
    ``exp2(logits - lse * log2(e))`` are the probabilities without a second pass over K (TidalDecode's selection
    layers)."""
    from .triton.decode_attention import paged_decode_attention

    logits = torch.empty(q.shape[0], q.shape[1], k.shape[2], dtype=torch.float32, device=q.device)
    out, lse = paged_decode_attention(q, k, v, scale=scale, softcap=softcap or None, kv_start=kv_start,
                                      kv_end=kv_end, return_lse=True, logits=logits)
    return out, lse, logits


@dense_decode_scores.register_fake
def _(q, k, v, scale, softcap, kv_start, kv_end):
    B, Hq = q.shape[:2]
    return (q.new_empty(B, Hq, 1, v.shape[-1]), q.new_empty(B, Hq, 1, dtype=torch.float32),
            q.new_empty(B, Hq, k.shape[2], dtype=torch.float32))


__all__ = ["paged_decode", "dense_decode_scores"]
