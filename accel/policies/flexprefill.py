from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from accel.kernels.reference_estimation import (block_means, block_sums, causal_pooled_mask,
                                                lastq_scores_reference, pooled_scores_from_pooled)
from accel.kernels.reference_sparse import build_block_layout, causal_block_mask
from accel.layouts import BlockLayout, DenseLayout

from .base import Policy
from .block_select import check_block_size, check_fraction, keep_by_threshold, layout_width
from .threshold_map import LayerThresholds
from .vertical_slash import _use_triton, last_query_scores


def top_n_mask(scores: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``n`` (per leading index, broadcast over the last dim) highest entries of each row."""
    order = scores.argsort(dim=-1, descending=True, stable=True)  # ties to the lower index, as block_topk.topn_mask
    rank_keep = torch.arange(scores.shape[-1], device=scores.device) < n[..., None]
    return torch.zeros_like(rank_keep).scatter(-1, order, rank_keep)


def tokens_to_cover(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Fewest top entries of each row of ``x`` (a distribution) whose sum reaches ``gamma`` of the row sum. On CUDA
    the sort-free cut of kernels/triton/mass_threshold.py (equal but for exact ties at the cut: all kept)."""
    if x.is_cuda and gamma < 1.0:
        return (x.float().clamp_min(0).view(torch.int32) >= _mass_cut(x, gamma)[..., None]).sum(-1)
    vals = x.sort(dim=-1, descending=True).values
    csum = vals.cumsum(-1)
    return ((csum - vals) < gamma * csum[..., -1:]).sum(-1)


def keep_by_mass(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``keep_by_threshold`` for long rows (FlexPrefill's whole query-aware block map, 1M entries per head at 128K):
    sort-free on CUDA, where sorting cost 5 ms per plan; else the sort."""
    if x.is_cuda and gamma < 1.0:
        return x.float().clamp_min(0).view(torch.int32) >= _mass_cut(x, gamma)[..., None]
    return keep_by_threshold(x, gamma)


def _mass_cut(x: torch.Tensor, gamma: float) -> torch.Tensor:
    from accel.kernels.triton.mass_threshold import mass_cut

    return mass_cut(x, gamma)


def slash_block_mask(sel: torch.Tensor, q_len: int, kv_len: int, block: int) -> torch.Tensor:
    """Blocks [.., n_q_blocks, n_k_blocks] that contain a (query, key) pair whose offset ``pos - key`` lies in a
    selected offset block (``sel`` bool [.., n_offset_blocks], offset block d = offsets d*block .. d*block+block-1)."""
    nq, nk = -(-q_len // block), -(-kv_len // block)
    off = kv_len - q_len
    dev = sel.device
    m = torch.arange(nq, device=dev)[:, None]
    n = torch.arange(nk, device=dev)[None, :]
    first = off + m * block
    last = off + torch.clamp((m + 1) * block, max=q_len) - 1
    hi = last - n * block  # largest offset of the pair
    lo = (first - (n + 1) * block + 1).clamp_min(0)  # smallest (>= 0)
    nd = sel.shape[-1]
    cs = torch.nn.functional.pad(sel.long().cumsum(-1), (1, 0))  # cs[x] = selected offset blocks below x
    ohi = (hi // block).clamp(-1, nd - 1)
    olo = (lo // block).clamp(0, nd)
    idx_hi = (ohi + 1).expand(nq, nk).reshape(-1)
    idx_lo = olo.expand(nq, nk).reshape(-1)
    count = cs[..., idx_hi] - cs[..., idx_lo]
    return (count > 0).reshape(*sel.shape[:-1], nq, nk) & (hi >= 0)


def pooled_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean-pooled blocks, float32 [B, H, ceil(S/block), D]: the Triton kernel on CUDA, else ``block_means``."""
    if _use_triton(x):
        from accel.kernels.triton.pooled_score import mean_pool

        return mean_pool(x, block)
    return block_means(x, block)


def pooled_probs(q_pool: torch.Tensor, k_pool: torch.Tensor, q_len: int, kv_len: int, block: int,
                 scale: float) -> torch.Tensor:
    """FlexPrefill's query-aware estimate from pooled q [B, Hq, nq, D] and pooled k [B, Hkv, nk, D]: causal softmax
    over key blocks, float32 [B, Hq, nq, nk]. A grouped float32 cuBLAS matmul and torch's softmax on every device:
    on the H200 at 128K (32 heads, 1K x 1K blocks) 0.58 ms against 2.08 ms for the Triton kernel
    (kernels/triton/pooled_score.py, whose float32 dots run as FMAs), for the same output size."""
    nq, nk = -(-q_len // block), -(-kv_len // block)
    keep = nq * nk <= _CACHED_MASK_ENTRIES and not (q_pool.is_cuda and torch.cuda.is_current_stream_capturing())
    invisible = _invisible_blocks(q_len, kv_len, block, q_pool.device) if keep else None
    return pooled_scores_from_pooled(q_pool, k_pool, q_len, kv_len, block, scale, invisible=invisible)


_CACHED_MASK_ENTRIES = 1 << 20  # up to 1K x 1K blocks (1 MB of bool): kept per shape


@functools.lru_cache(maxsize=8)
def _invisible_blocks(q_len: int, kv_len: int, block: int, device: torch.device) -> torch.Tensor:
    """``~causal_pooled_mask``, kept: a plan at a repeated shape builds it once instead of a dozen ops per call."""
    return ~causal_pooled_mask(q_len, kv_len, block, device=device)


@dataclass
class FlexPrefillPolicy(LayerThresholds, Policy):
    """FlexPrefill (Lai et al. 2025, arXiv 2502.20766), per head:

    1. the last query block's exact attention gives the head's true key-block distribution; the mean-pooled last
       queries against mean-pooled key blocks give the cheap estimate. Square-root Jensen-Shannon divergence < tau:
       the pooled estimate is trusted and the head is *query-aware*: every query block scores every key block with
       pooled q/k, and the fewest blocks whose softmaxed scores reach ``gamma`` of the whole map are kept (plus
       vertical/slash blocks at the minimum budget, as in the paper's code);
    2. otherwise the head is *vertical-slash*: the last queries' column and diagonal mass pick key-block columns and
       diagonal-offset blocks, as many as the token-level mass needs to reach ``gamma`` (at least ``min_budget``
       tokens' worth of blocks).

    Both branches produce a ``BlockLayout``: a kept column becomes a column of key blocks, a kept diagonal band the
    blocks it crosses (the paper's own kernel works on blocks the same way). First and diagonal blocks are always kept.
    ``gamma=1`` keeps every causal block (dense). Sequences shorter than one block (or than the minimum budget, which
    would keep everything) run dense and are recorded as density 1.0.

    Default ``gamma`` 0.95, the value FlexPrefill used in its RULER runs on Llama-3.1-8B (its general default is
    0.9): at 0.9 Gemma-3-270M keeps mean recall 0.931 at 4K (0.888 at 8K), below issue 5's 0.95; at 0.95 SmolLM2-135M
    (2K/4K) keeps 0.985 at density 0.78 and Gemma 4K 0.957 at density 0.82 (8K: 0.933; gamma 0.97 would be needed
    there, 0.957 at density 0.84; results/recall_sweep.md).

    Per-layer ``gamma`` (``layer_thresholds``, as XAttention's per-layer thresholds: policies/threshold_map.py): a
    map from ``scripts/calibrate_xattention.py MODEL --policy flexprefill`` holds per layer the smallest gamma whose
    layouts keep a target recall on calibration prompts; ``"auto"`` (default) uses the shipped one that fits the
    model (configs/flexprefill_*.json), ``"none"`` or an explicit ``gamma`` one value for every layer."""

    name = "flexprefill"
    phases = ("prefill",)
    description = "per-head query-aware or vertical-slash blocks by JS divergence, cumulative budget gamma"
    paper = "FlexPrefill (arXiv 2502.20766)"

    block_size: int = 128
    gamma: float = 0.95  # paper default 0.9; 0.95 in its RULER runs (see the docstring)
    tau: float = 0.1
    min_budget: int = 1024
    layer_thresholds: str = "auto"  # per-layer gamma: "auto" | "none" | shipped name | .json path (see the docstring)

    _layer_option = "gamma"

    def validate(self) -> None:
        self._check_layer_thresholds()
        check_block_size(self)
        check_fraction(self, "gamma")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"option 'tau' of policy 'flexprefill' must be in [0, 1], got {self.tau}")
        if self.min_budget <= 0:
            raise ValueError(f"option 'min_budget' of policy 'flexprefill' must be > 0, got {self.min_budget}")

    def plan(self, q, k, ctx):
        q_len, kv_len = q.shape[2], k.shape[2]
        bs = self.block_size
        if ctx.sliding_window is not None:
            return DenseLayout(window=ctx.sliding_window)
        if q_len < bs or kv_len <= self.min_budget:
            return DenseLayout()  # nothing to skip; recorded as density 1.0
        layer = self.at_layer(ctx.layer_idx)
        if layer is not self:  # this layer's calibrated gamma
            return layer.plan(q, k, ctx)
        if self.gamma < 1.0 and _use_triton(q) and -(-kv_len // bs) <= _max_layout_blocks():
            return self.select_layout(q, k)  # causality from the lengths, in the layout kernel: no block mask
        causal, _ = causal_block_mask(q_len, kv_len, bs, bs, device=q.device)
        if self.gamma >= 1.0:
            return build_block_layout(causal.expand(q.shape[0], q.shape[1], *causal.shape), q_len, kv_len, bs, bs)
        return build_block_layout(self.select(q, k, causal), q_len, kv_len, bs, bs)

    def estimate(self, q, k, nk: int) -> dict:
        """The per-head estimates both selection paths share: column- and offset-block mass of the last query block
        (``v_blk``, ``s_blk``, the sink block and the local band set to inf so they always count), how many blocks
        of each to keep (``n_vert``, ``n_slash``), the pattern choice (``query_aware``) and the pooled keys. Torch
        ops on any device: the twin of ``estimate_fused`` (what ``select_layout`` runs)."""
        B, Hq, Sq, D = q.shape
        g = Hq // k.shape[1]
        bs = self.block_size
        scale = D**-0.5
        n_last = min(bs, Sq)  # the last query block's exact attention: column / diagonal mass, mean over queries
        vertical, slash = last_query_scores(q, k, bs, scale)
        vertical, slash = vertical / n_last, slash / n_last
        min_blocks = min(nk, math.ceil(self.min_budget / bs))
        # both distributions in one call (on CUDA one mass-cut search: 8 launches instead of 16)
        n_vert, n_slash = tokens_to_cover(torch.stack((vertical, slash)), self.gamma)
        n_vert = (n_vert / bs).ceil().long().clamp(min_blocks, nk)
        n_slash = (n_slash / bs).ceil().long().clamp(min_blocks, nk)
        v_blk, s_blk = block_sums(vertical, bs), block_sums(slash, bs)

        # pattern choice: pooled estimate of the last block vs its true block distribution
        k_pool = pooled_means(k, bs)  # [B, Hkv, nk, D] (pooled keys are tiny; GQA: not repeated)
        q_last = q[:, :, -n_last:].float().mean(-2).reshape(B, k.shape[1], g, 1, D)
        est = torch.matmul(q_last, k_pool[:, :, None].transpose(-1, -2)).reshape(B, Hq, nk)
        est = torch.softmax(est * scale, dim=-1)
        mid = (est + v_blk) / 2
        js = 0.5 * (torch.special.xlogy(est, est) - torch.special.xlogy(est, mid)).sum(-1) \
            + 0.5 * (torch.special.xlogy(v_blk, v_blk) - torch.special.xlogy(v_blk, mid)).sum(-1)
        query_aware = js.clamp_min(0).sqrt() < self.tau  # [B, H]
        n_vert = torch.where(query_aware, min_blocks, n_vert)
        n_slash = torch.where(query_aware, min_blocks, n_slash)
        v_blk[..., 0] = float("inf")  # the sink column block and the local diagonal band always count
        s_blk[..., 0] = float("inf")
        return dict(v_blk=v_blk, s_blk=s_blk, n_vert=n_vert, n_slash=n_slash, query_aware=query_aware,
                    k_pool=k_pool, scale=scale)

    def select(self, q, k, causal):
        """The selection as a bool block mask [B, H, n_q_blocks, n_k_blocks] in torch ops (any device)."""
        Sq, Sk, bs = q.shape[2], k.shape[2], self.block_size
        e = self.estimate(q, k, causal.shape[1])
        cols = top_n_mask(e["v_blk"], e["n_vert"])
        diags = top_n_mask(e["s_blk"], e["n_slash"])
        selected = cols[:, :, None, :] | slash_block_mask(diags, Sq, Sk, bs)
        query_aware = e["query_aware"]
        if bool(query_aware.any()):
            probs = pooled_probs(pooled_means(q, bs), e["k_pool"], Sq, Sk, bs, e["scale"])  # [B, H, nq, nk]
            qa = keep_by_mass(probs.flatten(-2), self.gamma).reshape(probs.shape)
            selected = selected | (qa & query_aware[..., None, None])
        return selected & causal

    def estimate_fused(self, q, k, nk: int, pooled: bool = False) -> dict:
        """``estimate`` with the Triton kernels, in a dozen launches and no host sync: the last-query mass
        (kernels/triton/lastq_score.py, torch twin off CUDA), one mass search over its token rows
        (mass_threshold.py) and the per-head estimate kernel (flex_estimate.py), which also writes the layout
        kernel's top-n tables (``cols``, ``dcs``) and per head ``slots`` (own index if query-aware, else -1).
        ``pooled``: also every head's pooled probabilities (``probs`` [B*H, nq, nk]) with their query-aware cuts
        (``cut``) from the same search, so that no host sync is needed to pick the query-aware heads."""
        from accel.kernels.triton.flex_estimate import flex_estimate
        from accel.kernels.triton.mass_threshold import mass_search

        B, Hq, Sq, D = q.shape
        Sk, bs = k.shape[2], self.block_size
        scale = D**-0.5
        n_last = min(bs, Sq)  # the last query block (a power of two in ``plan``: the kernel's 1/n_last is exact)
        vs = _last_query_stacked(q, k, n_last, scale)  # [2, B, Hq, Sk], sums over the n_last queries
        k_pool = pooled_means(k, bs)  # [B, Hkv, nk, D] (pooled keys are tiny; GQA: not repeated)
        rows = [vs.view(2 * B * Hq, Sk)]
        probs = None
        if pooled:
            probs = pooled_probs(pooled_means(q, bs), k_pool, Sq, Sk, bs, scale).view(B * Hq, -1, nk)
            rows.append(probs.view(B * Hq, -1))
        search = mass_search(rows, self.gamma)
        est = flex_estimate(vs, search, q, k_pool, block=bs, n_last=n_last, tau=self.tau,
                            min_blocks=min(nk, math.ceil(self.min_budget / bs)), scale=scale, pooled_rows=pooled)
        v_blk, s_blk, _ = est.blk.unbind(0)
        n_vert, n_slash, slots, cut = est.ints.unbind(0)
        return dict(v_blk=v_blk, s_blk=s_blk, n_vert=n_vert, n_slash=n_slash, query_aware=slots >= 0,
                    k_pool=k_pool, scale=scale, slots=slots, cols=est.cols, dcs=est.dcs, probs=probs,
                    cut=cut if pooled else None)

    def select_layout(self, q, k) -> BlockLayout:
        """The same selection straight to a BlockLayout with the Triton kernels (CUDA, or the interpreter): the
        estimate and the top-n tables by ``estimate_fused``, the query-aware cut by mass_threshold.py, and the union
        of columns, crossed diagonal blocks, query-aware blocks, sink and diagonal blocks compacted by
        flex_layout.py. No block-sized bool maps in between (those cost ~2 ms of elementwise ops and a sort per plan
        at 128K). Up to block_select.SYNC_FREE_BLOCKS key blocks every head's pooled probabilities are computed
        (32 x 256 x 256 floats at 32K) and the heads that are not query-aware are left out on the device (slot
        -1): no host sync; beyond, only the query-aware heads' (a host read picks them: 4 MB per head at 128K)."""
        from accel.kernels.triton.flex_layout import flex_layout_tables

        Sq, Sk, bs = q.shape[2], k.shape[2], self.block_size
        nk = -(-Sk // bs)
        width = layout_width(nk)
        sync_free = width is not None
        e = self.estimate_fused(q, k, nk, pooled=sync_free)
        if sync_free:
            return flex_layout_tables(e["cols"], e["dcs"], Sq, Sk, bs, probs=e["probs"], cut=e["cut"],
                                      slots=e["slots"], max_blocks=width)
        sel = e["query_aware"].flatten().nonzero().squeeze(1)  # flat (batch * H + head) of the query-aware heads
        if sel.numel() == 0:
            return flex_layout_tables(e["cols"], e["dcs"], Sq, Sk, bs, max_blocks=width)
        # pooled probabilities of the query-aware heads only (each is [nq, nk]: 4 MB and a mass-cut row of 1M
        # entries at 128K), their keys' pooled KV head picked per head
        B, Hq, Hkv = q.shape[0], q.shape[1], k.shape[1]
        kv_rows = (sel // Hq) * Hkv + (sel % Hq) // (Hq // Hkv)
        k_sel = e["k_pool"].flatten(0, 1).index_select(0, kv_rows)[None]
        probs = pooled_probs(_pool_heads(q, bs, sel), k_sel, Sq, Sk, bs, e["scale"])[0].contiguous()
        cut = _mass_cut(probs.flatten(-2), self.gamma)
        slots = torch.full((B * Hq,), -1, dtype=torch.int32, device=q.device)
        slots[sel] = torch.arange(sel.numel(), dtype=torch.int32, device=q.device)
        return flex_layout_tables(e["cols"], e["dcs"], Sq, Sk, bs, probs=probs, cut=cut, slots=slots.reshape(B, Hq),
                                  max_blocks=width)


def _last_query_stacked(q: torch.Tensor, k: torch.Tensor, n_last: int, scale: float) -> torch.Tensor:
    """``last_query_scores`` as one float32 tensor [2, B, Hq, Sk] (vertical, slash), not divided by the queries."""
    if _use_triton(q):
        from accel.kernels.triton.lastq_score import lastq_scores

        return lastq_scores(q, k, n_last, scale=scale, stacked=True)
    return torch.stack(lastq_scores_reference(q, k, n_last, scale))


def _pool_heads(x: torch.Tensor, block: int, heads: torch.Tensor) -> torch.Tensor:
    """Mean-pooled blocks of the flat (batch * H + head) ``heads`` of x [B, H, S, D]: float32 [1, n, nb, D]."""
    if _use_triton(x):
        from accel.kernels.triton.pooled_score import mean_pool

        return mean_pool(x, block, heads=heads)
    return block_means(x.flatten(0, 1).index_select(0, heads)[None], block)


def _max_layout_blocks() -> int:
    from accel.kernels.triton.block_topk import MAX_N

    return MAX_N
