"""Reference twins of the sparse kernels, the checked mode for layouts, and on-device layout builders.

Everything here is plain torch and runs anywhere; the Triton kernels in kernels/triton/ are tested against it.

Index-space convention (accel.layouts): keys 0..Sk-1, query i of Sq sits at key position ``Sk - Sq + i``.
``BlockLayout`` query blocks are counted over the Sq queries (block m covers queries ``m*block_q ..``), key blocks
over the Sk keys. A listed key block is attended to except for keys after the query's position (causality inside
diagonal blocks, and listed blocks entirely in the future, are masked). Layout heads: ``counts``/``indices`` have
``H_L`` heads with ``Hq % H_L == 0``; query head ``h`` uses layout head ``h // (Hq // H_L)`` (so ``H_L = Hkv`` shares
one layout per KV group, ``H_L = 1`` one layout for all heads). The layout batch is ``B`` or 1 (broadcast).
"""

from __future__ import annotations

import math

import torch

from accel.layouts import BlockLayout, VerticalSlashLayout

from .reference import visible_mask

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)


# --------------------------------------------------------------------------------------------------- shared math


def _attend_masked(q, k, v, keep, scale, softcap):
    """Exact masked attention of one query chunk without repeating K/V.

    q: [B, Hq, C, D]; k, v: [B, Hkv, Sk, D]; keep: bool broadcastable to [B, Hq, C, Sk].
    Returns out (float32) [B, Hq, C, Dv] and lse (float32, natural log) [B, Hq, C]; rows that see no key give 0 and
    -inf."""
    B, Hq, C, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qf = q.float().reshape(B, Hkv, g, C, D)
    scores = torch.matmul(qf, k.float()[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, g, C, Sk]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keep = torch.broadcast_to(keep, (B, Hq, C, Sk)).reshape(B, Hkv, g, C, Sk)
    scores = scores.masked_fill(~keep, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    l = p.sum(-1, keepdim=True)
    o = torch.matmul(p, v.float()[:, :, None]) / l.clamp_min(1e-30)
    o = torch.where(l > 0, o, torch.zeros_like(o))
    lse = torch.where(l[..., 0] > 0, m[..., 0] + torch.log(l[..., 0]), -math.inf)
    return o.reshape(B, Hq, C, -1), lse.reshape(B, Hq, C)


def _sdpa_masked(q, k, v, keep, scale, hi):
    """``_attend_masked``'s output (no lse, no soft-capping) through torch SDPA over the keys before ``hi`` (the
    chunk's causal range), in float32; rows that see no key give 0. ~4x faster on CPU than the explicit math."""
    Hq, Hkv = q.shape[1], k.shape[1]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k[:, :, :hi].float(), v[:, :, :hi].float(), attn_mask=keep[..., :hi], scale=scale,
        enable_gqa=Hq != Hkv)
    return torch.nan_to_num(o, nan=0.0).to(q.dtype)


def _layout_heads(n_layout_heads: int, hq: int) -> torch.Tensor:
    """Layout head index of every query head (h // (Hq // H_L))."""
    return torch.arange(hq) // (hq // n_layout_heads)


# ------------------------------------------------------------------------------------------- block-sparse layout


def layout_to_block_mask(layout: BlockLayout, n_k_blocks: int) -> torch.Tensor:
    """Dense bool block mask [B_L, H_L, n_q_blocks, n_k_blocks] of a layout (out-of-range entries ignored)."""
    counts, indices = layout.counts, layout.indices
    mb = indices.shape[-1]
    valid = torch.arange(mb, device=indices.device) < counts[..., None].long()
    idx = indices.long()
    valid &= (idx >= 0) & (idx < n_k_blocks)
    idx = torch.where(valid, idx, torch.full_like(idx, n_k_blocks))  # dump column for padding
    dense = torch.zeros(*counts.shape, n_k_blocks + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, idx, valid)
    return dense[..., :n_k_blocks]


def block_sparse_attention(q, k, v, layout: BlockLayout, *, scale=None, softcap=None, return_lse=False,
                           chunk: int = 1024):
    """Reference block-sparse attention (causal, GQA, Sq <= Sk). Same contract as the Triton kernel
    ``kernels.triton.block_sparse.block_sparse_attention``; rows with no visible key give 0 and lse -inf."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    bq, bk = layout.block_q, layout.block_k
    n_k_blocks = -(-Sk // bk)
    block_mask = layout_to_block_mask(layout, n_k_blocks).to(q.device)  # [B_L, H_L, nq, nk]
    block_mask = block_mask[:, _layout_heads(block_mask.shape[1], Hq).to(q.device)]  # [B_L, Hq, nq, nk]
    out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    chunk = max(bq, chunk // bq * bq)
    for s in range(0, Sq, chunk):
        e = min(Sq, s + chunk)
        rows = block_mask[:, :, s // bq: -(-e // bq)]
        keep = rows.repeat_interleave(bq, dim=2)[:, :, : e - s]
        keep = keep.repeat_interleave(bk, dim=3)[..., :Sk]
        keep = keep & visible_mask(Sq, Sk, q_start=s, q_end=e, device=q.device)
        if softcap is None and not return_lse:  # same math through SDPA (CPU-usable at long context)
            out[:, :, s:e] = _sdpa_masked(q[:, :, s:e], k, v, keep, scale, Sk - Sq + e)
            continue
        o, l = _attend_masked(q[:, :, s:e], k, v, keep, scale, softcap)
        out[:, :, s:e] = o.to(q.dtype)
        lse[:, :, s:e] = l
    return (out, lse) if return_lse else out


def validate_block_layout(layout: BlockLayout, q: torch.Tensor, k: torch.Tensor) -> None:
    """Checked mode: raise ValueError naming the problem when ``layout`` does not fit ``q`` [B,Hq,Sq,D] and
    ``k`` [B,Hkv,Sk,D] (types, dtypes, devices, shapes, block sizes, counts, out-of-range or repeated indices).
    Synchronises with the device; meant for tests and debugging, not for hot paths."""
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"expected a BlockLayout, got {type(layout).__name__}")
    counts, indices = layout.counts, layout.indices
    for name, t in (("counts", counts), ("indices", indices)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"BlockLayout.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise ValueError(f"BlockLayout.{name} must be int32, got {t.dtype}; use .to(torch.int32)")
        if t.device != q.device:
            raise ValueError(f"BlockLayout.{name} is on {t.device} but q is on {q.device}; move the layout with .to()")
    for name, bs in (("block_q", layout.block_q), ("block_k", layout.block_k)):
        if bs not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"BlockLayout.{name}={bs} is not supported; use one of {SUPPORTED_BLOCK_SIZES}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [batch, heads, seq, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    if counts.dim() != 3:
        raise ValueError(f"BlockLayout.counts must be [batch, heads, n_q_blocks], got shape {tuple(counts.shape)}")
    if indices.dim() != 4 or tuple(indices.shape[:3]) != tuple(counts.shape):
        raise ValueError(f"BlockLayout.indices must be [batch, heads, n_q_blocks, max_blocks] matching counts "
                         f"{tuple(counts.shape)}, got shape {tuple(indices.shape)}")
    BL, HL, nq = counts.shape
    if BL not in (B, 1):
        raise ValueError(f"layout batch {BL} must be the query batch {B} or 1")
    if HL == 0 or Hq % HL:
        raise ValueError(f"layout heads {HL} must divide the query heads {Hq} (use Hq, Hkv or 1 layout heads)")
    n_q_blocks = -(-Sq // layout.block_q)
    if nq != n_q_blocks:
        raise ValueError(f"layout has {nq} query blocks but Sq={Sq} with block_q={layout.block_q} needs {n_q_blocks}")
    n_k_blocks = -(-Sk // layout.block_k)
    mb = indices.shape[-1]
    if counts.numel():
        cmin, cmax = int(counts.min()), int(counts.max())
        if cmin < 0:
            raise ValueError(f"BlockLayout.counts has a negative entry ({cmin})")
        if cmax > mb:
            raise ValueError(f"BlockLayout.counts has an entry {cmax} above the row length max_blocks={mb}")
        if cmax > n_k_blocks:
            raise ValueError(f"BlockLayout.counts has an entry {cmax} above the number of key blocks {n_k_blocks} "
                             f"(Sk={Sk}, block_k={layout.block_k})")
    if indices.numel():
        valid = torch.arange(mb, device=indices.device) < counts[..., None]
        if valid.any():
            vals = indices[valid]
            lo, hi = int(vals.min()), int(vals.max())
            if lo < 0 or hi >= n_k_blocks:
                bad = lo if lo < 0 else hi
                raise ValueError(f"BlockLayout.indices has key block {bad} out of range [0, {n_k_blocks}) "
                                 f"(Sk={Sk}, block_k={layout.block_k})")
            if layout.ascending:
                filled = torch.where(valid, indices, torch.full_like(indices, n_k_blocks))
                if ((filled[..., 1:] <= filled[..., :-1]) & valid[..., 1:]).any():
                    raise ValueError("BlockLayout.ascending is set but a row's indices are not strictly ascending; "
                                     "sort them or build the layout with block_mask_to_layout")
            srt = torch.where(valid, indices, torch.full_like(indices, n_k_blocks)).sort(-1).values
            dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] < n_k_blocks)
            if dup.any():
                raise ValueError("BlockLayout.indices repeats a key block within one row; each block may appear once")


# ------------------------------------------------------------------------------------------------ layout builders


def causal_block_mask(q_len: int, kv_len: int, block_q: int = 128, block_k: int = 128, *,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(causal, diagonal) bool [n_q_blocks, n_k_blocks]: key blocks with at least one key visible to some query of
    the block, and key blocks that contain a query of the block's own position (must be kept so no row is empty)."""
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    off = kv_len - q_len
    m = torch.arange(nq, device=device)
    first = off + m * block_q  # key position of the block's first query
    last = off + torch.clamp((m + 1) * block_q, max=q_len) - 1  # and of its last query
    n = torch.arange(nk, device=device)
    causal = n[None, :] * block_k <= last[:, None]
    diag = (n[None, :] >= (first // block_k)[:, None]) & (n[None, :] <= (last // block_k)[:, None])
    return causal, diag


def block_mask_to_layout(block_mask: torch.Tensor, block_q: int = 128, block_k: int = 128, *,
                         max_blocks: int | None = None) -> BlockLayout:
    """BlockLayout from a dense bool block mask [B, H, n_q_blocks, n_k_blocks]; indices ascending per row.

    ``max_blocks`` fixes the index width; left None it is the largest row count (one device sync)."""
    if block_mask.dim() != 4 or block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be bool [B, H, n_q_blocks, n_k_blocks], got {block_mask.dtype} "
                         f"{tuple(block_mask.shape)}")
    counts = block_mask.sum(-1, dtype=torch.int32)
    nk = block_mask.shape[-1]
    # kept columns first, each group in ascending order (stable sort on the negated mask)
    order = torch.sort((~block_mask).to(torch.uint8), dim=-1, stable=True).indices
    if max_blocks is None:
        max_blocks = int(counts.max()) if counts.numel() else 0
    max_blocks = min(max(max_blocks, 0), nk)
    indices = order[..., :max_blocks].to(torch.int32).contiguous()
    return BlockLayout(counts=counts.contiguous(), indices=indices, block_q=block_q, block_k=block_k, ascending=True)


def build_block_layout(block_mask: torch.Tensor, q_len: int, kv_len: int, block_q: int = 128, block_k: int = 128,
                       *, causal: bool = True, keep_first: bool = True, keep_diagonal: bool = True,
                       max_blocks: int | None = None) -> BlockLayout:
    """What a policy calls: its selected blocks (bool [B, H, n_q_blocks, n_k_blocks]) plus the always-kept first
    (sink) and diagonal blocks, limited to causal blocks, as a BlockLayout. All on the mask's device."""
    causal_m, diag = causal_block_mask(q_len, kv_len, block_q, block_k, device=block_mask.device)
    if tuple(block_mask.shape[-2:]) != tuple(causal_m.shape):
        raise ValueError(f"block_mask has {tuple(block_mask.shape[-2:])} blocks; q_len={q_len}, kv_len={kv_len} with "
                         f"blocks {block_q}x{block_k} need {tuple(causal_m.shape)}")
    mask = block_mask.bool()
    if keep_first:
        first = torch.zeros_like(causal_m)
        first[:, 0] = True
        mask = mask | first
    if keep_diagonal:
        mask = mask | diag
    if causal:
        mask = mask & causal_m
    return block_mask_to_layout(mask, block_q, block_k, max_blocks=max_blocks)


def full_block_layout(batch: int, heads: int, q_len: int, kv_len: int, block_q: int = 128, block_k: int = 128, *,
                      device: torch.device | str = "cpu") -> BlockLayout:
    """Every causal block: the kernel then computes dense causal attention."""
    causal_m, _ = causal_block_mask(q_len, kv_len, block_q, block_k, device=device)
    return block_mask_to_layout(causal_m.expand(batch, heads, *causal_m.shape), block_q, block_k)


def random_block_layout(batch: int, heads: int, q_len: int, kv_len: int, block_q: int = 128, block_k: int = 128, *,
                        keep: float = 0.1, seed: int = 0, device: torch.device | str = "cpu",
                        keep_first: bool = True, keep_diagonal: bool = True) -> BlockLayout:
    """Random causal layout for tests and benchmarks: each causal block kept with probability ``keep``, plus the
    first and diagonal blocks. Generated on ``device``."""
    causal_m, _ = causal_block_mask(q_len, kv_len, block_q, block_k, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    sel = torch.rand(batch, heads, *causal_m.shape, generator=gen, device=device) < keep
    return build_block_layout(sel, q_len, kv_len, block_q, block_k, keep_first=keep_first,
                              keep_diagonal=keep_diagonal)


def block_layout_density(layout: BlockLayout, q_len: int, kv_len: int) -> float:
    """Share of causal blocks the layout keeps (one device sync)."""
    causal_m, _ = causal_block_mask(q_len, kv_len, layout.block_q, layout.block_k, device=layout.counts.device)
    kept = layout_to_block_mask(layout, causal_m.shape[1]) & causal_m
    return float(kept.sum()) / float(causal_m.sum() * layout.counts.shape[0] * layout.counts.shape[1])


def split_full_partial(layout: BlockLayout, q_len: int, kv_len: int):
    """Split each row into blocks that need the causal mask (crossing the diagonal or the end of the keys) and full
    blocks, for FA4 / FlexAttention. Returns (mask_counts, mask_indices, full_counts, full_indices), int32, each index
    tensor as wide as ``layout.indices``; the order within each group is kept."""
    counts, idx = layout.counts, layout.indices.long()
    bq, bk = layout.block_q, layout.block_k
    mb = idx.shape[-1]
    m = torch.arange(counts.shape[-1], device=idx.device)[:, None]
    first_q = kv_len - q_len + m * bq
    needs = (idx + 1) * bk - 1 > first_q  # last key of the block after the block's first query position
    needs |= (idx + 1) * bk > kv_len
    valid = torch.arange(mb, device=idx.device) < counts[..., None].long()
    key_mask = torch.where(valid & needs, 0, torch.where(valid, 1, 2))
    key_full = torch.where(valid & ~needs, 0, torch.where(valid, 1, 2))
    mask_idx = torch.gather(idx, -1, torch.sort(key_mask, dim=-1, stable=True).indices)
    full_idx = torch.gather(idx, -1, torch.sort(key_full, dim=-1, stable=True).indices)
    mask_cnt = (valid & needs).sum(-1, dtype=torch.int32)
    full_cnt = (valid & ~needs).sum(-1, dtype=torch.int32)
    return mask_cnt, mask_idx.to(torch.int32), full_cnt, full_idx.to(torch.int32)


# ------------------------------------------------------------------------------------------------ vertical-slash


def vertical_slash_mask(layout: VerticalSlashLayout, q_len: int, kv_len: int, *, q_start: int = 0,
                        q_end: int | None = None) -> torch.Tensor:
    """Bool [B, H, q_end - q_start, Sk]: key j is visible to the query at position p when j is a kept column or
    ``p - j`` a kept offset, and ``j <= p``. Negative entries are padding (rows of different lengths); entries >= Sk
    are ignored too (``validate_vertical_slash_layout`` rejects them). Repeated entries count once."""
    q_end = q_len if q_end is None else q_end
    cols, offs = layout.columns, layout.offsets
    dev = cols.device
    B, H = cols.shape[:2]
    col_keep = torch.zeros(B, H, kv_len + 1, dtype=torch.bool, device=dev)
    c = cols.long()
    c = torch.where((c >= 0) & (c < kv_len), c, kv_len)
    col_keep.scatter_(-1, c, True)
    diag_keep = torch.zeros(B, H, kv_len + 1, dtype=torch.bool, device=dev)
    o = offs.long()
    o = torch.where((o >= 0) & (o < kv_len), o, kv_len)
    diag_keep.scatter_(-1, o, True)
    diag_keep[..., kv_len] = False
    qpos = torch.arange(q_start, q_end, device=dev)[:, None] + (kv_len - q_len)
    d = qpos - torch.arange(kv_len, device=dev)[None, :]  # [C, Sk]
    causal = d >= 0
    dg = torch.gather(diag_keep, -1, d.clamp(0, kv_len).reshape(1, 1, -1).expand(B, H, -1)).reshape(B, H, *d.shape)
    return (col_keep[..., None, :kv_len] | dg) & causal


def vertical_slash_attention(q, k, v, layout: VerticalSlashLayout, *, scale=None, softcap=None, return_lse=False,
                             chunk: int = 512):
    """Reference MInference vertical-slash attention (causal, GQA, Sq <= Sk). Layout heads are Hq, Hkv or 1 (as for
    BlockLayout); rows that see no key give 0 and lse -inf."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    heads = _layout_heads(layout.columns.shape[1], Hq).to(q.device)
    out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    for s in range(0, Sq, chunk):
        e = min(Sq, s + chunk)
        keep = vertical_slash_mask(layout, Sq, Sk, q_start=s, q_end=e).to(q.device)[:, heads]
        if softcap is None and not return_lse:  # same math through SDPA (CPU-usable at long context)
            out[:, :, s:e] = _sdpa_masked(q[:, :, s:e], k, v, keep, scale, Sk - Sq + e)
            continue
        o, l = _attend_masked(q[:, :, s:e], k, v, keep, scale, softcap)
        out[:, :, s:e] = o.to(q.dtype)
        lse[:, :, s:e] = l
    return (out, lse) if return_lse else out


def validate_vertical_slash_layout(layout: VerticalSlashLayout, q: torch.Tensor, k: torch.Tensor) -> None:
    """Checked mode for VerticalSlashLayout: integer tensors [B or 1, H_L, n] on q's device with H_L dividing Hq,
    entries in [0, Sk) or negative (padding). Raises ValueError naming the problem (device sync)."""
    if not isinstance(layout, VerticalSlashLayout):
        raise ValueError(f"expected a VerticalSlashLayout, got {type(layout).__name__}")
    B, Hq = q.shape[:2]
    Sk = k.shape[2]
    shapes = []
    for name in ("columns", "offsets"):
        t = getattr(layout, name)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"VerticalSlashLayout.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"VerticalSlashLayout.{name} must be int32 or int64, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"VerticalSlashLayout.{name} is on {t.device} but q is on {q.device}")
        if t.dim() != 3:
            raise ValueError(f"VerticalSlashLayout.{name} must be [batch, heads, n], got shape {tuple(t.shape)}")
        if t.shape[0] not in (B, 1) or t.shape[1] == 0 or Hq % t.shape[1]:
            raise ValueError(f"VerticalSlashLayout.{name} batch/heads {tuple(t.shape[:2])} must be ({B} or 1, a "
                             f"divisor of {Hq})")
        if t.numel() and int(t.max()) >= Sk:
            raise ValueError(f"VerticalSlashLayout.{name} has entry {int(t.max())} out of range [0, {Sk}) "
                             "(negative entries are padding)")
        shapes.append(tuple(t.shape[:2]))
    if shapes[0] != shapes[1]:
        raise ValueError(f"VerticalSlashLayout columns and offsets differ in batch/heads: {shapes[0]} vs {shapes[1]}")


def merge_attention(outs, lses):
    """Merge partial attention results over disjoint key sets by their log-sum-exps (float32 math).
    outs: list of [B, H, S, D]; lses: list of [B, H, S] (natural log, -inf where a part saw no key)."""
    lse = torch.stack(lses).float()
    m = lse.amax(0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m_safe)  # [P, B, H, S]
    total = w.sum(0)
    out = sum(wi[..., None] * o.float() for wi, o in zip(w, outs))
    out = torch.where(total[..., None] > 0, out / total.clamp_min(1e-30)[..., None], torch.zeros_like(out))
    merged_lse = torch.where(total > 0, m_safe + torch.log(total.clamp_min(1e-30)), torch.full_like(m, -math.inf))
    return out.to(outs[0].dtype), merged_lse
