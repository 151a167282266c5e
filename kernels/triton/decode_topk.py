"""Top-k page selection in Triton, one program per (batch, KV head): the whole score row sits in registers.

Same function as ``kernels.reference_decode.select_pages``: the ``k`` highest-scoring pages, with the newest page
(and optionally page 0) forced in, written in ascending page order; ties go to the lower page index. Instead of a
sort, the k-th largest score is found exactly over an order-preserving int32 image of the float32
scores by a ternary search (two counts per pass packed in one reduction; at most 21 passes over the row, all in
registers) started on the finite scores' range (the forced pages score +inf and are counted, not searched), then a
prefix sum over rows of 64 pages compacts the selected page ids (a 1-D one ranks ties only when there are any).
A radix select (histograms of 8 or 4 key bits per pass) was measured slower in the step and removed
(kernels/triton/NOTES.md).

The row is held as the largest power-of-two block that fits in it plus a smaller tail block for the rest, so a row
just past a power of two (a static cache of 128K + a few tokens) costs about what the power of two costs instead of
twice (H200, batch 1: 25.3 us in one 16384-wide block for 8193 pages, 16.4 at 8192, 17.0 with the tail block;
results/bench_decode_topk_tail.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import device_ints

MAX_PAGES = 65536  # one row per program; beyond this the selection runs through torch.topk


@triton.jit
def _keys(row, offs, ssp, P, LAST, LEN_ON_DEVICE: tl.constexpr, KEEP_FIRST: tl.constexpr):
    """Order-preserving int32 keys of the scores at ``offs`` (INT32_MIN where not a candidate) and the valid mask."""
    ok = offs < P
    if LEN_ON_DEVICE:  # a static cache: the length is a tensor, pages past it hold nothing (and score NaN)
        ok = ok & (offs <= LAST)
    s = tl.load(row + offs * ssp, mask=ok, other=0.0)
    force = offs == LAST
    if KEEP_FIRST:
        force = force | (offs == 0)
    s = tl.where(force, float("inf"), s)
    bits = s.to(tl.int32, bitcast=True)
    # int32 keys (an int64 row of 16K pages spilled registers: 131 us per call at 128K, 8x the int32 row)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    return tl.where(ok, key, -2147483647 - 1), ok  # INT32_MIN: below every non-NaN score; never selected


KEY_INF = tl.constexpr(0x7F800000)  # the key of +inf; +NaN keys lie above it
KEY_NEG_INF = tl.constexpr(-2139095041)  # the key of -inf (bits 0xFF800000 ^ 0x7FFFFFFF); -NaN keys lie below it


@triton.jit
def _tally(key, ok):
    """Per key, packed for one int64 sum: 1 if valid | 1 << 21 if at or above +inf | 1 << 42 if at or below -inf
    (a row holds at most MAX_PAGES + its tail < 2^21 keys)."""
    top = ok & (key >= KEY_INF)
    bot = ok & (key <= KEY_NEG_INF)
    return ok.to(tl.int64) | (top.to(tl.int64) << 21) | (bot.to(tl.int64) << 42)


@triton.jit
def _whole_range(key, ok, tkey, tok, TAIL: tl.constexpr):
    """(min, max, count) of the valid keys: the search interval over every valid key and count(key >= min)."""
    lo = tl.min(tl.where(ok, key, 2147483647), axis=0)
    hi = tl.max(key, axis=0)
    c = tl.sum(ok.to(tl.int32), axis=0)
    if TAIL > 0:
        lo = tl.minimum(lo, tl.min(tl.where(tok, tkey, 2147483647), axis=0))
        hi = tl.maximum(hi, tl.max(tkey, axis=0))
        c += tl.sum(tok.to(tl.int32), axis=0)
    return lo, hi, c


@triton.jit
def _count(key, u1, u2, NC: tl.constexpr):
    """NC = 1: count(key >= u1). NC = 2: that count in the low 16 bits and count(key >= u2) in the high 16 (a cut
    above the row's smallest key counts at most P - 1 <= 65535 keys)."""
    if NC == 1:
        return tl.sum((key >= u1).to(tl.int32), axis=0)
    return tl.sum((key >= u1).to(tl.int32) + ((key >= u2).to(tl.int32) << 16), axis=0)


@triton.jit
def reused(SEL, idx, length, STEPS):
    """LServe's reuse test for the selection of row ``idx`` at cache length ``length``: one was made (its length
    ``SEL[idx]`` > 0) fewer than ``STEPS`` tokens ago."""
    sel = tl.load(SEL + idx).to(tl.int64)
    return (sel != 0) & (length.to(tl.int64) - sel < STEPS)


@triton.jit
def _ternary_threshold(key, ok, tkey, tok, K, TAIL: tl.constexpr, NC: tl.constexpr, FINITE: tl.constexpr):
    """(the K-th largest valid key, count(key >= it)) by an (NC + 1)-ary search over the key values."""
    if FINITE:
        # The search starts on the finite keys' range: the forced pages score +inf, and an interval reaching up to
        # +inf is ~2^30 keys wide for scores around 10-100 against ~2^24 for the finite range (simulated: about 13
        # ternary passes on Quest rows against 8; times in results/bench_decode_topk_range.md). Keys at or above
        # +inf (forced pages, +NaN) and at or below -inf (left padding, -NaN) are counted, not searched, unless the
        # cut lies among them.
        fin = ok & (key > KEY_NEG_INF) & (key < KEY_INF)
        lo = tl.min(tl.where(fin, key, 2147483647), axis=0)
        hi = tl.max(tl.where(fin, key, -2147483647 - 1), axis=0)
        tally = tl.sum(_tally(key, ok), axis=0)  # int64: valid | at or above +inf << 21 | at or below -inf << 42
        if TAIL > 0:
            tfin = tok & (tkey > KEY_NEG_INF) & (tkey < KEY_INF)
            lo = tl.minimum(lo, tl.min(tl.where(tfin, tkey, 2147483647), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(tfin, tkey, -2147483647 - 1), axis=0))
            tally += tl.sum(_tally(tkey, tok), axis=0)
        n_ok = (tally & 0x1FFFFF).to(tl.int32)
        n_top = ((tally >> 21) & 0x1FFFFF).to(tl.int32)
        c_lo = n_ok - (tally >> 42).to(tl.int32)  # count(key >= lo): the finite keys and the keys above them
        if (n_top >= K) | (c_lo < K):  # the cut lies among the infinite keys (so does a row without finite keys)
            lo, hi, c_lo = _whole_range(key, ok, tkey, tok, TAIL)
    else:
        lo, hi, c_lo = _whole_range(key, ok, tkey, tok, TAIL)
    lo = lo.to(tl.int64)  # scalars in int64: hi - lo may pass 2^31
    hi = hi.to(tl.int64)
    hi = tl.where(c_lo == K, lo, hi)  # exactly K keys at or above lo: done
    # largest t with count(key >= t) >= K: the K-th largest key. Invariant: count(key >= lo) >= K and
    # count(key > hi) < K. NC = 2: each pass counts the keys at or above two cuts in ONE reduction, the two counts
    # packed in 16-bit fields of an int32: a ternary search for the price of a bisection pass. A pass is one
    # cross-warp reduction whatever it reduces; two separate reductions (or a [BLOCK_P, cuts] tile) cost twice
    # (H200, results/bench_decode_topk.md). A cut with exactly K keys at or above it is the threshold already (the
    # keys above it are the top K, ties included): the search stops there, which on real score rows ends it after
    # about half of the passes the worst case needs (search_passes).
    while lo < hi:
        w = hi - lo + 1
        if NC == 1:
            u1 = lo + w // 2
            u2 = u1
        else:
            u1 = lo + tl.maximum(w // 3, 1)  # both cuts in (lo, hi] for w >= 2
            u2 = lo + tl.maximum((2 * w) // 3, 1)
        t = _count(key, u1.to(tl.int32), u2.to(tl.int32), NC)
        if TAIL > 0:
            t += _count(tkey, u1.to(tl.int32), u2.to(tl.int32), NC)
        if NC == 1:
            take = t >= K
            lo = tl.where(take, u1, lo)
            c_lo = tl.where(take, t, c_lo)
            hi = tl.where(take, hi, u1 - 1)
        else:
            n1 = t & 0xFFFF
            n2 = (t >> 16) & 0xFFFF
            new_lo = tl.where(n1 >= K, u1, lo)  # counts fall with the cut: the higher taken cut wins
            c_lo = tl.where(n1 >= K, n1, c_lo)
            new_lo = tl.where(n2 >= K, u2, new_lo)
            c_lo = tl.where(n2 >= K, n2, c_lo)
            hi = tl.where(n2 < K, u2 - 1, hi)  # the lower untaken cut wins
            hi = tl.where(n1 < K, u1 - 1, hi)
            lo = new_lo
        hi = tl.where(c_lo == K, lo, hi)  # exactly K keys at or above lo: done
    return lo, c_lo


@triton.jit
def select_row(row, ssp, P, LAST, K, LEN_ON_DEVICE: tl.constexpr, KEEP_FIRST: tl.constexpr, BLOCK_P: tl.constexpr,
               TAIL: tl.constexpr, NC: tl.constexpr, FINITE: tl.constexpr):
    """The kept flags of one score row (pages ``[0, BLOCK_P)`` and the tail block's ``[BLOCK_P, BLOCK_P + TAIL)``,
    the main block's flags standing in for the tail's when TAIL is 0): its K highest valid scores, the newest page
    (and page 0 with KEEP_FIRST) forced in, ties to the lower page index."""
    offs = tl.arange(0, BLOCK_P)
    key, ok = _keys(row, offs, ssp, P, LAST, LEN_ON_DEVICE, KEEP_FIRST)
    if TAIL > 0:  # the pages past the power-of-two block
        toffs = BLOCK_P + tl.arange(0, TAIL)
        tkey, tok = _keys(row, toffs, ssp, P, LAST, LEN_ON_DEVICE, KEEP_FIRST)
    else:  # unused stand-ins
        tkey = key
        tok = ok
    lo, c_lo = _ternary_threshold(key, ok, tkey, tok, K, TAIL, NC, FINITE)
    lo = lo.to(tl.int32)
    sel = (key >= lo) & ok
    tsel = sel
    if TAIL > 0:
        tsel = (tkey >= lo) & tok
    if c_lo > K:  # more than K keys tie at or above the threshold: the lowest page ids among the tied ones
        n_gt = tl.sum((key > lo).to(tl.int32), axis=0)
        if TAIL > 0:
            n_gt += tl.sum((tkey > lo).to(tl.int32), axis=0)
        need = K - n_gt
        tie = ((key == lo) & ok).to(tl.int32)
        sel = (key > lo) | ((tie > 0) & (tl.cumsum(tie, axis=0) - tie < need))
        if TAIL > 0:
            ttie = ((tkey == lo) & tok).to(tl.int32)
            before = tl.sum(tie, axis=0)  # ties in the main block rank first
            tsel = (tkey > lo) | ((ttie > 0) & (tl.cumsum(ttie, axis=0) - ttie + before < need))
    return sel, tsel


@triton.jit
def page_slots(sel, BLOCK_P: tl.constexpr, CH: tl.constexpr):
    """(slot [BLOCK_P // CH, CH]: each kept page's index in the ascending list of kept pages, -1 where not kept;
    the count kept). A prefix sum taken within rows of CH pages and then over the row totals (a 1-D scan over 8K
    pages took ~1 us more; kernels/triton/NOTES.md)."""
    sel2 = tl.reshape(sel.to(tl.int32), (BLOCK_P // CH, CH))
    tot = tl.sum(sel2, axis=1)
    slot = (tl.cumsum(tot, axis=0) - tot)[:, None] + tl.cumsum(sel2, axis=1) - sel2
    return tl.where(sel2 > 0, slot, -1), tl.sum(tot, axis=0)


@triton.jit
def tail_slots(tsel, n_before):
    """The tail block's slots after the ``n_before`` kept pages of the main block (-1 where not kept) and the new
    count."""
    t = tsel.to(tl.int32)
    return tl.where(tsel, tl.cumsum(t, axis=0) - t + n_before, -1), n_before + tl.sum(t, axis=0)


# P, LAST and the strides of scores [B, H, P] grow during decode: not specialised (a divisible-by-16 variant would
# compile mid-decode)
@triton.jit(do_not_specialize=["P", "LAST", "ssb", "ssh"])
def _select_kernel(SCORES, PAGES, COUNTS, KV_LEN, SEL, LIVE, ssb, ssh, ssp, spb, sph, sps, Hkv, P, K, LAST, PAGE,
                   STEPS, LEN_ON_DEVICE: tl.constexpr, KEEP_FIRST: tl.constexpr, BLOCK_P: tl.constexpr,
                   TAIL: tl.constexpr, HAS_REUSE: tl.constexpr, NC: tl.constexpr, FINITE: tl.constexpr,
                   CH: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    if LEN_ON_DEVICE:
        length = tl.load(KV_LEN)  # int32 or int64
        LAST = ((length - 1) // PAGE).to(tl.int32)
    if HAS_REUSE:  # LServe over a static cache: the bookkeeping of a reused selection, here instead of in torch
        # (it was three fused elementwise launches per layer and step in the compiled graph)
        if reused(SEL, pid, length, STEPS):
            n = tl.load(COUNTS + pid)
            # the physical page begun since the selection (at most one), in the spare slot after the kept ones
            begun = LAST > ((tl.load(SEL + pid) - 1) // PAGE).to(tl.int32)
            tl.store(PAGES + b * spb + h * sph + n * sps, LAST)
            tl.store(LIVE + pid, n + begun.to(tl.int32))
            return
    row = SCORES + b * ssb + h * ssh
    sel, tsel = select_row(row, ssp, P, LAST, K, LEN_ON_DEVICE, KEEP_FIRST, BLOCK_P, TAIL, NC, FINITE)
    out = PAGES + b * spb + h * sph
    slot, n_sel = page_slots(sel, BLOCK_P, CH)
    tl.store(out + slot * sps, tl.reshape(tl.arange(0, BLOCK_P), (BLOCK_P // CH, CH)), mask=slot >= 0)
    if TAIL > 0:
        tslot, n_sel = tail_slots(tsel, n_sel)
        tl.store(out + tslot * sps, BLOCK_P + tl.arange(0, TAIL), mask=tslot >= 0)
    tl.store(COUNTS + pid, n_sel)
    if HAS_REUSE:  # a fresh selection: it holds the newest page, none is begun
        tl.store(SEL + pid, length.to(SEL.dtype.element_ty))
        tl.store(LIVE + pid, n_sel)


# Counts per search pass (see _select_kernel): 2 packed in one reduction (ternary search) by default; 1 is bisection.
# H200, 8 KV heads, budget 4096, batch 1, 8 warps (results/bench_decode_topk.md), 2 against 1: Quest score rows
# 17.0 vs 17.5 us at 128K, 7.8 vs 9.4 at 32K; Gaussian rows 18.1 vs 17.0 and 7.1 vs 8.0 (the passes fall from ~20
# to ~13, but at 8K pages the row's fixed cost dominates).
N_CUTS = 2


def search_passes(n_cuts: int) -> int:
    """Passes of an (n_cuts + 1)-ary search that always narrow an interval of 2^32 int32 keys to one value: the
    kernel's worst case (it stops earlier at a cut with exactly k keys above it)."""
    passes, width = 0, 2**32
    while width > 1:
        width = -(-width // (n_cuts + 1))  # the widest of the n_cuts + 1 pieces
        passes += 1
    return passes


def blocks(n_pages: int) -> tuple[int, int]:
    """(main, tail): the largest power of two up to the row's length (16 at least) and the power-of-two block for
    the pages past it (0: none)."""
    main = max(16, 1 << (max(1, n_pages).bit_length() - 1))
    return main, (max(16, triton.next_power_of_2(n_pages - main)) if n_pages > main else 0)


def _warps(block_p: int) -> int:
    """About 32 keys per thread (H200, 128K context: 8 warps best for 8K pages, 16 for 16K)."""
    return max(4, min(16, block_p // 1024))


def select_pages(scores: torch.Tensor, k: int, *, kv_len: int | torch.Tensor, page_size: int,
                 keep_first: bool = False, num_warps: int | None = None, n_cuts: int | None = None,
                 tail_block: bool = True, finite_range: bool = True, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                 reuse: tuple[torch.Tensor, int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scores float32 [B, Hkv, P] -> (pages int32 [B, Hkv, min(k, P)] ascending, counts int32 [B, Hkv]).
    ``kv_len`` a 0-d tensor (a static cache's length, read on the device, no sync): pages past it are never chosen,
    and ``counts`` is below ``k`` when fewer pages are filled. ``n_cuts``: cuts per search pass, 1 or 2
    (default N_CUTS). ``tail_block=False``: one power-of-two block for the whole row (the
    layout before the tail block, kept for benchmarks). ``finite_range=False``: the search starts on the whole
    range of keys, +inf of the forced pages included (the search before the finite range, kept for benchmarks).
    ``out``: (pages, counts) buffers to write into (pages may be wider than ``k``).

    ``reuse`` (LServe over a static cache, with a device-side ``kv_len`` and ``out``): ``(sel_len, steps, live)``,
    int32 [B, Hkv] each but ``steps``. A row whose last selection (made at length ``sel_len``, 0 for none) is fewer
    than ``steps`` tokens old keeps its pages and count; the others select and set ``sel_len`` to the length. Either
    way the newest page is written after the kept ones and ``live`` gets the count to attend to (plus one when that
    page was begun since the selection): pages must be at least ``k + 1`` wide. Returns (pages, live)."""
    B, H, P = scores.shape
    k, on_device = check_budget(k, P, kv_len, "select_pages", "k")
    if P > MAX_PAGES:
        if on_device:
            raise ValueError(f"select_pages: {P} pages with a device-side length exceed MAX_PAGES ({MAX_PAGES})")
        from ..reference_decode import select_pages as ref

        return ref(scores, k, kv_len=kv_len, page_size=page_size, keep_first=keep_first)
    scores = scores.float()
    if out is not None:
        pages, counts = out
    else:
        pages = torch.empty(B, H, k, dtype=torch.int32, device=scores.device)
        counts = torch.empty(B, H, dtype=torch.int32, device=scores.device)
    length = device_ints(kv_len, scores.device) if on_device else counts
    block_p, tail = blocks(P) if tail_block else (max(16, triton.next_power_of_2(P)), 0)
    nc = n_cuts or N_CUTS
    if nc not in (1, 2):
        raise ValueError(f"select_pages: n_cuts must be 1 (bisection) or 2 (two packed counts per pass), got {nc}")
    sel = live = counts
    steps = 0
    if reuse is not None:
        sel, steps, live = reuse
        check_reuse(sel, live, counts, B, H, "select_pages")
        if not on_device or out is None or pages.shape[-1] < k + 1:
            raise ValueError("select_pages: reuse needs a device-side kv_len and out=(pages, counts) with pages at "
                             f"least k + 1 = {k + 1} wide")
    _select_kernel[(B * H,)](scores, pages, counts, length, sel, live, *scores.stride(), *pages.stride(), H, P, k,
                             0 if on_device else (kv_len - 1) // page_size, page_size, int(steps),
                             LEN_ON_DEVICE=on_device, KEEP_FIRST=bool(keep_first), BLOCK_P=block_p, TAIL=tail,
                             HAS_REUSE=reuse is not None, NC=nc, FINITE=bool(finite_range), CH=min(64, block_p),
                             num_warps=num_warps or _warps(block_p))  # main >= tail
    return pages, (live if reuse is not None else counts)


def check_budget(k: int, n_pages: int, kv_len, fn: str, name: str) -> tuple[int, bool]:
    """(pages to keep, capped at the row's ``n_pages``; whether ``kv_len`` is a device-side length), or a clear error
    for a budget below one page or a device length holding more than one value."""
    k = min(int(k), n_pages)
    if k < 1:
        raise ValueError(f"{fn}: {name} must be >= 1, got {k}")
    on_device = isinstance(kv_len, torch.Tensor)
    if on_device and kv_len.numel() != 1:
        raise ValueError(f"{fn}: a device-side kv_len holds one length, got {kv_len.numel()} values")
    return k, on_device


def check_reuse(sel_len: torch.Tensor, live: torch.Tensor | None, counts: torch.Tensor | None, B: int, H: int,
                kernel: str) -> None:
    """LServe's reuse buffers: contiguous int32 [B, H] (the kernels index them by program)."""
    for name, t in (("sel_len", sel_len), ("live", live), ("counts", counts)):
        if t is not None and (t.dtype != torch.int32 or tuple(t.shape) != (B, H) or not t.is_contiguous()):
            raise ValueError(f"{kernel}: reuse buffer {name} must be a contiguous int32 [{B}, {H}] tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")


__all__ = ["select_pages", "blocks", "MAX_PAGES", "reused", "check_reuse", "check_budget"]
