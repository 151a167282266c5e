"""The sort-free cumulative-mass cut (kernels/triton/mass_threshold.py) against its torch twin and the sort."""

import pytest
import torch

from accel.kernels.triton.mass_threshold import mass_cut, mass_cut_torch, mass_search, search_cuts
from accel.policies.block_select import keep_by_threshold_torch
from accel.policies.flexprefill import tokens_to_cover


def _rows(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g) ** 6  # peaked rows, no ties
    x[0, 0] = 0.0  # a row without mass keeps nothing
    return x


@pytest.mark.parametrize("gamma", [0.3, 0.9, 0.95])
@pytest.mark.parametrize("n", [1, 700, 3000])
def test_mass_cut_matches_twin_and_sort(gamma, n):
    x = _rows((2, 3, n), seed=n)
    cut = mass_cut(x, gamma, block=512)
    assert cut.shape == (2, 3) and cut.dtype == torch.int32
    assert torch.equal(cut, mass_cut_torch(x, gamma))
    keep = x.view(torch.int32) >= cut[..., None]
    assert torch.equal(keep, keep_by_threshold_torch(x, gamma))  # no ties: the fewest top entries, exactly
    assert torch.equal(keep.sum(-1), tokens_to_cover(x, gamma))
    assert not keep[0, 0].any()


def test_mass_cut_keeps_ties_and_ignores_negatives():
    x = torch.tensor([[0.5, 0.25, 0.25, 0.0, -3.0], [0.1, 0.1, 0.1, 0.1, 0.1]])
    cut = mass_cut(x, 0.6, block=16)
    keep = x.view(torch.int32) >= cut[:, None]
    # row 0: 0.5 alone is 0.5 < 0.6 of 1.0, so the cut falls on the tied 0.25s: both kept
    assert keep[0].tolist() == [True, True, True, False, False]
    assert keep[1].all()  # all tied
    assert torch.equal(cut, mass_cut_torch(x, 0.6))


def test_mass_cut_programs_spanning_several_blocks():
    x = _rows((2, 3, 900), seed=3)  # 57 blocks of 16 x 6 rows over 100 programs: each sums 4 blocks
    cut = mass_cut(x, 0.9, block=16, programs=100)
    assert torch.equal(cut, mass_cut_torch(x, 0.9))


def test_one_search_over_two_row_groups():
    """Two groups of rows of different lengths (FlexPrefill: token-level rows and pooled block maps) in one search:
    each row's cut as if searched alone; a strided row view is read in place."""
    a = _rows((5, 300), seed=11)
    b = _rows((3, 1000), seed=12)
    wide = _rows((4, 900), seed=13)
    a_view = wide[:, 100:400]  # [4, 300] with row stride 900
    for x0, x1 in ((a, b), (b, a), (a_view, b)):
        got = search_cuts(mass_search([x0, x1], 0.9, block=64, programs=40))
        assert torch.equal(got, torch.cat((mass_cut_torch(x0, 0.9), mass_cut_torch(x1, 0.9))))
    with pytest.raises(ValueError, match="unit last stride"):
        mass_search([a[:, ::2]], 0.9)
