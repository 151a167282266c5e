"""kernels/triton/flex_layout.py against its torch twin (FlexPrefill's mask union + build_block_layout): exact
equality of counts and indices, with and without query-aware heads; and FlexPrefillPolicy's Triton selection path
against its torch path."""

import pytest
import torch

from accel.kernels.reference_sparse import build_block_layout, causal_block_mask
from accel.kernels.triton.flex_layout import flex_layout
from accel.kernels.triton.mass_threshold import mass_cut
from accel.policies.flexprefill import FlexPrefillPolicy, slash_block_mask


def _torch_layout(cols, diags, q_len, kv_len, bs, probs=None, cut=None, qa=None):
    sel = cols[:, :, None, :] | slash_block_mask(diags, q_len, kv_len, bs)
    if probs is not None:
        keep = probs.float().clamp_min(0).view(torch.int32) >= cut[..., None, None]
        sel = sel | (keep & qa[..., None, None])
    causal, _ = causal_block_mask(q_len, kv_len, bs, bs)
    return build_block_layout(sel & causal, q_len, kv_len, bs, bs)


@pytest.mark.parametrize("q_len, kv_len, bs", [(256, 256, 32), (200, 330, 32), (64, 300, 16), (17, 17, 16)])
@pytest.mark.parametrize("with_qa", [False, True])
def test_flex_layout_matches_torch(q_len, kv_len, bs, with_qa):
    g = torch.Generator().manual_seed(q_len + kv_len)
    B, H = 2, 3
    nq, nk = -(-q_len // bs), -(-kv_len // bs)
    cols = torch.rand(B, H, nk, generator=g) < 0.2
    diags = torch.rand(B, H, nk, generator=g) < 0.15
    kw = {}
    if with_qa:
        causal, _ = causal_block_mask(q_len, kv_len, bs, bs)
        probs = torch.rand(B, H, nq, nk, generator=g) ** 4 * causal
        cut = mass_cut(probs.flatten(-2), 0.9)
        qa = torch.tensor([[True, False, True], [False, True, True]])
        kw = dict(probs=probs, cut=cut, query_aware=qa)
    got = flex_layout(cols, diags, q_len, kv_len, bs, **kw)
    want = _torch_layout(cols, diags, q_len, kv_len, bs, kw.get("probs"), kw.get("cut"), kw.get("query_aware"))
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.indices, want.indices)
    assert got.ascending


def test_flex_layout_rejects_bad_shapes():
    cols = torch.zeros(1, 2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="key blocks"):
        flex_layout(cols, cols, 64, 100, 16)
    with pytest.raises(ValueError, match="probs must be"):
        flex_layout(cols, cols, 64, 64, 16, probs=torch.zeros(1, 2, 3, 4), cut=torch.zeros(1, 2, dtype=torch.int32),
                    query_aware=torch.ones(1, 2, dtype=torch.bool))


def _qk(S=768, D=16, heads=4, kv_heads=2):
    torch.manual_seed(0)
    common = torch.randn(kv_heads, 1, D)
    q = torch.randn(1, heads, S, D) * 0.4 + common.repeat_interleave(heads // kv_heads, 0)
    k = torch.randn(1, kv_heads, S, D) * 0.4
    k[:, :, 100] = common[:, 0] * 2
    return q, k


@pytest.mark.parametrize("tau", [0.0, 1.0])  # no head query-aware / every head query-aware
def test_policy_triton_layout_matches_torch_path(tau):
    q, k = _qk()
    pol = FlexPrefillPolicy.from_options(block_size=64, min_budget=64, gamma=0.9, tau=tau)
    causal, _ = causal_block_mask(q.shape[2], k.shape[2], 64, 64)
    want = build_block_layout(pol.select(q, k, causal), q.shape[2], k.shape[2], 64, 64)
    got = pol.select_layout(q, k)
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.indices, want.indices)
    assert (got.counts < causal.sum(-1)).any()  # something was skipped
