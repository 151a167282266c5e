"""Decode kernels (Triton, run on the CPU by the interpreter) against their torch twins: page bounds, Quest
scoring, top-k selection, split-KV attention over selected pages; full selections equal dense decode."""

import pytest
import torch

from accel.kernels import reference_decode as R
from accel.kernels.reference import attention
from accel.kernels.triton.decode_attention import paged_decode_attention
from accel.kernels.triton.decode_score import quest_scores
from accel.kernels.triton.decode_topk import select_pages

# the top-k's threshold searches: bisection, the packed ternary search
SEARCHES = [{"n_cuts": 1}, {"n_cuts": 2}]
SEARCH_IDS = ["bisect", "ternary"]


def _qkv(B, hkv, group, S, D=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hkv * group, 1, D, generator=g).to(dtype)
    k = torch.randn(B, hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, hkv, S, D, generator=g).to(dtype)
    return q, k, v


def test_page_bounds_partial_page():
    k = torch.randn(2, 3, 37, 16)
    mn, mx = R.page_bounds(k, 16)
    assert mn.shape == (2, 3, 3, 16)
    torch.testing.assert_close(mx[:, :, 2], k[:, :, 32:].amax(-2))
    torch.testing.assert_close(mn[:, :, 1], k[:, :, 16:32].amin(-2))


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("reduce", ["max", "sum", "max_norm"])
def test_quest_scores_match_reference(group, reduce):
    q, k, _ = _qkv(2, 2, group, 101)
    mn, mx = R.page_bounds(k, 16)
    start = torch.tensor([0, 40])
    got = quest_scores(q, mn, mx, group_reduce=reduce, kv_start=start)
    ref = R.quest_scores(q, mn, mx, group_reduce=reduce, kv_start=start)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.isinf(got[1, :, :2]).all()  # pages entirely in the padding are never chosen


@pytest.mark.parametrize("merge,block_p", [(2, None), (4, None), (4, 16), (8, 8)])
def test_quest_scores_merge_physical_pages(merge, block_p):
    """``merge``: each output the max of ``merge`` consecutive page scores (LServe's physical page) in the same
    launch, a ragged last run included (31 pages), across program tiles, with a head map."""
    q, k, _ = _qkv(2, 3, 4, 31 * 16 - 5, seed=3)
    mn, mx = R.page_bounds(k, 16)
    heads = torch.tensor([2, 0, 1])
    got = quest_scores(q, mn, mx, merge=merge, block_p=block_p, kv_heads=heads, group=4)
    ref = R.quest_scores(q, mn, mx, kv_heads=heads, group=4)
    ref = torch.nn.functional.pad(ref, (0, (-31) % merge), value=float("-inf")).unflatten(-1, (-1, merge)).amax(-1)
    assert got.shape == (2, 3, -(-31 // merge))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="power of two"):
        quest_scores(q, mn, mx, merge=3)


def test_quest_scores_max_norm():
    """``max_norm``: each head's bounds minus its bound over the whole cache (a ceiling no page exceeds), then the
    group max. Pages never written (+-inf bounds, as a
    static cache keeps them) drop out of the ceiling; a head map is refused."""
    q, k, _ = _qkv(1, 1, 2, 64, seed=5)
    mn, mx = R.page_bounds(k, 16)
    per_head = [R.quest_scores(q[:, h:h + 1], mn, mx) for h in range(2)]
    ceil = R.head_bounds(q[:, :, 0], mn, mx)
    want = torch.maximum(per_head[0] - ceil[0, 0], per_head[1] - ceil[0, 1])
    torch.testing.assert_close(R.quest_scores(q, mn, mx, group_reduce="max_norm"), want)
    assert (want <= 1e-5).all()
    spare = (torch.full_like(mn[:, :, :2], float("inf")), torch.full_like(mx[:, :, :2], float("-inf")))
    torch.testing.assert_close(R.head_bounds(q[:, :, 0], torch.cat([mn, spare[0]], 2), torch.cat([mx, spare[1]], 2)),
                               ceil)
    with pytest.raises(ValueError, match="kv_heads"):
        quest_scores(q, mn, mx, group_reduce="max_norm", kv_heads=torch.tensor([0]), group=2)


@pytest.mark.parametrize("pages, fp8", [(3, False), (70, False), (70, True)])
def test_page_box_matches_torch(pages, fp8):
    """The box max_norm's ceiling reads (Triton, split over the pages with float atomics): elementwise min of kmin
    and max of kmax over every page, unwritten (+-inf) pages dropping out; float8 bounds widened exactly."""
    from accel.kernels.triton.decode_score import page_box

    q, k, _ = _qkv(2, 3, 2, pages * 16 - 5, seed=pages)
    mn, mx = R.page_bounds(k, 16, R.BOUNDS_FP8 if fp8 else None)
    mn = torch.cat([mn, torch.full_like(mn[:, :, :4], float("inf"))], 2)  # a static cache's unwritten tail
    mx = torch.cat([mx, torch.full_like(mx[:, :, :4], float("-inf"))], 2)
    box = page_box(mn, mx)
    assert torch.equal(box[:, :, 0], mn.float().amin(2)) and torch.equal(-box[:, :, 1], mx.float().amax(2))
    got = quest_scores(q, mn, mx, group_reduce="max_norm")[..., :pages]  # unwritten pages score NaN (masked later)
    want = R.quest_scores(q, mn, mx, group_reduce="max_norm")[..., :pages]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_page_box_and_max_norm_on_gpu():
    """At a model shape (8 KV heads x 4, 128K tokens in pages of 16, float8 bounds, a static cache's unwritten
    tail): the box equals torch's, the max_norm scores the reference's."""
    from accel.kernels.triton.decode_score import page_box

    q, k, _ = _qkv(1, 8, 4, 8000 * 16, D=128, seed=9)
    q, k = q.cuda(), k.cuda()
    mn, mx = R.page_bounds(k, 16, R.BOUNDS_FP8)
    mn = torch.cat([mn, torch.full_like(mn[:, :, :200], float("inf"))], 2)
    mx = torch.cat([mx, torch.full_like(mx[:, :, :200], float("-inf"))], 2)
    box = page_box(mn, mx)
    assert torch.equal(box[:, :, 0], mn.float().amin(2)) and torch.equal(-box[:, :, 1], mx.float().amax(2))
    got = quest_scores(q, mn, mx, group_reduce="max_norm")[..., :8000]
    want = R.quest_scores(q, mn, mx, group_reduce="max_norm")[..., :8000]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="group_reduce"):
        R.quest_scores(q, mn, mx, group_reduce="mean")


def test_quest_score_bounds_every_key():
    """The criticality is an upper bound of q.k for every key of the page (per query head)."""
    q, k, _ = _qkv(1, 1, 1, 64)
    mn, mx = R.page_bounds(k, 16)
    s = R.quest_scores(q, mn, mx)
    qk = (q[0, 0, 0] @ k[0, 0].T).view(4, 16).amax(-1)
    assert (s[0, 0] >= qk - 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_outward_is_the_nearest_bound(dtype):
    """float8_e5m2 bounds: the min rounds down and the max up, to the nearest e5m2 value on that side (never past
    it: every value on the grid stays put), +-inf kept, and past the finite range only the outward side is inf."""
    x = torch.cat([torch.randn(20000) * 10, torch.randn(2000) * 1e-5, torch.tensor([0.0, -0.0, 1.0, -1.5, 57344.0,
                   60000.0, -60000.0, 7e4, -7e4, float("inf"), float("-inf")])]).to(dtype)
    up, down = R.fp8_outward(x, up=True), R.fp8_outward(x, up=False)
    assert up.dtype == down.dtype == R.BOUNDS_FP8
    xf, u, d = x.float(), up.float(), down.float()
    assert (u >= xf).all() and (d <= xf).all()
    near = xf.to(R.BOUNDS_FP8).float()  # round to nearest: on the right side it is the tightest bound
    fin = torch.isfinite(near)
    assert (u[fin & (near >= xf)] == near[fin & (near >= xf)]).all()
    assert (d[fin & (near <= xf)] == near[fin & (near <= xf)]).all()
    # the other side: exactly one e5m2 step away (the next value inward would not bound x)
    steps = u.to(R.BOUNDS_FP8).view(torch.uint8).int() - d.to(R.BOUNDS_FP8).view(torch.uint8).int()
    inside = fin & (near != xf) & (xf.abs() < 57344) & (xf != 0)
    assert (steps[inside & (xf > 0)] == 1).all() and (steps[inside & (xf < 0)] == -1).all()
    assert u[-6] == float("inf") and d[-6] == 57344 and d[-5] == float("-inf") and u[-5] == -57344
    assert u[-2] == d[-2] == float("inf") and u[-1] == d[-1] == float("-inf")


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quest_scores_fp8_bounds(group, dtype):
    """Float8 page bounds: the Triton scoring widens them in registers and matches the torch twin on the same
    bounds; the criticality still bounds q.k of every key of its page, and it is at most a few percent looser
    than with exact bounds."""
    q, k, _ = _qkv(2, 2, group, 101, dtype=dtype)
    mn, mx = R.page_bounds(k, 16, R.BOUNDS_FP8)
    assert mn.dtype == R.BOUNDS_FP8 and mn.element_size() == 1
    got = quest_scores(q, mn, mx)
    ref = R.quest_scores(q, mn, mx)
    torch.testing.assert_close(got, ref, atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-2)
    qk = torch.einsum("bhgd,bhsd->bhgs", q.float()[:, :, 0].unflatten(1, (2, group)), k.float())
    qk = torch.nn.functional.pad(qk, (0, 112 - 101), value=float("-inf")).unflatten(-1, (7, 16)).amax(-1).amax(2)
    assert (ref >= qk - 1e-3).all()
    exact = R.quest_scores(q, *R.page_bounds(k, 16))
    assert (ref >= exact - 1e-3).all() and ((ref - exact) / exact.abs().clamp_min(1)).max() < 0.3


@pytest.mark.parametrize("k_pages", [1, 3, 7, 40])
@pytest.mark.parametrize("keep_first", [False, True])
@pytest.mark.parametrize("how", SEARCHES, ids=SEARCH_IDS)
def test_select_pages_matches_reference(k_pages, keep_first, how):
    g = torch.Generator().manual_seed(k_pages)
    s = torch.randn(2, 3, 33, generator=g)
    s[0, 0, 5:9] = 0.25  # ties
    s[1, 2, :4] = float("-inf")
    kv_len = 33 * 16 - 5
    got = select_pages(s, k_pages, kv_len=kv_len, page_size=16, keep_first=keep_first, **how)
    ref = R.select_pages(s, k_pages, kv_len=kv_len, page_size=16, keep_first=keep_first)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    if k_pages >= 2 or not keep_first:
        assert (got[0] == 32).any(-1).all()  # the newest page is always kept


@pytest.mark.parametrize("k_pages", [1, 17, 60, 199])
@pytest.mark.parametrize("how", SEARCHES, ids=SEARCH_IDS)
def test_select_pages_heavy_ties_and_early_stop(k_pages, how):
    # integer scores: most cuts land inside a run of equal keys, so the search's stop at a cut with exactly k keys
    # above it and the tie ranking after it both decide the result; continuous rows stop early instead
    g = torch.Generator().manual_seed(k_pages)
    s = torch.cat([torch.randint(0, 6, (2, 2, 200), generator=g).float(), torch.randn(2, 2, 200, generator=g)], 1)
    got = select_pages(s, k_pages, kv_len=200 * 16, page_size=16, **how)
    ref = R.select_pages(s, k_pages, kv_len=200 * 16, page_size=16)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("n_pages", [32, 40])
@pytest.mark.parametrize("k_pages", [1, 2, 6, 9, 30])
@pytest.mark.parametrize("keep_first", [False, True])
def test_select_pages_cut_among_infinite_keys(n_pages, k_pages, keep_first):
    """The search starts on the finite scores' range and counts the keys at +-inf; when the cut falls among them
    (more +inf pages than k, no finite page, or too few finite pages) it searches the whole range. Both starts give
    the reference's pages."""
    g = torch.Generator().manual_seed(n_pages * k_pages)
    s = torch.randn(4, 1, n_pages, generator=g)
    s[0, 0, 3:8] = float("inf")  # five +inf pages besides the forced ones
    s[1, 0, :] = float("-inf")  # no finite page: only the forced ones rank
    s[2, 0, 4:] = float("-inf")  # four finite pages, then -inf
    s[3, 0, ::3] = float("-inf")  # left-padding-like -inf pages among finite ones
    kv_len = n_pages * 16 - 7
    ref = R.select_pages(s, k_pages, kv_len=kv_len, page_size=16, keep_first=keep_first)
    for kw in ({"finite_range": True}, {"finite_range": False}):
        got = select_pages(s, k_pages, kv_len=kv_len, page_size=16, keep_first=keep_first, **kw)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), kw


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_reference(group, dtype):
    q, k, v = _qkv(2, 2, group, 133, dtype=dtype, seed=group)
    mn, mx = R.page_bounds(k, 16)
    pages, counts = R.select_pages(R.quest_scores(q, mn, mx), 4, kv_len=133, page_size=16)
    counts[0, 1] = 2  # fewer valid entries than the row's width
    start = torch.tensor([0, 19])
    end = torch.tensor([133, 101], dtype=torch.int32)  # a static cache's filled length, read on the device
    for kw in ({}, {"softcap": 3.0}, {"kv_start": start}, {"kv_end": end}, {"kv_start": start, "kv_end": end}):
        got, lse = paged_decode_attention(q, k, v, pages, counts, 16, scale=0.2, return_lse=True, **kw)
        ref, rlse = R.paged_decode_attention(q, k, v, pages, counts, 16, scale=0.2, return_lse=True, **kw)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("page", [1, 16, 64])
@pytest.mark.parametrize("splits", [None, 2])
def test_paged_attention_128_key_tiles(page, splits):
    """The GPU's larger tile (128 keys, ``_tile``) on the interpreter: a program's share spans several pages (or
    unsorted token positions, as TidalDecode's unsorted top-k leaves them), and the last tile is partial."""
    q, k, v = _qkv(2, 2, 4, 700, dtype=torch.bfloat16, seed=page)
    g = torch.Generator().manual_seed(page)
    n = {1: 300, 16: 13, 64: 5}[page]
    pages = torch.stack([torch.randperm(-(-700 // page), generator=g)[:n] for _ in range(4)]).view(2, 2, n)
    pages = pages.to(torch.int32).contiguous()
    counts = torch.tensor([[n, n - 1], [n, 1]], dtype=torch.int32)
    end = torch.tensor([700, 650], dtype=torch.int32)
    got = paged_decode_attention(q, k, v, pages, counts, page, scale=0.2, kv_end=end, block_n=128, n_splits=splits)
    ref = R.paged_decode_attention(q, k, v, pages, counts, page, scale=0.2, kv_end=end)
    torch.testing.assert_close(got.float(), ref.float(), atol=1e-2, rtol=1e-2)
    dense = paged_decode_attention(q, k, v, scale=0.2, block_n=128, n_splits=splits)
    torch.testing.assert_close(dense.float(), attention(q, k, v, scale=0.2).float(), atol=1e-2, rtol=1e-2)


def test_launch_tile_and_stages():
    """Keys per tile and pipeline stages on a 132-SM GPU for the decode shapes of results/bench_decode_tiles.md
    (128K, budget 4096, 8 KV heads, head_dim 128, bf16)."""
    from accel.kernels.triton.decode_attention import _stages, _tile

    assert _tile(1, 8, 4096, None, 128, 128, 2, 132) == 128  # Quest / TidalDecode, batch 1: 256 programs
    assert _tile(4, 8, 4096, None, 128, 128, 2, 132) == 128
    assert _tile(1, 4, 65 * 64, None, 128, 128, 2, 132) == 64  # LServe batch 1: 4 selecting heads, 132 programs
    assert _tile(4, 4, 65 * 64, None, 128, 128, 2, 132) == 128
    assert _tile(1, 8, 131072, None, 128, 128, 2, 132) == 128  # dense
    assert _tile(1, 8, 131072, None, 256, 256, 2, 132) == 64  # Gemma's head_dim 256: 64 KB tiles
    assert _tile(1, 8, 131072, None, 128, 128, 4, 132) == 64  # float32
    assert _tile(1, 8, 4096, 1, 128, 128, 2, 132) == 64  # one split per row: 8 programs
    assert [_stages(t, 128) for t in (1, 2, 4, 100)] == [1, 2, 2, 2]
    assert [_stages(t, 64) for t in (1, 2, 4, 8)] == [1, 1, 2, None]


@pytest.mark.parametrize("rows", [1, 4, 8, 16, 32, 64, 100, 264, 300])
def test_splits_keep_one_wave(rows):
    """Splits per (batch row, KV head) fill at most one wave of two programs per SM (132 SMs): rounding up put 24
    of batch 4's 288 programs in a second wave (results/bench_decode_logits.md), and still fill most of it."""
    from accel.kernels.triton.decode_attention import _splits

    n = _splits(rows, 132)
    assert n >= 1
    assert rows * n <= max(264, rows)
    assert rows * (n + 1) > 264


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("S", [1, 17, 150])
def test_full_selection_is_dense_decode(S, splits):
    q, k, v = _qkv(1, 2, 4, S)
    n = -(-S // 16)
    pages = torch.arange(n, dtype=torch.int32).expand(1, 2, n).contiguous()
    counts = torch.full((1, 2), n, dtype=torch.int32)
    dense = attention(q, k, v, scale=0.3)
    torch.testing.assert_close(paged_decode_attention(q, k, v, pages, counts, 16, scale=0.3, n_splits=splits), dense,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged_decode_attention(q, k, v, scale=0.3, n_splits=splits), dense, atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(R.paged_decode_attention(q, k, v, pages, counts, 16, scale=0.3), dense, atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("paged", [False, True])
def test_kv_end_equals_truncated_cache(paged):
    """Keys at or past kv_end are invisible: the same as attending to the truncated cache."""
    q, k, v = _qkv(2, 2, 4, 96, seed=3)
    end = torch.tensor([50, 96], dtype=torch.int32)
    n = 6
    pages = torch.arange(n, dtype=torch.int32).expand(2, 2, n).contiguous() if paged else None
    counts = torch.full((2, 2), n, dtype=torch.int32) if paged else None
    got = paged_decode_attention(q, k, v, pages, counts, 16, scale=0.3, kv_end=end)
    for b, e in enumerate(end.tolist()):
        want = attention(q[b : b + 1], k[b : b + 1, :, :e], v[b : b + 1, :, :e], scale=0.3)
        torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-5)


def test_strided_cache_views():
    """K/V as views of a larger capacity buffer (what PagedKVLayer hands out)."""
    q, k, v = _qkv(1, 2, 2, 64)
    kb, vb = torch.zeros(1, 2, 100, 32), torch.zeros(1, 2, 100, 32)
    kb[:, :, :64], vb[:, :, :64] = k, v
    got = paged_decode_attention(q, kb[:, :, :64], vb[:, :, :64])
    torch.testing.assert_close(got, attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_bad_page_size():
    q, k, v = _qkv(1, 1, 1, 32)
    pages = torch.zeros(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="page size 12"):
        paged_decode_attention(q, k, v, pages, torch.ones(1, 1, dtype=torch.int32), 12)


@pytest.mark.parametrize("window", [None, 40, 500])
@pytest.mark.parametrize("padded", [False, True])
def test_triton_backend_dense_decode_uses_split_kv(window, padded):
    """One-token decode on the triton backend (dense or windowed layout) goes through the split-KV kernel and
    equals the reference backend, with left padding and with a window shorter or longer than the cache."""
    from accel.kernels import get_backend
    from accel.layouts import DenseLayout

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 1, 64, generator=g)
    k = torch.randn(2, 2, 300, 64, generator=g)
    v = torch.randn(2, 2, 300, 64, generator=g)
    kv_start = torch.tensor([0, 270], dtype=torch.int32) if padded else None
    layout = DenseLayout(window=window)
    got = get_backend("triton").run(layout, q, k, v, scale=0.125, kv_start=kv_start)
    want = get_backend("reference").run(layout, q, k, v, scale=0.125, kv_start=kv_start)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_search_passes_cover_every_int32_key():
    from accel.kernels.triton.decode_topk import search_passes

    assert [search_passes(n) for n in (1, 2, 3)] == [32, 21, 16]
    with pytest.raises(ValueError, match="1 \\(bisection\\) or 2"):
        select_pages(torch.randn(1, 1, 8), 2, kv_len=128, page_size=16, n_cuts=3)


@pytest.mark.parametrize("n_pages", [16, 17, 40, 64, 100])
@pytest.mark.parametrize("how", SEARCHES, ids=SEARCH_IDS)
def test_select_pages_tail_block(n_pages, how):
    """Rows past a power of two: a power-of-two block plus a tail block (kernel ``blocks``); ties straddle the two
    (the lowest page ids win across both), the newest page sits in the tail, and on the device the length ends
    inside it."""
    from accel.kernels.triton.decode_topk import blocks

    main, tail = blocks(n_pages)
    assert main <= max(16, n_pages) and main + tail >= n_pages and (tail > 0) == (n_pages > main)
    g = torch.Generator().manual_seed(n_pages)
    s = torch.randn(2, 2, n_pages, generator=g)
    s[0, 1, 10:30] = 0.5  # a run of ties across the block boundary at 16 or 32
    s[0, 1, :10] = -1.0
    for k in (3, 15, n_pages - 1):
        got = select_pages(s, k, kv_len=n_pages * 16 - 3, page_size=16, **how)
        ref = R.select_pages(s, k, kv_len=n_pages * 16 - 3, page_size=16)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        one = select_pages(s, k, kv_len=n_pages * 16 - 3, page_size=16, **how, tail_block=False)
        assert torch.equal(one[0], ref[0]) and torch.equal(one[1], ref[1])
    length = (n_pages - 2) * 16 + 1  # the last filled page is the one before the last
    s_nan = s.clone()
    s_nan[..., n_pages - 1:] = float("nan")
    pages, counts = select_pages(s_nan, 5, kv_len=torch.tensor(length), page_size=16, **how)
    want_p, want_c = R.select_pages(s[..., : n_pages - 1], 5, kv_len=length, page_size=16)
    assert torch.equal(pages, want_p) and torch.equal(counts, want_c)


@pytest.mark.parametrize("length", [1, 37, 130, 160])
@pytest.mark.parametrize("how", SEARCHES, ids=SEARCH_IDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_select_pages_with_device_length(length, how, dtype):
    """A static cache's length read on the device: pages past it (NaN scores from +-inf bounds) are never chosen and
    the rest matches the host-length selection over the filled pages."""
    g = torch.Generator().manual_seed(length)
    scores = torch.randn(2, 3, 10, generator=g)
    n_filled = -(-length // 16)
    scores[..., n_filled:] = float("nan")
    pages, counts = select_pages(scores, 4, kv_len=torch.tensor(length, dtype=dtype), page_size=16, **how)
    want_p, want_c = R.select_pages(scores[..., :n_filled], 4, kv_len=length, page_size=16)
    assert torch.equal(counts, want_c)
    for b in range(2):
        for h in range(3):
            assert torch.equal(pages[b, h, : counts[b, h]], want_p[b, h, : want_c[b, h]])


def test_select_pages_reuse_per_row():
    """LServe's reuse in the top-k kernel, row by row: a row whose selection is fresh enough keeps its pages and
    count and gets the page begun since in the spare slot (counted in ``live``); a row that never selected, or whose
    selection is ``steps`` tokens old, selects anew (as without reuse) and records the length."""
    g = torch.Generator().manual_seed(3)
    B, H, P, k, page, steps = 2, 2, 12, 4, 16, 4
    length = torch.tensor(7 * page + 2)  # newest page 7, begun 2 tokens ago
    scores = torch.randn(B, H, P, generator=g)
    scores[..., 8:] = float("nan")  # unfilled pages
    kept = torch.tensor([[1, 3, 5, 6]], dtype=torch.int32).expand(B, H, 4)
    pages = torch.zeros(B, H, k + 1, dtype=torch.int32)
    pages[..., :4] = kept
    counts = torch.full((B, H), 4, dtype=torch.int32)
    # (0, 0) selected 1 token ago on page 6 -> reused + page 7 begun; (0, 1) 1 token ago, page 7 -> reused, none
    # begun; (1, 0) never -> selects; (1, 1) exactly `steps` tokens ago -> selects
    sel_len = torch.tensor([[6 * page + 16, 7 * page + 1], [0, 7 * page + 2 - steps]], dtype=torch.int32)
    sel0 = sel_len.clone()
    live = torch.full((B, H), -1, dtype=torch.int32)
    got_p, got_live = select_pages(scores.clone(), k, kv_len=length, page_size=page, out=(pages, counts),
                                   reuse=(sel_len, steps, live))
    assert got_p is pages and got_live is live
    fresh_p, fresh_c = select_pages(scores, k, kv_len=length, page_size=page)
    assert torch.equal(pages[0, 0, :5], torch.tensor([1, 3, 5, 6, 7], dtype=torch.int32)) and live[0, 0] == 5
    assert torch.equal(pages[0, 1, :4], kept[0, 0]) and pages[0, 1, 4] == 7 and live[0, 1] == 4
    assert torch.equal(sel_len[0], sel0[0]) and torch.equal(counts[0], torch.tensor([4, 4], dtype=torch.int32))
    for h in range(H):  # the reselected rows: the fresh selection, the length recorded, nothing begun
        assert torch.equal(pages[1, h, : fresh_c[1, h]], fresh_p[1, h, : fresh_c[1, h]])
        assert counts[1, h] == fresh_c[1, h] == live[1, h] and sel_len[1, h] == int(length)
    # the scoring kernel decides the same rows: the reselecting ones are scored as without reuse
    q, kk, _ = _qkv(B, H, 2, P * page, seed=4)
    kmin, kmax = R.page_bounds(kk, page)
    out = quest_scores(q, kmin, kmax, page_size=page, reuse=(sel0, length, steps))
    assert torch.equal(out[1], quest_scores(q, kmin, kmax, page_size=page)[1])


def test_select_pages_reuse_needs_its_buffers():
    scores = torch.randn(1, 2, 8)
    sel = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="k \\+ 1"):
        select_pages(scores, 3, kv_len=torch.tensor(100), page_size=16, reuse=(sel, 4, sel.clone()))
    with pytest.raises(ValueError, match="int32"):
        select_pages(scores, 3, kv_len=torch.tensor(100), page_size=16, reuse=(sel.long(), 4, sel.clone()),
                     out=(torch.zeros(1, 2, 4, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32)))


@pytest.mark.parametrize("padded", [False, True])
def test_quest_static_op_triton_matches_torch(padded):
    from accel.kernels.reference_decode import page_bounds
    from accel.kernels.static_decode import quest_static_decode

    q, k, v = _qkv(2, 2, 4, 256, seed=5)
    length = torch.tensor(150)
    kmin, kmax = page_bounds(k[:, :, :150], 16)
    pad = torch.full((2, 2, 16 - kmin.shape[2], k.shape[-1]), float("inf"))
    kmin, kmax = torch.cat([kmin, pad], 2), torch.cat([kmax, -pad], 2)  # a static buffer of 256 slots
    start = torch.tensor([0, 21], dtype=torch.int32) if padded else None
    args = (q, k, v, kmin, kmax, length, start, 4, 16, "max", 0.25, 0.0)
    torch.testing.assert_close(quest_static_decode(*args, True), quest_static_decode(*args, False), atol=1e-5,
                               rtol=1e-5)


def _mapped(group):
    """Query heads of the KV-head map [2, 0] (out of order on purpose) in a layer of 3 KV heads."""
    heads = torch.tensor([2, 0], dtype=torch.int32)
    qh = (heads.long()[:, None] * group + torch.arange(group)).flatten()
    return heads, qh


BOUNDS = {"none": {}, "start": {"kv_start": torch.tensor([0, 19], dtype=torch.int32)},
          "end": {"kv_end": torch.tensor([70, 41], dtype=torch.int32)},
          # a static cache's length: one 0-d int64 value for every row
          "start+end": {"kv_start": torch.tensor([5, 19], dtype=torch.int32), "kv_end": torch.tensor(58)}}


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("bounds", list(BOUNDS))
def test_paged_attention_head_map(group, dtype, paged, bounds):
    """k/v hold KV heads 2 and 0 of a 3-head layer, q is the full layer's: the kernel writes exactly those query
    heads of ``out`` (the rest untouched), equal to its twin and to the no-map call on gathered inputs."""
    q, k, v = _qkv(2, 3, group, 70, D=16, dtype=dtype, seed=group)
    heads, qh = _mapped(group)
    ks, vs = k[:, heads.long()], v[:, heads.long()]  # what a split cache stores
    pages = counts = None
    if paged:
        mn, mx = R.page_bounds(ks, 16)
        pages, counts = R.select_pages(R.quest_scores(q[:, qh], mn, mx), 3, kv_len=70, page_size=16)
        counts[1, 0] = 2
    kw = dict(scale=0.3, softcap=None if bounds != "end" else 2.0, **BOUNDS[bounds])
    out = torch.full((2, 3 * group, 1, 16), 7.0, dtype=dtype)
    got, lse = paged_decode_attention(q, ks, vs, pages, counts, 16, kv_heads=heads, group=group, out=out,
                                      return_lse=True, **kw)
    assert got is out
    others = torch.ones(3 * group, dtype=torch.bool)
    others[qh] = False
    assert (out[:, others] == 7.0).all() and torch.isinf(lse[:, others]).all()
    ref, rlse = R.paged_decode_attention(q, ks, vs, pages, counts, 16, kv_heads=heads, group=group,
                                         return_lse=True, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got[:, qh].float(), ref[:, qh].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse[:, qh], rlse[:, qh], atol=1e-4, rtol=1e-4)
    plain, plse = paged_decode_attention(q[:, qh], ks, vs, pages, counts, 16, return_lse=True, **kw)
    assert torch.equal(got[:, qh], plain) and torch.equal(lse[:, qh], plse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("ring_len,fill", [(24, 70), (200, 70), (200, 150)])  # ring narrower / wider than pages
def test_paged_attention_with_ring(dtype, paged, ring_len, fill):
    """One launch over KV heads 2 and 0 of a 3-head layer (paged or not) and, as a second source, head 1's ring
    (slots [0, min(kv_end, ring))): each part equals its own twin call, and every query head is written."""
    group = 2
    q, k, v = _qkv(2, 3, group, 256, D=16, dtype=dtype, seed=ring_len)
    heads, qh = _mapped(group)
    ks, vs = k[:, heads.long()], v[:, heads.long()]
    rk, rv = k[:, 1:2, :ring_len], v[:, 1:2, :ring_len]
    ring_heads = torch.tensor([1], dtype=torch.int32)
    pages = counts = None
    if paged:
        mn, mx = R.page_bounds(ks[:, :, :fill], 16)
        pages, counts = R.select_pages(R.quest_scores(q[:, qh], mn, mx), 2, kv_len=fill, page_size=16)
    kw = dict(scale=0.3, kv_end=torch.tensor(fill))
    got = paged_decode_attention(q, ks, vs, pages, counts, 16, kv_heads=heads, group=group,
                                 ring=(rk, rv, ring_heads), **kw)
    want = R.paged_decode_attention(q, ks, vs, pages, counts, 16, kv_heads=heads, group=group, **kw)
    want = R.paged_decode_attention(q, rk, rv, None, None, 16, kv_heads=ring_heads, group=group, out=want, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="ring needs a head map"):
        paged_decode_attention(q, k, v, ring=(rk, rv, ring_heads))


def test_paged_attention_head_map_checks():
    q, k, v = _qkv(1, 2, 2, 32, D=16)
    heads = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match="needs group"):
        paged_decode_attention(q, k[:, 1:], v[:, 1:], kv_heads=heads)
    with pytest.raises(ValueError, match="kv_heads must be"):
        paged_decode_attention(q, k, v, kv_heads=heads, group=2)
    out = torch.full((1, 4, 1, 16), 3.0)  # no KV head selected: nothing launched, out untouched
    paged_decode_attention(q, k[:, :0], v[:, :0], kv_heads=heads[:0], group=2, out=out)
    assert (out == 3.0).all()


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_quest_scores_head_map(group, dtype, padded):
    """Bounds of KV heads 2 and 0 of a 3-head layer, q the full layer's: the twin's scores, and the no-map call's on
    the gathered query heads."""
    q, k, _ = _qkv(2, 3, group, 75, D=16, dtype=dtype, seed=7)
    heads, qh = _mapped(group)
    mn, mx = R.page_bounds(k[:, heads.long()], 16)
    start = torch.tensor([0, 40]) if padded else None
    for reduce in ("max", "sum"):
        got = quest_scores(q, mn, mx, group_reduce=reduce, kv_start=start, kv_heads=heads, group=group)
        assert got.shape == (2, 2, 5)
        ref = R.quest_scores(q, mn, mx, group_reduce=reduce, kv_start=start, kv_heads=heads, group=group)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
        assert torch.equal(got, quest_scores(q[:, qh], mn, mx, group_reduce=reduce, kv_start=start))


@pytest.mark.parametrize("n_cuts", [1, 2])
def test_select_pages_packed_counts_at_the_largest_row(n_cuts):
    """A row of MAX_PAGES pages: the two counts of a pass share one int32 in 16-bit fields, so a count must stay
    below 65536 even when every page but the smallest is at or above a cut."""
    from accel.kernels.triton.decode_topk import MAX_PAGES

    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 1, MAX_PAGES, generator=g)
    s[0, 0, 7] = -50.0  # one far-below page: the first cuts sit just above it, with MAX_PAGES - 1 keys above them
    k = MAX_PAGES - 2
    got = select_pages(s, k, kv_len=MAX_PAGES * 16, page_size=16, n_cuts=n_cuts)
    ref = R.select_pages(s, k, kv_len=MAX_PAGES * 16, page_size=16)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("bounds", list(BOUNDS))
def test_paged_attention_hands_back_its_scores(dtype, paged, bounds):
    """``logits``: every attended key's base-2 score lands at its key index (soft-capped when asked), keys not
    attended keep what was there, and exp2(logits - lse * log2 e) over the attended keys are the probabilities
    that produced the output (TidalDecode ranks keys by them)."""
    q, k, v = _qkv(2, 2, 4, 70, D=16, dtype=dtype, seed=5)
    pages = counts = None
    if paged:
        mn, mx = R.page_bounds(k, 16)
        pages, counts = R.select_pages(R.quest_scores(q, mn, mx), 3, kv_len=70, page_size=16)
    kw = dict(scale=0.3, softcap=2.0 if bounds == "end" else None, **BOUNDS[bounds])
    logits = torch.full((2, 8, 75), float("nan"))  # wider than the cache: a static buffer's row
    out, lse = paged_decode_attention(q, k, v, pages, counts, 16, return_lse=True, logits=logits, **kw)
    s = torch.einsum("bhd,bhsd->bhs", q[:, :, 0].float(), k.repeat_interleave(4, 1).float()) * 0.3
    if kw["softcap"]:
        s = 2.0 * torch.tanh(s / 2.0)
    pos = torch.arange(70)
    seen = torch.ones(2, 70, dtype=torch.bool)  # the keys each row attends to
    if "kv_start" in kw:
        seen &= pos[None] >= kw["kv_start"].long()[:, None]
    if "kv_end" in kw:
        seen &= pos[None] < kw["kv_end"].long().reshape(-1, 1)
    seen = seen[:, None].expand(2, 8, 70)
    if paged:
        chosen = torch.zeros(2, 2, 70, dtype=torch.bool)
        for b in range(2):
            for h in range(2):
                for p in pages[b, h, : counts[b, h]].tolist():
                    chosen[b, h, p * 16 : p * 16 + 16] = True
        seen = seen & chosen.repeat_interleave(4, 1)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits[..., :70][seen], (s * 1.4426950408889634)[seen], atol=tol, rtol=tol)
    assert torch.isnan(logits[..., :70][~seen]).all() and torch.isnan(logits[..., 70:]).all()
    p = torch.where(seen, torch.exp2(logits[..., :70] - lse * 1.4426950408889634), 0.0)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 8), atol=1e-4, rtol=1e-4)
    want = (p[..., None] * v.repeat_interleave(4, 1).float()).sum(2)
    torch.testing.assert_close(out[:, :, 0].float(), want, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="logits must be a float32"):
        paged_decode_attention(q, k, v, logits=torch.zeros(2, 8, 69))
