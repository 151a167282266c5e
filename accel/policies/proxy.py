from __future__ import annotations

from dataclasses import dataclass

import torch

from accel.kernels.reference_sparse import build_block_layout, causal_block_mask
from accel.layouts import DenseLayout

from .base import Policy, require_positive
from .block_select import check_block_size, check_fraction, fast_selection, layout_width
from .flexprefill import pooled_means, tokens_to_cover, top_n_mask
from .threshold_map import LayerThresholds


def proxy_block_scores(q: torch.Tensor, k: torch.Tensor, block: int, heads_per_proxy: int, stride: int,
                       chunk_rows: int = 512) -> torch.Tensor:
    """Token-level scores of pooled proxy heads, summed per block: [B, n_proxies, n_q_blocks, n_k_blocks].

    Proxy p averages query heads ``p*heads_per_proxy ..`` (and the KV heads they read); queries are sampled every
    ``stride`` rows (the last of each ``stride`` rows), each softmaxed over its causal keys at token resolution."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    P = Hq // heads_per_proxy
    kv_of = torch.arange(Hq, device=q.device) // (Hq // Hkv)
    qp = q.float().reshape(B, P, heads_per_proxy, Sq, D).mean(2)
    kp = k.float()[:, kv_of].reshape(B, P, heads_per_proxy, Sk, D).mean(2)
    rows = torch.arange(stride - 1, Sq + stride - 1, stride, device=q.device).clamp_max(Sq - 1)
    nq, nk = -(-Sq // block), -(-Sk // block)
    out = torch.zeros(B, P, nq, nk, dtype=torch.float32, device=q.device)
    key_block = torch.arange(Sk, device=q.device) // block
    for r0 in range(0, rows.numel(), chunk_rows):
        r = rows[r0: r0 + chunk_rows]
        logits = torch.matmul(qp[:, :, r], kp.transpose(-1, -2)) * D**-0.5  # [B, P, R, Sk]
        pos = (Sk - Sq + r)[:, None]
        logits = logits.masked_fill(torch.arange(Sk, device=q.device)[None, :] > pos, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        per_block = torch.zeros(B, P, r.numel(), nk, device=q.device).index_add_(-1, key_block, probs)
        out.index_add_(2, r // block, per_block)
    return out


def _triton_scores(q: torch.Tensor, k: torch.Tensor) -> bool:
    """The Triton proxy-score kernel takes these inputs (CUDA, a head_dim and dtype it supports)."""
    from accel.kernels.triton.checks import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    return q.is_cuda and q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES and k.dtype == q.dtype


def block_scores(q: torch.Tensor, k: torch.Tensor, block: int, heads_per_proxy: int, stride: int) -> torch.Tensor:
    """``proxy_block_scores``, through the Triton kernel (kernels/triton/proxy_score.py) on CUDA."""
    if _triton_scores(q, k):
        from accel.kernels.triton.proxy_score import proxy_scores

        return proxy_scores(q, k, block=block, heads_per_proxy=heads_per_proxy, stride=stride)
    return proxy_block_scores(q, k, block, heads_per_proxy, stride)


@dataclass
class ProxyPolicy(LayerThresholds, Policy):
    """ProxyAttn (Wang et al. 2025, arXiv 2509.24745): attention heads attend to largely the same tokens but differ
    in how sparse they are. So heads are pooled (not tokens): each proxy head averages ``heads_per_proxy`` query
    heads (default 0 = one proxy per GQA group, where pooling queries is exact pooling of logits) and scores keys at
    token resolution for queries sampled every ``query_stride`` rows; those scores summed per block rank the key
    blocks of every head in the group. Each head then keeps as many top-ranked blocks as its own *block-aware
    budget* says: the fewest blocks whose mass reaches ``gamma`` in the head's cheap block-level estimate
    (mean-pooled query block against mean-pooled key blocks), per query block, and never fewer than the proxy's own
    token-level scores need to reach ``gamma``; first and diagonal blocks always.

    Our reading of the paper (its code could not be consulted here): grouping, query sampling and the budget rule
    follow the paper's description; the exact group sizes and sampling of the authors' code may differ. The floor
    at the proxy's own budget is ours: on SmolLM2-135M at 2K tokens the pooled per-head budget alone kept 0.89 of
    the attention mass (density 0.45), with the floor 0.94 (density 0.57).
    Default ``gamma`` 0.94 (0.9 before): at 0.9 the demo models keep mean recall 0.932 (SmolLM2-135M, 2K/4K) and
    0.930 (Gemma-3-270M, 4K/8K), below issue 5's 0.95; 0.93 lands on the edge on SmolLM2 (0.952, 4K prompts 0.946);
    0.94 keeps 0.959 / 0.962 at density 0.60 / 0.78 (0.95: 0.966 / 0.970 at 0.63 / 0.81). Sampling every 4th
    query instead of every 8th changes recall by <= 0.003 (results/recall_sweep.md).
    ``gamma=1`` keeps every causal block (dense).

    Per-layer ``gamma`` (``layer_thresholds``, as XAttention's and FlexPrefill's: policies/threshold_map.py): a map
    from ``scripts/calibrate_xattention.py MODEL --policy proxy`` holds per layer the smallest gamma whose layouts
    keep a target recall on calibration prompts; ``"auto"`` (default) uses the shipped one that fits the model
    (configs/proxy_*.json), ``"none"`` or an explicit ``gamma`` one value for every layer."""

    name = "proxy"
    phases = ("prefill",)
    description = "pooled proxy heads rank key blocks for their head group; per-head block-aware budget"
    paper = "ProxyAttn (arXiv 2509.24745)"

    block_size: int = 128
    gamma: float = 0.94  # see the docstring
    heads_per_proxy: int = 0
    query_stride: int = 8
    layer_thresholds: str = "auto"  # per-layer gamma: "auto" | "none" | shipped name | .json path (see the docstring)

    _layer_option = "gamma"

    def validate(self) -> None:
        self._check_layer_thresholds()
        check_block_size(self)
        check_fraction(self, "gamma")
        require_positive(self, "query_stride")
        if self.heads_per_proxy < 0:
            raise ValueError(f"option 'heads_per_proxy' of policy 'proxy' must be >= 0 (0: one proxy per GQA "
                             f"group), got {self.heads_per_proxy}")
        if self.block_size % self.query_stride:
            raise ValueError(f"option 'query_stride' ({self.query_stride}) must divide block_size ({self.block_size})")

    def check_model(self, model) -> None:
        """Called by accel.patch: ``heads_per_proxy`` must divide the model's query heads (else the first prefill of
        ``block_size`` tokens or more would fail); then the per-layer gamma map."""
        cfg = getattr(model.config, "text_config", None) or model.config
        hq, per = cfg.num_attention_heads, self.heads_per_proxy
        if per and hq % per:
            divisors = [d for d in range(1, hq + 1) if hq % d == 0]
            raise ValueError(f"option 'heads_per_proxy' ({per}) of policy 'proxy' must divide the model's {hq} query "
                             f"heads; pass one of {divisors}, or 0 (one proxy per GQA group)")
        super().check_model(model)

    def plan(self, q, k, ctx):
        q_len, kv_len = q.shape[2], k.shape[2]
        bs = self.block_size
        if ctx.sliding_window is not None:
            return DenseLayout(window=ctx.sliding_window)
        if q_len < bs:
            return DenseLayout()  # nothing to skip; recorded as density 1.0
        layer = self.at_layer(ctx.layer_idx)
        if layer is not self:  # this layer's calibrated gamma
            return layer.plan(q, k, ctx)
        causal, _ = causal_block_mask(q_len, kv_len, bs, bs, device=q.device)
        if self.gamma >= 1.0:
            return build_block_layout(causal.expand(q.shape[0], q.shape[1], *causal.shape), q_len, kv_len, bs, bs)
        if q.is_cuda and fast_selection(causal.float()[:1]):  # rows the Triton selection takes
            return self.select_layout(q, k, causal)
        return build_block_layout(self.select(q, k, causal), q_len, kv_len, bs, bs)

    def _proxies(self, q, k) -> int:
        Hq, Hkv = q.shape[1], k.shape[1]
        per = self.heads_per_proxy or Hq // Hkv
        if Hq % per:
            raise ValueError(f"option 'heads_per_proxy' ({per}) of policy 'proxy' must divide the model's "
                             f"{Hq} query heads")
        return per

    def _own_distribution(self, q, k, causal):
        """Each head's cheap block-level estimate: mean-pooled query blocks against mean-pooled key blocks."""
        Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
        q_pool = pooled_means(q, self.block_size)  # the Triton mean-pool on CUDA: no float32 copy of q
        k_pool = pooled_means(k, self.block_size).repeat_interleave(Hq // Hkv, dim=1)
        logits = torch.matmul(q_pool, k_pool.transpose(-1, -2)) * D**-0.5
        return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)  # [B, Hq, nq, nk]

    def select(self, q, k, causal):
        """Selected blocks (bool [B, Hq, nq, nk]), torch path."""
        per = self._proxies(q, k)
        ranking = block_scores(q, k, self.block_size, per, self.query_stride)
        proxy_budget = tokens_to_cover(ranking.masked_fill(~causal, 0.0), self.gamma).repeat_interleave(per, dim=1)
        ranking = ranking.masked_fill(~causal, -1.0).repeat_interleave(per, dim=1)  # [B, Hq, nq, nk]
        # block-aware budget of each head: its own pooled block distribution, per query block
        own = self._own_distribution(q, k, causal)
        budget = torch.maximum(tokens_to_cover(own, self.gamma), proxy_budget)  # blocks per (head, query block)
        return top_n_mask(ranking, budget) & causal

    def select_layout(self, q, k, causal):
        """``build_block_layout(select(...))`` on the GPU without sorts: Triton proxy scores (when the kernel takes
        the inputs), budgets and per-row top-n through kernels/triton/block_topk.py, straight to the layout; the
        proxy's scores are never repeated over its heads."""
        from accel.kernels.triton.block_topk import threshold_counts, topn_layout

        per = self._proxies(q, k)
        bs = self.block_size
        ranking = block_scores(q, k, bs, per, self.query_stride)  # [B, P, nq, nk]
        proxy_budget = threshold_counts(ranking.masked_fill(~causal, 0.0), self.gamma).repeat_interleave(per, dim=1)
        own_budget = threshold_counts(self._own_distribution(q, k, causal), self.gamma)
        budget = torch.maximum(own_budget, proxy_budget)
        return topn_layout(ranking, budget, q.shape[2], k.shape[2], bs, bs, max_blocks=layout_width(ranking.shape[-1]))
