"""Fast block selection in Triton: cumulative-threshold and per-row top-n over a score matrix, straight to a
BlockLayout (or a bool mask), without sorting.

Torch twins: ``accel.policies.block_select.keep_by_threshold`` (threshold rule), ``tokens_to_cover`` and
``top_n_mask`` in ``accel.policies.flexprefill`` (counts, top-n), and ``kernels.reference_sparse.build_block_layout``
(causal limit, always-kept sink and diagonal blocks, layout format).

One program per score row (up to ``MAX_N`` entries, the whole row in registers). No sort: the cut is found by
bisection over an order-preserving int32 image of the float32 scores, 32 passes over the row in registers:
- threshold: the smallest key c with ``sum(x : key(x) > c) < threshold * row_sum`` (the sum is monotone in c, since
  each pass adds the same tree of non-negative terms); entries above c are kept;
- top-n: the largest key c with ``count(key >= c) >= n``; entries above c are kept.
Entries equal to the cut (ties) are taken in ascending index order: for top-n as many as make n; for the threshold,
each tied entry while the mass before it (``sum above c + rank * value``) is still below the target. This is the
torch rule "keep up to and including the entry that crosses the threshold" with ties broken towards the lower
index (torch's sort breaks them arbitrarily). Scores for the threshold rule must be non-negative, as the policies'
scores are.

Layouts: phase 0 finds per row the cut and the number of tied entries taken (and the count of kept entries); the
host reads the largest count (one sync, as ``build_block_layout``), then phase 1 rebuilds the kept set from the cut
and writes the indices by a prefix sum: kept key blocks first in ascending order, then the others in ascending order
as padding, truncated to ``max_blocks`` -- exactly ``block_mask_to_layout``'s format. Causality, the first (sink)
block and the diagonal blocks are computed in the kernel from (q_len, kv_len, block sizes), as
``causal_block_mask`` does: entries outside the causal limit are never selected (like scores masked to 0), forced
blocks are added after the selection (like ``build_block_layout``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from accel.layouts import BlockLayout

from .checks import gpu_path, interpreting

MAX_N = 4096  # entries per row (key blocks): one row per program, in registers
SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

MODE_THRESHOLD, MODE_TOPN, MODE_POSITIVE, MODE_ALL = 0, 1, 2, 3
_INT_MIN, _INT_MAX = -2147483648, 2147483647


@triton.jit
def _row(S, NROW, row, offs, ssb, ssh, ssm, ssn, H, NQ, N, HPS, Sq, OFF, BQ, BK,
         MODE: tl.constexpr, LOAD_N: tl.constexpr, CAUSAL: tl.constexpr, KEEP_FIRST: tl.constexpr,
         KEEP_DIAG: tl.constexpr):
    """Load one score row; return (x, key, valid, forced, n_eff)."""
    m = row % NQ
    bh = row // NQ
    h = bh % H
    b = bh // H
    ok = offs < N
    x = tl.load(S + b.to(tl.int64) * ssb + (h // HPS).to(tl.int64) * ssh + m.to(tl.int64) * ssm + offs * ssn,
                mask=ok, other=0.0).to(tl.float32)
    valid = ok
    forced = offs < 0
    if CAUSAL:
        first = OFF + m * BQ  # key position of the query block's first query
        last = OFF + tl.minimum((m + 1) * BQ, Sq) - 1  # and of its last
        valid = valid & (offs * BK <= last)
        if KEEP_FIRST:
            forced = forced | (offs == 0)
        if KEEP_DIAG:
            forced = forced | ((offs >= first // BK) & (offs <= last // BK))
        forced = forced & valid
    if MODE == 0:
        x = tl.where(valid, x, 0.0)
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving: signed int order == float order
    n_eff = 0
    if LOAD_N:
        n_eff = tl.minimum(tl.maximum(tl.load(NROW + row).to(tl.int32), 0), tl.sum(valid.to(tl.int32), 0))
    return x, key, valid, forced, n_eff


@triton.jit
def topn_select(key, valid, n):
    """Top-n of a row of order-preserving int32 keys (valid where ``valid``; 0 <= n <= count(valid)): the cut (the
    largest c with count(key >= c) >= n), how many keys equal to it are kept (the lowest indices), the selection."""
    lo = tl.min(tl.where(valid, key, 2147483647), 0)
    hi = tl.max(tl.where(valid, key, -2147483648), 0)
    for _ in range(32):  # largest c with count(key >= c) >= n
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)
        enough = tl.sum((valid & (key >= mid)).to(tl.int32), 0) >= n
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    ntie = n - tl.sum((valid & (key > lo)).to(tl.int32), 0)
    tied = valid & (key == lo)
    ti = tied.to(tl.int32)
    rank = tl.cumsum(ti, 0) - ti
    return lo, ntie, (valid & (key > lo)) | (tied & (rank < ntie))


@triton.jit
def _select_phase0(S, NROW, CUT, NTIE, COUNT, MASK, threshold,
                   ssb, ssh, ssm, ssn, H, NQ, N, HPS, Sq, OFF, BQ, BK,
                   MODE: tl.constexpr, CAUSAL: tl.constexpr, KEEP_FIRST: tl.constexpr, KEEP_DIAG: tl.constexpr,
                   WRITE_MASK: tl.constexpr, WRITE_CUT: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    x, key, valid, forced, n_eff = _row(S, NROW, row, offs, ssb, ssh, ssm, ssn, H, NQ, N, HPS, Sq, OFF, BQ, BK,
                                        MODE, MODE == 1, CAUSAL, KEEP_FIRST, KEEP_DIAG)
    if MODE == 0:
        target = threshold * tl.sum(x, 0)
        hi = tl.max(tl.where(valid, key, 0), 0)
        lo = hi - hi  # 0: sum(x : key > 0) is the row sum >= target, so the cut is above 0 (zeros never kept)
        for _ in range(32):  # smallest c with sum(x : key > c) < target
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
            below = tl.sum(tl.where(key > mid, x, 0.0), 0) < target
            hi = tl.where(below, mid, hi)
            lo = tl.where(below, lo, mid + 1)
        cut = lo
        above = tl.sum(tl.where(key > cut, x, 0.0), 0)
        tied = valid & (key == cut)
        ti = tied.to(tl.int32)
        rank = tl.cumsum(ti, 0) - ti
        ntie = tl.sum((tied & (above + rank.to(tl.float32) * x < target)).to(tl.int32), 0)
        sel = (valid & (key > cut)) | (tied & (rank < ntie))
    elif MODE == 1:
        cut, ntie, sel = topn_select(key, valid, n_eff)
    elif MODE == 2:
        cut = 0
        ntie = 0
        sel = valid & (x > 0.0)
    else:
        cut = 0
        ntie = 0
        sel = valid
    kept = sel | forced
    tl.store(COUNT + row, tl.sum(kept.to(tl.int32), 0))
    if WRITE_CUT:
        tl.store(CUT + row, cut)
        tl.store(NTIE + row, ntie)
    if WRITE_MASK:
        tl.store(MASK + row.to(tl.int64) * N + offs, kept.to(tl.int8), mask=offs < N)


@triton.jit
def _select_phase1(S, CUT, NTIE, COUNT, IDX, MB,
                   ssb, ssh, ssm, ssn, H, NQ, N, HPS, Sq, OFF, BQ, BK,
                   MODE: tl.constexpr, CAUSAL: tl.constexpr, KEEP_FIRST: tl.constexpr, KEEP_DIAG: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    x, key, valid, forced, n_eff = _row(S, CUT, row, offs, ssb, ssh, ssm, ssn, H, NQ, N, HPS, Sq, OFF, BQ, BK,
                                        MODE, False, CAUSAL, KEEP_FIRST, KEEP_DIAG)
    if MODE == 0 or MODE == 1:
        cut = tl.load(CUT + row)
        ntie = tl.load(NTIE + row)
        tied = valid & (key == cut)
        ti = tied.to(tl.int32)
        rank = tl.cumsum(ti, 0) - ti
        sel = (valid & (key > cut)) | (tied & (rank < ntie))
    elif MODE == 2:
        sel = valid & (x > 0.0)
    else:
        sel = valid
    kept = sel | forced
    count = tl.load(COUNT + row)
    kk = kept.to(tl.int32)
    before = tl.cumsum(kk, 0) - kk  # kept entries before each index
    dest = tl.where(kept, before, count + offs - before)  # kept first, then the rest, each ascending
    tl.store(IDX + row.to(tl.int64) * MB + dest, offs, mask=(offs < N) & (dest < MB))


# ------------------------------------------------------------------------------------------------------- host side


def _block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def _warps(block_n: int) -> int:
    return max(1, min(8, block_n // 256))


def check_scores(scores: torch.Tensor, what: str = "scores", dims: int | None = None) -> None:
    """Shape/dtype/device checks (no device sync). Raises ValueError naming the limit."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(scores).__name__}")
    if dims is not None and scores.dim() != dims:
        raise ValueError(f"{what} must have {dims} dims [batch, heads, n_q_blocks, n_k_blocks], got shape "
                         f"{tuple(scores.shape)}")
    if scores.dim() < 1:
        raise ValueError(f"{what} must have at least one dim (rows of scores), got a scalar")
    if scores.dtype not in SCORE_DTYPES:
        raise ValueError(f"{what} must be float16/bfloat16/float32, got {scores.dtype}")
    if scores.shape[-1] > MAX_N:
        raise ValueError(f"{what} rows have {scores.shape[-1]} entries; the Triton block selection supports at most "
                         f"MAX_N={MAX_N} per row (use the torch selection for longer rows)")
    if not gpu_path(scores) and not interpreting():
        raise ValueError("the Triton block selection needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors; "
                         "accel.policies.block_select.keep_by_threshold is the torch version)")


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a number > 0, got {threshold!r}")
    return float(threshold)


def _mode(threshold: float) -> int:
    return MODE_THRESHOLD if threshold < 1.0 else (MODE_POSITIVE if threshold == 1.0 else MODE_ALL)


def _geometry(scores, q_len, kv_len, block_q, block_k):
    nq, nk = scores.shape[-2:]
    for name, v in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q), ("block_k", block_k)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name.startswith("block") else 0):
            raise ValueError(f"{name} must be a {'positive' if name.startswith('block') else 'non-negative'} int, "
                             f"got {v!r}")
    if q_len > kv_len:
        raise ValueError(f"q_len ({q_len}) must be <= kv_len ({kv_len}) (queries are the last q_len keys)")
    want = (-(-q_len // block_q), -(-kv_len // block_k))
    if (nq, nk) != want:
        raise ValueError(f"scores have {(nq, nk)} blocks; q_len={q_len}, kv_len={kv_len} with blocks "
                         f"{block_q}x{block_k} need {want}")


def _phase0(scores4, mode, *, threshold=0.0, nrow=None, heads=None, hps=1, causal=None, keep_first=False,
            keep_diag=False, write_mask=False, write_cut=False):
    """Launch phase 0 over scores4 [B, HS, NQ, N] for rows [B, HS*hps, NQ]; returns (count, cut, ntie, mask)."""
    B, HS, NQ, N = scores4.shape
    H = HS * hps if heads is None else heads
    R = B * H * NQ
    dev = scores4.device
    count = torch.empty(R, dtype=torch.int32, device=dev)
    cut = torch.empty(R if write_cut else 1, dtype=torch.int32, device=dev)
    ntie = torch.empty_like(cut)
    mask = torch.empty(R if write_mask else 1, N if write_mask else 1, dtype=torch.int8, device=dev)
    if R == 0:
        return count, cut, ntie, mask
    Sq, OFF, BQ, BK = causal if causal is not None else (0, 0, 1, 1)
    bn = _block_n(N)
    _select_phase0[(R,)](
        scores4, nrow if nrow is not None else count, cut, ntie, count, mask, threshold,
        *scores4.stride(), H, NQ, N, hps, Sq, OFF, BQ, BK,
        MODE=mode, CAUSAL=causal is not None, KEEP_FIRST=keep_first, KEEP_DIAG=keep_diag,
        WRITE_MASK=write_mask, WRITE_CUT=write_cut, BLOCK_N=bn, num_warps=_warps(bn))
    return count, cut, ntie, mask


def _as_rows(scores: torch.Tensor) -> torch.Tensor:
    return scores.reshape(1, 1, -1, scores.shape[-1])


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask of the fewest highest entries per row (last dim) whose sum reaches ``threshold`` of the row sum
    (``keep_by_threshold``'s rule; threshold 1.0 keeps the positive entries, above 1.0 everything)."""
    check_scores(scores)
    threshold = _check_threshold(threshold)
    if scores.numel() == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    _, _, _, mask = _phase0(_as_rows(scores), _mode(threshold), threshold=threshold, write_mask=True)
    return mask.view(torch.bool).reshape(scores.shape)


def threshold_counts(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """int32 [...]: per row, how many entries the threshold rule keeps (``tokens_to_cover``'s number)."""
    check_scores(scores)
    threshold = _check_threshold(threshold)
    if scores.numel() == 0:
        return torch.zeros(scores.shape[:-1], dtype=torch.int32, device=scores.device)
    count, _, _, _ = _phase0(_as_rows(scores), _mode(threshold), threshold=threshold)
    return count.reshape(scores.shape[:-1])


def _check_n(n: torch.Tensor, shape, device) -> torch.Tensor:
    if not isinstance(n, torch.Tensor) or n.dtype.is_floating_point or n.dtype == torch.bool:
        raise ValueError(f"n must be an integer tensor of per-row counts, got {getattr(n, 'dtype', type(n))}")
    if tuple(n.shape) != tuple(shape):
        raise ValueError(f"n must have shape {tuple(shape)} (one count per row), got {tuple(n.shape)}")
    if n.device != device:
        raise ValueError(f"n is on {n.device} but the scores are on {device}")
    return n.to(torch.int32).contiguous().reshape(-1)


def topn_mask(scores: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``n`` (per row, shape ``scores.shape[:-1]``) highest entries of each row, ties to the lower
    index (``top_n_mask``'s rule)."""
    check_scores(scores)
    nrow = _check_n(n, scores.shape[:-1], scores.device)
    if scores.numel() == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    _, _, _, mask = _phase0(_as_rows(scores), MODE_TOPN, nrow=nrow, write_mask=True)
    return mask.view(torch.bool).reshape(scores.shape)


def _layout(scores, mode, q_len, kv_len, block_q, block_k, *, threshold=0.0, nrow=None, hps=1, keep_first=True,
            keep_diagonal=True, max_blocks=None) -> BlockLayout:
    B, HS, NQ, N = scores.shape
    H = HS * hps
    geo = (q_len, kv_len - q_len, block_q, block_k)
    kw = dict(heads=H, hps=hps, causal=geo, keep_first=keep_first, keep_diag=keep_diagonal)
    count, cut, ntie, _ = _phase0(scores, mode, threshold=threshold, nrow=nrow, write_cut=True, **kw)
    if max_blocks is None:
        max_blocks = int(count.max()) if count.numel() else 0
    mb = min(max(int(max_blocks), 0), N)
    idx = torch.empty(B, H, NQ, mb, dtype=torch.int32, device=scores.device)
    R = B * H * NQ
    if R and mb:
        bn = _block_n(N)
        _select_phase1[(R,)](
            scores, cut, ntie, count, idx, mb, *scores.stride(), H, NQ, N, hps, q_len, kv_len - q_len,
            block_q, block_k, MODE=mode, CAUSAL=True, KEEP_FIRST=keep_first, KEEP_DIAG=keep_diagonal,
            BLOCK_N=bn, num_warps=_warps(bn))
    return BlockLayout(counts=count.reshape(B, H, NQ), indices=idx, block_q=block_q, block_k=block_k, ascending=True)


def threshold_layout(scores: torch.Tensor, threshold: float, q_len: int, kv_len: int, block_q: int = 128,
                     block_k: int = 128, *, heads_per_score: int = 1, keep_first: bool = True,
                     keep_diagonal: bool = True, max_blocks: int | None = None) -> BlockLayout:
    """``build_block_layout(keep_by_threshold(scores.masked_fill(~causal, 0), threshold), ...)`` in two launches:
    scores [B, HS, n_q_blocks, n_k_blocks] (query head h reads score head h // heads_per_score), threshold over the
    causal blocks, plus the first and diagonal blocks, as a BlockLayout with B, HS*heads_per_score heads."""
    check_scores(scores, dims=4)
    threshold = _check_threshold(threshold)
    _geometry(scores, q_len, kv_len, block_q, block_k)
    return _layout(scores, _mode(threshold), q_len, kv_len, block_q, block_k, threshold=threshold,
                   hps=heads_per_score, keep_first=keep_first, keep_diagonal=keep_diagonal, max_blocks=max_blocks)


def topn_layout(scores: torch.Tensor, n: torch.Tensor, q_len: int, kv_len: int, block_q: int = 128,
                block_k: int = 128, *, keep_first: bool = True, keep_diagonal: bool = True,
                max_blocks: int | None = None) -> BlockLayout:
    """``build_block_layout(top_n_mask(scores_h.masked_fill(~causal, -1), n) & causal, ...)`` in two launches.
    scores [B, HS, n_q_blocks, n_k_blocks], n [B, H, n_q_blocks] (H a multiple of HS: query head h reads score head
    h // (H // HS), so scores shared by a head group are never repeated). Keeps per row the n highest causal blocks
    (ties to the lower index), plus the first and diagonal blocks."""
    check_scores(scores, dims=4)
    _geometry(scores, q_len, kv_len, block_q, block_k)
    B, HS, NQ, _ = scores.shape
    if not isinstance(n, torch.Tensor) or n.dim() != 3 or HS == 0 or n.shape[1] % HS:
        raise ValueError(f"n must be [batch, heads, n_q_blocks] with heads a multiple of the {HS} score heads, got "
                         f"{tuple(getattr(n, 'shape', ()))}")
    hps = n.shape[1] // HS
    nrow = _check_n(n, (B, HS * hps, NQ), scores.device)
    return _layout(scores, MODE_TOPN, q_len, kv_len, block_q, block_k, nrow=nrow, hps=hps, keep_first=keep_first,
                   keep_diagonal=keep_diagonal, max_blocks=max_blocks)


__all__ = ["threshold_mask", "threshold_counts", "topn_mask", "threshold_layout", "topn_layout", "check_scores",
           "MAX_N"]
