"""The shared step of block-scoring prefill policies: score key blocks, keep the best.

A subclass implements ``score`` (block scores [B, H, n_q_blocks, n_k_blocks], non-negative, already restricted to
causal blocks); this base keeps, per query-block row, the fewest blocks whose scores reach ``threshold`` of the row
total, always adds the first (sink) and diagonal blocks, and builds the BlockLayout on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from accel.kernels.reference_sparse import build_block_layout, causal_block_mask
from accel.layouts import DenseLayout

from .base import Policy

SUPPORTED_BLOCKS = (64, 128)

# Up to this many key blocks the Triton selections build a layout at its full width (rows padded to every key block)
# instead of the widest row's: reading the widest row is a host sync that holds the CPU until the estimate has run,
# and at 32K (256 blocks) that stall cost ~0.5 ms of a ~1.6 ms plan, which is launch-bound there. Beyond it the GPU
# dominates the plan and the narrower layout saves memory (a full-width layout is 128 MB of int32 at 128K, 32 heads).
SYNC_FREE_BLOCKS = 512


def layout_width(n_k_blocks: int) -> int | None:
    """``max_blocks`` for the Triton layout builders: the full width (no host sync) up to SYNC_FREE_BLOCKS key
    blocks, else None (the widest row's, read from the device)."""
    return n_k_blocks if n_k_blocks <= SYNC_FREE_BLOCKS else None


def check_block_size(policy: Policy) -> None:
    if policy.block_size not in SUPPORTED_BLOCKS:
        raise ValueError(f"option 'block_size' of policy {policy.name!r} must be one of {SUPPORTED_BLOCKS}, "
                         f"got {policy.block_size}")


def check_fraction(policy: Policy, option: str) -> None:
    value = getattr(policy, option)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"option {option!r} of policy {policy.name!r} must be in (0, 1], got {value}")


def fast_selection(scores: torch.Tensor) -> bool:
    """Whether the Triton block selection (kernels/triton/block_topk.py) takes ``scores``: CUDA, a float dtype it
    reads, non-empty rows of at most its MAX_N entries. Otherwise the torch path runs (same results)."""
    if not scores.is_cuda or scores.dtype not in (torch.float16, torch.bfloat16, torch.float32) or scores.dim() == 0:
        return False
    from accel.kernels.triton.block_topk import MAX_N

    return 0 < scores.shape[-1] <= MAX_N


def keep_by_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask of the fewest highest-scoring entries per row whose sum reaches ``threshold`` of the row sum.

    Non-negative scores. On CUDA (rows up to 4096 entries) a sort-free Triton kernel computes the same mask
    (``block_topk.threshold_mask``; ties go to the lower index, torch's sort breaks them arbitrarily)."""
    if threshold < 1.0 and fast_selection(scores):
        from accel.kernels.triton.block_topk import threshold_mask

        return threshold_mask(scores, threshold)
    return keep_by_threshold_torch(scores, threshold)


def keep_by_threshold_torch(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``keep_by_threshold`` in torch on any device (sort, cumulative sum, scatter): the Triton kernel's twin."""
    if threshold >= 1.0:
        return scores > 0 if threshold == 1.0 else torch.ones_like(scores, dtype=torch.bool)
    vals, order = torch.sort(scores, dim=-1, descending=True)
    csum = vals.cumsum(-1)
    total = csum[..., -1:]
    keep_sorted = (csum - vals) < threshold * total  # keep up to and including the block that crosses
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@dataclass
class BlockSelectPolicy(Policy):
    phases = ("prefill",)

    block_size: int = 128
    threshold: float = 0.9

    def validate(self) -> None:
        check_block_size(self)
        check_fraction(self, "threshold")

    def score(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def threshold_for(self, layer_idx: int) -> float:
        """The threshold of one layer (a subclass may calibrate them per layer)."""
        return self.threshold

    def plan(self, q, k, ctx):
        q_len, kv_len = q.shape[2], k.shape[2]
        if ctx.sliding_window is not None:
            return DenseLayout(window=ctx.sliding_window)  # the model's sliding layers keep their window
        if q_len < self.block_size:
            # shorter than one block: nothing to skip; recorded as density 1.0 in stats
            return DenseLayout()
        threshold = self.threshold_for(ctx.layer_idx)
        if threshold >= 1.0:
            bs = self.block_size
            causal, _ = causal_block_mask(q_len, kv_len, bs, bs, device=q.device)
            return build_block_layout(causal.expand(q.shape[0], q.shape[1], *causal.shape), q_len, kv_len, bs, bs)
        return self.layout_from_scores(self.score(q, k), threshold, q_len, kv_len)

    def layout_from_scores(self, scores: torch.Tensor, threshold: float, q_len: int, kv_len: int):
        """The layout of ``score``'s output at ``threshold`` (< 1): what ``plan`` returns, so a calibration can
        score once and try many thresholds (scripts/calibrate_xattention.py)."""
        bs = self.block_size
        if scores.dim() == 4 and fast_selection(scores):
            # one Triton pass: threshold over causal blocks + sink + diagonal, straight to the layout (the
            # kernel derives causality from the lengths: no block mask is built, six launches fewer per plan)
            from accel.kernels.triton.block_topk import threshold_layout

            return threshold_layout(scores, threshold, q_len, kv_len, bs, bs,
                                    max_blocks=layout_width(scores.shape[-1]))
        causal, _ = causal_block_mask(q_len, kv_len, bs, bs, device=scores.device)
        selected = keep_by_threshold(scores.masked_fill(~causal, 0), threshold)
        return build_block_layout(selected, q_len, kv_len, bs, bs)
