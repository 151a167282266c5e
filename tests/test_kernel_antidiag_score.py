"""Triton antidiagonal (XAttention) block scores vs the torch reference ``antidiagonal_block_scores`` (itself tested
against a brute force in test_policy_xattention.py). CPU under TRITON_INTERPRET=1; GPU tests marked."""

import pytest
import torch

from accel.kernels.triton.antidiag_score import antidiagonal_scores
from accel.policies.xattention import antidiagonal_block_scores

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-4, rtol=2e-4),
       torch.float16: dict(atol=2e-4, rtol=2e-4)}


def _qk(B, Hq, Hkv, Sq, Sk, D, dtype, device="cpu", seed=0, scale=2.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (scale * torch.randn(B, Hq, Sq, D, generator=g)).to(device=device, dtype=dtype)
    k = (scale * torch.randn(B, Hkv, Sk, D, generator=g)).to(device=device, dtype=dtype)
    return q, k


def _compare(q, k, block, stride, config=None):
    got = antidiagonal_scores(q, k, block=block, stride=stride, config=config)
    want = antidiagonal_block_scores(q, k, block, stride)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[q.dtype])
    return got


# (B, Hq, Hkv, Sq, Sk, D, block, stride, dtype, config)
CASES = [
    (1, 2, 2, 100, 100, 16, 32, 4, torch.float32, None),  # odd length, MHA, 8 strided rows per block
    (1, 4, 1, 45, 173, 32, 64, 8, torch.float32, None),  # Sq < Sk, offset not a multiple of stride, GQA 4
    (2, 7, 1, 77, 77, 16, 32, 8, torch.bfloat16, None),  # GQA 7, batch 2, 4 strided rows per block
    (1, 4, 2, 130, 250, 64, 64, 4, torch.bfloat16, dict(BLOCK_R=32, BLOCK_C=64)),  # tiles over several blocks
    (1, 2, 1, 200, 203, 16, 64, 8, torch.float16, dict(BLOCK_R=16, BLOCK_C=32)),  # fp16, key tail past Sq tail
    (1, 1, 1, 1, 50, 16, 32, 8, torch.float32, None),  # a single query
    (1, 2, 2, 64, 64, 256, 32, 4, torch.float32, None),  # head_dim 256, lengths multiples of the block
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c[:-1]))
def test_matches_reference(case):
    B, Hq, Hkv, Sq, Sk, D, block, stride, dtype, config = case
    q, k = _qk(B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq + Sk)
    got = _compare(q, k, block, stride, config)
    # each query block's row sums to its number of strided rows holding a query
    rows = torch.tensor([min(block, Sq - m * block) for m in range(got.shape[2])], dtype=torch.float32)
    torch.testing.assert_close(got.sum(-1)[0, 0], torch.ceil(rows / stride), atol=1e-4, rtol=1e-4)


def test_non_contiguous_inputs():
    q, k = _qk(1, 4, 2, 90, 120, 32, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] storage, as after a projection
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    torch.testing.assert_close(antidiagonal_scores(qt, kt, block=32, stride=4),
                               antidiagonal_block_scores(q, k, 32, 4), **TOL[torch.float32])


def test_empty_query():
    q, k = _qk(1, 2, 1, 0, 40, 16, torch.float32)
    assert antidiagonal_scores(q, k, block=32, stride=4).shape == (1, 2, 0, 2)


@pytest.mark.parametrize("kw, msg", [
    (dict(block=32, stride=3), "must divide block"),
    (dict(block=48, stride=4), "power of two"),
    (dict(block=32, stride=0), "positive int"),
])
def test_bad_options(kw, msg):
    q, k = _qk(1, 2, 1, 40, 40, 16, torch.float32)
    with pytest.raises(ValueError, match=msg):
        antidiagonal_scores(q, k, **kw)


def test_bad_inputs(monkeypatch):
    q, k = _qk(1, 2, 1, 40, 40, 16, torch.float32)
    with pytest.raises(ValueError, match="head_dim 24"):
        antidiagonal_scores(torch.randn(1, 2, 40, 24), torch.randn(1, 1, 40, 24))
    with pytest.raises(ValueError, match="Sq <= Sk"):
        antidiagonal_scores(q, k[:, :, :30])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        antidiagonal_scores(q[:, :1], torch.cat([k, k], 1))
    with pytest.raises(ValueError, match="share one dtype"):
        antidiagonal_scores(q, k.half())
    with pytest.raises(ValueError, match="share one dtype"):
        antidiagonal_scores(q.double(), k.double())
    with pytest.raises(ValueError, match="batch or head_dim"):
        antidiagonal_scores(q, k[..., :8])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        antidiagonal_scores(q, k)


def test_xattention_policy_scores_route_equivalently():
    """The policy's selection is the same whether it scores with the reference or the kernel."""
    from accel.policies.block_select import keep_by_threshold

    q, k = _qk(1, 4, 2, 256, 256, 32, torch.float32, scale=3.0)
    a = keep_by_threshold(antidiagonal_scores(q, k, block=64, stride=8), 0.9)
    b = keep_by_threshold(antidiagonal_block_scores(q, k, 64, 8), 0.9)
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, block, stride, Sq, Sk, config", [
    (torch.bfloat16, 128, 8, 3000, 4100, None),
    (torch.bfloat16, 128, 8, 4096, 4096, dict(BLOCK_R=128, BLOCK_C=128, num_warps=8, num_stages=2)),
    (torch.float16, 64, 4, 2049, 2049, dict(BLOCK_R=64, BLOCK_C=64, num_warps=4, num_stages=3)),
    (torch.float32, 64, 8, 1500, 2000, None),
])
def test_gpu_matches_reference(dtype, block, stride, Sq, Sk, config):
    q, k = _qk(1, 8, 2, Sq, Sk, 128, dtype, device="cuda", scale=1.5)
    got = antidiagonal_scores(q, k, block=block, stride=stride, config=config)
    want = antidiagonal_block_scores(q, k, block, stride)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_long_context_row_sums():
    """32K, Llama-3.1-8B head shape: finite, and each query-block row sums to its strided rows (16)."""
    q, k = _qk(1, 32, 8, 32768, 32768, 128, torch.bfloat16, device="cuda", scale=1.0)
    got = antidiagonal_scores(q, k)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.full_like(got[..., 0], 16.0), atol=1e-2, rtol=1e-3)
