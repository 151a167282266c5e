"""kernels/triton/fa4_layout.py (FA4's mask / full block lists in one launch) against the torch path of
``kernels.flash.fa4_tensors``: equal element for element, with shared layout heads, batch broadcast, layouts wider
or narrower than the key blocks, and a query range ending before the keys."""

import pytest
import torch

from accel.kernels.flash import fa4_tensors
from accel.kernels.reference_sparse import random_block_layout


@pytest.mark.parametrize("q_len, kv_len, layout_heads, heads, layout_batch, batch",
                         [(256, 256, 4, 4, 2, 2), (130, 257, 2, 6, 1, 3), (64, 300, 1, 4, 1, 1),
                          (17, 17, 3, 3, 2, 2)])
@pytest.mark.parametrize("keep", [0.1, 0.6])
def test_fa4_split_matches_torch(q_len, kv_len, layout_heads, heads, layout_batch, batch, keep):
    layout = random_block_layout(layout_batch, layout_heads, q_len, kv_len, 16, 16, keep=keep, seed=q_len)
    want = fa4_tensors(layout, batch, heads, q_len, kv_len, use_triton=False)
    got = fa4_tensors(layout, batch, heads, q_len, kv_len, use_triton=True)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.int32 and g.shape == w.shape
        assert torch.equal(g, w)


def test_fa4_split_of_a_wide_layout_truncates():
    layout = random_block_layout(1, 2, 64, 64, 16, 16, keep=1.0)
    nk = 4
    layout.indices = torch.nn.functional.pad(layout.indices, (0, 3), value=7)  # wider than the key blocks
    want = fa4_tensors(layout, 1, 2, 64, 64, use_triton=False)
    got = fa4_tensors(layout, 1, 2, 64, 64, use_triton=True)
    assert got[1].shape[-1] == nk
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_fa4_split_rejects_mismatched_heads():
    layout = random_block_layout(1, 3, 64, 64, 16, 16)
    with pytest.raises(ValueError, match="cannot serve"):
        fa4_tensors(layout, 1, 4, 64, 64, use_triton=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fa4_split_on_gpu_matches_torch():
    layout = random_block_layout(1, 8, 32768, 32768, 128, 128, keep=0.08, device="cuda")
    want = fa4_tensors(layout, 1, 32, 32768, 32768, use_triton=False)
    got = fa4_tensors(layout, 1, 32, 32768, 32768, use_triton=True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
