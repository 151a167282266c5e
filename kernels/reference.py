"""Reference backend: plain torch, runs anywhere, the ground truth every other kernel is tested against.

Chunked over queries so memory stays O(chunk * Sk) rather than O(Sq * Sk)."""

from __future__ import annotations

import math

import torch

from accel.layouts import BlockLayout, DenseLayout, StreamingLayout, VerticalSlashLayout


def visible_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = True,
    sink: int = 0,
    window: int | None = None,
    q_start: int = 0,
    q_end: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool [q_end - q_start, kv_len]: which keys each query sees (index-space convention of accel.layouts)."""
    q_end = q_len if q_end is None else q_end
    qpos = torch.arange(q_start, q_end, device=device)[:, None] + (kv_len - q_len)
    kpos = torch.arange(kv_len, device=device)[None, :]
    keep = torch.ones(q_end - q_start, kv_len, dtype=torch.bool, device=device)
    if causal:
        keep &= kpos <= qpos
    if window is not None:
        keep &= (qpos - kpos < window) | (kpos < sink)
    return keep


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sink: int = 0,
    window: int | None = None,
    softcap: float | None = None,
    kv_start: torch.Tensor | None = None,
    return_lse: bool = False,
    chunk: int = 1024,
):
    """Exact attention with causal / sink+window masks, soft-capping and left padding.

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D] with Hq % Hkv == 0. ``kv_start`` ([B] int): keys before it are padding;
    sink positions then count from it. Rows that see no key give 0 output and -inf log-sum-exp."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    kpos = torch.arange(Sk, device=q.device)
    for s in range(0, Sq, chunk):
        e = min(Sq, s + chunk)
        scores = torch.matmul(q[:, :, s:e].float(), kf.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if kv_start is None:
            keep = visible_mask(Sq, Sk, causal=causal, sink=sink, window=window, q_start=s, q_end=e, device=q.device)
            keep = keep[None, None]
        else:
            # sinks are counted from each row's first real token
            start = kv_start.to(q.device).long()[:, None, None]
            qpos = torch.arange(s, e, device=q.device)[None, :, None] + (Sk - Sq)
            kp = kpos[None, None, :]
            keep = kp >= start
            if causal:
                keep = keep & (kp <= qpos)
            if window is not None:
                keep = keep & ((qpos - kp < window) | (kp - start < sink))
            keep = keep[:, None]
        scores = scores.masked_fill(~keep, float("-inf"))
        m = scores.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(scores - m)
        l = p.sum(-1, keepdim=True)
        o = torch.matmul(p, vf) / l.clamp_min(1e-30)
        out[:, :, s:e] = torch.where(l > 0, o, torch.zeros_like(o)).to(q.dtype)
        lse[:, :, s:e] = torch.where(l[..., 0] > 0, m[..., 0] + torch.log(l[..., 0]), -math.inf)
    return (out, lse) if return_lse else out


class ReferenceBackend:
    """Plain torch. Supports every mask layout; sparse layouts arrive with the sparse kernels issue."""

    name = "reference"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def supports(self, layout, q: torch.Tensor) -> str | None:
        if isinstance(layout, (DenseLayout, StreamingLayout, BlockLayout, VerticalSlashLayout)):
            return None
        return f"layout {type(layout).__name__} is not supported by the reference backend yet"

    def run(self, layout, q, k, v, *, scale, softcap=None, kv_start=None):
        if isinstance(layout, (BlockLayout, VerticalSlashLayout)):
            from . import reference_sparse

            if kv_start is not None:
                raise ValueError("sparse prefill policies do not support left-padded batches yet; run prompts one "
                                 "at a time or with equal lengths")
            fn = (reference_sparse.block_sparse_attention if isinstance(layout, BlockLayout)
                  else reference_sparse.vertical_slash_attention)
            return fn(q, k, v, layout, scale=scale, softcap=softcap)
        sink = layout.sink if isinstance(layout, StreamingLayout) else 0
        return attention(q, k, v, scale=scale, sink=sink, window=layout.window, softcap=softcap, kv_start=kv_start)
