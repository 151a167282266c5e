"""kernels/triton/quest_decode.py (Quest's scoring, top-k and attention in one launch, the programs of a row
splitting the row; run on the CPU by the interpreter, one launch per phase) against the torch twins:
quest_scores, select_pages, paged_decode_attention."""

import pytest
import torch

from accel.kernels import reference_decode as R
from accel.kernels.triton import quest_decode as QD


def _case(B, hkv, group, S, page, D=32, dtype=torch.float32, seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hkv * group, 1, D, generator=g)
    k = torch.randn(B, hkv, S, D, generator=g)
    v = torch.randn(B, hkv, S, D, generator=g).to(dtype)
    if integer:  # small integers: exact scores, many of them equal, so the tie rule decides
        q, k = q.round().clamp(-1, 1), k.round().clamp(-1, 1)
    q, k = q.to(dtype), k.to(dtype)
    kmin, kmax = R.page_bounds(k, page)
    return q, k, v, kmin, kmax


def _ref(q, k, v, kmin, kmax, n_keep, kv_len, page, keep_first=False, group_reduce="max", **kw):
    s = R.quest_scores(q, kmin, kmax, page_size=page, group_reduce=group_reduce,
                       kv_start=kw.get("kv_start")).float()
    pages, counts = R.select_pages(s, n_keep, kv_len=kv_len, page_size=page, keep_first=keep_first)
    return R.paged_decode_attention(q, k, v, pages, counts, page, **kw)


@pytest.fixture(params=["default", "small-bins", "fallback"])
def bins(request, monkeypatch):
    """The histogram path as shipped; with 16 bins (many candidates per bin); with a candidate capacity of 2 (most
    rows take the whole-row search)."""
    if request.param == "small-bins":
        monkeypatch.setattr(QD, "NB", 16)
    if request.param == "fallback":
        monkeypatch.setattr(QD, "NB", 16)
        monkeypatch.setattr(QD, "CAP", 2)
    return request.param


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_keep", [1, 5, 12])
def test_matches_reference(bins, group, dtype, n_keep):
    page, S = 16, 16 * 21 - 5  # 21 pages, the newest partly filled: a row of 16 pages + a tail block
    q, k, v, kmin, kmax = _case(2, 2, group, S, page, dtype=dtype, seed=n_keep)
    got = QD.quest_decode(q, k, v, kmin, kmax, n_keep, kv_len=S, page_size=page)
    ref = _ref(q, k, v, kmin, kmax, n_keep, S, page)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("splits", [1, 2, 5, 40])  # 40: more programs than pages, some own none
@pytest.mark.parametrize("group_reduce", ["max", "sum"])
def test_splits_and_group_reduce(bins, splits, group_reduce):
    page, S = 8, 8 * 30 - 3
    q, k, v, kmin, kmax = _case(1, 2, 3, S, page, seed=splits)
    got = QD.quest_decode(q, k, v, kmin, kmax, 7, kv_len=S, page_size=page, n_splits=splits,
                          group_reduce=group_reduce)
    torch.testing.assert_close(got, _ref(q, k, v, kmin, kmax, 7, S, page, group_reduce=group_reduce),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep_first", [False, True])
def test_ties_take_the_lower_pages(bins, keep_first):
    # integer queries and keys: the cut lands inside runs of equal scores
    for seed in range(3):
        q, k, v, kmin, kmax = _case(2, 2, 2, 16 * 48, 16, seed=seed, integer=True)
        s = R.quest_scores(q, kmin, kmax, page_size=16)
        assert s.unique().numel() < s.numel() // 4  # many ties
        got = QD.quest_decode(q, k, v, kmin, kmax, 9, kv_len=16 * 48, page_size=16, n_splits=3,
                              keep_first=keep_first)
        ref = _ref(q, k, v, kmin, kmax, 9, 16 * 48, 16, keep_first=keep_first)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 37, 150, 256])
def test_static_buffer_with_device_length(bins, length):
    """A static cache: buffers of 256 slots, the length a 0-d tensor; pages past it (bounds +-inf, scores NaN)
    are never chosen, keys past it are masked, as in kernels/static_decode.py."""
    page = 16
    q, k, v, kmin, kmax = _case(1, 2, 4, 256, page, seed=length)
    n_pages = -(-length // page)
    kmin[:, :, n_pages:], kmax[:, :, n_pages:] = float("inf"), float("-inf")
    got = QD.quest_decode(q, k, v, kmin, kmax, 5, kv_len=torch.tensor(length), page_size=page)
    ref = _ref(q, k[:, :, :length], v[:, :, :length], kmin[:, :, :n_pages], kmax[:, :, :n_pages], 5, length, page)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_left_padding_and_softcap(bins):
    page, S = 16, 16 * 20
    q, k, v, kmin, kmax = _case(2, 2, 2, S, page, seed=7)
    start = torch.tensor([0, 70])
    got = QD.quest_decode(q, k, v, kmin, kmax, 6, kv_len=S, page_size=page, kv_start=start, softcap=5.0)
    ref = _ref(q, k, v, kmin, kmax, 6, S, page, kv_start=start, softcap=5.0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_budget_above_the_context_keeps_every_page(bins):
    page, S = 16, 16 * 6 - 1
    q, k, v, kmin, kmax = _case(1, 2, 2, S, page, seed=2)
    got = QD.quest_decode(q, k, v, kmin, kmax, 50, kv_len=S, page_size=page)
    torch.testing.assert_close(got, R.paged_decode_attention(q, k, v, torch.arange(6).expand(1, 2, 6).int(),
                                                             torch.full((1, 2), 6).int(), page),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_scoring_in_its_own_launch(monkeypatch, padded):
    """``FUSED_SCORING = False``: decode_score's launch writes the scratch row and the launch starts from it."""
    monkeypatch.setattr(QD, "FUSED_SCORING", False)
    page, S = 16, 16 * 20 - 9
    q, k, v, kmin, kmax = _case(2, 2, 3, S, page, seed=11)
    start = torch.tensor([0, 40]) if padded else None
    got = QD.quest_decode(q, k, v, kmin, kmax, 6, kv_len=S, page_size=page, kv_start=start, group_reduce="sum")
    ref = _ref(q, k, v, kmin, kmax, 6, S, page, kv_start=start, group_reduce="sum")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_counters_are_left_zero():
    """The last program of a row re-zeroes the row's histogram and counters: the next launch starts clean."""
    from accel.kernels.triton.decode_attention import _counters

    q, k, v, kmin, kmax = _case(2, 2, 2, 16 * 30, 16, seed=4)
    for _ in range(2):
        got = QD.quest_decode(q, k, v, kmin, kmax, 5, kv_len=16 * 30, page_size=16)
        torch.testing.assert_close(got, _ref(q, k, v, kmin, kmax, 5, 16 * 30, 16), atol=1e-5, rtol=1e-5)
        assert not _counters(4 * (QD.NB + 4), q.device).any()


def test_bad_input():
    q, k, v, kmin, kmax = _case(1, 2, 2, 64, 16)
    with pytest.raises(ValueError, match="max_norm"):
        QD.quest_decode(q, k, v, kmin, kmax, 2, kv_len=64, page_size=16, group_reduce="max_norm")
    with pytest.raises(ValueError, match="page size"):
        QD.quest_decode(q, k, v, kmin, kmax, 2, kv_len=64, page_size=12)
    with pytest.raises(ValueError, match="kmin and kmax"):
        QD.quest_decode(q, k, v, kmin[:, :1], kmax[:, :1], 2, kv_len=64, page_size=16)
