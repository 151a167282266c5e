"""FlexPrefill's block layout in two launches: the union of the head's kept column blocks, the blocks crossed by its
kept diagonal-offset blocks, its query-aware blocks (pooled probabilities at or above the head's mass cut), the sink
and diagonal blocks, limited to causal blocks, written straight as a ``BlockLayout``.

Torch twin: ``cols | slash_block_mask(diags) | (probs >= cut) & query_aware`` then ``build_block_layout`` (in
``accel.policies.flexprefill``). That path materialises a dozen bool maps of [B, H, n_q_blocks, n_k_blocks] (32M
entries per layer at 128K) and sorts one of them to compact the indices: about 2 ms of elementwise ops and a radix
sort per plan on the H200. Here one program owns one (batch, head, query block) row with the whole row in registers
(``n_k_blocks <= MAX_N``, as kernels/triton/block_topk.py):

- the diagonal test reads a per-head prefix count of kept offset blocks (``dcs[x]`` = kept offset blocks below x):
  a block (m, n) holds pairs with offsets in [lo, hi], so it is crossed iff ``dcs[hi // bs + 1] > dcs[lo // bs]``
  (two gathers per entry from a table of n_k_blocks + 1 ints);
- query-aware heads compare the float32 bit pattern of their pooled probability to the head's cut
  (kernels/triton/mass_threshold.py); other heads never read the probabilities;
- phase 0 stores the row count; the host reads the largest (one sync, as ``block_mask_to_layout``); phase 1
  compacts with a prefix sum: kept blocks ascending, then the others ascending as padding, truncated to that width:
  exactly ``block_mask_to_layout``'s format, so the result compares with ``torch.equal``. Given the width
  (``max_blocks``) one launch does both.

``flex_layout_tables`` takes the kept columns and the offset prefix counts as they come from
kernels/triton/flex_estimate.py (no torch ops to build them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from accel.layouts import BlockLayout

from .block_topk import MAX_N, _block_n, _warps


@triton.jit
def _kept(COLS, DCS, PROBS, CUT, SLOT, row, offs, sps, spm, NQ, NK, ND, Sq, OFF, BS, HAS_QA: tl.constexpr):
    m = row % NQ
    bh = row // NQ
    ok = offs < NK
    first = OFF + m * BS  # key position of the block's first query
    last = OFF + tl.minimum((m + 1) * BS, Sq) - 1  # and of its last
    causal = ok & (offs * BS <= last)
    kept = (offs == 0) | ((offs >= first // BS) & (offs <= last // BS))
    kept = kept | (tl.load(COLS + bh.to(tl.int64) * NK + offs, mask=ok, other=0) != 0)
    # offsets of the block's causal pairs: [lo, hi]; hi >= 0 on causal entries, so // is a floor there
    hi = tl.where(causal, last - offs * BS, 0)
    lo = tl.maximum(first - (offs + 1) * BS + 1, 0)
    ohi = tl.minimum(hi // BS, ND - 1)
    olo = tl.minimum(lo // BS, ND)
    table = DCS + bh.to(tl.int64) * (ND + 1)
    crossed = tl.load(table + ohi + 1, mask=causal, other=0) > tl.load(table + olo, mask=causal, other=0)
    kept = kept | crossed
    if HAS_QA:
        slot = tl.load(SLOT + bh)
        if slot >= 0:  # a query-aware head: its pooled probabilities are row ``slot`` of PROBS
            x = tl.load(PROBS + slot.to(tl.int64) * sps + m.to(tl.int64) * spm + offs, mask=causal,
                        other=0.0).to(tl.float32)
            bits = tl.maximum(x, 0.0).to(tl.int32, bitcast=True)
            kept = kept | (bits >= tl.load(CUT + slot))
    return kept & causal


@triton.jit
def _flex_layout_kernel(COLS, DCS, PROBS, CUT, SLOT, COUNT, IDX, MB, sps, spm, NQ, NK, ND, Sq, OFF, BS,
                        PHASE: tl.constexpr, HAS_QA: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    kept = _kept(COLS, DCS, PROBS, CUT, SLOT, row, offs, sps, spm, NQ, NK, ND, Sq, OFF, BS, HAS_QA)
    kk = kept.to(tl.int32)
    if PHASE != 1:
        count = tl.sum(kk, 0)
        tl.store(COUNT + row, count)
    else:
        count = tl.load(COUNT + row)
    if PHASE != 0:  # 1: after the host read the width; 2: width given, count and indices in one launch
        before = tl.cumsum(kk, 0) - kk  # kept entries before each index
        dest = tl.where(kept, before, count + offs - before)  # kept first, then the rest, each ascending
        tl.store(IDX + row.to(tl.int64) * MB + dest, offs, mask=(offs < NK) & (dest < MB))


def flex_layout(cols: torch.Tensor, diags: torch.Tensor, q_len: int, kv_len: int, block: int, *,
                probs: torch.Tensor | None = None, cut: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, max_blocks: int | None = None) -> BlockLayout:
    """BlockLayout of FlexPrefill's selection. ``cols`` bool [B, H, n_k_blocks] (kept column blocks), ``diags`` bool
    [B, H, n_offset_blocks] (kept diagonal-offset blocks: offsets d*block .. d*block+block-1); optionally the
    query-aware heads' pooled probabilities ``probs`` float [n_qa, n_q_blocks, n_k_blocks] with their cuts ``cut``
    int32 [n_qa] (keep ``probs.float().view(int32) >= cut``) and ``slots`` int [B, H]: the row of ``probs`` of each
    head, -1 for heads that are not query-aware (only those heads' probabilities are ever computed). The sink and
    diagonal blocks are always kept; everything is limited to causal blocks. Equal to the torch composition in
    ``FlexPrefillPolicy.select`` + ``build_block_layout``. ``max_blocks``: the indices' width (None: the widest
    row's, read from the device: a host sync), as ``block_topk.threshold_layout``."""
    if diags.shape[:2] != cols.shape[:2]:
        raise ValueError(f"diags must be [{cols.shape[0]}, {cols.shape[1]}, n_offset_blocks], got "
                         f"{tuple(diags.shape)}")
    dcs = torch.nn.functional.pad(diags.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0)).contiguous()
    return flex_layout_tables(cols.to(torch.int8).contiguous(), dcs, q_len, kv_len, block, probs=probs, cut=cut,
                              slots=slots, max_blocks=max_blocks)


def flex_layout_tables(cols8: torch.Tensor, dcs: torch.Tensor, q_len: int, kv_len: int, block: int, *,
                       probs: torch.Tensor | None = None, cut: torch.Tensor | None = None,
                       slots: torch.Tensor | None = None, max_blocks: int | None = None) -> BlockLayout:
    """``flex_layout`` from its tables: ``cols8`` int8 [B, H, n_k_blocks] (kept columns, contiguous) and ``dcs``
    int32 [B, H, n_offset_blocks + 1] (contiguous; ``dcs[..., x]`` = kept offset blocks below x), as
    ``flex_estimate`` writes them. Other arguments as ``flex_layout``."""
    B, H, nk = cols8.shape
    nq = -(-q_len // block)
    if nk != -(-kv_len // block):
        raise ValueError(f"cols has {nk} key blocks; kv_len={kv_len} with block {block} needs {-(-kv_len // block)}")
    if nk > MAX_N:
        raise ValueError(f"{nk} key blocks per row; the Triton layout supports at most MAX_N={MAX_N}")
    if cols8.dtype != torch.int8 or dcs.dtype != torch.int32 or dcs.shape[:2] != (B, H) or dcs.shape[-1] < 1:
        raise ValueError(f"cols8 must be int8 [B, H, n_k_blocks] and dcs int32 [{B}, {H}, n_offset_blocks + 1], got "
                         f"{cols8.dtype} {tuple(cols8.shape)}, {dcs.dtype} {tuple(dcs.shape)}")
    nd = dcs.shape[-1] - 1
    dev = cols8.device
    has_qa = probs is not None
    if has_qa:
        if probs.dim() != 3 or probs.shape[1:] != (nq, nk) or probs.stride(-1) != 1:
            raise ValueError(f"probs must be [n_query_aware, {nq}, {nk}] with unit last stride, got "
                             f"{tuple(probs.shape)}")
        if cut is None or slots is None or tuple(slots.shape) != (B, H) or cut.numel() != probs.shape[0]:
            raise ValueError("probs needs cut [n_query_aware] and slots [batch, heads] (row of probs or -1)")
        slot32 = slots.to(torch.int32).contiguous()
        cut32 = cut.reshape(-1).to(torch.int32).contiguous()
        strides = probs.stride()[:2]
    else:
        probs, slot32, cut32, strides = cols8, cols8, cols8, (0, 0)
    R = B * H * nq
    count = torch.empty(R, dtype=torch.int32, device=dev)
    bn = _block_n(nk)
    args = (cols8, dcs, probs, cut32, slot32, count)
    geo = (*strides, nq, nk, nd, q_len, kv_len - q_len, block)
    kw = dict(HAS_QA=has_qa, BLOCK_N=bn, num_warps=_warps(bn))
    if max_blocks is not None:  # width known: no sync, one launch
        mb = min(max(int(max_blocks), 0), nk)
        idx = torch.empty(B, H, nq, mb, dtype=torch.int32, device=dev)
        if R:
            _flex_layout_kernel[(R,)](*args, idx, mb, *geo, PHASE=2, **kw)
    else:
        if R:
            _flex_layout_kernel[(R,)](*args, count, 0, *geo, PHASE=0, **kw)
        mb = int(count.max()) if R else 0
        idx = torch.empty(B, H, nq, mb, dtype=torch.int32, device=dev)
        if R and mb:
            _flex_layout_kernel[(R,)](*args, idx, mb, *geo, PHASE=1, **kw)
    return BlockLayout(counts=count.reshape(B, H, nq), indices=idx, block_q=block, block_k=block, ascending=True)


__all__ = ["flex_layout", "flex_layout_tables"]
