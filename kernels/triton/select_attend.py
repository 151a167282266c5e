"""Quest's top-k page selection inside the split-KV attention launch: one launch instead of two.

At batch 1 the selection is latency-bound, not work-bound: ``decode_topk.select_pages`` runs one program per
(batch, KV head), 8 programs on 132 SMs at Llama-3.1-8B's shape, and the split pass that follows waits for all of
them (a graph node and its drain, ~3-5 us, on top of the kernel). Here every split program of a (batch, KV head)
recomputes that row's selection itself (the same keys, threshold search and tie rule: ``decode_topk.select_row``),
writes the page ids of its own share of the ascending kept list, and attends to them: the work is repeated n_splits
times, in parallel, and the score row (32 KB at 8K pages) comes from L2 after its first read. The partials are
merged by decode_attention's combine kernel, so the output is the two-launch path's: same pages, same shares.

Same function as ``select_pages`` + ``paged_decode_attention`` (kernels/reference_decode.py for both). Quest's
static-cache op takes it by default (``ENABLED``; measured in kernels/triton/NOTES.md). The row of keys takes a
program's registers (16 warps, ~115 registers a thread), so the launch has one program per SM: 16 splits per
(batch, KV head) at batch 1 on 132 SMs, each over one 256-key tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import device_ints
from .decode_attention import (PAGE_SIZES, _combine_kernel, _interpreting, _per_row, _sm_count, check_decode_qkv,
                               launch_shape, load_kv_tile, online_softmax, softmax_consts, softmax_state,
                               store_partial, tile_scores)
from .decode_topk import MAX_PAGES, N_CUTS, blocks, check_budget, page_slots, select_row, tail_slots
from .timer import check_stamps, stamp, stamp_after

# Quest's static-cache op (kernels/static_decode.py) runs through this launch when True (switches ``@selattend`` /
# ``@twolaunch`` in scripts/bench_utils.py). On: H100, 128K, budget 4096, one layer graph-replayed 50.7 -> 45.3 us
# (batch 1), 104.6 -> 101.3 (batch 4) (results/bench_decode_select_attend.md); with 256-key tiles at batch 1 the
# 32-layer step attention 1.880 -> 1.661 ms and the compiled batch-1 step 8.76 -> 8.41 ms
# (results/bench_decode_floor_selattend256_b1.md, results/bench_static_decode_compile_b1_selattend256.md).
ENABLED = True
# Warps of the fused launch: at 8K pages (128K tokens) 16 warps hold the row in 116 registers a thread without
# spilling; 8 warps need 255 and spill (scripts/compile_check.py)
WARPS = 16
SLOTS = tl.constexpr(8)  # timer stamps per program (``stamps``): start, selected, share stored, attended, end


# P, LAST, the lengths and the scores' strides change during decode: not specialised
@triton.jit(do_not_specialize=["P", "LAST", "ssb", "ssh", "Sk", "NS", "TOK_PER_SPLIT"])
def _select_attend_kernel(SCORES, Q, K, V, PAGES, KV_LEN, KV_START, OP, LP, STAMPS, ssb, ssh, ssp, sqb, sqh, sqd,
                          skb, skh, skn, skd, svb, svh, svn, svd, sph, sps, s_start, Hkv, G, Sk, P, NK, LAST,
                          NS, TOK_PER_SPLIT, qk_scale, cap_in, cap_out, PAGE: tl.constexpr,
                          LEN_ON_DEVICE: tl.constexpr, KEEP_FIRST: tl.constexpr, BLOCK_P: tl.constexpr,
                          TAIL: tl.constexpr, NC: tl.constexpr, CH: tl.constexpr, HAS_KV_START: tl.constexpr,
                          SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          STAMP: tl.constexpr):
    qk_scale = tl.full([], qk_scale, tl.float32)
    cap_in = tl.full([], cap_in, tl.float32)
    cap_out = tl.full([], cap_out, tl.float32)
    pid = tl.program_id(0)  # b * Hkv + h
    split = tl.program_id(1)
    stamps = STAMPS + (pid * NS + split) * SLOTS  # probes only (STAMP): start, selected, share stored, attended, end
    stamp(stamps, 0, STAMP)
    b = pid // Hkv
    h = pid % Hkv
    end = Sk
    if LEN_ON_DEVICE:
        length = tl.load(KV_LEN).to(tl.int32)
        LAST = (length - 1) // PAGE
        end = tl.minimum(length, Sk)
    # 1. the row's selection, as select_pages makes it
    sel, tsel = select_row(SCORES + b * ssb + h * ssh, ssp, P, LAST, NK, LEN_ON_DEVICE, KEEP_FIRST, BLOCK_P,
                           TAIL, NC, True)
    if STAMP:  # (the dependency's reduction only in the probe's variant)
        stamp_after(stamps, 1, tl.sum(sel.to(tl.float32), axis=0), STAMP)
    slot, n_sel = page_slots(sel, BLOCK_P, CH)
    # 2. this program's share of the kept list: slots [s0, s1), written where its loop below reads them
    s0 = split * (TOK_PER_SPLIT // PAGE)
    s1 = s0 + TOK_PER_SPLIT // PAGE
    out = PAGES + pid * sph  # this launch's own scratch, [B * Hkv, slots]
    mine = (slot >= s0) & (slot < s1)
    tl.store(out + slot * sps, tl.reshape(tl.arange(0, BLOCK_P), (BLOCK_P // CH, CH)), mask=mine)
    if TAIL > 0:
        tslot, n_sel = tail_slots(tsel, n_sel)
        tl.store(out + tslot * sps, BLOCK_P + tl.arange(0, TAIL), mask=(tslot >= s0) & (tslot < s1))
    tl.debug_barrier()  # the share's page ids stored by every thread before any thread reads them back
    stamp(stamps, 2, STAMP)
    # 3. split-KV attention over the share, as decode_attention._split_kernel does it
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    hq0 = h * G
    q = tl.load(Q + b * sqb + (hq0 + offs_g)[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    start = 0
    if HAS_KV_START:
        start = tl.load(KV_START + b * s_start).to(tl.int32)
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    lo = split * TOK_PER_SPLIT
    hi = tl.minimum(lo + TOK_PER_SPLIT, n_sel * PAGE)
    m_i, l_i, acc = softmax_state(BLOCK_G, BLOCK_DV)
    for t0 in range(lo, hi, BLOCK_N):
        t = t0 + offs_n
        ok = t < hi
        page = tl.load(out + (t // PAGE) * sps, mask=ok, other=0)
        tok, ok, kt, vv = load_kv_tile(k_base, v_base, page * PAGE + t % PAGE, ok, start, end, skn, skd, svn, svd,
                                       offs_d, offs_dv, HAS_KV_START, DOT_F32)
        s = tile_scores(q, kt, ok, qk_scale, cap_in, cap_out, SOFTCAP, IEEE)
        m_i, l_i, acc = online_softmax(s, vv, m_i, l_i, acc, IEEE)
    if STAMP:
        stamp_after(stamps, 3, tl.sum(tl.sum(acc, axis=1), axis=0), STAMP)
    store_partial(OP, LP, pid * G + offs_g, NS, split, m_i, l_i, acc, g_ok, BLOCK_DV)
    stamp(stamps, 4, STAMP)


def select_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, n_keep: int, *,
                  kv_len: int | torch.Tensor, page_size: int, keep_first: bool = False, scale: float | None = None,
                  softcap: float | None = None, kv_start: torch.Tensor | None = None, n_splits: int | None = None,
                  block_n: int | None = None, num_warps: int | None = None,
                  stamps: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, 1, D] over the ``n_keep`` pages of each (batch, KV head) that ``scores`` float32
    [B, Hkv, P] rank highest (Quest: ``decode_score.quest_scores``), the newest page (and page 0 with
    ``keep_first``) always in: ``paged_decode_attention(q, k, v, *select_pages(scores, n_keep, ...))`` in two
    launches (selection + split pass, then the combine) instead of three. k, v [B, Hkv, Sk, D] (cache views work);
    ``kv_len`` the filled length, an int or a 0-d tensor read on the device (a static cache: keys at or past it are
    masked, pages past it never chosen); ``kv_start`` int [B] (or one value): left padding. ``n_splits``,
    ``block_n``, ``num_warps`` override the launch. ``stamps`` (a GPU probe: int64, SLOTS per program, programs
    ordered (batch, KV head) then split) gets each program's global timer in ns at its start, selection done, share
    stored, attention done and end (``scripts/bench_decode.py --stamps``). Returns [B, Hq, 1, Dv] in q's dtype."""
    B, Hq, _, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    P = scores.shape[-1]
    check_decode_qkv(q, k, v, "select_attend")
    if tuple(scores.shape[:2]) != (B, Hkv) or Hq % Hkv:
        raise ValueError(f"select_attend: scores must be [{B}, {Hkv}, pages] and the query heads ({Hq}) a multiple "
                         f"of the KV heads, got scores {tuple(scores.shape)}")
    if page_size not in PAGE_SIZES:
        raise ValueError(f"select_attend: page size {page_size} is not supported; use one of {PAGE_SIZES}")
    if P > MAX_PAGES:
        raise ValueError(f"select_attend: {P} pages exceed one program's row ({MAX_PAGES}); use select_pages + "
                         "paged_decode_attention")
    n_keep, on_device = check_budget(n_keep, P, kv_len, "select_attend", "n_keep")
    G = Hq // Hkv
    out = q.new_empty(B, Hq, 1, Dv)
    if B * Hq == 0:
        return out
    scores = scores.float()
    width = n_keep * page_size
    interp = _interpreting()
    block_p, tail = blocks(P)
    warps = num_warps or WARPS
    if n_splits is None and not interp:
        # one program per SM: the row of keys takes every register a program may have (compile_check: 116 at 16
        # warps, 255 and a spill at 8, Triton 3.9, sm_90), so two programs would not share an SM
        n_splits = max(1, _sm_count(q.device) // (B * Hkv))
    if block_n is None and not interp and max(D, Dv) <= 128 and q.element_size() == 2:
        # fewer, longer programs than the split pass's: one 256-key tile where it covers a program's share (batch
        # 1: 4096 tokens over 16 splits), else 128-key tiles (H100, 128K: 24.5 against 26.4 us at batch 1)
        block_n = 256 if width <= 256 * n_splits else 128
    block_n, n_splits, tok_per_split, stages = launch_shape(q, Hkv, width, Dv, page_size, n_splits, block_n)
    if block_n >= 256:
        stages = 1  # a K and a V tile of 256 x 128 take 128 KB: one stage fits in shared memory, two do not
    check_stamps(stamps, B * Hkv * n_splits, SLOTS.value, "select_attend")
    pages = torch.empty(B * Hkv, n_splits * tok_per_split // page_size, dtype=torch.int32, device=q.device)
    part_o = torch.empty(B * Hq * n_splits * Dv, dtype=torch.float32, device=q.device)
    part_l = torch.empty(B * Hq * n_splits, dtype=torch.float32, device=q.device)
    length = device_ints(kv_len, q.device) if on_device else part_l
    s_start = 0
    if kv_start is not None:
        kv_start, s_start = _per_row(kv_start, B, q.device, "kv_start", "select_attend")
    qk_scale, cap_in, cap_out = softmax_consts(scale, softcap, D)
    f32 = q.dtype == torch.float32
    _select_attend_kernel[(B * Hkv, n_splits)](
        scores, q, k, v, pages, length, kv_start if kv_start is not None else part_l, part_o, part_l,
        stamps if stamps is not None else part_l,
        *scores.stride(), q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), *pages.stride(),
        s_start, Hkv, G, Sk, P, n_keep, 0 if on_device else (int(kv_len) - 1) // page_size, n_splits, tok_per_split,
        qk_scale, cap_in, cap_out, PAGE=page_size, LEN_ON_DEVICE=on_device, KEEP_FIRST=bool(keep_first),
        BLOCK_P=block_p, TAIL=tail, NC=N_CUTS, CH=min(64, block_p), HAS_KV_START=kv_start is not None,
        SOFTCAP=softcap is not None, DOT_F32=interp and not f32, IEEE=f32 and not interp,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n, BLOCK_D=D, BLOCK_DV=Dv,
        STAMP=stamps is not None,
        num_warps=warps, **({"num_stages": stages} if stages else {}))
    _combine_kernel[(B * Hq,)](part_o, part_l, part_l, part_l, out, out, out.stride(0), out.stride(1), out.stride(3),
                               0, 0, Hq, G, n_splits, Hkv, RETURN_LSE=False, HAS_HEADS=False, TWO=False,
                               BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_DV=Dv, DV=Dv)
    return out


__all__ = ["select_attend", "ENABLED", "SLOTS"]
