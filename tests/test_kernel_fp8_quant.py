"""FP8 estimation operands (kernels/triton/fp8_quant.py) and XAttention's fp8 estimate: the Triton quantiser
against its torch twin, the one-pass kernel on FP8 operands against the torch estimate on the same dequantised
values, the softmax invariance of centring the keys, and the policy option."""

import pytest
import torch

from accel.kernels.triton.antidiag_score_onepass import antidiagonal_scores_onepass, fp8_operands
from accel.kernels.triton.fp8_quant import (FP8_MAX, center_vector, dequantize_fp8, grouped_view, quantize_fp8,
                                            quantize_fp8_reference)
from accel.policies.xattention import XAttentionPolicy, antidiagonal_block_scores


@pytest.mark.parametrize("group", [1, 8, 16])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_reference(center, dtype, group):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 70, 32) * 3 + 5).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # odd strides
    x[:, :, 16:24] *= 0.01  # one group of small values: its own scale keeps their precision
    x8, scale = quantize_fp8(x, group=group, center=center)
    r8, rscale = quantize_fp8_reference(x, group=group, center=center)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape
    assert scale.shape == (2, 3, -(-70 // group))
    torch.testing.assert_close(scale, rscale)
    a, b = dequantize_fp8(x8, scale, group), dequantize_fp8(r8, rscale, group)
    # at most one e4m3 step apart (division rounding), and nearly always equal
    step = dequantize_fp8(torch.ones_like(x8), scale, group) * 2**-9  # e4m3's subnormal step, scaled
    assert ((a - b).abs() <= 0.13 * b.abs() + step).all() and (a == b).float().mean() > 0.99
    assert x8.float().abs().max() <= FP8_MAX
    # every group reaches the top of the e4m3 range: the scale is that group's own max
    g8 = torch.nn.functional.pad(x8.float().abs(), (0, 0, 0, (-70) % group)).reshape(2, 3, -1, group * 32)
    assert (g8.amax(-1) == FP8_MAX).all()
    want = x.float() - (center_vector(x)[:, :, None] if center else 0)
    assert ((a - want).abs() <= 0.07 * want.abs() + step).all()


@pytest.mark.parametrize("S", [64, 70, 57])
def test_grouped_view_is_whole_zero_padded_groups(S):
    x = torch.randn(2, 3, S, 16) + 1
    x8, _ = quantize_fp8(x, group=8, center=True)
    g = grouped_view(x8, 8)
    assert g.shape == (6, -(-S // 8), 128) and g.stride() == (g.shape[1] * 128, 128, 1)
    flat = g.float().reshape(2, 3, -1, 16)
    torch.testing.assert_close(flat[:, :, :S], x8.float())  # the view's tokens are x8's, in order
    assert (flat[:, :, S:] == 0).all()  # the last group's padding: zeros, so it adds nothing to a dot product
    with pytest.raises(ValueError, match="quantize_fp8's output"):
        grouped_view(x8[:, :, 1:], 8)


def test_center_vector_is_a_subsample_mean():
    x = torch.randn(1, 2, 1024, 16) + 4
    torch.testing.assert_close(center_vector(x), x[:, :, ::4].mean(2))  # 1024 // 256
    torch.testing.assert_close(center_vector(x[:, :, :100]), x[:, :, :100].mean(2))
    assert (center_vector(x) - x.mean(2)).abs().max() < 0.3


def test_group_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        quantize_fp8(torch.zeros(1, 1, 8, 16), group=6)


def _qk(S=300, D=32):
    torch.manual_seed(1)
    q = torch.randn(1, 4, S, D) * 2
    k = torch.randn(1, 2, S, D) * 2 + 3  # a large shared key component: centring removes it
    return q, k


@pytest.mark.parametrize("S", [300, 320])
def test_onepass_fp8_matches_torch_on_the_same_operands(S):
    q, k = _qk(S)
    q[:, :, 40:48] *= 0.05  # per-group scales differ by 20x across the sequence
    got = antidiagonal_scores_onepass(q, k, block=32, stride=8, fp8=True)
    (q8, sq), (k8, sk) = fp8_operands(q, k, 8)
    want = antidiagonal_block_scores(dequantize_fp8(q8, sq, 8), dequantize_fp8(k8, sk, 8), 32, 8)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk", [(1, 4, 2, 300, 300), (2, 4, 1, 96, 173), (1, 2, 2, 45, 64)])
def test_onepass_fp8_tma_equals_pointer_loads(B, Hq, Hkv, Sq, Sk):
    # the TMA path reads the same whole-group copies through descriptors: the same dots in the same order
    torch.manual_seed(2)
    q, k = torch.randn(B, Hq, Sq, 16) * 2, torch.randn(B, Hkv, Sk, 16) + 1
    cfg = dict(BLOCK_R=16, BLOCK_C=16, EPI_KB=8, num_warps=4, num_stages=1)
    want = antidiagonal_scores_onepass(q, k, block=32, stride=4, fp8=True, config=cfg)
    got = antidiagonal_scores_onepass(q, k, block=32, stride=4, fp8=True, config=dict(cfg, TMA=True))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="TMA=True needs fp8"):
        antidiagonal_scores_onepass(q, k, block=32, stride=4, config=dict(cfg, TMA=True))


def test_centring_keys_leaves_the_estimate_unchanged():
    # exact when every strided column holds real keys (a partial last column mixes in zero padding)
    q, k = _qk(S=320)
    a = antidiagonal_block_scores(q, k, 32, 8)
    b = antidiagonal_block_scores(q, k - center_vector(k)[:, :, None], 32, 8)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fp8_estimate_is_close_to_the_exact_one():
    q, k = _qk()
    exact = antidiagonal_block_scores(q, k, 64, 8)  # each query-block row sums to its 8 strided rows
    got = XAttentionPolicy.from_options(block_size=64, estimate_dtype="fp8").score(q, k)
    assert (got - exact).abs().max() < 0.25 and (got - exact).abs().mean() < 0.02
    torch.testing.assert_close(got.sum(-1), exact.sum(-1))


def test_estimate_dtype_option():
    assert not XAttentionPolicy.from_options().uses_fp8(torch.zeros(1, 1, 1, 8))  # auto on the CPU: input dtype
    assert XAttentionPolicy.from_options(estimate_dtype="fp8").uses_fp8(torch.zeros(1, 1, 1, 8))
    with pytest.raises(ValueError, match="estimate_dtype"):
        XAttentionPolicy.from_options(estimate_dtype="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("center", [False, True])
def test_quantize_on_gpu_matches_reference(center):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8200, 128, device="cuda", dtype=torch.bfloat16) * 3 + 1
    x8, scale = quantize_fp8(x, group=8, center=center)
    r8, rscale = quantize_fp8_reference(x, group=8, center=center)
    torch.testing.assert_close(scale, rscale)
    a, b = dequantize_fp8(x8, scale, 8), dequantize_fp8(r8, rscale, 8)
    assert (a == b).float().mean() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_onepass_fp8_on_gpu_matches_torch_twin():
    torch.manual_seed(0)
    q = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 8192, 128, device="cuda", dtype=torch.bfloat16) + 1
    (q8, sq), (k8, sk) = fp8_operands(q, k, 8)
    want = antidiagonal_block_scores(dequantize_fp8(q8, sq, 8), dequantize_fp8(k8, sk, 8), 128, 8)
    for tma in (False, True):  # pointer loads and TMA descriptors
        cfg = dict(BLOCK_R=128, BLOCK_C=256, num_warps=8, num_stages=3, TMA=tma)
        got = antidiagonal_scores_onepass(q, k, block=128, stride=8, fp8=True, config=cfg)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
