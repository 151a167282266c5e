"""Triton ProxyAttn proxy-head block scores vs the torch reference ``proxy_block_scores`` (itself tested against a
brute force in test_policy_proxy.py). CPU under TRITON_INTERPRET=1; GPU tests marked."""

import pytest
import torch

from accel.kernels.triton.proxy_score import proxy_scores
from accel.policies.proxy import proxy_block_scores

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-4, rtol=2e-4),
       torch.float16: dict(atol=2e-4, rtol=2e-4)}


def _qk(B, Hq, Hkv, Sq, Sk, D, dtype, device="cpu", seed=0, scale=2.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (scale * torch.randn(B, Hq, Sq, D, generator=g) / D**0.25).to(device=device, dtype=dtype)
    k = (scale * torch.randn(B, Hkv, Sk, D, generator=g) / D**0.25).to(device=device, dtype=dtype)
    return q, k


def _sampled_rows(Sq, block, stride):
    """Sampled rows per query block (the last of each ``stride`` rows; the final one clamped to the last query)."""
    rows = torch.arange(stride - 1, Sq + stride - 1, stride).clamp_max(Sq - 1)
    return torch.bincount(rows // block, minlength=-(-Sq // block)).float()


# (B, Hq, Hkv, Sq, Sk, D, block, stride, heads_per_proxy, dtype, config)
CASES = [
    (1, 4, 4, 100, 100, 64, 32, 4, 1, torch.float32, None),  # MHA, odd length, per 1
    (1, 4, 1, 45, 173, 64, 64, 8, 4, torch.float32, None),  # GQA 4, Sq < Sk (chunk on top of a cache), per = group
    (1, 4, 1, 45, 173, 64, 64, 8, 2, torch.float32, None),  # per divides the group: still one KV head per proxy
    (2, 7, 1, 77, 77, 64, 32, 8, 7, torch.bfloat16, None),  # GQA 7, batch 2, bf16
    (1, 8, 2, 130, 250, 128, 64, 16, 8, torch.float32, dict(BLOCK_R=16, BLOCK_C=128)),  # per 2 groups, head_dim 128
    (1, 6, 2, 90, 131, 64, 32, 4, 2, torch.float16, dict(BLOCK_R=32, BLOCK_C=64)),  # per 2 of 3: pooled K prepass
    (1, 4, 2, 64, 64, 64, 64, 16, 4, torch.bfloat16, None),  # one query block, pooled K over 2 KV heads
    (1, 2, 1, 1, 50, 64, 32, 8, 2, torch.float32, None),  # a single query
]


@pytest.mark.parametrize("method", ["lse", "two_pass"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c[:-1]))
def test_matches_reference(case, method):
    B, Hq, Hkv, Sq, Sk, D, block, stride, per, dtype, config = case
    q, k = _qk(B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq + Sk)
    got = proxy_scores(q, k, block=block, heads_per_proxy=per, stride=stride, config=config, method=method)
    want = proxy_block_scores(q, k, block, per, stride)
    assert got.dtype == torch.float32 and got.shape == want.shape == (B, Hq // per, -(-Sq // block), -(-Sk // block))
    torch.testing.assert_close(got, want, **TOL[dtype])
    # each query-block row sums to its number of sampled rows
    torch.testing.assert_close(got.sum(-1), _sampled_rows(Sq, block, stride).expand_as(got[..., 0]),
                               atol=1e-4, rtol=1e-4)


def test_lse_scratch_in_proxy_groups(monkeypatch):
    # a scratch limit below one proxy's rows: every proxy (and batch row) goes through its own launch and softmax
    import accel.kernels.triton.proxy_score as ps

    q, k = _qk(2, 6, 3, 90, 131, 64, torch.float32, seed=3)
    whole = proxy_scores(q, k, block=32, heads_per_proxy=2, stride=4, method="lse")
    monkeypatch.setattr(ps, "LSE_SCRATCH_BYTES", 1)
    grouped = proxy_scores(q, k, block=32, heads_per_proxy=2, stride=4, method="lse")
    torch.testing.assert_close(grouped, whole, atol=1e-6, rtol=1e-6)  # torch reductions: shape-dependent rounding
    torch.testing.assert_close(grouped, proxy_block_scores(q, k, 32, 2, 4), **TOL[torch.float32])


def test_bad_method():
    q, k = _qk(1, 2, 1, 40, 40, 64, torch.float32)
    with pytest.raises(ValueError, match="method"):
        proxy_scores(q, k, block=32, stride=4, method="one_pass")


def test_default_heads_per_proxy_is_the_group():
    q, k = _qk(1, 8, 2, 70, 70, 64, torch.float32)
    torch.testing.assert_close(proxy_scores(q, k, block=32, stride=8), proxy_block_scores(q, k, 32, 4, 8),
                               **TOL[torch.float32])


def test_non_contiguous_inputs():
    q, k = _qk(1, 4, 2, 90, 120, 64, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] storage, as after a projection
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    torch.testing.assert_close(proxy_scores(qt, kt, block=32, heads_per_proxy=2, stride=4),
                               proxy_block_scores(q, k, 32, 2, 4), **TOL[torch.float32])


def test_empty_query():
    q, k = _qk(1, 2, 1, 0, 40, 64, torch.float32)
    assert proxy_scores(q, k, block=32, stride=4).shape == (1, 1, 0, 2)


@pytest.mark.parametrize("kw, msg", [
    (dict(block=32, stride=3), "must divide block"),
    (dict(block=48, stride=4), "powers of two"),
    (dict(block=32, stride=0), "positive int"),
    (dict(block=32, stride=4, heads_per_proxy=3), "must divide the 2 query heads"),
    (dict(block=256, stride=1), "<= 128"),
])
def test_bad_options(kw, msg):
    q, k = _qk(1, 2, 1, 40, 40, 64, torch.float32)
    with pytest.raises(ValueError, match=msg):
        proxy_scores(q, k, **kw)


def test_bad_inputs(monkeypatch):
    q, k = _qk(1, 2, 1, 40, 40, 64, torch.float32)
    with pytest.raises(ValueError, match="head_dim 24"):
        proxy_scores(torch.randn(1, 2, 40, 24), torch.randn(1, 1, 40, 24))
    with pytest.raises(ValueError, match="Sq <= Sk"):
        proxy_scores(q, k[:, :, :30])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        proxy_scores(q[:, :1], torch.cat([k, k], 1))
    with pytest.raises(ValueError, match="share one dtype"):
        proxy_scores(q, k.half())
    with pytest.raises(ValueError, match="share one dtype"):
        proxy_scores(q.double(), k.double())
    with pytest.raises(ValueError, match="batch or head_dim"):
        proxy_scores(q, k[..., :32])
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        proxy_scores(q[0], k[0])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        proxy_scores(q, k)


def test_proxy_policy_scores_route_equivalently():
    """The policy's GPU layout path (Triton scores + Triton selection) gives the torch path's layout."""
    from accel.kernels.reference_sparse import build_block_layout, causal_block_mask
    from accel.policies.proxy import ProxyPolicy

    q, k = _qk(1, 4, 2, 256, 256, 64, torch.float32, scale=3.0)
    pol = ProxyPolicy.from_options(block_size=64, gamma=0.8, query_stride=8)
    causal, _ = causal_block_mask(256, 256, 64, 64)
    want = build_block_layout(pol.select(q, k, causal), 256, 256, 64, 64)
    got = pol.select_layout(q, k, causal)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)
    a = proxy_scores(q, k, block=64, heads_per_proxy=2, stride=8)
    b = proxy_block_scores(q, k, 64, 2, 8)
    torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, block, stride, per, Sq, Sk, config", [
    (torch.bfloat16, 128, 8, 4, 3000, 4100, None),
    (torch.bfloat16, 128, 8, 4, 4096, 4096, dict(BLOCK_R=128, BLOCK_C=64, num_warps=8, num_stages=3)),
    (torch.bfloat16, 128, 16, 8, 2500, 2500, None),  # pooled K over 2 KV heads
    (torch.float16, 64, 4, 1, 2049, 2049, dict(BLOCK_R=64, BLOCK_C=64, num_warps=4, num_stages=3)),
    (torch.float32, 64, 8, 4, 1500, 2000, None),
])
@pytest.mark.parametrize("method", ["lse", "two_pass"])
def test_gpu_matches_reference(dtype, block, stride, per, Sq, Sk, config, method):
    q, k = _qk(1, 8, 2, Sq, Sk, 128, dtype, device="cuda", scale=1.5)
    got = proxy_scores(q, k, block=block, heads_per_proxy=per, stride=stride, config=config, method=method)
    want = proxy_block_scores(q, k, block, per, stride)
    # bf16/fp16: the pooled queries are rounded to the input dtype for the tensor-core dots
    torch.testing.assert_close(got, want, atol=5e-3, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_long_context_row_sums():
    """32K, Llama-3.1-8B head shape: finite, and each query-block row sums to its sampled rows (16)."""
    q, k = _qk(1, 32, 8, 32768, 32768, 128, torch.bfloat16, device="cuda", scale=1.0)
    got = proxy_scores(q, k)
    assert got.shape == (1, 8, 256, 256) and torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.full_like(got[..., 0], 16.0), atol=1e-2, rtol=1e-3)
