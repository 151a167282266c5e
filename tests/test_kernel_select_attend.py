"""kernels/triton/select_attend.py (Quest's top-k inside the split-KV launch, run on the CPU by the interpreter)
against the two-launch path's torch twins: select_pages then paged_decode_attention."""

import pytest
import torch

from accel.kernels import reference_decode as R
from accel.kernels.triton.select_attend import select_attend


def _case(B, hkv, group, S, page, D=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hkv * group, 1, D, generator=g).to(dtype)
    k = torch.randn(B, hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, hkv, S, D, generator=g).to(dtype)
    kmin, kmax = R.page_bounds(k, page)
    return q, k, v, R.quest_scores(q, kmin, kmax, page_size=page).float()


def _ref(q, k, v, s, n_keep, kv_len, page, **kw):
    keep_first = kw.pop("keep_first", False)
    pages, counts = R.select_pages(s, n_keep, kv_len=kv_len, page_size=page, keep_first=keep_first)
    return R.paged_decode_attention(q, k, v, pages, counts, page, **kw)


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_keep", [1, 5, 12])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_matches_two_launch_reference(group, dtype, n_keep, splits):
    page, S = 16, 16 * 21 - 5  # 21 pages, the newest partly filled: a row of 16 pages + a tail block
    q, k, v, s = _case(2, 2, group, S, page, dtype=dtype, seed=n_keep)
    got = select_attend(q, k, v, s, n_keep, kv_len=S, page_size=page, n_splits=splits)
    ref = _ref(q, k, v, s, n_keep, S, page)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("page", [1, 8, 64])
def test_page_sizes_and_keep_first(page):
    S = page * 40
    q, k, v, s = _case(1, 3, 2, S, page, seed=page)
    for keep_first in (False, True):
        got = select_attend(q, k, v, s, 6, kv_len=S, page_size=page, keep_first=keep_first)
        torch.testing.assert_close(got, _ref(q, k, v, s, 6, S, page, keep_first=keep_first), atol=1e-5, rtol=1e-5)


def test_ties_take_the_lower_pages():
    # integer scores: the cut lands inside runs of equal scores, so the tie rule decides which pages are attended
    q, k, v, s = _case(2, 2, 2, 16 * 48, 16, seed=3)
    s = torch.randint(0, 3, s.shape, generator=torch.Generator().manual_seed(1)).float()
    got = select_attend(q, k, v, s, 9, kv_len=16 * 48, page_size=16, n_splits=3)
    torch.testing.assert_close(got, _ref(q, k, v, s, 9, 16 * 48, 16), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 37, 150, 256])
def test_static_buffer_with_device_length(length):
    """A static cache: buffers of 256 slots, the length a 0-d tensor; pages past it score NaN (their bounds are
    +-inf) and are never chosen, keys past it are masked, as in kernels/static_decode.py."""
    page = 16
    q, k, v, _ = _case(2, 2, 4, 256, page, seed=length)
    kmin, kmax = R.page_bounds(k[:, :, :length], page)
    pad = torch.full((2, 2, 16 - kmin.shape[2], k.shape[-1]), float("inf"))
    kmin, kmax = torch.cat([kmin, pad], 2), torch.cat([kmax, -pad], 2)
    s = R.quest_scores(q, kmin, kmax, page_size=page).float()
    got = select_attend(q, k, v, s, 4, kv_len=torch.tensor(length), page_size=page)
    filled = -(-length // page)
    ref = _ref(q, k[:, :, :length], v[:, :, :length], s[..., :filled], 4, length, page)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_softcap_and_left_padding():
    page, S = 16, 16 * 20
    q, k, v, s = _case(2, 2, 2, S, page, seed=9)
    start = torch.tensor([0, 37], dtype=torch.int32)
    got = select_attend(q, k, v, s, 7, kv_len=S, page_size=page, softcap=5.0, kv_start=start, scale=0.3)
    ref = _ref(q, k, v, s, 7, S, page, softcap=5.0, kv_start=start, scale=0.3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_budget_over_the_context_is_dense():
    page, S = 16, 16 * 9
    q, k, v, s = _case(1, 2, 4, S, page, seed=2)
    got = select_attend(q, k, v, s, 100, kv_len=S, page_size=page)
    dense = R.paged_decode_attention(q, k, v, None, None, page)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


def test_bad_input():
    q, k, v, s = _case(1, 2, 2, 64, 16)
    with pytest.raises(ValueError, match="page size 12"):
        select_attend(q, k, v, s, 2, kv_len=64, page_size=12)
    with pytest.raises(ValueError, match="n_keep must be >= 1"):
        select_attend(q, k, v, s, 0, kv_len=64, page_size=16)
    with pytest.raises(ValueError, match="scores must be"):
        select_attend(q, k, v, s[:, :1], 2, kv_len=64, page_size=16)
    with pytest.raises(ValueError, match="one query per row"):
        select_attend(q.expand(1, 4, 2, 32), k, v, s, 2, kv_len=64, page_size=16)
    with pytest.raises(ValueError, match="interpreter has no timer"):  # the timer probe is for the GPU only
        select_attend(q, k, v, s, 2, kv_len=64, page_size=16, stamps=torch.zeros(64, dtype=torch.int64))


@pytest.mark.parametrize("keep_first", [False, True])
@pytest.mark.parametrize("path", ["selattend", "twolaunch"])
@pytest.mark.parametrize("padded", [False, True])
def test_quest_static_op_on_each_path(monkeypatch, padded, path, keep_first):
    """kernels/static_decode.py's Quest op (the compiled static-cache step) through the fused top-k launch
    (select_attend, the default) or the two-launch path (select_pages, then paged_decode_attention) equals its torch
    twin either way."""
    from accel.kernels.static_decode import quest_static_decode
    from accel.kernels.triton import select_attend as mod

    calls = []
    monkeypatch.setattr(mod, "ENABLED", path == "selattend")
    monkeypatch.setattr(mod, "select_attend", lambda *a, **kw: calls.append("selattend") or select_attend(*a, **kw))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, s, 32, generator=g) for n, s in ((8, 1), (2, 256), (2, 256)))
    length = torch.tensor(150)
    kmin, kmax = R.page_bounds(k[:, :, :150], 16)
    pad = torch.full((2, 2, 16 - kmin.shape[2], 32), float("inf"))
    kmin, kmax = torch.cat([kmin, pad], 2), torch.cat([kmax, -pad], 2)  # a static buffer of 256 slots
    start = torch.tensor([0, 21], dtype=torch.int32) if padded else None
    kmin[:, :, 0], kmax[:, :, 0] = 0.0, 0.0  # page 0's bound is 0, below every other page's: chosen only if forced
    args = (q, k, v, kmin, kmax, length, start, 4, 16, "max", 0.25, 0.0)
    got = quest_static_decode(*args, True, keep_first)
    torch.testing.assert_close(got, quest_static_decode(*args, False, keep_first), atol=1e-5, rtol=1e-5)
    assert calls == ([] if path == "twolaunch" else [path])
    if keep_first and not padded:  # page 0 (not all padding) is attended only because it is forced
        assert not torch.allclose(got, quest_static_decode(*args, False, False), atol=1e-3)

