"""MInference 1.0 estimation helpers (last-query attention, column and diagonal mass), shared with FlexPrefill."""

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


def block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """Sum-pool the last dimension in blocks of ``block`` (zero-padded at the end)."""
    pad = (-x.shape[-1]) % block
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, block).sum(-1)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean-pool [..., S, D] over the sequence in blocks (the last partial block averages its real rows)."""
    S = x.shape[-2]
    pad = (-S) % block
    xs = F.pad(x.float(), (0, 0, 0, pad)) if pad else x.float()
    sums = xs.reshape(*x.shape[:-2], -1, block, x.shape[-1]).sum(-2)
    counts = torch.full((sums.shape[-2],), float(block), device=x.device)
    counts[-1] = block - pad
    return sums / counts[:, None]
