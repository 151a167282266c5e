"""One-pass Triton antidiagonal (XAttention) block scores (kernels/triton/antidiag_score_onepass.py) vs the torch
reference ``antidiagonal_block_scores`` and the two-pass kernel; the ``method`` switch of ``antidiagonal_scores``.
CPU under TRITON_INTERPRET=1 (small shapes); GPU tests marked."""

import pytest
import torch

from accel.kernels.triton.antidiag_score import antidiagonal_scores
from accel.kernels.triton.antidiag_score_onepass import antidiagonal_scores_onepass, scratch_bytes_per_head
from accel.policies.block_select import keep_by_threshold
from accel.policies.xattention import antidiagonal_block_scores

# fp32: ~1e-5 relative (log2/exp2 round trip of the partials, different summation order); bf16/fp16 inputs are
# exact in float32 after the upcast, so the same tolerance holds up to the reference's own float32 rounding
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=2e-6, rtol=2e-5),
       torch.float16: dict(atol=2e-6, rtol=2e-5)}


def _qk(B, Hq, Hkv, Sq, Sk, D, dtype, device="cpu", seed=0, scale=2.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (scale * torch.randn(B, Hq, Sq, D, generator=g)).to(device=device, dtype=dtype)
    k = (scale * torch.randn(B, Hkv, Sk, D, generator=g)).to(device=device, dtype=dtype)
    return q, k


# (B, Hq, Hkv, Sq, Sk, D, block, stride, dtype, config, scratch_bytes)
CASES = [
    (1, 2, 2, 100, 100, 16, 64, 4, torch.float32, None, None),  # MHA (GQA 1), odd length, stride 4
    (1, 4, 1, 45, 173, 32, 64, 8, torch.float32, None, None),  # GQA 4, Sq < Sk, offset not a multiple of stride
    (2, 7, 1, 77, 77, 16, 64, 8, torch.bfloat16, None, None),  # GQA 7, batch 2, bf16
    (1, 2, 1, 150, 300, 16, 128, 8, torch.float32, None, None),  # block 128 / stride 8 (16 rows per block)
    (1, 2, 2, 130, 261, 16, 128, 4, torch.bfloat16, None, None),  # block 128 / stride 4 (32 rows per block)
    (1, 4, 2, 200, 203, 16, 64, 16, torch.float32, None, None),  # stride 16 (4 rows per block), odd key tail
    (1, 4, 2, 130, 250, 32, 64, 4, torch.float32, dict(BLOCK_R=32, BLOCK_C=64, EPI_KB=4), None),  # multi-block tiles
    (2, 7, 1, 90, 140, 16, 64, 8, torch.float32, None, 1),  # tiny budget: one (batch, head) per launch
    (2, 6, 3, 90, 140, 16, 64, 8, torch.bfloat16, None, 3 * 4096),  # chunks of 3 pairs across the batch boundary
    (1, 1, 1, 1, 50, 16, 32, 8, torch.float32, None, None),  # a single query
    (1, 2, 1, 60, 64, 16, 32, 8, torch.float16, dict(BLOCK_R=16, BLOCK_C=32, EPI_KB=1), None),  # fp16, EPI_KB 1
]


def _ids(c):
    return "-".join(str(x).replace("torch.", "") for x in c[:9])


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_reference(case):
    B, Hq, Hkv, Sq, Sk, D, block, stride, dtype, config, scratch = case
    q, k = _qk(B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq + Sk)
    got = antidiagonal_scores(q, k, block=block, stride=stride, config=config, method="one_pass",
                              scratch_bytes=scratch)
    want = antidiagonal_block_scores(q, k, block, stride)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    # each query block's row sums to its number of strided rows holding a query
    rows = torch.tensor([min(block, Sq - m * block) for m in range(got.shape[2])], dtype=torch.float32)
    torch.testing.assert_close(got.sum(-1), torch.ceil(rows / stride).expand_as(got.sum(-1)), atol=1e-4, rtol=1e-5)
    two = antidiagonal_scores(q, k, block=block, stride=stride, method="two_pass")
    torch.testing.assert_close(got, two, **TOL[dtype])


def test_chunking_is_exact():
    """Head chunking only changes which launch computes a (batch, head): results are bitwise equal."""
    q, k = _qk(2, 4, 2, 70, 90, 16, torch.float32, seed=3)
    per = scratch_bytes_per_head(q, k, block=32, stride=4)
    ref = antidiagonal_scores_onepass(q, k, block=32, stride=4)
    for budget in (1, per, 3 * per, 100 * per):
        assert torch.equal(antidiagonal_scores_onepass(q, k, block=32, stride=4, scratch_bytes=budget), ref)


def test_row_max_growth_no_overflow():
    """Logits that grow by far more than 128 (log2 units) after the first tile: the partials are stored as log2
    sums relative to the first tile's max, so nothing overflows; late keys dominate."""
    q, k = _qk(1, 2, 1, 96, 96, 16, torch.float32, seed=5, scale=1.0)
    ramp = torch.linspace(0.0, 200.0, 96)[:, None]
    q = q + 1.0
    k = k + ramp  # the scaled strided logits grow by ~200*16/16*log2(e) ~ 290 (log2 units) along the keys
    got = antidiagonal_scores(q, k, block=32, stride=4, method="one_pass")
    want = antidiagonal_block_scores(q, k, 32, 4)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_same_selection_as_reference():
    q, k = _qk(1, 4, 2, 256, 256, 32, torch.float32, scale=3.0)
    got = antidiagonal_scores(q, k, block=64, stride=8, method="one_pass")
    want = antidiagonal_block_scores(q, k, 64, 8)
    for thr in (0.5, 0.9, 0.96):
        assert torch.equal(keep_by_threshold(got, thr), keep_by_threshold(want, thr))


def test_non_contiguous_inputs():
    q, k = _qk(1, 4, 2, 90, 120, 32, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    torch.testing.assert_close(antidiagonal_scores(qt, kt, block=32, stride=4, method="one_pass"),
                               antidiagonal_block_scores(q, k, 32, 4), **TOL[torch.float32])


def test_empty_query():
    q, k = _qk(1, 2, 1, 0, 40, 16, torch.float32)
    assert antidiagonal_scores(q, k, block=32, stride=4, method="one_pass").shape == (1, 2, 0, 2)


def test_method_switch():
    q, k = _qk(1, 2, 1, 40, 40, 16, torch.float32)
    # auto stays on the two-pass kernel off CUDA (bitwise the two-pass result)
    assert torch.equal(antidiagonal_scores(q, k, block=32, stride=4),
                       antidiagonal_scores(q, k, block=32, stride=4, method="two_pass"))
    with pytest.raises(ValueError, match="method must be one of"):
        antidiagonal_scores(q, k, block=32, stride=4, method="fast")
    with pytest.raises(ValueError, match="must divide block"):
        antidiagonal_scores(q, k, block=32, stride=3, method="one_pass")
    with pytest.raises(ValueError, match="power of two"):
        antidiagonal_scores(q, k, block=32, stride=4, method="one_pass", config=dict(EPI_KB=3))
    big = torch.zeros(1, 1, 1, 16).expand(1, 1, 2**20, 16)  # 1M tokens, no memory: scratch offsets would not fit
    with pytest.raises(ValueError, match="two_pass"):  # (raised before anything is allocated)
        antidiagonal_scores(big, big, block=16, stride=1, method="one_pass")
    # one head's scratch: padded strided rows x padded key blocks x 4 bytes
    assert scratch_bytes_per_head(q, k, block=32, stride=4, config=dict(BLOCK_R=16, BLOCK_C=16)) == 16 * 2 * 4


def test_auto_picks_by_budget(monkeypatch):
    """auto: one_pass on CUDA when one head's scratch fits the budget (simulated with a CUDA-looking flag)."""
    from accel.kernels.triton import antidiag_score_onepass as op

    calls = []
    monkeypatch.setattr(op, "antidiagonal_scores_onepass", lambda *a, **kw: calls.append(kw) or "one")

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    q, k = _qk(1, 2, 1, 40, 40, 16, torch.float32)
    qc = q.as_subclass(FakeCuda)
    assert antidiagonal_scores(qc, k, block=32, stride=4) == "one"
    per = scratch_bytes_per_head(qc, k, block=32, stride=4)  # the GPU tiles' padding
    assert per > scratch_bytes_per_head(q, k, block=32, stride=4)
    assert antidiagonal_scores(qc, k, block=32, stride=4, scratch_bytes=per) == "one"
    assert len(calls) == 2
    # too small a budget: the two-pass kernel (run for real here, on the CPU tensors)
    # one byte short: the two-pass kernel (run for real, interpreted)
    got = antidiagonal_scores(qc, k, block=32, stride=4, scratch_bytes=per - 1)
    assert isinstance(got, torch.Tensor) and len(calls) == 2
    torch.testing.assert_close(got.as_subclass(torch.Tensor), antidiagonal_block_scores(q, k, 32, 4),
                               **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, block, stride, Sq, Sk, config, scratch", [
    (torch.bfloat16, 128, 8, 3000, 4100, None, None),
    (torch.bfloat16, 128, 8, 4096, 4096, dict(BLOCK_R=128, BLOCK_C=128, num_warps=8, num_stages=2), None),
    (torch.bfloat16, 128, 8, 4096, 4096, dict(BLOCK_R=256, BLOCK_C=128, num_warps=16, num_stages=2), None),
    (torch.bfloat16, 128, 16, 4000, 4096, None, 1),  # one head per launch
    (torch.float16, 64, 4, 2049, 2049, dict(BLOCK_R=64, BLOCK_C=64, num_warps=4, num_stages=3), None),
    (torch.float32, 64, 8, 1500, 2000, None, None),
])
def test_gpu_matches_reference(dtype, block, stride, Sq, Sk, config, scratch):
    q, k = _qk(1, 8, 2, Sq, Sk, 128, dtype, device="cuda", scale=1.5)
    got = antidiagonal_scores(q, k, block=block, stride=stride, config=config, method="one_pass",
                              scratch_bytes=scratch)
    want = antidiagonal_block_scores(q, k, block, stride)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    two = antidiagonal_scores(q, k, block=block, stride=stride, method="two_pass")
    torch.testing.assert_close(got, two, atol=2e-3, rtol=2e-3)
    assert torch.equal(keep_by_threshold(got, 0.9), keep_by_threshold(want, 0.9))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_is_one_pass_and_long_context():
    """32K, Llama-3.1-8B head shape: auto takes the one-pass kernel (bitwise), finite, row sums 16, close to the
    two-pass kernel."""
    q, k = _qk(1, 32, 8, 32768, 32768, 128, torch.bfloat16, device="cuda", scale=1.0)
    got = antidiagonal_scores(q, k)
    assert torch.equal(got, antidiagonal_scores(q, k, method="one_pass"))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.full_like(got[..., 0], 16.0), atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(got, antidiagonal_scores(q, k, method="two_pass"), atol=2e-3, rtol=2e-3)
