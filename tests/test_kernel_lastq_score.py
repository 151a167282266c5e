"""Triton last-query scores (MInference vertical / slash mass) vs the torch twin ``lastq_scores_reference`` (itself
checked against brute force here). CPU under TRITON_INTERPRET=1; GPU tests marked."""

import pytest
import torch

from accel.kernels.reference_estimation import last_query_attention, lastq_scores_reference
from accel.kernels.triton.lastq_score import lastq_scores

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-4, rtol=2e-4),
       torch.float16: dict(atol=2e-4, rtol=2e-4)}


def _qk(B, Hq, Hkv, Sq, Sk, D, dtype, device="cpu", seed=0, scale=2.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (scale * torch.randn(B, Hq, Sq, D, generator=g)).to(device=device, dtype=dtype)
    k = (scale * torch.randn(B, Hkv, Sk, D, generator=g)).to(device=device, dtype=dtype)
    return q, k


def _compare(q, k, n_last, scale=None, config=None):
    vert, slash = lastq_scores(q, k, n_last, scale=scale, config=config)
    want_v, want_s = lastq_scores_reference(q, k, n_last, scale)
    assert vert.dtype == slash.dtype == torch.float32 and vert.shape == want_v.shape == slash.shape
    torch.testing.assert_close(vert, want_v, **TOL[q.dtype])
    torch.testing.assert_close(slash, want_s, **TOL[q.dtype])
    return vert, slash


def test_reference_matches_brute_force():
    q, k = _qk(1, 4, 2, 20, 30, 8, torch.float32)
    vert, slash = lastq_scores_reference(q, k, 5, heads_per_chunk=1)
    want_v, want_s = torch.zeros(4, 30), torch.zeros(4, 30)
    for h in range(4):
        for i in range(5):
            pos = 30 - 5 + i
            p = torch.softmax(q[0, h, 15 + i] @ k[0, h // 2, : pos + 1].T / 8**0.5, -1)
            want_v[h, : pos + 1] += p
            want_s[h, : pos + 1] += p.flip(0)  # offset pos - j
    torch.testing.assert_close(vert[0], want_v)
    torch.testing.assert_close(slash[0], want_s)
    torch.testing.assert_close(vert, last_query_attention(q, k, 5).sum(-2))


# (B, Hq, Hkv, Sq, Sk, D, n_last, dtype, config)
CASES = [
    (1, 4, 4, 90, 90, 64, 13, torch.float32, None),  # MHA, n_last odd
    (1, 4, 1, 45, 173, 64, 37, torch.float32, dict(BLOCK_M=128, CHUNK=32)),  # GQA 4 (2 heads/tile), Sq < Sk, chunks
    (2, 7, 1, 77, 130, 64, 50, torch.bfloat16, dict(BLOCK_M=256, CHUNK=64)),  # GQA 7: 4 heads/tile, 3 in the last
    (1, 8, 2, 40, 95, 64, 13, torch.float32, dict(BLOCK_M=64, CHUNK=32)),  # 4 heads of 13 (padded 16) per tile
    (1, 8, 2, 33, 100, 128, 64, torch.bfloat16, dict(BLOCK_M=64, CHUNK=48)),  # n_last > Sq, head_dim 128
    (1, 2, 1, 150, 151, 64, 140, torch.float32, None),  # n_last > MAX_ROWS: two accumulating launches
    (1, 2, 2, 1, 50, 64, 64, torch.float16, None),  # a single query
    (1, 4, 2, 60, 61, 128, 1, torch.float32, dict(CHUNK=16)),  # one last query
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c[:-1]))
def test_matches_reference(case):
    B, Hq, Hkv, Sq, Sk, D, n_last, dtype, config = case
    q, k = _qk(B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq + Sk)
    vert, slash = _compare(q, k, n_last, config=config)
    n = min(n_last, Sq)
    # every query's softmax sums to one: each head's vertical and slash sum to n
    torch.testing.assert_close(vert.sum(-1), torch.full((B, Hq), float(n)), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(slash.sum(-1), torch.full((B, Hq), float(n)), atol=1e-3, rtol=1e-4)


def test_custom_scale_and_non_contiguous():
    q, k = _qk(1, 4, 2, 70, 90, 64, torch.float32, scale=1.0)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] storage, as after a projection
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    got = lastq_scores(qt, kt, 20, scale=0.3)
    want = lastq_scores_reference(q, k, 20, 0.3)
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1], want[1], **TOL[torch.float32])


def test_empty_query():
    q, k = _qk(1, 2, 1, 0, 40, 16, torch.float32)
    v, s = lastq_scores(q, k, 8)
    assert v.shape == s.shape == (1, 2, 40) and not v.any() and not s.any()


def test_bad_inputs(monkeypatch):
    q, k = _qk(1, 2, 1, 40, 40, 16, torch.float32)
    with pytest.raises(ValueError, match="head_dim 24"):
        lastq_scores(torch.randn(1, 2, 40, 24), torch.randn(1, 1, 40, 24))
    with pytest.raises(ValueError, match="Sq <= Sk"):
        lastq_scores(q, k[:, :, :30])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        lastq_scores(q[:, :1], torch.cat([k, k], 1))
    with pytest.raises(ValueError, match="share one dtype"):
        lastq_scores(q, k.half())
    with pytest.raises(ValueError, match="share one dtype"):
        lastq_scores(q.double(), k.double())
    with pytest.raises(ValueError, match="batch or head_dim"):
        lastq_scores(q, k[..., :8])
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        lastq_scores(q[0], k[0])
    with pytest.raises(ValueError, match="n_last must be a positive int"):
        lastq_scores(q, k, 0)
    with pytest.raises(ValueError, match="BLOCK_N"):
        lastq_scores(q, k, 8, config=dict(BLOCK_N=24))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            lastq_scores(q.cuda(), k)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lastq_scores(q, k)


def test_vertical_slash_policy_routes_equivalently(monkeypatch):
    """The policy's layout is the same whether it estimates with the twin or the kernel."""
    from accel.policies import AttentionContext
    from accel.policies import vertical_slash as vs_mod

    torch.manual_seed(0)
    common = torch.randn(4, 1, 32)
    q = torch.randn(1, 4, 300, 32) * 0.3 + common
    k = torch.randn(1, 2, 300, 32) * 0.3
    k[:, :, 123] = common[::2, 0] * 2
    pol = vs_mod.VerticalSlashPolicy.from_options(vertical_size=40, slash_size=120, last_q=16)
    ctx = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None)
    want = pol.plan(q, k, ctx)
    monkeypatch.setattr(vs_mod, "_use_triton", lambda x: True)
    got = pol.plan(q, k, ctx)
    assert torch.equal(got.columns, want.columns) and torch.equal(got.offsets, want.offsets)
    assert 123 in got.columns[0, 0].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, Hq, Hkv, Sq, Sk, n_last, config", [
    (torch.bfloat16, 32, 8, 3000, 4100, 64, None),
    (torch.bfloat16, 28, 4, 4096, 4096, 128, None),
    (torch.bfloat16, 32, 8, 2049, 2049, 64, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)),
    (torch.float16, 8, 8, 1500, 2000, 50, dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)),
    (torch.float32, 8, 2, 1500, 2000, 64, None),
    (torch.bfloat16, 4, 1, 1000, 1000, 200, None),  # several row launches
])
def test_gpu_matches_reference(dtype, Hq, Hkv, Sq, Sk, n_last, config):
    q, k = _qk(1, Hq, Hkv, Sq, Sk, 128, dtype, device="cuda", scale=1.5)
    got = lastq_scores(q, k, n_last, config=config)
    want = lastq_scores_reference(q, k, n_last)
    torch.testing.assert_close(got[0], want[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got[1], want[1], atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_long_context_sums():
    """128K, Llama-3.1-8B head shape: finite, each head's vertical and slash sum to n_last, deterministic."""
    q, k = _qk(1, 32, 8, 131072, 131072, 128, torch.bfloat16, device="cuda", scale=1.0)
    v, s = lastq_scores(q, k, 64)
    assert torch.isfinite(v).all() and torch.isfinite(s).all()
    torch.testing.assert_close(v.sum(-1), torch.full_like(v[..., 0], 64.0), atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(s.sum(-1), torch.full_like(s[..., 0], 64.0), atol=1e-2, rtol=1e-3)
    v2, s2 = lastq_scores(q, k, 64)
    assert torch.equal(v, v2) and torch.equal(s, s2)


@pytest.mark.parametrize("rows", [16, 32])
def test_queries_split_over_launches(rows):
    """ROWS caps the queries per launch (the GPU default runs 128 last queries as two launches of 64)."""
    q, k = _qk(1, 4, 2, 90, 150, 64, torch.float32, seed=5)
    _compare(q, k, 70, config=dict(ROWS=rows))
