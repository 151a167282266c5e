"""A BlockLayout in FlashAttention-4's block-sparse format, in one launch: per (batch, query head, query block) the
kept key blocks split into those that need the causal mask (crossing the diagonal or the end of the keys) and the
full ones, each list compacted in the layout's order and padded to the number of key blocks.

Torch twin: ``reference_sparse.split_full_partial`` + the head / batch expansion and width padding of
``kernels.flash.fa4_block_sparse``. That path runs two segmented stable sorts, a gather and a dozen elementwise ops
over [B, H, n_q_blocks, max_blocks] int64 tensors, then pads two [B, Hq, n_q_blocks, n_k_blocks] tensors: about a
millisecond per layer at 128K, on every FA4 block-sparse call. Here one program owns one output row: it reads the
row's indices once, ranks the three groups (chosen, other valid, invalid) with prefix sums, and writes both lists
at their full width (zeros past the layout's width, as the torch padding), so the outputs are equal element for
element (tests compare them with ``torch.equal``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from accel.layouts import BlockLayout


@triton.jit
def _place(OUT, base, idx, first, second, n_first, n_second, offs, W):
    """Write ``idx`` ordered: the ``first`` entries, then the ``second``, then the rest, each in their order."""
    f = first.to(tl.int32)
    s = second.to(tl.int32)
    r = (~first & ~second).to(tl.int32)
    dest = tl.where(first, tl.cumsum(f, 0) - f,
                    tl.where(second, n_first + tl.cumsum(s, 0) - s, n_first + n_second + tl.cumsum(r, 0) - r))
    tl.store(OUT + base + dest, idx, mask=(dest < W) & (offs >= 0))


@triton.jit
def _fa4_split_kernel(COUNTS, IDX, MC, MI, FC, FI, H, HL, BL, NQ, MB, W, sib, sih, sim, scb, sch,
                      Sq, OFF, BQ, BK, Sk, BLOCK: tl.constexpr, ZBLOCK: tl.constexpr):
    row = tl.program_id(0)
    m = row % NQ
    bh = row // NQ
    h = bh % H
    b = bh // H
    lb = tl.where(BL == 1, 0, b).to(tl.int64)  # a layout of batch 1 serves every batch row
    lh = (h // (H // HL)).to(tl.int64)  # layouts may be shared by a group of query heads
    offs = tl.arange(0, BLOCK)
    inb = offs < MB
    count = tl.load(COUNTS + lb * scb + lh * sch + m)
    idx = tl.load(IDX + lb * sib + lh * sih + m.to(tl.int64) * sim + offs, mask=inb, other=0)
    valid = inb & (offs < count)
    first_q = OFF + m * BQ  # key position of the block's first query
    needs = ((idx + 1) * BK - 1 > first_q) | ((idx + 1) * BK > Sk)
    chosen_m = valid & needs
    chosen_f = valid & ~needs
    n_m = tl.sum(chosen_m.to(tl.int32), 0)
    n_f = tl.sum(chosen_f.to(tl.int32), 0)
    tl.store(MC + row, n_m)
    tl.store(FC + row, n_f)
    base = row.to(tl.int64) * W
    # entries past MB are neither group: they land after the valid ones, and `dest < W` drops what does not fit
    _place(MI, base, idx, chosen_m, chosen_f, n_m, n_f, tl.where(inb, offs, -1), W)
    _place(FI, base, idx, chosen_f, chosen_m, n_f, n_m, tl.where(inb, offs, -1), W)
    for z in range(MB, W, ZBLOCK):  # the padding up to the number of key blocks
        zo = z + tl.arange(0, ZBLOCK)
        tl.store(MI + base + zo, tl.zeros([ZBLOCK], tl.int32), mask=zo < W)
        tl.store(FI + base + zo, tl.zeros([ZBLOCK], tl.int32), mask=zo < W)


def fa4_split(layout: BlockLayout, batch: int, heads: int, q_len: int, kv_len: int):
    """(mask_counts, mask_indices, full_counts, full_indices) for ``heads`` query heads and ``batch`` rows, int32,
    index tensors [batch, heads, n_q_blocks, n_k_blocks]: what ``fa4_block_sparse`` hands to FA4, equal to its torch
    path. The layout's heads must divide ``heads``; its batch must be 1 or ``batch``."""
    counts, idx = layout.counts, layout.indices
    BL, HL, NQ = counts.shape
    MB = idx.shape[-1]
    if heads % HL or BL not in (1, batch):
        raise ValueError(f"a layout with batch {BL} and {HL} heads cannot serve batch {batch} with {heads} heads")
    nk = -(-kv_len // layout.block_k)
    dev = counts.device
    mc = torch.empty(batch, heads, NQ, dtype=torch.int32, device=dev)
    fc = torch.empty_like(mc)
    mi = torch.empty(batch, heads, NQ, nk, dtype=torch.int32, device=dev)
    fi = torch.empty_like(mi)
    R = batch * heads * NQ
    if R:
        idx32 = idx.to(torch.int32).contiguous()
        counts32 = counts.to(torch.int32).contiguous()
        block = max(16, triton.next_power_of_2(max(MB, 1)))
        _fa4_split_kernel[(R,)](
            counts32, idx32, mc, mi, fc, fi, heads, HL, BL, NQ, MB, nk, *idx32.stride()[:3], *counts32.stride()[:2],
            q_len, kv_len - q_len, layout.block_q, layout.block_k, kv_len,
            BLOCK=block, ZBLOCK=256, num_warps=4 if block <= 1024 else 8)
    return mc, mi, fc, fi


__all__ = ["fa4_split"]
