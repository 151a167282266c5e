"""Quest's whole decode step in one launch: page scoring, the exact top-k and the attention, the programs of a
(batch, KV head) sharing the work through three row barriers.

``select_attend`` already moved the top-k into the split-KV launch, but every split program there repeats the whole
row's selection (~14 us on one SM at 128K: the row of 8K keys, the threshold search over all of them, the
compaction), and the scoring is a launch of its own. Here the ``NS`` programs of a row split the row instead: program
``j`` owns pages ``j, j + NS, j + 2 NS, ...`` (interleaved, so the kept pages, which cluster, spread evenly), and

1. scores its pages (Quest's criticality, as ``decode_score``), writes them to a scratch row and publishes the range
   and counts of its keys (the same order-preserving int32 keys as ``decode_topk``);
2. after barrier 1, bins its finite keys into NB linear bins over the row's finite range (relaxed atomics into the
   row's histogram);
3. after barrier 2, finds the bin that holds the k-th largest key (a reverse cumsum of the histogram) and copies
   its own keys in that bin, with their pages, to the row's candidate list (one atomic per program for the offset);
4. after barrier 3, finds the exact threshold among the candidates (decode_topk's search, the keys above the bin
   counted as a constant) and, for ties, the page id up to which tied pages are taken (ties go to the lower page
   index), keeps its own pages at or above it, and attends to them (decode_attention's tile helpers); the combine
   kernel merges the NS partials.

Rows the histogram cannot settle (the cut among the +-inf keys, or more than CAP keys in the threshold's bin: many
exact ties) take the whole-row search of ``decode_topk`` in every program instead, over the scratch row: the same
pages either way (kernels/reference_decode.py: ``quest_scores`` + ``select_pages`` + ``paged_decode_attention``).

The barriers spin on a per-row counter (release / acquire atomics at GPU scope), so every program of a row must be
resident at once: the launch has at most one program per SM (``quest_decode`` refuses more rows than SMs). The
counters and the histogram live in decode_attention's zeroed per-stream buffer; the last program of a row to finish
zeroes its share again, so a CUDA graph replays with no memset. The interpreter runs programs one after another, so
there (``PHASE`` 1-4) each phase is a launch of its own and the barriers are the launch boundaries; every phase reads
what the earlier ones wrote from memory, so the two forms run the same code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference_decode import GROUP_REDUCES
from .checks import device_ints
from .decode_attention import (PAGE_SIZES, _combine_kernel, _counters, _interpreting, _per_row, _sm_count,
                               check_decode_qkv, load_kv_tile, online_softmax, softmax_consts, store_partial,
                               tile_scores)
from .decode_score import quest_scores
from .decode_topk import (KEY_INF, KEY_NEG_INF, MAX_PAGES, N_CUTS, _keys, _tally, _ternary_threshold, blocks,
                          check_budget)

NB = 2048  # histogram bins over the row's finite key range
CAP = 64  # candidates the threshold's bin may hold before the row takes the whole-row search
WARPS = 16
SCORE_PAGES = 128  # pages a scoring step loads (x 2 bounds x head_dim)
SCORE_STAGES = 2  # software-pipeline stages of the scoring loop
# the scoring in the launch's first phase (True) or decode_score's own launch before it (False)
FUSED_SCORING = True
PHASES = None  # e.g. (1, 2, 3, 4, 5): the phases as launches of their own on the GPU too (timing probes)
# Quest's static-cache op (kernels/static_decode.py) runs through this launch when True and the rows fit on the SMs
# (``@questfused`` / ``@selattend`` in scripts/bench_utils.py)
ENABLED = False


@triton.jit
def _stamp(STAMPS, i, STAMP: tl.constexpr):
    """Probe only (STAMP): the GPU's global nanosecond timer at point ``i`` of this program."""
    if STAMP:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        tl.store(STAMPS + i, t)


@triton.jit
def _row_barrier(BAR, target, PHASE: tl.constexpr):
    """Wait until the row's programs have all arrived ``target`` arrivals in (PHASE 0; in the phase launches the
    launch boundary is the barrier)."""
    if PHASE == 0:
        tl.debug_barrier()  # every thread's stores issued before the release
        tl.atomic_add(BAR, 1, sem="release", scope="gpu")
        n = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
        while n < target:
            n = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


@triton.jit
def _own_keys(SC, split, NS, P, LAST, LEN_ON_DEVICE: tl.constexpr, KEEP_FIRST: tl.constexpr,
              BLOCK_O: tl.constexpr):
    """This program's pages (split + NS * m) and their keys / valid mask, read from the scratch row through L2."""
    page = split + NS * tl.arange(0, BLOCK_O)
    key, ok = _keys(SC, page, 1, P, LAST, LEN_ON_DEVICE, KEEP_FIRST, True)
    return page, key, ok


@triton.jit
def _row_range(SUMM, NS, K, BLOCK_S: tl.constexpr):
    """The row's finite key range, count(key >= lo) and count(key >= +inf) from the programs' summaries, and
    whether the histogram path settles it (the cut lies among the finite keys)."""
    offs = tl.arange(0, BLOCK_S)
    m = offs < NS
    lo = tl.min(tl.load(SUMM + offs * 4, mask=m, other=2147483647, cache_modifier=".cg"), axis=0)
    hi = tl.max(tl.load(SUMM + offs * 4 + 1, mask=m, other=-2147483647 - 1, cache_modifier=".cg"), axis=0)
    c_lo = tl.sum(tl.load(SUMM + offs * 4 + 2, mask=m, other=0, cache_modifier=".cg"), axis=0)
    n_top = tl.sum(tl.load(SUMM + offs * 4 + 3, mask=m, other=0, cache_modifier=".cg"), axis=0)
    fast = (n_top < K) & (c_lo >= K) & (lo <= hi)
    return lo.to(tl.int64), hi.to(tl.int64), c_lo, n_top, fast


@triton.jit
def _score_of(key):
    """The float32 score of an order-preserving int32 key (decode_topk._keys' map is its own inverse)."""
    return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)


@triton.jit
def _bin(key, lo, hi, NB: tl.constexpr):
    """Bins linear in the score over the row's finite range [lo, hi] (keys): monotone in the key, so a bin is a run
    of the row's order. Linear in the key instead would be logarithmic in the score: at 128K a Quest row's threshold
    bin then held hundreds of keys."""
    smin = _score_of(lo.to(tl.int32))
    smax = _score_of(hi.to(tl.int32))
    scale = tl.where(smax > smin, NB / (smax - smin), 0.0)  # (a range past float32's: one bin, the whole-row search)
    x = (_score_of(key) - smin) * scale
    x = tl.where(x == x, tl.minimum(tl.maximum(x, 0.0), NB - 1.0), 0.0)  # (the +-inf / NaN keys are masked)
    return x.to(tl.int32)


@triton.jit
def _bracket(HIST, n_top, K, NB: tl.constexpr):
    """The bin holding the K-th largest key, the keys above it and the keys in it."""
    bins = tl.arange(0, NB)
    h = tl.load(HIST + bins, cache_modifier=".cg")
    ge = tl.cumsum(h, axis=0, reverse=True) + n_top  # keys in this bin or above
    bk = tl.max(tl.where(ge >= K, bins, 0), axis=0)
    n_in = tl.sum(tl.where(bins == bk, h, 0), axis=0)
    above = tl.sum(tl.where(bins == bk, ge, 0), axis=0) - n_in
    return bk, above, n_in


@triton.jit
def _tie_cut(key, page, ok, T, need, P):
    """The page id up to which keys equal to T are taken: the need-th lowest page among them (a bisection over the
    page ids; ties are rare on real score rows)."""
    tie = ok & (key == T)
    a = tl.zeros((), tl.int32)
    b = P - 1
    while a < b:
        mid = (a + b) // 2
        n = tl.sum((tie & (page <= mid)).to(tl.int32), axis=0)
        a = tl.where(n >= need, a, mid + 1)
        b = tl.where(n >= need, mid, b)
    return a


# P, LAST, the lengths and the strides that change during decode are not specialised
@triton.jit(do_not_specialize=["P", "LAST", "Sk", "NS"])
def _quest_decode_kernel(Q, KMIN, KMAX, K, V, SC, SUMM, WS, CKEY, CPAGE, LIST, STAMPS, KV_LEN, KV_START, OP, LP,
                         sqb, sqh, sqd, smb, smh, smp, smd, sxb, sxh, sxp, sxd, skb, skh, skn, skd, svb, svh, svn, svd,
                         s_start, Hkv, G, Sk, P, NK, LAST, NS, LCAP, qk_scale, cap_in, cap_out,
                         PAGE: tl.constexpr, LEN_ON_DEVICE: tl.constexpr, KEEP_FIRST: tl.constexpr,
                         HAS_KV_START: tl.constexpr, REDUCE_MAX: tl.constexpr, SOFTCAP: tl.constexpr,
                         S_DOT_F32: tl.constexpr, S_IEEE: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_O: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, TAIL: tl.constexpr,
                         NC: tl.constexpr, NB: tl.constexpr, CAP: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SCORE: tl.constexpr,
                         SCORE_STAGES: tl.constexpr, STAMP: tl.constexpr, PHASE: tl.constexpr):
    pid = tl.program_id(0)  # b * Hkv + h
    split = tl.program_id(1)
    stamps = STAMPS + (pid * NS + split) * 16
    _stamp(stamps, 0, STAMP)
    b = pid // Hkv
    h = pid % Hkv
    end = Sk
    if LEN_ON_DEVICE:
        length = tl.load(KV_LEN).to(tl.int32)
        LAST = (length - 1) // PAGE
        end = tl.minimum(length, Sk)
    start = 0
    if HAS_KV_START:
        start = tl.load(KV_START + b * s_start).to(tl.int32)
    sc = SC + pid.to(tl.int64) * P  # the row's scratch scores
    summ = SUMM + pid * NS * 4  # per program: finite min, finite max, count(key >= finite min), count(key >= +inf)
    ws = WS + pid * (NB + 4)  # the row's histogram, then the barrier, candidate and exit counters (zero at launch)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    hq0 = h * G
    q = tl.load(Q + b * sqb + (hq0 + offs_g)[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None], other=0.0)

    # 1. score this program's pages (decode_score's criticality, its group reduction and left-padding rule)
    if ((PHASE == 0) or (PHASE == 1)) and SCORE:  # (else decode_score's own launch wrote the scratch row)
        qf = q.to(tl.float32)
        q_pos = tl.maximum(qf, 0.0).to(KMAX.dtype.element_ty)
        q_neg = tl.minimum(qf, 0.0).to(KMIN.dtype.element_ty)
        if S_DOT_F32:
            q_pos = q_pos.to(tl.float32)
            q_neg = q_neg.to(tl.float32)
        for m0 in tl.range(0, tl.cdiv(P - split, NS), BLOCK_M, num_stages=SCORE_STAGES):
            pg = split + NS * (m0 + tl.arange(0, BLOCK_M))
            p_ok = pg < P
            kmax = tl.load(KMAX + b * sxb + h * sxh + pg[:, None] * sxp + offs_d[None, :] * sxd, mask=p_ok[:, None],
                           other=0.0)
            kmin = tl.load(KMIN + b * smb + h * smh + pg[:, None] * smp + offs_d[None, :] * smd, mask=p_ok[:, None],
                           other=0.0)
            if S_DOT_F32:
                kmax = kmax.to(tl.float32)
                kmin = kmin.to(tl.float32)
            if S_IEEE:
                s = tl.dot(q_pos, tl.trans(kmax), input_precision="ieee")
                s = tl.dot(q_neg, tl.trans(kmin), s, input_precision="ieee")
            else:
                s = tl.dot(q_pos, tl.trans(kmax))
                s = tl.dot(q_neg, tl.trans(kmin), s)
            if REDUCE_MAX:
                score = tl.max(tl.where(g_ok[:, None], s, float("-inf")), axis=0)
            else:
                score = tl.sum(s, axis=0)  # padded rows are zero queries: they add 0
            if HAS_KV_START:
                score = tl.where((pg + 1) * PAGE <= start, float("-inf"), score)
            tl.store(sc + pg, score, mask=p_ok)
        tl.debug_barrier()  # this program's scores stored before its threads read them back
    _stamp(stamps, 1, STAMP)
    if (PHASE == 0) or (PHASE == 1):  # the range and counts of this program's keys
        page, key, ok = _own_keys(sc, split, NS, P, LAST, LEN_ON_DEVICE, KEEP_FIRST, BLOCK_O)
        fin = ok & (key > KEY_NEG_INF) & (key < KEY_INF)
        tally = tl.sum(_tally(key, ok), axis=0)  # valid | at or above +inf << 21 | at or below -inf << 42
        tl.store(summ + split * 4, tl.min(tl.where(fin, key, 2147483647), axis=0))
        tl.store(summ + split * 4 + 1, tl.max(tl.where(fin, key, -2147483647 - 1), axis=0))
        tl.store(summ + split * 4 + 2, ((tally & 0x1FFFFF) - (tally >> 42)).to(tl.int32))
        tl.store(summ + split * 4 + 3, ((tally >> 21) & 0x1FFFFF).to(tl.int32))
    _stamp(stamps, 2, STAMP)
    _row_barrier(ws + NB, NS, PHASE)
    _stamp(stamps, 3, STAMP)

    # 2. the row's histogram of finite keys over its finite range
    if (PHASE == 0) or (PHASE == 2):
        lo, hi, c_lo, n_top, fast = _row_range(summ, NS, NK, BLOCK_S)
        if fast:
            page, key, ok = _own_keys(sc, split, NS, P, LAST, LEN_ON_DEVICE, KEEP_FIRST, BLOCK_O)
            fin = ok & (key > KEY_NEG_INF) & (key < KEY_INF)
            tl.atomic_add(ws + _bin(key, lo, hi, NB), 1, mask=fin, sem="relaxed", scope="gpu")
    _stamp(stamps, 4, STAMP)
    _row_barrier(ws + NB, 2 * NS, PHASE)
    _stamp(stamps, 5, STAMP)

    # 3. the bin holding the threshold; its keys to the candidate list
    if (PHASE == 0) or (PHASE == 3):
        lo, hi, c_lo, n_top, fast = _row_range(summ, NS, NK, BLOCK_S)
        bk, above, n_in = _bracket(ws, n_top, NK, NB)
        if fast & (n_in <= CAP):
            page, key, ok = _own_keys(sc, split, NS, P, LAST, LEN_ON_DEVICE, KEEP_FIRST, BLOCK_O)
            inb = ok & (key > KEY_NEG_INF) & (key < KEY_INF)
            inb = inb & (_bin(key, lo, hi, NB) == bk)
            mine = inb.to(tl.int32)
            base = tl.atomic_add(ws + NB + 1, tl.sum(mine, axis=0), sem="relaxed", scope="gpu")
            slot = base + tl.cumsum(mine, axis=0) - mine
            tl.store(CKEY + pid * CAP + slot, key, mask=inb)
            tl.store(CPAGE + pid * CAP + slot, page, mask=inb)
    _stamp(stamps, 6, STAMP)
    _row_barrier(ws + NB, 3 * NS, PHASE)
    _stamp(stamps, 7, STAMP)

    # 4. the threshold and the tie cut; this program's kept pages to the row's list
    if (PHASE == 0) or (PHASE == 4):
        lo, hi, c_lo, n_top, fast = _row_range(summ, NS, NK, BLOCK_S)
        bk, above, n_in = _bracket(ws, n_top, NK, NB)
        if STAMP:
            tl.store(stamps + 11, (fast & (n_in <= CAP)).to(tl.int64))
            tl.store(stamps + 12, n_in.to(tl.int64))
        if fast & (n_in <= CAP):
            # the candidates ranked by (key descending, page ascending) in one [CAP, CAP] comparison: the first
            # NK - above are kept (the keys above their bin are all kept), so the threshold is the least kept key
            # and the tie cut the highest kept page at it
            offs_c = tl.arange(0, CAP)
            c_ok = offs_c < n_in
            ckey = tl.load(CKEY + pid * CAP + offs_c, mask=c_ok, other=-2147483647 - 1, cache_modifier=".cg")
            cpage = tl.load(CPAGE + pid * CAP + offs_c, mask=c_ok, other=0, cache_modifier=".cg")
            before = (ckey[None, :] > ckey[:, None]) | ((ckey[None, :] == ckey[:, None]) &
                                                        (cpage[None, :] < cpage[:, None]))
            rank = tl.sum((before & c_ok[None, :]).to(tl.int32), axis=1)
            c_kept = c_ok & (rank < NK - above)
            T = tl.min(tl.where(c_kept, ckey, 2147483647), axis=0)
            cut = tl.max(tl.where(c_kept & (ckey == T), cpage, -1), axis=0)
        else:  # the whole row's search, as decode_topk.select_row runs it, over the scratch row
            offs_p = tl.arange(0, BLOCK_P)
            fkey, fok = _keys(sc, offs_p, 1, P, LAST, LEN_ON_DEVICE, KEEP_FIRST, True)
            if TAIL > 0:
                toffs = BLOCK_P + tl.arange(0, TAIL)
                tkey, tok = _keys(sc, toffs, 1, P, LAST, LEN_ON_DEVICE, KEEP_FIRST, True)
            else:
                toffs = offs_p
                tkey = fkey
                tok = fok
            T, c_t = _ternary_threshold(fkey, fok, tkey, tok, NK, TAIL, NC, True)
            T = T.to(tl.int32)
            cut = P
            if c_t > NK:  # more keys tie at T than fit: the lowest pages among them
                need = NK - tl.sum((fkey > T).to(tl.int32), axis=0)
                if TAIL > 0:
                    need -= tl.sum((tkey > T).to(tl.int32), axis=0)
                cut = _tie_cut(fkey, offs_p, fok, T, need, P)
                if TAIL > 0:  # tied pages of the main block rank first
                    n_main = tl.sum((fok & (fkey == T)).to(tl.int32), axis=0)
                    if n_main < need:
                        cut = _tie_cut(tkey, toffs, tok, T, need - n_main, P)
        page, key, ok = _own_keys(sc, split, NS, P, LAST, LEN_ON_DEVICE, KEEP_FIRST, BLOCK_O)
        kept = ok & ((key > T) | ((key == T) & (page <= cut)))
        k32 = kept.to(tl.int32)
        # the row's kept pages in one unordered list (attention's order is free), so every program then takes an
        # equal share of it: the interleaved pages alone would leave the programs with the most kept pages (~1.7x
        # the mean at 16 programs) on the critical path
        base = tl.atomic_add(ws + NB + 3, tl.sum(k32, axis=0), sem="relaxed", scope="gpu")
        slot = base + tl.cumsum(k32, axis=0) - k32
        tl.store(LIST + pid * LCAP + slot, page, mask=kept & (slot < LCAP))  # (at most NK are kept)
    _stamp(stamps, 8, STAMP)
    _row_barrier(ws + NB, 4 * NS, PHASE)
    _stamp(stamps, 9, STAMP)

    # 5. attention over this program's share of the kept pages
    if (PHASE == 0) or (PHASE == 5):
        n_kept = tl.atomic_add(ws + NB + 3, 0, sem="relaxed", scope="gpu")
        # every read of the histogram, candidates and counters done: the row's last program re-zeroes them
        if PHASE == 0:
            tl.debug_barrier()
            done = tl.atomic_add(ws + NB + 2, 1, sem="acq_rel", scope="gpu")
        else:
            done = tl.atomic_add(ws + NB + 2, 1)
        if done == NS - 1:
            tl.store(ws + tl.arange(0, NB), tl.zeros([NB], tl.int32))
            tl.store(ws + NB + tl.arange(0, 4), tl.zeros([4], tl.int32))
        per = tl.cdiv(n_kept, NS)
        lo_t = split * per * PAGE
        hi_t = tl.minimum((split + 1) * per, n_kept) * PAGE
        lst = LIST + pid * LCAP
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        if DOT_F32:
            q = q.to(tl.float32)
        k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
        qk_scale = tl.full([], qk_scale, tl.float32)
        cap_in = tl.full([], cap_in, tl.float32)
        cap_out = tl.full([], cap_out, tl.float32)
        for t0 in range(lo_t, hi_t, BLOCK_N):
            t = t0 + offs_n
            t_ok = t < hi_t
            pg = tl.load(lst + t // PAGE, mask=t_ok, other=0, cache_modifier=".cg")
            tok, t_ok, kt, vv = load_kv_tile(k_base, v_base, pg * PAGE + t % PAGE, t_ok, start, end, skn, skd, svn,
                                             svd, offs_d, offs_dv, HAS_KV_START, DOT_F32)
            s = tile_scores(q, kt, t_ok, qk_scale, cap_in, cap_out, SOFTCAP, IEEE)
            m_i, l_i, acc = online_softmax(s, vv, m_i, l_i, acc, IEEE)
        store_partial(OP, LP, pid * G + offs_g, NS, split, m_i, l_i, acc, g_ok, BLOCK_DV)
        _stamp(stamps, 10, STAMP)


def quest_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                 n_keep: int, *, kv_len: int | torch.Tensor, page_size: int, keep_first: bool = False,
                 group_reduce: str = "max", scale: float | None = None, softcap: float | None = None,
                 kv_start: torch.Tensor | None = None, n_splits: int | None = None, block_n: int | None = None,
                 num_warps: int | None = None, stamps: torch.Tensor | None = None) -> torch.Tensor:
    """Quest's decode attention in one launch (plus the combine): q [B, Hq, 1, D] over the ``n_keep`` pages of each
    (batch, KV head) whose bounds kmin / kmax [B, Hkv, P, D] score highest, the newest page (and page 0 with
    ``keep_first``) always in. The same as ``quest_scores`` + ``select_pages`` + ``paged_decode_attention``
    (kernels/reference_decode.py). k, v [B, Hkv, Sk, D]; ``kv_len`` an int or a 0-d tensor read on the device (a
    static cache); ``kv_start`` int [B] (or one value): left padding; ``group_reduce`` 'max' or 'sum' (Quest's
    'max_norm' needs the whole cache's head bounds first: ``select_attend``). ``n_splits`` (programs per (batch,
    KV head)), ``block_n``, ``num_warps`` override the launch; ``stamps`` (int64, 16 per program; a probe of the GPU path)
    gets each program's global timer at the phase boundaries. Returns [B, Hq, 1, Dv] in q's dtype."""
    B, Hq, _, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    P = kmin.shape[2]
    check_decode_qkv(q, k, v, "quest_decode")
    if tuple(kmin.shape) != (B, Hkv, P, D) or kmax.shape != kmin.shape or Hq % Hkv:
        raise ValueError(f"quest_decode: kmin and kmax must be [{B}, {Hkv}, pages, {D}] and the query heads ({Hq}) "
                         f"a multiple of the KV heads, got {tuple(kmin.shape)} and {tuple(kmax.shape)}")
    if group_reduce not in GROUP_REDUCES or group_reduce == "max_norm":
        raise ValueError(f"quest_decode: group_reduce must be 'max' or 'sum' (use select_attend for 'max_norm'), "
                         f"got {group_reduce!r}")
    if page_size not in PAGE_SIZES:
        raise ValueError(f"quest_decode: page size {page_size} is not supported; use one of {PAGE_SIZES}")
    if P > MAX_PAGES:
        raise ValueError(f"quest_decode: {P} pages exceed one program's row ({MAX_PAGES}); use quest_scores + "
                         "select_pages + paged_decode_attention")
    n_keep, on_device = check_budget(n_keep, P, kv_len, "quest_decode", "n_keep")
    G = Hq // Hkv
    out = q.new_empty(B, Hq, 1, Dv)
    if B * Hq == 0:
        return out
    interp = _interpreting()
    R = B * Hkv
    if n_splits is None:
        n_splits = 3 if interp else max(1, _sm_count(q.device) // R)
    if n_splits < 1 or (q.is_cuda and R * n_splits > _sm_count(q.device)):
        # the row barriers need every program resident at once: at most one per SM
        raise ValueError(f"quest_decode: {R} (batch, KV head) rows x {n_splits} programs must be at least one and "
                         f"at most the GPU's SMs; use select_attend for more rows")
    block_p, tail = blocks(P)
    block_o = max(16, triton.next_power_of_2(triton.cdiv(P, n_splits)))
    if block_n is None:
        block_n = 32 if interp else 128
    length = device_ints(kv_len, q.device) if on_device else None
    dev = q.device
    if FUSED_SCORING:
        sc = torch.empty(R, P, dtype=torch.float32, device=dev)
    else:
        starts = None if kv_start is None else device_ints(kv_start, q.device).reshape(-1).expand(B)
        sc = quest_scores(q, kmin, kmax, group_reduce=group_reduce, page_size=page_size, kv_start=starts)
    summ = torch.empty(R * n_splits * 4, dtype=torch.int32, device=dev)
    ws = _counters(R * (NB + 4), dev)
    ckey = torch.empty(R * CAP, dtype=torch.int32, device=dev)
    cpage = torch.empty(R * CAP, dtype=torch.int32, device=dev)
    lcap = max(1, n_keep)
    lst = torch.empty(R * lcap, dtype=torch.int32, device=dev)
    part_o = torch.empty(B * Hq * n_splits * Dv, dtype=torch.float32, device=dev)
    part_l = torch.empty(B * Hq * n_splits, dtype=torch.float32, device=dev)
    s_start = 0
    if kv_start is not None:
        kv_start, s_start = _per_row(kv_start, B, dev, "kv_start", "quest_decode")
    qk_scale, cap_in, cap_out = softmax_consts(scale, softcap, D)
    f32 = q.dtype == torch.float32
    bounds_f32 = kmin.dtype == torch.float32
    args = (q, kmin, kmax, k, v, sc, summ, ws, ckey, cpage, lst, stamps if stamps is not None else part_l, length if length is not None else part_l,
            kv_start if kv_start is not None else part_l, part_o, part_l,
            q.stride(0), q.stride(1), q.stride(3), *kmin.stride(), *kmax.stride(), *k.stride(), *v.stride(),
            s_start, Hkv, G, Sk, P, n_keep, 0 if on_device else (int(kv_len) - 1) // page_size, n_splits,
            lcap, qk_scale, cap_in, cap_out)
    consts = dict(PAGE=page_size, LEN_ON_DEVICE=on_device, KEEP_FIRST=bool(keep_first),
                  HAS_KV_START=kv_start is not None, REDUCE_MAX=group_reduce == "max", SOFTCAP=softcap is not None,
                  S_DOT_F32=interp and not bounds_f32, S_IEEE=bounds_f32 and not interp, DOT_F32=interp and not f32,
                  IEEE=f32 and not interp,
                  BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_M=min(SCORE_PAGES, block_o), BLOCK_O=block_o,
                  BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_P=block_p, TAIL=tail, NC=N_CUTS, NB=NB,
                  CAP=CAP, BLOCK_N=block_n, BLOCK_D=D, BLOCK_DV=Dv, SCORE=FUSED_SCORING,
                  SCORE_STAGES=SCORE_STAGES, STAMP=stamps is not None)
    grid = (R, n_splits)
    for phase in PHASES or ((1, 2, 3, 4, 5) if interp else (0,)):
        _quest_decode_kernel[grid](*args, **consts, PHASE=phase, num_warps=num_warps or WARPS,
                                   **({} if interp else {"num_stages": 1}))
    _combine_kernel[(B * Hq,)](part_o, part_l, part_l, part_l, out, out, out.stride(0), out.stride(1), out.stride(3),
                               0, 0, Hq, G, n_splits, Hkv, RETURN_LSE=False, HAS_HEADS=False, TWO=False,
                               BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_DV=Dv, DV=Dv)
    return out


def fits(batch: int, kv_heads: int, device) -> bool:
    """Whether ``quest_decode`` can take these rows on ``device``: a program per row at least, one per SM at most."""
    return device.type != "cuda" or batch * kv_heads <= _sm_count(device)


__all__ = ["quest_decode", "fits", "ENABLED"]
