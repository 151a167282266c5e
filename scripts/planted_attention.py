"""Random-weight models whose attention has the structure of a real model's: planted sinks, locality, heavy columns.

With plain random weights every query attends almost uniformly to every key, so a sparse prefill policy at its
defaults keeps ~95% of the blocks and an end-to-end benchmark times dense attention under another name. Real long
context attention is the opposite: most of each row's mass sits on a sink, a local window and a few heavy columns.
``plant`` edits a random-weight Llama/Qwen-shaped model (built with ``attention_bias=True``) so that its own forward
produces that structure; everything else (projections, MLPs, RoPE, the policies' estimation) is the model's ordinary
code, so the timing is real and the recall each policy reaches on it is measured, not assumed.

- Locality: every KV head's query and key projections get the same bias, non-zero on the RoPE frequency pairs that
  turn at least once within a span (256, 1K, 4K or 16K tokens, rotating over heads and layers: the longer the span,
  the more pairs and the sharper the peak). After RoPE the bias-bias term of a logit is
  ``sum_f a^2 cos(theta_f (i - j))``: highest on the diagonal, decaying with distance and averaging to zero far away
  (with deterministic ripples: faint slash lines, as real heads have).
- Sinks and heavy columns, as massive activations: token id 1 (placed at position 0) and token id 2 (placed at a few
  random positions) have embeddings hundreds of times larger than the others along hidden unit 0 (resp. 1), so after
  RMSNorm their hidden state is that unit. The key projection maps those units onto the slowest RoPE pairs (almost
  unrotated over 128K), where every query carries a constant bias: every query sees them as high-logit columns. Their
  value projections are zero on those units, so, like real sinks, they absorb attention without adding to it.
- The random part of the query and key projections is rescaled so that content noise (std 0.5 per q/k entry, any
  hidden size) stays under the structure.

The constants were chosen on a small model of head_dim 128 on the CPU so that the policies' density and recall at
their defaults look like those measured on the real Gemma-3-270M at 32K (results/bench_e2e_gemma3_real.md: density
0.07-0.10, recall 0.97-0.99); the benchmark measures and reports both on the planted model itself.
"""

from __future__ import annotations

import torch

SINK_ID, HEAVY_ID = 1, 2  # the benchmark draws ordinary token ids from [10, vocab - 10)
SPANS = (256, 1024, 4096, 16384)
LOCAL_GAIN = 0.5  # scale * a^2: peak logits of 14-24 at the diagonal, for the 28-48 pairs of these spans
SINK_LOGIT, HEAVY_LOGIT = 20.0, 10.0
SLOW_PAIRS = 4  # RoPE pairs kept for sinks and heavy columns (the slowest: < 0.4 rad over 128K at theta 5e5)
RANDOM_STD = 0.5  # std of the random (content) part of each query/key entry, whatever the hidden size


def _attn_layers(model):
    return [layer.self_attn for layer in model.model.layers]


def plant(model, cfg=None) -> None:
    """Edit the attention weights of a random-weight model in place (see the module docstring)."""
    cfg = cfg or model.config
    if any(a.q_proj.bias is None or a.k_proj.bias is None for a in _attn_layers(model)):
        raise ValueError("planted attention needs q/k projection biases: build the model with attention_bias=True")
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    half = D // 2
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    freq = theta ** (-2 * torch.arange(half, dtype=torch.float64) / D)  # rad/token of RoPE pair f (dims f, f + D/2)
    scale = D ** -0.5
    amp = (LOCAL_GAIN / scale) ** 0.5
    slow = torch.arange(half - SLOW_PAIRS, half)
    # hidden unit 0 (sink) or 1 (heavy) reaches ~sqrt(hidden) after RMSNorm; spread the logit over the slow pairs
    unit = cfg.hidden_size ** 0.5
    w_sink = (SINK_LOGIT / (scale * SLOW_PAIRS * unit))  # key weight per slow pair with a query bias of 1
    w_heavy = (HEAVY_LOGIT / (scale * SLOW_PAIRS * unit))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        # large enough to stay the dominant unit of these tokens' residual stream after every layer has added its
        # O(1)-per-unit output (so the structure holds in the last layer as in the first)
        big = 100.0 * (cfg.hidden_size * cfg.num_hidden_layers) ** 0.5
        emb[SINK_ID].zero_()
        emb[SINK_ID, 0] = big
        emb[HEAVY_ID].zero_()
        emb[HEAVY_ID, 1] = big
        emb[10:, :2] = 0.0  # ordinary tokens: nothing on the sink/heavy units at the input
        for li, attn in enumerate(_attn_layers(model)):
            for proj in (attn.q_proj, attn.k_proj):
                # RMSNorm'd hidden entries are ~unit: an entry of q or k has std w.std() * sqrt(hidden)
                proj.weight.mul_(RANDOM_STD / (proj.weight.float().std() * cfg.hidden_size ** 0.5))
                proj.weight[:, :2] = 0.0
                proj.bias.zero_()
            for proj in (attn.v_proj,):
                proj.weight[:, :2] = 0.0  # sinks absorb attention, they add (almost) nothing to the output
                if proj.bias is not None:
                    proj.bias.zero_()
            if attn.o_proj.bias is not None:
                attn.o_proj.bias.zero_()
            qb = attn.q_proj.bias.view(H, D)
            kb = attn.k_proj.bias.view(Hkv, D)
            kw = attn.k_proj.weight.view(Hkv, D, -1)
            for h in range(Hkv):
                span = SPANS[(h + li) % len(SPANS)]
                local = (freq >= 1.0 / span).nonzero().flatten()
                local = local[local < half - SLOW_PAIRS]
                kb[h, local] = amp
                kw[h, slow, :] = 0.0
                kw[h, slow, 0] = w_sink
                kw[h, slow, 1] = w_heavy
                for g in range(H // Hkv):
                    qb[h * (H // Hkv) + g, local] = amp
                    qb[h * (H // Hkv) + g, slow] = 1.0
                    attn.q_proj.weight.view(H, D, -1)[h * (H // Hkv) + g, slow] = 0.0


def plant_ids(ids: torch.Tensor, n_heavy: int = 15, seed: int = 0) -> torch.Tensor:
    """Token ids with the sink token at position 0 and ``n_heavy`` heavy tokens at random positions."""
    ids = ids.clone()
    ids[:, 0] = SINK_ID
    S = ids.shape[1]
    if S > 2 and n_heavy:
        g = torch.Generator().manual_seed(seed)
        pos = torch.randperm(S - 1, generator=g)[:n_heavy] + 1
        ids[:, pos.to(ids.device)] = HEAVY_ID
    return ids
