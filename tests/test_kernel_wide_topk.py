"""kernels/triton/wide_topk.py against torch.topk: the same positions where the k-th largest value is untied, and
with ties a valid top-k (k distinct positions, every kept value >= every dropped one); over lengths that are and
are not whole blocks, k from 1 to the row length, negative values, +-inf, and rows of TidalDecode's shape."""

import pytest
import torch

from accel.kernels.triton.wide_topk import BLOCK, wide_topk, wide_topk_reference


def _valid_topk(s: torch.Tensor, pos: torch.Tensor, k: int) -> None:
    rows, N = s.reshape(-1, s.shape[-1]), s.shape[-1]
    pos = pos.reshape(-1, k).long()
    for r in range(rows.shape[0]):
        p = pos[r]
        assert p.min() >= 0 and p.max() < N and p.unique().numel() == k, "k distinct positions in range"
        kept = torch.zeros(N, dtype=torch.bool)
        kept[p] = True
        if k < N:
            assert rows[r][kept].min() >= rows[r][~kept].max(), "every kept value >= every dropped one"


def _same_set(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("N", [1, 100, BLOCK, BLOCK + 1, 3 * BLOCK - 7])
@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_matches_torch_topk(N, frac):
    g = torch.Generator().manual_seed(N)
    s = torch.randn(3, N, generator=g)  # continuous: no ties
    k = max(1, int(frac * N))
    got = wide_topk(s, k)
    assert got.dtype == torch.int32 and got.shape == (3, k)
    assert _same_set(got, wide_topk_reference(s, k))


def test_tidal_rows_probabilities_with_inf_and_masked_zeros():
    """TidalDecode's selection row: probabilities (tiny, many exponents), the newest at +inf, keys past the
    length at 0; budget 256 of a row of 3 blocks, batch 2 with one shared row each ([B, 1, S])."""
    g = torch.Generator().manual_seed(1)
    S, n = 3 * BLOCK, 256
    p = torch.softmax(torch.randn(2, 1, S, generator=g) * 3, -1)
    p[0, 0, 5000:] = 0.0
    p[0, 0, 4999] = float("inf")
    p[1, 0, -1] = float("inf")
    out = torch.full((2, 1, n), -1, dtype=torch.int32)
    assert wide_topk(p, n, out=out) is out
    assert _same_set(out, wide_topk_reference(p, n))
    assert (out[0] == 4999).any() and (out[1] == S - 1).any()


@pytest.mark.parametrize("case", ["ties_at_kth", "all_equal", "zeros_past_length", "negatives_and_infs"])
def test_ties_and_special_values_give_a_valid_topk(case):
    g = torch.Generator().manual_seed(2)
    N, k = BLOCK + 300, 700
    if case == "ties_at_kth":
        s = torch.randint(0, 40, (2, N), generator=g).float()  # ~100 copies of each value: the k-th is tied
    elif case == "all_equal":
        s = torch.full((2, N), 0.25)
    elif case == "zeros_past_length":  # fewer positive keys than k: zeros fill the rest
        s = torch.zeros(2, N)
        s[:, :500] = torch.rand(2, 500, generator=g) + 0.1
    else:
        s = torch.randn(2, N, generator=g) * 1e30
        s[0, :50] = float("-inf")
        s[1, 10:20] = float("inf")
        s[1, 20] = -0.0
    got = wide_topk(s, k)
    _valid_topk(s, got, k)
    if case == "zeros_past_length":
        assert all(set(range(500)) <= set(got[r].tolist()) for r in range(2))
    if case == "negatives_and_infs":
        assert set(range(10, 20)) <= set(got[1].tolist())
        assert not set(range(50)) & set(got[0].tolist())


def test_bad_input_names_the_fix():
    s = torch.randn(2, 100)
    with pytest.raises(ValueError, match="k must be in"):
        wide_topk(s, 101)
    with pytest.raises(ValueError, match="float32"):
        wide_topk(s.half(), 4)
    with pytest.raises(ValueError, match="out must be"):
        wide_topk(s, 4, out=torch.empty(2, 5, dtype=torch.int32))
