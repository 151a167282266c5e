"""kernels/triton/flex_layout.py against its torch twin (FlexPrefill's mask union + build_block_layout): exact
equality of counts and indices, with and without query-aware heads; FlexPrefillPolicy's Triton selection path
against its torch path, and its sync-free path (every head's pooled map, up to SYNC_FREE_BLOCKS key blocks) against
its selective one."""

import pytest
import torch

from accel.kernels.reference_sparse import build_block_layout, causal_block_mask
from accel.kernels.triton.flex_layout import flex_layout
from accel.kernels.triton.mass_threshold import mass_cut
from accel.policies.flexprefill import FlexPrefillPolicy, slash_block_mask


def _torch_layout(cols, diags, q_len, kv_len, bs, probs=None, cut=None, slots=None):
    sel = cols[:, :, None, :] | slash_block_mask(diags, q_len, kv_len, bs)
    if probs is not None:
        keep = probs.float().clamp_min(0).view(torch.int32) >= cut[..., None, None]  # [n_qa, nq, nk]
        qa = slots >= 0
        full = torch.zeros(*slots.shape, *probs.shape[1:], dtype=torch.bool)
        full[qa] = keep[slots[qa].long()]
        sel = sel | full
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
        probs = torch.rand(4, nq, nk, generator=g) ** 4 * causal  # rows of the four query-aware heads
        cut = mass_cut(probs.flatten(-2), 0.9)
        slots = torch.tensor([[2, -1, 0], [-1, 3, 1]])
        kw = dict(probs=probs, cut=cut, slots=slots)
    got = flex_layout(cols, diags, q_len, kv_len, bs, **kw)
    want = _torch_layout(cols, diags, q_len, kv_len, bs, kw.get("probs"), kw.get("cut"), kw.get("slots"))
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.indices, want.indices)
    assert got.ascending


def test_flex_layout_rejects_bad_shapes():
    cols = torch.zeros(1, 2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="key blocks"):
        flex_layout(cols, cols, 64, 100, 16)
    with pytest.raises(ValueError, match="probs must be"):
        flex_layout(cols, cols, 64, 64, 16, probs=torch.zeros(2, 3, 4), cut=torch.zeros(2, dtype=torch.int32),
                    slots=torch.tensor([[0, 1]]))


def _qk(S=768, D=16, heads=4, kv_heads=2):
    torch.manual_seed(0)
    common = torch.randn(kv_heads, 1, D)
    q = torch.randn(1, heads, S, D) * 0.4 + common.repeat_interleave(heads // kv_heads, 0)
    k = torch.randn(1, kv_heads, S, D) * 0.4
    k[:, :, 100] = common[:, 0] * 2
    return q, k


@pytest.mark.parametrize("tau", [0.0, 0.4, 1.0])  # no head / two of four heads / every head query-aware
def test_policy_triton_layout_matches_torch_path(tau):
    q, k = _qk()
    pol = FlexPrefillPolicy.from_options(block_size=64, min_budget=64, gamma=0.9, tau=tau)
    causal, _ = causal_block_mask(q.shape[2], k.shape[2], 64, 64)
    assert int(pol.estimate(q, k, causal.shape[1])["query_aware"].sum()) == {0.0: 0, 0.4: 2, 1.0: 4}[tau]
    want = build_block_layout(pol.select(q, k, causal), q.shape[2], k.shape[2], 64, 64)
    got = pol.select_layout(q, k)
    assert torch.equal(got.counts, want.counts)
    # the policy builds short rows at full width (no host sync); its first entries are the torch layout's
    assert got.indices.shape[-1] == causal.shape[1]
    assert torch.equal(got.indices[..., : want.indices.shape[-1]], want.indices)
    assert (got.counts < causal.sum(-1)).any()  # something was skipped


@pytest.mark.parametrize("tau", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("S_q, triton_estimate", [(768, False), (500, False), (768, True)])
def test_sync_free_layout_equals_selective_layout(tau, S_q, triton_estimate, monkeypatch):
    """Up to SYNC_FREE_BLOCKS key blocks every head's pooled probabilities are cut on the device and the heads that
    are not query-aware get slot -1; beyond, the query-aware heads are picked on the host. Same layout either way
    (with the twins or the Triton kernels estimating; queries fewer than keys too)."""
    from accel.policies import block_select
    from accel.policies import flexprefill as fp_mod
    from accel.policies import vertical_slash as vs_mod

    q, k = _qk()
    q = q[:, :, -S_q:]
    if triton_estimate:
        monkeypatch.setattr(fp_mod, "_use_triton", lambda x: True)
        monkeypatch.setattr(vs_mod, "_use_triton", lambda x: True)
    pol = FlexPrefillPolicy.from_options(block_size=64, min_budget=64, gamma=0.9, tau=tau)
    got = pol.select_layout(q, k)
    with monkeypatch.context() as m:
        m.setattr(block_select, "SYNC_FREE_BLOCKS", 0)
        want = pol.select_layout(q, k)
    nk = -(-k.shape[2] // 64)
    assert got.indices.shape[-1] == nk  # full width (the selective path: the widest row's)
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.indices[..., : want.indices.shape[-1]], want.indices)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_policy_triton_layout_on_gpu_matches_torch_path():
    """At a real shape on the device (Llama-3.1-8B heads, 16K, bf16): the Triton path keeps the same blocks as the
    torch masks (the float atomics of the mass cut may move a cut that lands exactly on a boundary: allow 0.1%)."""
    from accel.kernels.reference_sparse import layout_to_block_mask
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from bench_estimation import structured_qkv

    q, k, _ = structured_qkv(16384, 32, 8, 128, "cuda")
    for tau in (0.0, 0.1, 1.0):
        pol = FlexPrefillPolicy.from_options(tau=tau)
        causal, _ = causal_block_mask(16384, 16384, 128, 128, device="cuda")
        want = build_block_layout(pol.select(q, k, causal), 16384, 16384, 128, 128)
        got = pol.select_layout(q, k)
        a, b = layout_to_block_mask(got, 128), layout_to_block_mask(want, 128)
        assert (a != b).float().mean() < 1e-3
        assert (a & ~causal).sum() == 0
