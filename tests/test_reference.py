"""The reference backend's fast path (SDPA over the visible key band) computes the ground-truth function."""

import pytest
import torch

from accel.kernels.reference import attention, sliced_attention


@pytest.mark.parametrize("Sq, Sk", [(1, 1), (37, 37), (300, 300), (5, 300), (1, 300)])
@pytest.mark.parametrize("sink, window", [(0, None), (0, 24), (4, 24), (3, 500), (16, 7)])
@pytest.mark.parametrize("group", [1, 3])
def test_sliced_matches_ground_truth(Sq, Sk, sink, window, group):
    torch.manual_seed(Sq + Sk)
    q = torch.randn(2, 2 * group, Sq, 16)
    k, v = torch.randn(2, 2, Sk, 16), torch.randn(2, 2, Sk, 16)
    want = attention(q, k, v, sink=sink, window=window)
    got = sliced_attention(q, k, v, sink=sink, window=window, chunk=64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sink, window", [(0, None), (2, 10)])
def test_sliced_left_padding(sink, window):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 50, 8), torch.randn(3, 2, 50, 8), torch.randn(3, 2, 50, 8)
    start = torch.tensor([0, 7, 49], dtype=torch.int32)
    want = attention(q, k, v, sink=sink, window=window, kv_start=start)
    got = sliced_attention(q, k, v, sink=sink, window=window, kv_start=start, chunk=16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Sk", [39, 40, 41])  # sink + window = 40: every key visible up to 40, one hidden at 41
def test_sliced_one_query_over_a_streaming_store(Sk):
    """A decode query over sink + recent keys (a streaming head's store) takes the maskless path only when it
    really sees every key."""
    torch.manual_seed(Sk)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, Sk, 16), torch.randn(1, 2, Sk, 16)
    want = attention(q, k, v, sink=16, window=24)
    torch.testing.assert_close(sliced_attention(q, k, v, sink=16, window=24), want, atol=1e-5, rtol=1e-5)
