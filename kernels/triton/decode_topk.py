"""Top-k page selection in Triton, one program per (batch, KV head): the whole score row sits in registers.

Same function as ``kernels.reference_decode.select_pages``: the ``k`` highest-scoring pages, with the newest page
(and optionally page 0) forced in, written in ascending page order; ties go to the lower page index. Instead of a
sort, the k-th largest score is found exactly over an order-preserving int32 image of the float32
scores by bisection (33 counting passes over the row, all in registers), then a prefix sum compacts the selected
page ids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PAGES = 65536  # one row per program; beyond this the selection runs through torch.topk


# P, LAST and the strides of scores [B, H, P] grow during decode: not specialised (a divisible-by-16 variant would
# compile mid-decode)
@triton.jit(do_not_specialize=["P", "LAST", "ssb", "ssh"])
def _select_kernel(SCORES, PAGES, COUNTS, KV_LEN, SKIP, ssb, ssh, ssp, spb, sph, sps, Hkv, P, K, LAST, PAGE,
                   LEN_ON_DEVICE: tl.constexpr, KEEP_FIRST: tl.constexpr, BLOCK_P: tl.constexpr,
                   HAS_SKIP: tl.constexpr, NC: tl.constexpr):
    if HAS_SKIP:  # a device-side flag: keep the previous selection (LServe's reuse in a fixed graph)
        if tl.load(SKIP) != 0:
            return
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    offs = tl.arange(0, BLOCK_P)
    ok = offs < P
    if LEN_ON_DEVICE:  # a static cache: the length is a tensor, pages past it hold nothing (and score NaN)
        LAST = (tl.load(KV_LEN) - 1) // PAGE
        ok = ok & (offs <= LAST)
    s = tl.load(SCORES + b * ssb + h * ssh + offs * ssp, mask=ok, other=0.0)
    force = offs == LAST
    if KEEP_FIRST:
        force = force | (offs == 0)
    s = tl.where(force, float("inf"), s)
    bits = s.to(tl.int32, bitcast=True)
    # int32 keys (an int64 row of 16K pages spilled registers: 131 us per call at 128K, 8x the int32 row)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    key = tl.where(ok, key, -2147483647 - 1)  # INT32_MIN: below every non-NaN score; never selected (lo >= min)
    lo = tl.min(tl.where(ok, key, 2147483647), axis=0).to(tl.int64)  # scalars in int64: hi - lo may pass 2^31
    hi = tl.max(key, axis=0).to(tl.int64)
    # largest t with count(key >= t) >= K: the K-th largest key. Invariant: count(key >= lo) >= K and
    # count(key > hi) < K. Each pass counts the keys above NC evenly spaced cuts at once (one cross-warp reduction
    # of NC counts), shrinking [lo, hi] by NC + 1: NC = 1 is plain bisection (32 passes, search_passes); NC = 16
    # takes 8. (A four-pass radix select on tl.histogram was measured slower on the H200: 29 / 56 us against
    # 20 / 41 us for bisection over 8K / 16K-wide rows.)
    # An interpolation search (cuts aimed by the counts, Illinois-guarded: 8-11 passes instead of 15-19 on score rows)
    # was measured on the H200 and dropped: 13.5 vs 14.9 us on Quest rows at 128K but 14.6 vs 13.1 on log-normal
    # rows. A pass costs ~0.15 us; the ~11 us fixed part (launch, row load, scans, store) is what this kernel costs.
    # A cut with exactly K keys at or above it is the threshold already (the keys above it are the top K, ties
    # included): the search stops there instead of narrowing to one key value, which on real score rows ends it
    # after about half of the passes the worst case needs (search_passes) (the gap between the K-th and K+1-th key is wide).
    j = tl.arange(1, NC + 1).to(tl.int64)
    while lo < hi:
        cuts = lo + ((hi - lo + 1) * j) // (NC + 1)  # nondecreasing, in (lo, hi]
        c = tl.sum((key[:, None] >= cuts[None, :].to(tl.int32)).to(tl.int32), axis=0)  # [NC]
        take = (c >= K) & (cuts > lo)
        exact = tl.max((take & (c == K)).to(tl.int32), axis=0)  # the highest taken cut is then the exact one
        new_lo = tl.max(tl.where(take, cuts, lo), axis=0)
        hi = tl.min(tl.where((c < K) & (cuts > lo), cuts - 1, hi), axis=0)
        lo = new_lo
        hi = tl.where(exact > 0, lo, hi)
    lo = lo.to(tl.int32)
    gt = key > lo
    need = K - tl.sum(gt.to(tl.int32), axis=0)
    tie = ((key == lo) & ok).to(tl.int32)
    tie_rank = tl.cumsum(tie, axis=0) - tie
    sel = gt | ((tie > 0) & (tie_rank < need))
    sel_i = sel.to(tl.int32)
    pos = tl.cumsum(sel_i, axis=0) - sel_i
    tl.store(PAGES + b * spb + h * sph + pos * sps, offs, mask=sel)
    tl.store(COUNTS + pid, tl.sum(sel_i, axis=0))


# Cuts per pass of the k-ary search (see _select_kernel). Bisection stays the default: on the H200
# (results/bench_decode_topk.md) more cuts per pass cost more in the [BLOCK_P, NC] compare tile than the passes they
# save: 8K-page rows (128K context) take 18.9 us with 1 cut, 22.1 with 4, 30.3 with 8, 122.9+ with 16 (best warps).
N_CUTS = 1


def search_passes(n_cuts: int) -> int:
    """Passes of an (n_cuts + 1)-ary search that always narrow an interval of 2^32 int32 keys to one value: the
    kernel's worst case (it stops earlier at a cut with exactly k keys above it)."""
    passes, width = 0, 2**32
    while width > 1:
        width = -(-width // (n_cuts + 1))  # the widest of the n_cuts + 1 pieces
        passes += 1
    return passes


def _warps(block_p: int) -> int:
    """About 32 keys per thread (H200, 128K context: 8 warps best for 8K pages, 16 for 16K)."""
    return max(4, min(16, block_p // 1024))


def select_pages(scores: torch.Tensor, k: int, *, kv_len: int | torch.Tensor, page_size: int,
                 keep_first: bool = False, num_warps: int | None = None, skip: torch.Tensor | None = None,
                 n_cuts: int | None = None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scores float32 [B, Hkv, P] -> (pages int32 [B, Hkv, min(k, P)] ascending, counts int32 [B, Hkv]).
    ``kv_len`` a 0-d tensor (a static cache's length, read on the device, no sync): pages past it are never chosen,
    and ``counts`` is below ``k`` when fewer pages are filled. ``n_cuts``: cuts per search pass (power of two;
    default N_CUTS). ``out``: (pages, counts) buffers to write into
    (pages may be wider than ``k``); ``skip``: a device-side int32 flag, nonzero = leave them as they are."""
    B, H, P = scores.shape
    k = min(int(k), P)
    if k < 1:
        raise ValueError(f"select_pages: k must be >= 1, got {k}")
    on_device = isinstance(kv_len, torch.Tensor)
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
    length = kv_len.to(device=scores.device, dtype=torch.int32).reshape(1) if on_device else counts
    block_p = max(16, triton.next_power_of_2(P))
    nc = n_cuts or N_CUTS
    if nc & (nc - 1):
        raise ValueError(f"select_pages: n_cuts must be a power of two, got {nc}")
    _select_kernel[(B * H,)](scores, pages, counts, length, skip if skip is not None else counts, *scores.stride(),
                             *pages.stride(), H, P, k,
                             0 if on_device else (kv_len - 1) // page_size, page_size, LEN_ON_DEVICE=on_device,
                             KEEP_FIRST=bool(keep_first), BLOCK_P=block_p, HAS_SKIP=skip is not None,
                             NC=nc,
                             num_warps=num_warps or _warps(block_p))
    return pages, counts


__all__ = ["select_pages", "MAX_PAGES"]
