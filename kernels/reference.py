"""Reference backend: plain torch, runs anywhere, the ground truth every other kernel is tested against.

Chunked over queries so memory stays O(chunk * Sk) rather than O(Sq * Sk)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from accel.layouts import (BlockLayout, DenseLayout, PageSelection, SplitPageSelection, StreamingLayout,
                            VerticalSlashLayout)


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


_DECODE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sliced_attention(q, k, v, *, scale=None, sink=0, window=None, kv_start=None, chunk=1024):
    """Same function as ``attention`` (causal, no soft-capping) through torch SDPA, visiting per query chunk only
    the keys it can see (sinks + the window band), so the reference backend is usable on CPU at long context.
    Tested against ``attention``."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    # one query that sees every key (a streaming store holds just sink + recent: DuoAttention's decode) is plain too
    sees_all = window is None or window >= Sk or (Sq == 1 and sink + window >= Sk)
    if kv_start is None and sees_all and (Sq == Sk or Sq == 1):
        # plain causal: no mask to build (top-left and bottom-right causal agree when Sq == Sk)
        if Sq == 1 and q.is_cuda:
            # decode: not cuDNN, which builds an execution plan per key length, i.e. at every step (10 ms of CPU
            # per call on the H200, DuoAttention's eager decode ran at 4 tokens/s at 128K)
            with sdpa_kernel(_DECODE_SDPA):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=Hq != Hkv)
        return F.scaled_dot_product_attention(q, k, v, is_causal=Sq > 1, scale=scale, enable_gqa=Hq != Hkv)
    out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=q.dtype, device=q.device)
    off = Sk - Sq
    pad_start = None if kv_start is None else kv_start.to(q.device).long()[:, None, None, None]
    for s in range(0, Sq, chunk):
        e = min(Sq, s + chunk)
        hi = off + e  # keys >= hi are in every query's future
        lo = 0 if window is None else max(0, off + s - window + 1)
        n_sink = min(sink, lo) if window is not None else 0
        if kv_start is not None and window is not None and sink > 0:
            lo, n_sink = 0, 0  # sinks move with the padding: take the whole causal range
        idx = torch.cat([torch.arange(n_sink, device=q.device), torch.arange(lo, hi, device=q.device)])
        ks, vs = k.index_select(2, idx), v.index_select(2, idx)
        qpos = torch.arange(off + s, off + e, device=q.device)[:, None]
        keep = idx[None, :] <= qpos
        if window is not None:
            start = 0 if pad_start is None else pad_start
            keep = keep & ((qpos - idx[None, :] < window) | (idx[None, :] - start < sink))
        if pad_start is not None:
            keep = keep & (idx[None, :] >= pad_start)
        o = F.scaled_dot_product_attention(q[:, :, s:e], ks, vs, attn_mask=keep, scale=scale,
                                           enable_gqa=Hq != Hkv)
        out[:, :, s:e] = torch.nan_to_num(o, nan=0.0)  # rows that see no key
        if pad_start is not None or window is not None:
            empty = ~keep.expand(B, 1, e - s, idx.numel()).any(-1, keepdim=True)
            out[:, :, s:e] = out[:, :, s:e].masked_fill(empty, 0.0)
    return out


class ReferenceBackend:
    """Plain torch. Supports every mask layout; sparse layouts arrive with the sparse kernels issue."""

    name = "reference"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def supports(self, layout, q: torch.Tensor) -> str | None:
        if isinstance(layout, (DenseLayout, StreamingLayout, BlockLayout, VerticalSlashLayout)):
            return None
        if isinstance(layout, (PageSelection, SplitPageSelection)):
            return None if q.shape[2] == 1 else "page selections take one query per row (decode)"
        return f"layout {type(layout).__name__} is not supported by the reference backend yet"

    def run(self, layout, q, k, v, *, scale, softcap=None, kv_start=None):
        if isinstance(layout, SplitPageSelection):  # the two head groups one after the other, into one output
            out = q.new_empty(*q.shape[:3], v.shape[-1])
            out[:, layout.q_heads] = self.run(layout.selection, q.index_select(1, layout.q_heads), k, v, scale=scale,
                                              softcap=softcap, kv_start=kv_start)
            out[:, layout.ring_q_heads] = self.run(layout.stream, q.index_select(1, layout.ring_q_heads),
                                                   layout.ring_k, layout.ring_v, scale=scale, softcap=softcap)
            return out
        if isinstance(layout, PageSelection):  # decode over selected KV pages (kernels/reference_decode.py)
            from .reference_decode import paged_decode_attention

            return paged_decode_attention(q, k, v, layout.pages, layout.counts, layout.page_size, scale=scale,
                                          softcap=softcap, kv_start=kv_start)
        if isinstance(layout, (BlockLayout, VerticalSlashLayout)):
            from . import reference_sparse

            if kv_start is not None:
                raise ValueError("sparse prefill policies do not support left-padded batches yet; run prompts one "
                                 "at a time or with equal lengths")
            fn = (reference_sparse.block_sparse_attention if isinstance(layout, BlockLayout)
                  else reference_sparse.vertical_slash_attention)
            return fn(q, k, v, layout, scale=scale, softcap=softcap)
        sink = layout.sink if isinstance(layout, StreamingLayout) else 0
        if softcap is None:
            return sliced_attention(q, k, v, scale=scale, sink=sink, window=layout.window, kv_start=kv_start)
        return attention(q, k, v, scale=scale, sink=sink, window=layout.window, softcap=softcap, kv_start=kv_start)
