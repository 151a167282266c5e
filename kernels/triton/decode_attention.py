"""Split-KV (flash-decoding) attention of one new query over selected KV pages, or over the whole cache.

Same function as ``kernels.reference_decode.paged_decode_attention``. Grid (B * Hkv, n_splits): each program takes
one KV head and one contiguous share of its selected pages, with the G query heads of that KV group packed into
the M rows of its matmuls (padded to 16), so each selected K/V page is read once per group and K/V are never
repeated. Token ``t`` of a program's share maps to key ``pages[t // PAGE] * PAGE + t % PAGE`` (``PAGED=False``:
key ``t``). Each program writes a normalised partial output and its log-sum-exp; a second kernel merges the splits
(out = sum_s exp(lse_s - lse) o_s). Softmax in base 2, soft-capping through exp2-based tanh, left padding by
``kv_start``, keys at or past ``kv_end`` (a device-side length: static caches) masked. Rows that see no key give 0
output.

A KV-head map (``kv_heads``, ``group``) lets K/V hold a subset of a layer's KV heads (DuoAttention's retrieval heads,
or its streaming heads' ring) while q and the output stay the full layer's: program ``j`` reads query heads
``kv_heads[j] * group + g`` and the combine writes those heads of ``out``, so no gather of q nor scatter of the
output is launched around the kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .checks import device_ints, head_map

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
PAGE_SIZES = (1, 8, 16, 32, 64, 128)  # 1: token-level selections (TidalDecode)


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp2(x * (-2.0 * 1.4426950408889634))) - 1.0


@triton.jit
def load_kv_tile(k_base, v_base, tok, ok, start, end, kn, kd, vn, vd, offs_d, offs_dv, HAS_KV_START: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """Keys ``tok`` [N] of one (row, KV head): (tok as int64, the mask ``ok`` narrowed to keys in [start, end),
    K^T [D, N], V [N, Dv]), masked keys read as 0 (float32 with DOT_F32: the interpreter's dots)."""
    ok = ok & (tok < end)
    if HAS_KV_START:
        ok = ok & (tok >= start)
    tok = tok.to(tl.int64)
    kt = tl.load(k_base + tok[None, :] * kn + offs_d[:, None] * kd, mask=ok[None, :], other=0.0)
    vv = tl.load(v_base + tok[:, None] * vn + offs_dv[None, :] * vd, mask=ok[:, None], other=0.0)
    if DOT_F32:
        kt = kt.to(tl.float32)
        vv = vv.to(tl.float32)
    return tok, ok, kt, vv


@triton.jit
def tile_scores(q, kt, ok, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """Base-2 scores [BLOCK_G, N] of q [BLOCK_G, D] against kt [D, N], soft-capped, -inf where not ``ok`` [N]."""
    if IEEE:
        qk = tl.dot(q, kt, input_precision="ieee")
    else:
        qk = tl.dot(q, kt)
    if SOFTCAP:
        s = _tanh(qk * cap_in) * cap_out
    else:
        s = qk * qk_scale
    return tl.where(ok[None, :], s, float("-inf"))


@triton.jit
def softmax_state(BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The online softmax's empty (max, sum, accumulator) for BLOCK_G query rows."""
    return (tl.full([BLOCK_G], float("-inf"), dtype=tl.float32), tl.zeros([BLOCK_G], dtype=tl.float32),
            tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32))


@triton.jit
def online_softmax(s, vv, m_i, l_i, acc, IEEE: tl.constexpr):
    """One tile of the online softmax in base 2: scores s [BLOCK_G, N] and values vv [N, Dv] into the running
    (max, sum, accumulator)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = tl.dot(p, vv, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(vv.dtype), vv, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def store_partial(OP, LP, row, NS, split, m_i, l_i, acc, g_ok, BLOCK_DV: tl.constexpr):
    """A split's normalised partial output and log-sum-exp (natural log) for output rows ``row`` [BLOCK_G], as the
    combine kernel reads them; rows that saw no key store 0 and -inf."""
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(OP + (row[:, None] * NS + split) * BLOCK_DV + offs_dv[None, :], o, mask=g_ok[:, None])
    tl.store(LP + row * NS + split, lse, mask=g_ok)


# per-step lengths are not specialised: Triton's divisible-by-16 variants would compile anew mid-decode
@triton.jit(do_not_specialize=["Sk", "NS", "TOK_PER_SPLIT", "Sk2", "TOK2"])
def _split_kernel(Q, K, V, PAGES, COUNTS, KV_START, KV_END, HEADS, OP, LP, LOGITS, slgb, slgh,
                  sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, spb, sph, sps, s_start, s_end,
                  Hkv, G, Sk, NS, TOK_PER_SPLIT, qk_scale, cap_in, cap_out,
                  K2, V2, HEADS2, sk2b, sk2h, sk2n, sk2d, sv2b, sv2h, sv2n, sv2d, H2, Sk2, TOK2,
                  PAGE: tl.constexpr, PAGED: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_KV_END: tl.constexpr,
                  HAS_HEADS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LOGITS: tl.constexpr,
                  DOT_F32: tl.constexpr, IEEE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TWO: tl.constexpr):
    # float scalars arrive as fp64 when torch.compile (inductor) launches this kernel inside a compiled decode step
    # (TidalDecode over a static cache); a dot needs one dtype, so pin them to fp32
    qk_scale = tl.full([], qk_scale, tl.float32)
    cap_in = tl.full([], cap_in, tl.float32)
    cap_out = tl.full([], cap_out, tl.float32)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    HT = Hkv
    if TWO:  # a second, unpaged source (the streaming heads' ring) in the same launch: heads Hkv.. of the grid
        HT = Hkv + H2
    b = pid // HT
    hh = pid % HT  # the head of the grid: K/V's heads, then (TWO) the second source's
    sec = hh >= Hkv
    h = tl.where(sec, hh - Hkv, hh)  # the KV head of its source (of the map, with HAS_HEADS)
    hq0 = h * G  # its first query head
    if HAS_HEADS:
        if TWO:
            if sec:
                hq0 = tl.load(HEADS2 + h).to(tl.int32) * G
            else:
                hq0 = tl.load(HEADS + h).to(tl.int32) * G
        else:
            hq0 = tl.load(HEADS + h).to(tl.int32) * G
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    q = tl.load(Q + b * sqb + (hq0 + offs_g)[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    if PAGED:
        total = tl.load(COUNTS + b * Hkv + tl.minimum(h, Hkv - 1)) * PAGE  # (TWO: the ring's is set below)
    else:
        total = Sk
    start = 0
    if HAS_KV_START:
        start = tl.load(KV_START + b * s_start).to(tl.int32)
    end = Sk
    if HAS_KV_END:
        end = tl.minimum(tl.load(KV_END + b * s_end).to(tl.int32), Sk)
    if HAS_KV_END and not PAGED:  # token t is key t: a static buffer's unfilled tail costs no loop trips
        total = tl.minimum(total, end)
    tps = TOK_PER_SPLIT
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    kn = skn
    kd = skd
    vn = svn
    vd = svd
    if TWO:
        if sec:  # the ring: keys are slots [0, min(length, ring)), no paging, no left padding
            end = Sk2
            if HAS_KV_END:
                end = tl.minimum(tl.load(KV_END + b * s_end).to(tl.int32), Sk2)
            total = end
            start = 0
            tps = TOK2
            k_base = K2 + b.to(tl.int64) * sk2b + h.to(tl.int64) * sk2h
            v_base = V2 + b.to(tl.int64) * sv2b + h.to(tl.int64) * sv2h
            kn = sk2n
            kd = sk2d
            vn = sv2n
            vd = sv2d
    lo = split * tps
    hi = tl.minimum(lo + tps, total)
    m_i, l_i, acc = softmax_state(BLOCK_G, BLOCK_DV)
    for t0 in range(lo, hi, BLOCK_N):
        t = t0 + offs_n
        ok = t < hi
        if PAGED:
            if TWO:  # the ring's programs read no page table
                hp = tl.minimum(h, Hkv - 1)  # a real row of the page table (read and discarded by the ring's)
                pg = tl.where(sec, 0, t // PAGE)  # the ring may be wider than the page table
                page = tl.load(PAGES + b * spb + hp * sph + pg * sps, mask=ok, other=0)
                tok = tl.where(sec, t, page * PAGE + t % PAGE)
            else:
                page = tl.load(PAGES + b * spb + h * sph + (t // PAGE) * sps, mask=ok, other=0)
                tok = page * PAGE + t % PAGE
        else:
            tok = t
        tok, ok, kt, vv = load_kv_tile(k_base, v_base, tok, ok, start, end, kn, kd, vn, vd, offs_d, offs_dv,
                                       HAS_KV_START, DOT_F32)
        s = tile_scores(q, kt, ok, qk_scale, cap_in, cap_out, SOFTCAP, IEEE)
        if HAS_LOGITS:  # the scores themselves, for a selection that ranks keys by them (TidalDecode)
            tl.store(LOGITS + b.to(tl.int64) * slgb + (hq0 + offs_g).to(tl.int64)[:, None] * slgh + tok[None, :], s,
                     mask=g_ok[:, None] & ok[None, :])
        m_i, l_i, acc = online_softmax(s, vv, m_i, l_i, acc, IEEE)
    row = (b * HT + hh) * G + offs_g  # without a head map: b * Hq + query head
    store_partial(OP, LP, row, NS, split, m_i, l_i, acc, g_ok, BLOCK_DV)


@triton.jit(do_not_specialize=["NS"])
def _combine_kernel(OP, LP, HEADS, HEADS2, OUT, LSE, soutb, southq, soutd, slb, slh, R, G, NS, H1,
                    RETURN_LSE: tl.constexpr, HAS_HEADS: tl.constexpr, TWO: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_DV: tl.constexpr, DV):
    row = tl.program_id(0)  # b * R + r, with R = (KV heads of K/V [+ of the second source]) * G rows per batch row
    b = row // R
    r = row % R
    hq = r  # without a head map, row r is query head r
    if HAS_HEADS:
        j = r // G
        if TWO:
            if j >= H1:
                hq = tl.load(HEADS2 + j - H1).to(tl.int32) * G + r % G
            else:
                hq = tl.load(HEADS + j).to(tl.int32) * G + r % G
        else:
            hq = tl.load(HEADS + j).to(tl.int32) * G + r % G
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < NS
    lse = tl.load(LP + row * NS + offs_s, mask=s_ok, other=float("-inf"))
    o = tl.load(OP + (row * NS + offs_s)[:, None] * BLOCK_DV + offs_dv[None, :], mask=s_ok[:, None], other=0.0)
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    den = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(OUT + b * soutb + hq * southq + offs_dv * soutd, out.to(OUT.dtype.element_ty), mask=offs_dv < DV)
    if RETURN_LSE:
        row_lse = tl.where(den > 0, m_safe + tl.log(tl.where(den > 0, den, 1.0)), float("-inf"))
        tl.store(LSE + b * slb + hq * slh, row_lse)


# decided once, when Triton wrapped the kernel: ``type()`` of a kernel inside torch.compile's trace is an error
# ("TritonKernelVariable() has no type"), which broke TidalDecode's compiled static decode
_INTERPRETED = type(_split_kernel).__name__ == "InterpretedFunction"


def _interpreting() -> bool:
    return _INTERPRETED


def _sm_count(device) -> int:
    try:
        return torch.cuda.get_device_properties(device).multi_processor_count
    except Exception:  # noqa: BLE001 - CPU / interpreter
        return 8


def _stages(trips: int, block_n: int = 64) -> int | None:
    """Software-pipeline stages for a program's loop of ``trips`` blocks of ``block_n`` keys: little to overlap in
    a short loop, and each stage holds a K and a V tile of shared memory, which caps the programs per SM. H200, 128K,
    budget 4096, 32-layer graphs (L2 cold as in a model step). 64-key tiles (scripts/bench_decode.py
    --split-stages, results/bench_decode_stages.md), us per layer at stages 1 / 2 / 3: LServe batch 1 (1 trip)
    10.5 / 11.2 / 12.7, Quest batch 1 (2 trips) 12.9 / 13.8 / 13.4, LServe batch 4 (4 trips) 22.5 / 20.7 / 22.6,
    Quest batch 4 (8 trips) 31.6 / 31.0 / 28.4. 128-key tiles (--tile-sweep, results/bench_decode_tiles.md): one
    stage for a single trip (Quest batch 1: 12.0 / 12.6 / 14.8), else two, since three 64 KB stages leave one
    program per SM (LServe batch 4, 2 trips: 21.8 / 18.3 / 24.2; dense batch 4: 669 / 517 / 620). None:
    Triton's default (3; dense decode's long loops at 64)."""
    if block_n >= 128:
        return 1 if trips <= 1 else 2
    return 1 if trips <= 2 else (2 if trips <= 4 else None)


def _tile(B: int, Hkv: int, width: int, n_splits: int | None, D: int, Dv: int, itemsize: int, sms: int,
          scores: bool = False) -> int:
    """Keys per tile on the GPU: 128 where a K and a V tile stay 32 KB each (head dims <= 128, 16-bit) and the grid
    still has 1.5 programs per SM at that size, else 64. Larger tiles halve a program's dependent trips (page ids,
    then K and V) for the same bytes: H200, 128K, budget 4096, 32 layers (results/bench_decode_tiles.md), us per
    layer 64 -> 128: Quest 12.9 -> 12.0 (batch 1), 28.0 -> 24.3 (batch 4); TidalDecode's token positions 13.2 ->
    12.3, 28.8 -> 24.9; LServe batch 4 20.3 -> 18.3; dense batch 4 537 -> 517. LServe at batch 1 (4 selecting KV
    heads: 132 programs of 128 keys) is faster at 64 (10.2 against 10.6-11.0). A launch that also writes the
    scores (``logits``: TidalDecode's selection layers) keeps 64: at 128 TidalDecode's batch-4 step went from 3.22 to
    3.54 ms (results/bench_decode_floor_tiles.md) while its sparse layers got faster."""
    if max(D, Dv) > 128 or itemsize > 2 or scores:
        return 64
    per_row = n_splits or _splits(B * Hkv, sms)
    programs = B * Hkv * min(per_row, triton.cdiv(width, 128))
    return 128 if 2 * programs >= 3 * sms else 64


def _splits(rows: int, sms: int) -> int:
    """Splits per (row, KV head): as many as keep the grid within one wave of two programs per SM. Rounded down,
    not up: at batch 4 (32 rows on 132 SMs) 9 splits made 288 programs, 24 of them a second wave, and the dense
    pass with scores (TidalDecode's selection layers) ran 590 us against 527 at 8 splits (H200, 128K; scripts/
    bench_decode.py --logits-sweep, results/bench_decode_logits.md). Batch 1 (8 rows) is unchanged at 33."""
    return max(1, (2 * sms) // rows)


def launch_shape(q: torch.Tensor, Hkv: int, width: int, Dv: int, page_size: int, n_splits: int | None,
                 block_n: int | None, scores: bool = False) -> tuple[int, int, int, int | None]:
    """(keys per tile, splits, tokens per split, pipeline stages or None for Triton's default) of a split pass over
    at most ``width`` tokens per (row, KV head): ``_tile`` / ``_splits`` / ``_stages`` on the GPU, small fixed
    shapes under the interpreter; a tile holds whole pages."""
    interp = _interpreting()
    B, D = q.shape[0], q.shape[-1]
    if block_n is None:
        block_n = 32 if interp else _tile(B, Hkv, width, n_splits, D, Dv, q.element_size(), _sm_count(q.device),
                                          scores=scores)
    block_n = max(block_n, page_size)
    n_blocks = max(1, triton.cdiv(width, block_n))
    if n_splits is None:
        # two programs per SM from K/V's heads alone: the ring's programs are short and fill in around them
        # (counting them here halved duo's retrieval splits into one and a bit waves: 13.6 -> 15.8 ms per step)
        n_splits = 4 if interp else _splits(B * Hkv, _sm_count(q.device))
    n_splits = max(1, min(n_splits, n_blocks))
    tok_per_split = triton.cdiv(n_blocks, n_splits) * block_n
    n_splits = triton.cdiv(width, tok_per_split)
    return block_n, n_splits, tok_per_split, None if interp else _stages(tok_per_split // block_n, block_n)


def _per_row(t: torch.Tensor, B: int, device, name: str, fn: str = "paged_decode_attention"
             ) -> tuple[torch.Tensor, int]:
    """A per-row int bound ([B], or one value for every row, e.g. a static cache's 0-d length) and its row stride.
    int32/int64 are read as they are: no cast or broadcast copy launched before the kernel."""
    t = device_ints(t, device)
    if t.numel() == 1:
        return t, 0
    if t.numel() != B:
        raise ValueError(f"{fn}: {name} must hold one value or one per batch row ({B}), got {t.numel()}")
    return t, t.stride(0)


def check_decode_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fn: str) -> None:
    """One query per row, power-of-two head dims from 16 to 256, q / k / v in one 16- or 32-bit float dtype."""
    if q.shape[2] != 1:
        raise ValueError(f"{fn} takes one query per row, got {q.shape[2]}")
    for name, d in (("head_dim", q.shape[-1]), ("value head_dim", v.shape[-1])):
        if d < 16 or d > 256 or d & (d - 1):
            raise ValueError(f"{fn}: {name} {d} must be a power of two from 16 to 256")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{fn}: q, k, v must share float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}")


def softmax_consts(scale: float | None, softcap: float | None, D: int) -> tuple[float, float, float]:
    """(qk_scale, cap_in, cap_out) for the kernels' base-2 softmax: without ``softcap`` the scores are
    ``q.k * qk_scale``, with it ``tanh(q.k * cap_in) * cap_out`` (log2(e) folded in either way)."""
    scale = D**-0.5 if scale is None else float(scale)
    if softcap is not None:
        return 0.0, scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0, 0.0


def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor | None = None,
                           counts: torch.Tensor | None = None, page_size: int = 16, *, scale: float | None = None,
                           softcap: float | None = None, kv_start: torch.Tensor | None = None,
                           kv_end: torch.Tensor | None = None, return_lse: bool = False, n_splits: int | None = None,
                           block_n: int | None = None, kv_heads: torch.Tensor | None = None, group: int | None = None,
                           out: torch.Tensor | None = None,
                           ring: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                           num_warps: int | None = None, num_stages: int | None = None,
                           logits: torch.Tensor | None = None):
    """q [B, Hq, 1, D]; k, v [B, Hkv, Sk, D] (any strides: cache views work); ``pages`` int32 [B, Hkv, n] with
    ``counts`` int32 [B, Hkv] (None: every key); ``kv_start`` / ``kv_end`` int [B] (or one value for all rows): the
    first real key (left padding) / one past the last filled slot (a static cache's length, read on the device).
    Returns out [B, Hq, 1, Dv] in q's dtype, or ``out`` (and lse float32 [B, Hq, 1]).

    Head map: ``kv_heads`` (int32 or int64 [Hkv], on q's device) names the layer KV head each of k/v's heads is,
    and ``group`` (required with it) the query heads per KV head; q is the full layer's query (Hq = group * the
    layer's KV heads) and only query heads ``kv_heads[j] * group + g`` are read and written. ``out``: a preallocated
    [B, Hq, 1, Dv] output to write into (any float dtype); heads outside the map are left untouched (without
    ``out`` they are 0, and their lse -inf). Head ids are not range-checked (that would sync).

    ``ring`` (with a head map): ``(k2, v2, kv_heads2)``, a second source of other KV heads of the same layer,
    unpaged, whose keys are slots ``[0, min(kv_end, k2.shape[2]))`` (DuoAttention's streaming heads' sink + recent
    ring: attention is order-free), attended in the same launch and combine: one pair of launches per layer.

    ``logits`` (no ring): a float32 [B, Hq, >= Sk] buffer (last dim contiguous) that receives each attended key's
    score in base 2, ``log2(e) * scale * q.k`` (soft-capped first with ``softcap``), at its key index; keys not
    attended (past ``kv_end``, before ``kv_start``, not selected) are left as they were. With ``return_lse``,
    ``exp2(logits - lse * log2(e))`` are the attention probabilities, with no second pass over K.

    ``n_splits`` / ``block_n`` / ``num_warps`` / ``num_stages`` override the split pass's launch (None: two
    programs per SM, keys per tile by ``_tile``, Triton's default warps, ``_stages`` by the blocks each program
    loops over); scripts/bench_decode.py --split-sweep measured that no split or warp setting beats the defaults by
    more than 1 us at batch 1, --tile-sweep / --token-sweep chose the tiles."""
    B, Hq, _, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    check_decode_qkv(q, k, v, "paged_decode_attention")
    kv_heads, G = head_map(kv_heads, group, Hq, Hkv, q.device, "paged_decode_attention")
    if pages is not None and page_size not in PAGE_SIZES:
        raise ValueError(f"paged_decode_attention: page size {page_size} is not supported; use one of {PAGE_SIZES}")
    mapped = kv_heads is not None
    H2 = Sk2 = 0
    if ring is not None:
        k2, v2, heads2 = ring
        if not mapped:
            raise ValueError("paged_decode_attention: ring needs a head map (kv_heads, group) for both sources")
        H2, Sk2 = k2.shape[1], k2.shape[2]
        if (k2.shape[0] != B or k2.shape[-1] != D or tuple(v2.shape[:3]) != tuple(k2.shape[:3])
                or v2.shape[-1] != Dv or heads2.dim() != 1 or heads2.numel() != H2):
            raise ValueError(f"paged_decode_attention: ring k/v must be [{B}, H2, S2, {D}] / [{B}, H2, S2, {Dv}] "
                             f"with kv_heads2 [H2], got {tuple(k2.shape)}, {tuple(v2.shape)}, "
                             f"{tuple(heads2.shape)}")
        if k2.dtype != q.dtype or v2.dtype != q.dtype:
            raise TypeError("paged_decode_attention: ring k/v must have q's dtype")
        heads2 = heads2.to(q.device).contiguous()
    if logits is not None and (ring is not None or logits.dtype != torch.float32 or logits.dim() != 3
                               or tuple(logits.shape[:2]) != (B, Hq) or logits.shape[2] < Sk
                               or logits.stride(2) != 1 or logits.device != q.device):
        raise ValueError(f"paged_decode_attention: logits must be a float32 [{B}, {Hq}, >= {Sk}] tensor on "
                         f"{q.device} with a contiguous last dim, and takes no ring; got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if out is None:
        out = q.new_zeros(B, Hq, 1, Dv) if mapped else q.new_empty(B, Hq, 1, Dv)
    elif tuple(out.shape) != (B, Hq, 1, Dv) or out.device != q.device:
        raise ValueError(f"paged_decode_attention: out must be [{B}, {Hq}, 1, {Dv}] on {q.device}, got "
                         f"{tuple(out.shape)} on {out.device}")
    if return_lse:
        lse = (torch.full((B, Hq, 1), float("-inf"), device=q.device) if mapped
               else torch.empty(B, Hq, 1, dtype=torch.float32, device=q.device))
    else:
        lse = out
    HT = Hkv + H2  # program heads: K/V's, then the ring's
    rows = HT * G  # output rows per batch row: every query head, or the mapped heads' groups
    if B * rows == 0:
        return (out, lse) if return_lse else out
    interp = _interpreting()
    if pages is not None:
        width = pages.shape[-1] * page_size  # static bound on the tokens of one row (no host sync on counts)
        counts = counts.to(torch.int32).contiguous()
    else:
        width = Sk
    block_n, n_splits, tok_per_split, stages = launch_shape(q, Hkv, width, Dv, page_size if pages is not None else 1,
                                                            n_splits, block_n, scores=logits is not None)
    tok2 = triton.cdiv(triton.cdiv(Sk2, block_n), n_splits) * block_n if H2 else 0  # the ring over the same splits
    if num_stages is None:
        num_stages = stages
    part_o = torch.empty(B * rows * n_splits * Dv, dtype=torch.float32, device=q.device)
    part_l = torch.empty(B * rows * n_splits, dtype=torch.float32, device=q.device)
    s_start = s_end = 0
    if kv_start is not None:
        kv_start, s_start = _per_row(kv_start, B, q.device, "kv_start")
    if kv_end is not None:
        kv_end, s_end = _per_row(kv_end, B, q.device, "kv_end")
    qk_scale, cap_in, cap_out = softmax_consts(scale, softcap, D)
    f32 = q.dtype == torch.float32
    dummy = part_l
    two = dict(K2=k2, V2=v2, HEADS2=heads2, strides=(*k2.stride(), *v2.stride())) if H2 else None
    block_s = max(2, triton.next_power_of_2(n_splits))
    lse_strides = (lse.stride(0), lse.stride(1)) if return_lse else (0, 0)
    _split_kernel[(B * HT, n_splits)](
        q, k, v, pages if pages is not None else dummy, counts if counts is not None else dummy,
        kv_start if kv_start is not None else dummy, kv_end if kv_end is not None else dummy,
        kv_heads if mapped else dummy, part_o, part_l, logits if logits is not None else dummy,
        *((logits.stride(0), logits.stride(1)) if logits is not None else (0, 0)),
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        *(pages.stride() if pages is not None else (0, 0, 0)), s_start, s_end,
        Hkv, G, Sk, n_splits, tok_per_split, qk_scale, cap_in, cap_out,
        *((two["K2"], two["V2"], two["HEADS2"], *two["strides"]) if two else (dummy,) * 3 + (0,) * 8), H2, Sk2, tok2,
        PAGE=page_size if pages is not None else 1,
        PAGED=pages is not None, HAS_KV_START=kv_start is not None,
        HAS_KV_END=kv_end is not None, HAS_HEADS=mapped, SOFTCAP=softcap is not None,
        HAS_LOGITS=logits is not None, DOT_F32=interp and not f32,
        IEEE=f32 and not interp, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n, BLOCK_D=D, BLOCK_DV=Dv,
        TWO=bool(H2), **({"num_warps": num_warps} if num_warps else {}),
        **({"num_stages": num_stages} if num_stages else {}),
    )
    _combine_kernel[(B * rows,)](part_o, part_l, kv_heads if mapped else dummy, two["HEADS2"] if two else dummy,
                                 out, lse, out.stride(0), out.stride(1), out.stride(3), *lse_strides, rows, G,
                                 n_splits, Hkv, RETURN_LSE=bool(return_lse), HAS_HEADS=mapped, TWO=bool(H2),
                                 BLOCK_S=block_s, BLOCK_DV=Dv, DV=Dv)
    return (out, lse) if return_lse else out


__all__ = ["paged_decode_attention", "PAGE_SIZES"]
del math
