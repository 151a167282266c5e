"""scripts/read_floor.py: the plain read kernel behind the decode launch floor sums what it reads (interpreter on
the CPU), and the per-layer slices never overlap consecutive reads."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import read_floor as R  # noqa: E402


@pytest.mark.parametrize("n", [1, 100, R.BLOCK, 3 * R.BLOCK + 17])
@pytest.mark.parametrize("programs", [1, 2, 5])
def test_read_sum_matches_torch(n, programs):
    x = torch.randint(-1000, 1000, (n,), dtype=torch.int32)
    parts = R.read_sum(x, programs=programs, num_warps=4)
    assert parts.numel() == min(programs, -(-n // R.BLOCK))
    assert int(parts.sum()) == int(x.sum())


def test_read_sum_rejects_other_inputs():
    with pytest.raises(ValueError, match="contiguous 1-D int32"):
        R.read_sum(torch.zeros(8))


def test_slices_are_consecutive_and_wrap():
    buf = torch.zeros(100, dtype=torch.int32)
    views = R.slices(buf, [[64, 32], [80], [16]])  # bytes -> 16, 8, 20, 4 words
    sizes = [[v.numel() for v in layer] for layer in views]
    assert sizes == [[16, 8], [20], [4]]
    offs = [v.data_ptr() - buf.data_ptr() for layer in views for v in layer]
    assert offs == [0, 64, 96, 176]  # bytes: each read starts where the one before ended
    big = torch.zeros(200, dtype=torch.int32)
    wrapped = R.slices(big, [[320], [320], [320]])  # 80 words each: the third would pass the end, starts over
    assert [v.data_ptr() - big.data_ptr() for layer in wrapped for v in layer] == [0, 320, 0]
    with pytest.raises(ValueError, match="less than two reads"):
        R.slices(buf, [[240]])
