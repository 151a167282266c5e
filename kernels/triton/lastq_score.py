"""MInference's last-query estimate in Triton: the exact causal softmax attention of the last ``n_last`` queries over
every key, reduced to per-head column sums (vertical) and per-diagonal-offset sums (slash), float32 [B, Hq, Sk]
each. Torch twin: ``accel.kernels.reference_estimation.lastq_scores_reference``.

Query i of the n sits at key position ``p_i = Sk - n + i`` (accel.layouts convention); key j is visible iff
``j <= p_i``; the diagonal offset of (i, j) is ``o = p_i - j`` (0 = main diagonal, 0..Sk-1).

Work split. Rows are (query head of a GQA group, query) pairs: a tile holds ``HPT`` query heads of one KV head times
``N_PAD`` (n rounded up to a power of two) queries, so one K tile load feeds every head in the tile (GQA: K is never
repeated; the row tiles of one KV head are adjacent in launch order, so they read each K tile from L2). Keys are
split into ``CHUNK``-key chunks, one program per (row tile, chunk, batch * KV head), enough programs to fill the GPU
at any length. Pass 1 (``_lastq_stats``): per chunk, row max and sum of exp2 (log2 domain, log2(e) folded into the
scale) -> [B, Hq, N_PAD, n_chunks]. Pass 2 combines the chunk statistics of each row in-kernel (a [rows, n_chunks]
load, no extra launch), recomputes and normalises the logits, and sums each head's queries into the vertical
output (reshape [HPT, N_PAD, BLOCK_N] -> sum; each key column has one owner program: plain stores). The diagonal
sums come from one of two methods (``method=``):

- "scratch" (default): pass 2 (``_lastq_reduce_scratch``) also stores the probability tile, times ``P_SCALE`` =
  2^14, as float16 to a scratch P [heads, rows, keys] with plain vector stores; pass 3 (``_lastq_slash``, grid
  (offset tiles, heads)) computes ``slash[o] = sum_i P[i, p_i - o]`` for BLOCK_O offsets per program: each row's
  keys are contiguous (in reverse offset order), so the skew is just a per-row address shift of a [rows, BLOCK_O]
  load, then a sum over rows. Nothing ties BLOCK_N to n, so 128 queries run in one launch. Memory: 2 bytes x Hq x n
  x Sk per batch element (1 GiB at 128K, 32 heads, n=128); (batch, KV head) pairs run in chunks whose scratch fits
  ``scratch_bytes`` (at least one pair per chunk; results do not depend on the chunking). Cost: one write and one
  read of the scratch; the float16 rounding is ~5e-4 relative on slash (vertical stays float32).
- "gather" (the original): inside a [N_PAD, BLOCK_N] tile the offset is ``o = obase + t`` with
  ``t = i + BLOCK_N - 1 - jj`` in [0, 2*BLOCK_N) (n <= BLOCK_N + 1), so one ``tl.gather`` along the key axis skews
  each row by its index and a sum over queries gives the tile's 2*BLOCK_N diagonal partial sums. The upper half
  overlaps the previous (lower-key) tile's lower half, so the program carries the lower half to the next tile and
  writes each offset once with a plain store; only the two halves at a chunk boundary are shared with the
  neighbouring chunk's program and go through ``atomic_add`` (exactly two addends onto 0: deterministic). No
  n x Sk memory, but on an H200 at 128K the gather pass took 7.6x the statistics pass (1.26 vs 0.165 ms per 64
  queries) and its register use (244) forces 64 queries per launch.

Why not per-element atomics for the diagonals: n * Sk atomic adds per head (268M at 32 heads x 64 queries x 128K),
with n same-address adds per tile. More than ``ROWS`` (at most ``MAX_ROWS``) queries run as several row chunks
whose launches add into the outputs (the row softmaxes are independent).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, check_positive_ints, check_qk, gpu_path

MAX_ROWS = 128  # queries per launch (more are processed in several launches that accumulate)
MAX_CHUNKS = 256  # key chunks per row (the combine step loads them all at once)
METHODS = ("auto", "gather", "scratch")
DEFAULT_SCRATCH_BYTES = 3 << 29  # 1.5 GiB: n=128 at 128K with 32 query heads (1 GiB) runs in one chunk
# Scratch probabilities are stored as float16 times 2^14: p <= 1 stays <= 16384 < 65504 (no overflow), and p down to
# 2^-14 * 2^-14 = 3.7e-9 stays a normal float16 (11-bit significand, ~5e-4 relative) instead of going subnormal below
# 6.1e-5 (a flat 128K-key row has p ~ 8e-6); a power of two, so scaling and unscaling add no rounding. float16 over
# bfloat16: 8x finer rounding at the same 2 bytes.
P_SCALE = 16384.0
_LOG2E = 1.4426950408889634


@triton.jit
def _logits(q, K_base, offs_n, offs_d, stride_kn, stride_kd, end, pos0, row_pos, j0, qk_scale,
            BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Scaled log2-domain logits [ROWS, BLOCK_N] of the key tile at j0, -inf where invisible (j > p_i or j >= end)."""
    kT = tl.load(K_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=offs_n[None, :] < end, other=0.0)
    if UPCAST:  # the interpreter's dot mishandles bfloat16 (stored as uint16): compute it in float32
        kT = kT.to(tl.float32)
    s = tl.dot(q, kT, input_precision=PREC) * qk_scale
    if (j0 + BLOCK_N > end) | (j0 + BLOCK_N - 1 > pos0):  # tile crosses the causal edge or the chunk end
        s = tl.where((offs_n[None, :] <= row_pos[:, None]) & (offs_n[None, :] < end), s, float("-inf"))
    return s


@triton.jit
def _load_q(Q, b, kvh, ht, stride_qb, stride_qh, stride_qm, stride_qd, GROUP, NR,
            HPT: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.arange(0, HPT * N_PAD)
    i = rows % N_PAD
    hg = ht * HPT + rows // N_PAD  # head within the group
    row_valid = (i < NR) & (hg < GROUP)
    head = kvh * GROUP + hg
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_valid[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, i, head, row_valid


@triton.jit
def _lastq_stats(
    Q, K, M_OUT, L_OUT,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    Hq, Hkv, GROUP, NR, POS0, KV_END, CHUNK, NCH,
    HPT: tl.constexpr, N_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    ht = tl.program_id(0)
    c = tl.program_id(1)
    pid_bk = tl.program_id(2)
    b = (pid_bk // Hkv).to(tl.int64)
    kvh = (pid_bk % Hkv).to(tl.int64)
    q, i, head, row_valid = _load_q(Q, b, kvh, ht, stride_qb, stride_qh, stride_qm, stride_qd, GROUP, NR,
                                    HPT, N_PAD, BLOCK_D, UPCAST)
    row_pos = POS0 + i
    K_base = K + b * stride_kb + kvh * stride_kh
    offs_d = tl.arange(0, BLOCK_D)
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, KV_END)
    m_i = tl.full([HPT * N_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HPT * N_PAD], dtype=tl.float32)
    for j0 in tl.range(start, end, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        s = _logits(q, K_base, offs_n, offs_d, stride_kn, stride_kd, end, POS0, row_pos, j0, qk_scale,
                    BLOCK_N, PREC, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    off = ((b * Hq + head) * N_PAD + i) * NCH + c
    tl.store(M_OUT + off, m_i, mask=row_valid)
    tl.store(L_OUT + off, l_i, mask=row_valid)


@triton.jit
def _row_norm(M_IN, L_IN, b, head, i, row_valid, Hq, NCH, N_PAD: tl.constexpr, NCH_PAD: tl.constexpr):
    """Combine the per-chunk statistics of each row: (row max, 1 / row sum), inv 0 for invalid rows."""
    offs_c = tl.arange(0, NCH_PAD)
    st = ((b * Hq + head) * N_PAD + i)[:, None] * NCH + offs_c[None, :]
    st_mask = row_valid[:, None] & (offs_c[None, :] < NCH)
    mp = tl.load(M_IN + st, mask=st_mask, other=float("-inf"))
    lp = tl.load(L_IN + st, mask=st_mask, other=0.0)
    m_row = tl.max(mp, 1)
    m_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    l_row = tl.sum(lp * tl.math.exp2(mp - m_safe[:, None]), 1)
    inv_l = tl.where(row_valid & (l_row > 0.0), 1.0 / tl.where(l_row > 0.0, l_row, 1.0), 0.0)
    return m_safe, inv_l


@triton.jit
def _probs_vertical(q, K_base, VERT, out_rows, head_valid, offs_n, offs_d, stride_kn, stride_kd, end, POS0, row_pos,
                    j0, qk_scale, m_safe, inv_l, HPT: tl.constexpr, N_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr, ACCUM: tl.constexpr):
    """Pass 2's common step: the normalised probabilities of the key tile at j0, whose column sums per head (the
    vertical mass) it stores (one owner per column: plain stores, added to the earlier row chunks' when ACCUM)."""
    s = _logits(q, K_base, offs_n, offs_d, stride_kn, stride_kd, end, POS0, row_pos, j0, qk_scale,
                BLOCK_N, PREC, UPCAST)
    p = tl.math.exp2(s - m_safe[:, None]) * inv_l[:, None]
    v = tl.sum(tl.reshape(p, [HPT, N_PAD, BLOCK_N]), 1)
    v_ptr = VERT + out_rows + offs_n[None, :]
    v_mask = head_valid[:, None] & (offs_n[None, :] < end)
    if ACCUM:
        v += tl.load(v_ptr, mask=v_mask, other=0.0)
    tl.store(v_ptr, v, mask=v_mask)
    return p


@triton.jit
def _lastq_reduce(
    Q, K, M_IN, L_IN, VERT, SLASH,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    Hq, Hkv, GROUP, NR, POS0, KV_END, CHUNK, NCH, Sk,
    HPT: tl.constexpr, N_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NCH_PAD: tl.constexpr,
    ACCUM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    ht = tl.program_id(0)
    c = tl.program_id(1)
    pid_bk = tl.program_id(2)
    b = (pid_bk // Hkv).to(tl.int64)
    kvh = (pid_bk % Hkv).to(tl.int64)
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, KV_END)
    if start < end:
        q, i, head, row_valid = _load_q(Q, b, kvh, ht, stride_qb, stride_qh, stride_qm, stride_qd, GROUP, NR,
                                        HPT, N_PAD, BLOCK_D, UPCAST)
        row_pos = POS0 + i
        m_safe, inv_l = _row_norm(M_IN, L_IN, b, head, i, row_valid, Hq, NCH, N_PAD, NCH_PAD)

        K_base = K + b * stride_kb + kvh * stride_kh
        offs_d = tl.arange(0, BLOCK_D)
        offs_b = tl.arange(0, BLOCK_N)
        hg = ht * HPT + tl.arange(0, HPT)  # heads of the tile, within the group
        head_valid = hg < GROUP
        out_rows = ((b * Hq + kvh * GROUP + hg) * Sk)[:, None]  # [HPT, 1] row offsets of VERT / SLASH
        tt = tl.arange(0, 2 * BLOCK_N)
        carry = tl.zeros([HPT, BLOCK_N], dtype=tl.float32)
        obase = POS0 - start - (BLOCK_N - 1)
        for j0 in tl.range(start, end, BLOCK_N):
            offs_n = j0 + offs_b
            p = _probs_vertical(q, K_base, VERT, out_rows, head_valid, offs_n, offs_d, stride_kn, stride_kd, end, POS0,
                                row_pos, j0, qk_scale, m_safe, inv_l, HPT, N_PAD, BLOCK_N, PREC, UPCAST, ACCUM)
            # slash: skew rows, sum over queries -> 2*BLOCK_N diagonal partial sums per head
            # gather index that skews row i by its index: t = i + BLOCK_N - 1 - jj, t in [0, 2*BLOCK_N)
            g_idx = i[:, None] + (BLOCK_N - 1) - tt[None, :]
            g_ok = (g_idx >= 0) & (g_idx < BLOCK_N)
            g = tl.where(g_ok, tl.gather(p, tl.minimum(tl.maximum(g_idx, 0), BLOCK_N - 1), 1), 0.0)
            d = tl.sum(tl.reshape(g, [HPT, N_PAD, 2 * BLOCK_N]), 1)
            lo_half, hi_half = tl.split(tl.permute(tl.reshape(d, [HPT, 2, BLOCK_N]), (0, 2, 1)))
            obase = POS0 - j0 - (BLOCK_N - 1)
            o = obase + BLOCK_N + offs_b  # offsets of the upper half (= the previous tile's lower half)
            s_ptr = SLASH + out_rows + o[None, :]
            s_mask = head_valid[:, None] & (o[None, :] >= 0) & (o[None, :] < Sk)
            val = carry + hi_half
            if j0 == start:  # shared with the previous chunk's last tile
                tl.atomic_add(s_ptr, val, mask=s_mask, sem="relaxed")
            else:
                if ACCUM:
                    val += tl.load(s_ptr, mask=s_mask, other=0.0)
                tl.store(s_ptr, val, mask=s_mask)
            carry = lo_half
        o = obase + offs_b  # last tile's lower half: shared with the next chunk's first tile
        tl.atomic_add(SLASH + out_rows + o[None, :], carry,
                      mask=head_valid[:, None] & (o[None, :] >= 0) & (o[None, :] < Sk), sem="relaxed")


@triton.jit
def _lastq_reduce_scratch(
    Q, K, M_IN, L_IN, VERT, P,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ph, stride_pm,
    Hq, Hkv, GROUP, NR, POS0, KV_END, CHUNK, NCH, Sk, BK0,
    HPT: tl.constexpr, N_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NCH_PAD: tl.constexpr,
    P_SCALE: tl.constexpr, ACCUM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Pass 2 of the scratch method: vertical sums as in ``_lastq_reduce``, and the normalised probabilities times
    P_SCALE stored as float16 to the scratch P[slot * GROUP + head in group, row, key] (slot = the (batch, KV head)
    pair's index in this launch). Every visible key of every valid row is written (invisible ones as 0)."""
    ht = tl.program_id(0)
    c = tl.program_id(1)
    slot = tl.program_id(2).to(tl.int64)
    pid_bk = BK0 + slot
    b = pid_bk // Hkv
    kvh = pid_bk % Hkv
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, KV_END)
    if start < end:
        q, i, head, row_valid = _load_q(Q, b, kvh, ht, stride_qb, stride_qh, stride_qm, stride_qd, GROUP, NR,
                                        HPT, N_PAD, BLOCK_D, UPCAST)
        row_pos = POS0 + i
        m_safe, inv_l = _row_norm(M_IN, L_IN, b, head, i, row_valid, Hq, NCH, N_PAD, NCH_PAD)
        K_base = K + b * stride_kb + kvh * stride_kh
        offs_d = tl.arange(0, BLOCK_D)
        offs_b = tl.arange(0, BLOCK_N)
        hg = ht * HPT + tl.arange(0, HPT)
        head_valid = hg < GROUP
        out_rows = ((b * Hq + kvh * GROUP + hg) * Sk)[:, None]
        p_rows = (slot * GROUP + (head - kvh * GROUP)) * stride_ph + i.to(tl.int64) * stride_pm  # [rows]
        for j0 in tl.range(start, end, BLOCK_N):
            offs_n = j0 + offs_b
            p = _probs_vertical(q, K_base, VERT, out_rows, head_valid, offs_n, offs_d, stride_kn, stride_kd, end, POS0,
                                row_pos, j0, qk_scale, m_safe, inv_l, HPT, N_PAD, BLOCK_N, PREC, UPCAST, ACCUM)
            tl.store(P + p_rows[:, None] + offs_n[None, :], (p * P_SCALE).to(tl.float16),
                     mask=row_valid[:, None] & (offs_n[None, :] < end))


@triton.jit
def _lastq_slash(
    P, SLASH,
    stride_ph, stride_pm,
    NR, POS0, KV_END, Sk, BH0,
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, P_SCALE: tl.constexpr, ACCUM: tl.constexpr,
):
    """Pass 3 of the scratch method: slash[o] = sum_i P[i, POS0 + i - o] / P_SCALE over the rows that see offset o
    (POS0 + i - o >= 0), for BLOCK_O offsets (program_id(0)) of one scratch head (program_id(1)). Each row's
    BLOCK_O keys are contiguous (in reverse offset order); rows are summed in a fixed order (deterministic)."""
    slot = tl.program_id(1).to(tl.int64)
    o0 = tl.program_id(0) * BLOCK_O
    offs_o = o0 + tl.arange(0, BLOCK_O)
    P_base = P + slot * stride_ph + POS0
    # every row sees every offset of the tile (key POS0 + i - o >= 0): no key mask (the bulk of the tiles)
    interior = o0 + BLOCK_O - 1 <= POS0
    ar_r = tl.arange(0, BLOCK_R)
    # &P[i, POS0 + i - o] (keys <= POS0 + i: always written), advanced by BLOCK_R rows per step (a 64-bit add per
    # element, not a multiply per row)
    ptrs = (P_base + ar_r.to(tl.int64) * (stride_pm + 1))[:, None] - offs_o[None, :]
    step = (stride_pm + 1).to(tl.int64) * BLOCK_R
    acc = tl.zeros([BLOCK_R, BLOCK_O], dtype=tl.float32)
    for r0 in tl.range(0, NR, BLOCK_R):
        offs_r = r0 + ar_r
        if interior & (r0 + BLOCK_R <= NR):
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_r[:, None] < NR) & (offs_o[None, :] <= (POS0 + offs_r)[:, None]),
                        other=0.0)
        acc += x.to(tl.float32)
        ptrs += step
    val = tl.sum(acc, 0) * (1.0 / P_SCALE)  # power of two: exact
    ptr = SLASH + (BH0 + slot) * Sk + offs_o
    mask = offs_o < KV_END
    if ACCUM:
        val += tl.load(ptr, mask=mask, other=0.0)
    tl.store(ptr, val, mask=mask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _default_config(q: torch.Tensor, method: str) -> dict:
    """Rows per tile (BLOCK_M: query heads x padded queries), keys per tile (BLOCK_N), keys per program (CHUNK: 0 =
    pick so the grid has about PROGRAMS programs), queries per launch (ROWS), launch parameters, and for the scratch
    method the diagonal pass's tile (BLOCK_O offsets x BLOCK_R rows per step, slash_warps). Register counts below:
    sm_90 AOT compiles with unit head_dim strides (NOTES.md). Interpreter: small tiles."""
    D = q.shape[-1]
    if not gpu_path(q):
        return dict(BLOCK_M=16, BLOCK_N=16, CHUNK=0, PROGRAMS=4, num_warps=4, num_stages=1,
                    BLOCK_O=16, BLOCK_R=16, slash_warps=4)
    slash = dict(BLOCK_O=128, BLOCK_R=16, slash_warps=4)
    if method == "gather":
        # 128 rows (2 heads of 64 queries) x 64 keys, 8 warps: 89 regs (pass 1) / 244 (pass 2), no spills. ROWS 64:
        # 128 queries in one launch force 128-key tiles and one head per tile (8.6 ms at 128K on the H100); two
        # launches of 64 took 1.3 ms each (H200: 0.165 ms stats + 1.26 ms reduce per launch).
        if q.dtype == torch.float32:
            return dict(BLOCK_M=64, BLOCK_N=32, CHUNK=0, PROGRAMS=528, num_warps=4, num_stages=2, ROWS=64)
        if D <= 128:
            return dict(BLOCK_M=128, BLOCK_N=64, CHUNK=0, PROGRAMS=528, num_warps=8, num_stages=3, ROWS=64)
        # head_dim 256: 128 queries in one launch (128-key tiles) needed 256 KB of shared memory on the H200
        return dict(BLOCK_M=64, BLOCK_N=64, CHUNK=0, PROGRAMS=528, num_warps=8, num_stages=2, ROWS=64)
    # scratch: BLOCK_N no longer has to cover the queries, so 128 queries can run in one launch (1 head x 128 rows);
    # measured slower than two launches of 2 heads x 64 for bf16 head_dim <= 128 (K shared by two heads), so ROWS 64
    # there. bf16 head_dim 128, 128 x 64 tiles, 8 warps, 3 stages: 89 / 126 regs (n=128), 89 / 149
    # (n=64), 80 / 96 KB smem; diagonal pass 128 offsets x 16 rows, 4 warps: 56 regs. No spills anywhere.
    if q.dtype == torch.float32:  # 134 / 140 regs, 176 KB at 128 rows (4 warps spill; 2 heads x 64: 255 regs)
        return dict(BLOCK_M=64, BLOCK_N=32, CHUNK=0, PROGRAMS=528, num_warps=8, num_stages=2, ROWS=128, **slash)
    if D <= 128:  # H200, 128K, n=128: two launches of 2 heads x 64 rows 1.95 ms, one of 1 x 128 2.11, 2 x 128 2.18
        return dict(BLOCK_M=128, BLOCK_N=64, CHUNK=0, PROGRAMS=528, num_warps=8, num_stages=3, ROWS=64, **slash)
    # head_dim 256: 64-key tiles keep 128 rows at 97 / 150 regs, 128 / 144 KB smem
    return dict(BLOCK_M=128, BLOCK_N=64, CHUNK=0, PROGRAMS=528, num_warps=8, num_stages=2, ROWS=128, **slash)


def check_inputs(q: torch.Tensor, k: torch.Tensor, n_last: int) -> None:
    """Shape/dtype/device/option checks done before every launch (no device sync). Raises ValueError."""
    check_qk(q, k, "last-query scores", "last-query score",
             "accel.kernels.reference_estimation.lastq_scores_reference")
    check_positive_ints(n_last=n_last)


def resolve_method(q: torch.Tensor, method: str = "auto") -> str:
    """The method to run, "gather" or "scratch", for ``method`` ("auto": scratch, on CUDA and under the interpreter)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return "scratch" if method == "auto" else method


def _scratch_row_stride(Sk: int) -> int:
    return triton.cdiv(Sk, 64) * 64  # whole 128-byte lines per row: aligned vector stores in the reduce pass


def scratch_bytes_per_kv_head(q: torch.Tensor, k: torch.Tensor, n_last: int = 64, *,
                              config: dict | None = None) -> int:
    """Float16 scratch one (batch, KV head) pair needs with method "scratch": its query heads x the queries of one
    launch x the keys (row stride rounded up to 64 keys)."""
    cfg = _default_config(q, "scratch")
    if config:
        cfg.update(config)
    n = min(n_last, q.shape[2])
    rows = min(MAX_ROWS, cfg.get("ROWS", MAX_ROWS), n)
    return (q.shape[1] // k.shape[1]) * rows * _scratch_row_stride(k.shape[2]) * 2


def lastq_scores(q: torch.Tensor, k: torch.Tensor, n_last: int = 64, *, scale: float | None = None,
                 config: dict | None = None, method: str = "auto", scratch_bytes: int | None = None,
                 stacked: bool = False) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Last-query attention mass of MInference. q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (Sq <= Sk, any strides); the
    last ``n = min(n_last, Sq)`` queries' causal softmax (scale ``scale``, default 1/sqrt(D)) over the keys, summed:
    returns float32 ``(vertical, slash)``, each [B, Hq, Sk]: ``vertical[j]`` the mass on key j summed over the n
    queries, ``slash[o]`` the mass on diagonal offset o (query position - key) summed over the n queries. Each head's
    vertical and slash each sum to n. Equal to ``lastq_scores_reference(q, k, n_last, scale)`` (slash to ~5e-4
    relative with method "scratch": float16 probabilities).

    ``method``: "scratch" (the diagonal sums from a float16 probability scratch, 2 bytes x Hq x n x Sk per batch
    element, in chunks of KV heads that fit ``scratch_bytes``, default DEFAULT_SCRATCH_BYTES, at least one KV head
    per chunk), "gather" (in-register diagonal sums, no n x Sk memory, slower), "auto" = scratch.
    ``config`` overrides tiles / launch (BLOCK_M rows = query heads x padded queries per tile, BLOCK_N keys per tile,
    powers of two; CHUNK keys per program, rounded up to a multiple of BLOCK_N, or 0 to aim at PROGRAMS programs;
    ROWS queries per launch, at most MAX_ROWS; num_warps, num_stages; scratch: BLOCK_O, BLOCK_R, slash_warps of the
    diagonal pass) for tuning. ``stacked``: return one float32 tensor [2, B, Hq, Sk] (vertical, slash) instead of
    the pair (FlexPrefill searches both in one mass cut: no stacking copy)."""
    check_inputs(q, k, n_last)
    method = resolve_method(q, method)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    both = torch.zeros(2, B, Hq, Sk, dtype=torch.float32, device=q.device)  # one allocation for the pair
    vert, slash = both.unbind(0)
    out = both if stacked else (vert, slash)
    n = min(n_last, Sq)
    if B == 0 or Hq == 0 or n == 0:
        return out
    cfg = _default_config(q, method)
    if config:
        cfg.update(config)
    names = ("BLOCK_M", "BLOCK_N") + (("BLOCK_O", "BLOCK_R") if method == "scratch" else ())
    for name in names:
        t = cfg[name]
        if not isinstance(t, int) or t < 16 or t & (t - 1):
            raise ValueError(f"config {name}={t!r} must be a power of two >= 16")
    group = Hq // Hkv
    upcast = q.dtype == torch.bfloat16 and not gpu_path(q)
    if q.dtype == torch.float32 or upcast:
        prec = "tf32x3" if gpu_path(q) else "ieee"
    else:
        prec = "tf32"
    qk_scale = (D**-0.5 if scale is None else float(scale)) * _LOG2E
    rows = min(MAX_ROWS, cfg.get("ROWS", MAX_ROWS))
    n_bk = B * Hkv
    if method == "scratch":
        # one buffer for every launch: (batch, KV head) pairs per chunk x their query heads x rows x keys
        budget = DEFAULT_SCRATCH_BYTES if scratch_bytes is None else int(scratch_bytes)
        pairs = max(1, min(n_bk, budget // scratch_bytes_per_kv_head(q, k, n, config=config)))
        scratch = torch.empty(pairs * group, min(rows, n), _scratch_row_stride(Sk), dtype=torch.float16,
                              device=q.device)
    for r0 in range(0, n, rows):  # row chunks: independent softmaxes, summed into the outputs
        nr = min(rows, n - r0)
        n_pad = max(16, _next_pow2(nr))
        # the gather's diagonal carry needs n <= BLOCK_N + 1; the scratch pass has no such tie
        block_n = max(cfg["BLOCK_N"], n_pad) if method == "gather" else cfg["BLOCK_N"]
        hpt = min(_next_pow2(group), max(1, cfg["BLOCK_M"] // n_pad))
        n_row_tiles = triton.cdiv(group, hpt)
        pos0 = Sk - n + r0  # key position of the first row
        kv_end = pos0 + nr  # keys past the last row's position are invisible
        chunk = cfg["CHUNK"]
        if not chunk:  # from all pairs, not one scratch chunk: the key split (and so the sums) ignore the budget
            want = max(1, triton.cdiv(cfg["PROGRAMS"], n_row_tiles * n_bk))
            chunk = triton.cdiv(triton.cdiv(kv_end, want), block_n) * block_n
        chunk = triton.cdiv(max(chunk, triton.cdiv(kv_end, MAX_CHUNKS)), block_n) * block_n
        nch = triton.cdiv(kv_end, chunk)
        qs = q[:, :, Sq - n + r0: Sq - n + r0 + nr]
        m_part = torch.empty(B, Hq, n_pad, nch, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        common = dict(HPT=hpt, N_PAD=n_pad, BLOCK_N=block_n, BLOCK_D=D, PREC=prec, UPCAST=upcast,
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        _lastq_stats[(n_row_tiles, nch, n_bk)](qs, k, m_part, l_part, qk_scale, *qs.stride(), *k.stride(),
                                               Hq, Hkv, group, nr, pos0, kv_end, chunk, nch, **common)
        if method == "gather":
            _lastq_reduce[(n_row_tiles, nch, n_bk)](
                qs, k, m_part, l_part, vert, slash, qk_scale, *qs.stride(), *k.stride(),
                Hq, Hkv, group, nr, pos0, kv_end, chunk, nch, Sk,
                NCH_PAD=max(2, _next_pow2(nch)), ACCUM=r0 > 0, **common)
            continue
        for bk0 in range(0, n_bk, pairs):  # chunks of (batch, KV head) pairs whose scratch fits the budget
            nbk = min(pairs, n_bk - bk0)
            _lastq_reduce_scratch[(n_row_tiles, nch, nbk)](
                qs, k, m_part, l_part, vert, scratch, qk_scale, *qs.stride(), *k.stride(),
                scratch.stride(0), scratch.stride(1),
                Hq, Hkv, group, nr, pos0, kv_end, chunk, nch, Sk, bk0,
                NCH_PAD=max(2, _next_pow2(nch)), P_SCALE=P_SCALE, ACCUM=r0 > 0, **common)
            _lastq_slash[(triton.cdiv(kv_end, cfg["BLOCK_O"]), nbk * group)](
                scratch, slash, scratch.stride(0), scratch.stride(1), nr, pos0, kv_end, Sk, bk0 * group,
                BLOCK_O=cfg["BLOCK_O"], BLOCK_R=cfg["BLOCK_R"], P_SCALE=P_SCALE, ACCUM=r0 > 0,
                num_warps=cfg["slash_warps"], num_stages=1)
    return out


__all__ = ["lastq_scores", "check_inputs", "resolve_method", "scratch_bytes_per_kv_head", "MAX_ROWS", "METHODS",
           "DEFAULT_SCRATCH_BYTES", "P_SCALE", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]
