"""Torch twins of the Triton estimation kernels (kernels/triton/lastq_score.py, pooled_score.py): plain torch, any
device, the ground truth the kernels are tested against and the path the policies take off CUDA.

Index convention (accel.layouts): query i of Sq sits at key position ``Sk - Sq + i``; GQA keys are never repeated."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_query_attention(q: torch.Tensor, k: torch.Tensor, n_last: int, scale: float | None = None) -> torch.Tensor:
    """Exact softmax attention of the last ``n_last`` queries over every causal key, float32 [B, Hq, n, Sk].

    Query i of the n sits at key position ``Sk - n + i`` (accel.layouts convention); GQA keys are not repeated."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    n = min(n_last, Sq)
    g = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    ql = q[:, :, Sq - n:].float().reshape(B, Hkv, g, n, D)
    logits = torch.matmul(ql, k.float()[:, :, None].transpose(-1, -2)).reshape(B, Hq, n, Sk) * scale
    pos = torch.arange(Sk - n, Sk, device=q.device)[:, None]
    logits = logits.masked_fill(torch.arange(Sk, device=q.device)[None, :] > pos, float("-inf"))
    return torch.softmax(logits, dim=-1)


def diagonal_sums(attn: torch.Tensor) -> torch.Tensor:
    """Mass per diagonal offset ``o = query position - key`` of last-query attention [B, H, n, Sk] -> [B, H, Sk]."""
    n, Sk = attn.shape[-2:]
    pos = torch.arange(Sk - n, Sk, device=attn.device)[:, None]
    idx = pos - torch.arange(Sk, device=attn.device)[None, :]  # [n, Sk]: key index of offset o for row i
    valid = idx >= 0
    vals = torch.gather(attn, -1, idx.clamp_min(0).expand(*attn.shape[:-2], n, Sk))
    return (vals * valid).sum(-2)


def lastq_scores_reference(q: torch.Tensor, k: torch.Tensor, n_last: int = 64, scale: float | None = None,
                           heads_per_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``accel.kernels.triton.lastq_score.lastq_scores``: float32 ``(vertical, slash)`` [B, Hq, Sk], the
    last ``min(n_last, Sq)`` queries' causal softmax mass per key column and per diagonal offset, summed over the
    queries. Computed one KV-head group at a time (``heads_per_chunk`` KV heads, default: about 2^28 bytes of
    attention at once), so memory is O(group x n x Sk) rather than O(Hq x n x Sk)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    n = min(n_last, Sq)
    vert = torch.zeros(B, Hq, Sk, dtype=torch.float32, device=q.device)
    slash = torch.zeros_like(vert)
    if n == 0 or B == 0 or Hq == 0:
        return vert, slash
    if heads_per_chunk is None:
        heads_per_chunk = max(1, (1 << 28) // max(1, 4 * B * g * n * Sk))
    for h0 in range(0, Hkv, heads_per_chunk):
        h1 = min(Hkv, h0 + heads_per_chunk)
        attn = last_query_attention(q[:, h0 * g: h1 * g], k[:, h0:h1], n, scale)
        vert[:, h0 * g: h1 * g] = attn.sum(-2)
        slash[:, h0 * g: h1 * g] = diagonal_sums(attn)
    return vert, slash


def block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """Sum-pool the last dimension in blocks of ``block`` (zero-padded at the end)."""
    pad = (-x.shape[-1]) % block
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, block).sum(-1)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean-pool [..., S, D] over the sequence in blocks, float32 (the last partial block averages its real rows)."""
    S = x.shape[-2]
    pad = (-S) % block
    xs = F.pad(x.float(), (0, 0, 0, pad)) if pad else x.float()
    sums = xs.reshape(*x.shape[:-2], -1, block, x.shape[-1]).sum(-2)
    counts = torch.full((sums.shape[-2],), float(block), device=x.device)
    if counts.numel():
        counts[-1] = block - pad
    return sums / counts[:, None]


def causal_pooled_mask(q_len: int, kv_len: int, block: int, device=None) -> torch.Tensor:
    """Bool [n_q_blocks, n_k_blocks]: key block n is visible from query block m when its first key is at or before
    the block's last query position (``Sk - Sq + min((m+1)*block, Sq) - 1``): the bottom-right alignment that
    ``accel.kernels.reference_sparse.causal_block_mask`` uses."""
    nq, nk = -(-q_len // block), -(-kv_len // block)
    last = kv_len - q_len + torch.clamp((torch.arange(nq, device=device) + 1) * block, max=q_len) - 1
    return torch.arange(nk, device=device)[None, :] * block <= last[:, None]


def pooled_scores_from_pooled(q_pool: torch.Tensor, k_pool: torch.Tensor, q_len: int, kv_len: int, block: int,
                              scale: float, invisible: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q_pool k_pool^T * scale) over the causally visible key blocks, float32 [B, Hq, nq, nk], zeros where
    invisible. q_pool [B, Hq, nq, D], k_pool [B, Hkv, nk, D] (GQA: grouped matmul, pooled keys not repeated).
    ``invisible``: ``~causal_pooled_mask(q_len, kv_len, block)`` if the caller keeps it (saves a dozen small ops)."""
    B, Hq, nq, D = q_pool.shape
    Hkv, nk = k_pool.shape[1], k_pool.shape[2]
    g = Hq // Hkv
    logits = torch.matmul(q_pool.float().reshape(B, Hkv, g, nq, D), k_pool.float()[:, :, None].transpose(-1, -2))
    if invisible is None:
        invisible = ~causal_pooled_mask(q_len, kv_len, block, device=q_pool.device)
    # in place on the fresh matmul output: the same values as out-of-place, two allocations fewer
    return torch.softmax(logits.reshape(B, Hq, nq, nk).mul_(scale).masked_fill_(invisible, float("-inf")), dim=-1)


def pooled_scores_reference(q: torch.Tensor, k: torch.Tensor, block: int = 128,
                            scale: float | None = None) -> torch.Tensor:
    """Twin of ``accel.kernels.triton.pooled_score.pooled_scores``: FlexPrefill's query-aware estimate. Mean-pooled
    query blocks [B, Hq, nq, D] against mean-pooled key blocks [B, Hkv, nk, D], scaled (default 1/sqrt(D)), causal
    block mask (bottom-right aligned for Sq < Sk), softmax per row: float32 [B, Hq, nq, nk]."""
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    return pooled_scores_from_pooled(block_means(q, block), block_means(k, block), q.shape[2], k.shape[2], block,
                                     scale)


__all__ = ["last_query_attention", "diagonal_sums", "lastq_scores_reference", "block_sums", "block_means",
           "causal_pooled_mask", "pooled_scores_from_pooled", "pooled_scores_reference"]
