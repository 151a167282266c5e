"""Triton pooled block scores (FlexPrefill's query-aware estimate) and mean pooling vs the torch twins
``pooled_scores_reference`` / ``block_means`` (checked against brute force here). CPU under TRITON_INTERPRET=1; GPU
tests marked."""

import pytest
import torch

from accel.kernels.reference_estimation import block_means, pooled_scores_reference
from accel.kernels.reference_sparse import causal_block_mask
from accel.kernels.triton.pooled_score import mean_pool, pooled_block_scores, pooled_scores

TOL = dict(atol=1e-5, rtol=1e-5)


def _qk(B, Hq, Hkv, Sq, Sk, D, dtype, device="cpu", seed=0, scale=2.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (scale * torch.randn(B, Hq, Sq, D, generator=g)).to(device=device, dtype=dtype)
    k = (scale * torch.randn(B, Hkv, Sk, D, generator=g)).to(device=device, dtype=dtype)
    return q, k


def test_reference_matches_brute_force():
    q, k = _qk(1, 4, 2, 50, 70, 8, torch.float32)
    bs = 16
    got = pooled_scores_reference(q, k, bs)
    nq, nk = 4, 5
    causal, _ = causal_block_mask(50, 70, bs, bs)
    for h in range(4):
        for m in range(nq):
            qm = q[0, h, m * bs: (m + 1) * bs].mean(0)
            km = torch.stack([k[0, h // 2, n * bs: (n + 1) * bs].mean(0) for n in range(nk)])
            logits = (km @ qm) / 8**0.5
            want = torch.softmax(logits.masked_fill(~causal[m], float("-inf")), -1)
            torch.testing.assert_close(got[0, h, m], want)
    assert (got.masked_fill(causal, 0) == 0).all()


# (B, Hq, Hkv, Sq, Sk, D, block, dtype, config)
CASES = [
    (1, 4, 4, 100, 100, 64, 16, torch.float32, None),  # MHA, partial last block
    (1, 4, 1, 45, 173, 64, 16, torch.float32, None),  # GQA 4, Sq < Sk (bottom-right causal alignment)
    (2, 7, 1, 77, 130, 64, 8, torch.bfloat16, None),  # GQA 7, bf16, several key tiles
    (1, 8, 2, 300, 333, 128, 20, torch.bfloat16, dict(BLOCK_M=16, BLOCK_N=32)),  # block not a power of two
    (1, 2, 2, 64, 64, 128, 64, torch.float16, None),  # one block
    (1, 2, 1, 1, 50, 64, 16, torch.float32, None),  # a single query
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c[:-1]))
def test_matches_reference(case):
    B, Hq, Hkv, Sq, Sk, D, block, dtype, config = case
    q, k = _qk(B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq + Sk)
    got = pooled_scores(q, k, block=block, config=config)
    want = pooled_scores_reference(q, k, block)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_pool(k, block), block_means(k, block), **TOL)


def test_pooled_block_scores_scale_and_non_contiguous():
    q, k = _qk(1, 4, 2, 90, 120, 64, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    qp, kp = mean_pool(qt, 32), mean_pool(k, 32)
    got = pooled_block_scores(qp, kp, q_len=90, kv_len=120, block=32, scale=0.7)
    torch.testing.assert_close(got, pooled_scores_reference(q, k, 32, 0.7), **TOL)


def test_empty_query():
    q, k = _qk(1, 2, 1, 0, 40, 16, torch.float32)
    assert pooled_scores(q, k, block=16).shape == (1, 2, 0, 3)


def test_bad_inputs(monkeypatch):
    q, k = _qk(1, 2, 1, 40, 40, 16, torch.float32)
    with pytest.raises(ValueError, match="head_dim 24"):
        pooled_scores(torch.randn(1, 2, 40, 24), torch.randn(1, 1, 40, 24))
    with pytest.raises(ValueError, match="Sq <= Sk"):
        pooled_scores(q, k[:, :, :30])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        pooled_scores(q[:, :1], torch.cat([k, k], 1))
    with pytest.raises(ValueError, match="share one dtype"):
        pooled_scores(q, k.half())
    with pytest.raises(ValueError, match="float16, bfloat16, float32"):
        pooled_scores(q.double(), k.double())
    with pytest.raises(ValueError, match="batch or head_dim"):
        pooled_scores(q, k[..., :8])
    with pytest.raises(ValueError, match="block must be a positive int"):
        pooled_scores(q, k, block=0)
    with pytest.raises(ValueError, match="do not match q_len"):
        pooled_block_scores(mean_pool(q, 16), mean_pool(k, 16), q_len=40, kv_len=40, block=8)
    with pytest.raises(ValueError, match="float32"):
        pooled_block_scores(q.half(), k.half(), q_len=40, kv_len=40, block=1)
    with pytest.raises(ValueError, match="BLOCK_M"):
        pooled_scores(q, k, block=16, config=dict(BLOCK_M=8))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        pooled_scores(q, k, block=16)


def test_flexprefill_policy_routes_equivalently(monkeypatch):
    """FlexPrefill's layout is the same whether it estimates with the twins or the kernels (both kernels used)."""
    from accel.kernels.reference_sparse import layout_to_block_mask
    from accel.policies import AttentionContext
    from accel.policies import flexprefill as fp_mod
    from accel.policies import vertical_slash as vs_mod

    torch.manual_seed(0)
    common = torch.randn(2, 1, 32)
    q = torch.randn(1, 4, 640, 32) * 0.3 + common.repeat_interleave(2, 0)
    k = torch.randn(1, 2, 640, 32) * 0.3
    k[:, :, 300] = common[:, 0] * 2
    ctx = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None)
    for tau in (0.0, 1.0):  # vertical-slash heads only / query-aware heads only
        pol = fp_mod.FlexPrefillPolicy.from_options(block_size=64, min_budget=128, gamma=0.8, tau=tau)
        want = layout_to_block_mask(pol.plan(q, k, ctx), 10)
        with monkeypatch.context() as m:
            m.setattr(fp_mod, "_use_triton", lambda x: True)
            m.setattr(vs_mod, "_use_triton", lambda x: True)
            got = layout_to_block_mask(pol.plan(q, k, ctx), 10)
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, Hq, Hkv, Sq, Sk, D, block, config", [
    (torch.bfloat16, 32, 8, 3000, 4100, 128, 128, None),
    (torch.bfloat16, 28, 4, 8192, 8192, 128, 128, dict(BLOCK_M=32, BLOCK_N=128)),
    (torch.float16, 8, 8, 2049, 2049, 64, 64, None),
    (torch.float32, 8, 2, 1500, 2000, 256, 128, None),
])
def test_gpu_matches_reference(dtype, Hq, Hkv, Sq, Sk, D, block, config):
    q, k = _qk(1, Hq, Hkv, Sq, Sk, D, dtype, device="cuda", scale=1.5)
    got = pooled_scores(q, k, block=block, config=config)
    want = pooled_scores_reference(q, k, block)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_mean_pool_of_a_head_subset():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 70, 16)
    heads = torch.tensor([4, 0, 5])  # flat batch * H + head, any order
    got = mean_pool(x, 32, heads=heads)
    want = block_means(x.flatten(0, 1)[heads][None], 32)
    assert got.shape == (1, 3, 3, 16)
    torch.testing.assert_close(got, want)
