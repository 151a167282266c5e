"""Triton block selection (cumulative threshold, per-row top-n, straight to a BlockLayout) vs the torch twins
``keep_by_threshold``, ``tokens_to_cover``, ``top_n_mask`` and ``build_block_layout``: exact equality on inputs
without ties; ties go to the lower index. CPU under TRITON_INTERPRET=1; GPU tests marked."""

import pytest
import torch

from accel.kernels.reference_sparse import build_block_layout, causal_block_mask
from accel.kernels.triton.block_topk import (MAX_N, threshold_counts, threshold_layout, threshold_mask, topn_layout,
                                             topn_mask)
from accel.policies.block_select import keep_by_threshold
from accel.policies.flexprefill import tokens_to_cover, top_n_mask


def _scores(*shape, seed=0, power=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) ** power  # skewed, no ties


def _rows():
    x = _scores(12, 50)
    x[1] = 0.0  # empty row
    x[2] = 0.0
    x[2, 17] = 0.5  # a single block
    x[3] = torch.linspace(1.0, 2.0, 50)  # near-flat: most of the row
    x[4, 40:] = 0.0  # zeros (masked blocks) are never kept
    return x


def _same_layout(got, want):
    assert got.counts.dtype == got.indices.dtype == torch.int32
    assert torch.equal(got.counts, want.counts), (got.counts, want.counts)
    assert torch.equal(got.indices, want.indices), (got.indices, want.indices)


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.999, 1.0])
def test_threshold_mask_matches_keep_by_threshold(threshold):
    x = _rows()
    got = threshold_mask(x, threshold)
    assert got.dtype == torch.bool and got.shape == x.shape
    assert torch.equal(got, keep_by_threshold(x, threshold))
    assert not got[1].any() and got[2].sum() == 1 and not got[4, 40:].any()


def test_threshold_mask_any_leading_shape_and_dtypes():
    x = _scores(2, 4, 33, seed=1)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dt)
        assert torch.equal(threshold_mask(xd, 0.9), keep_by_threshold(xd.float(), 0.9))
    assert threshold_mask(x, 1.5).all()


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_threshold_counts_match_tokens_to_cover(threshold):
    x = _rows()
    assert torch.equal(threshold_counts(x, threshold), tokens_to_cover(x, threshold).to(torch.int32))


def test_threshold_ties_go_to_the_lower_index():
    x = torch.tensor([[1.0, 3.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    # row 0: total 7, target 3.5: 3 (mass before 0) then the tied 1s at mass 3 (kept), 4 (not)
    assert threshold_mask(x, 0.5).tolist() == [[True, True, False, False, False, False],
                                                [True, True, True, False, False, False]]


def test_long_rows_and_limit():
    x = _scores(3, 2048, seed=2, power=6.0)
    assert torch.equal(threshold_mask(x, 0.9), keep_by_threshold(x, 0.9))
    n = torch.tensor([0, 100, 2048])
    assert torch.equal(topn_mask(x, n), top_n_mask(x, n))
    with pytest.raises(ValueError, match=f"MAX_N={MAX_N}"):
        threshold_mask(torch.rand(2, MAX_N + 1), 0.9)


def test_topn_mask_matches_top_n_mask():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 37, generator=g)  # negative scores too
    n = torch.randint(-2, 45, (4, 6), generator=g)
    n[0, 0], n[0, 1], n[0, 2] = 0, 37, 60
    got = topn_mask(x, n)
    assert torch.equal(got, top_n_mask(x, n.clamp_min(0)))
    assert torch.equal(got.sum(-1), n.clamp(0, 37))


def test_topn_ties_go_to_the_lower_index():
    x = torch.tensor([[1.0, 5.0, 1.0, 1.0, -1.0, 1.0]])
    assert topn_mask(x, torch.tensor([3])).tolist() == [[True, True, True, False, False, False]]


# (q_len, kv_len, block_q, block_k)
GEOMETRIES = [(300, 300, 32, 32), (100, 333, 32, 32), (64, 64, 64, 64), (1, 50, 16, 16), (200, 260, 32, 64),
              (130, 130, 128, 128)]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0])
def test_threshold_layout_matches_build_block_layout(geo, threshold):
    Sq, Sk, bq, bk = geo
    causal, _ = causal_block_mask(Sq, Sk, bq, bk)
    s = _scores(1, 2, *causal.shape, seed=Sq + Sk)
    s[0, 1, ::2] = 0.0  # empty score rows: only the sink and diagonal blocks
    want = build_block_layout(keep_by_threshold(s.masked_fill(~causal, 0), threshold), Sq, Sk, bq, bk)
    _same_layout(threshold_layout(s, threshold, Sq, Sk, bq, bk), want)


def test_threshold_layout_options():
    Sq, Sk, b = 100, 200, 32
    causal, _ = causal_block_mask(Sq, Sk, b, b)
    s = _scores(1, 1, *causal.shape, seed=5)
    sel = keep_by_threshold(s.masked_fill(~causal, 0), 0.7)
    want = build_block_layout(sel, Sq, Sk, b, b, keep_first=False, keep_diagonal=False, max_blocks=9)
    _same_layout(threshold_layout(s, 0.7, Sq, Sk, b, b, keep_first=False, keep_diagonal=False, max_blocks=9), want)
    # one score head shared by 3 query heads
    want = build_block_layout(sel.repeat_interleave(3, dim=1), Sq, Sk, b, b)
    _same_layout(threshold_layout(s, 0.7, Sq, Sk, b, b, heads_per_score=3), want)


@pytest.mark.parametrize("geo, heads, per", [((300, 300, 32, 32), 2, 1), ((100, 333, 32, 32), 2, 2),
                                             ((64, 64, 64, 64), 1, 7), ((1, 50, 16, 16), 1, 7),
                                             ((200, 260, 32, 64), 1, 2)], ids=str)
def test_topn_layout_matches_build_block_layout(geo, heads, per):
    Sq, Sk, bq, bk = geo
    causal, _ = causal_block_mask(Sq, Sk, bq, bk)
    nq, nk = causal.shape
    g = torch.Generator().manual_seed(per)
    s = _scores(1, heads, nq, nk, seed=per + Sq)
    n = torch.randint(0, nk + 3, (1, heads * per, nq), generator=g)
    ranking = s.masked_fill(~causal, -1.0).repeat_interleave(per, dim=1)
    want = build_block_layout(top_n_mask(ranking, n) & causal, Sq, Sk, bq, bk)
    _same_layout(topn_layout(s, n, Sq, Sk, bq, bk), want)


def test_empty_inputs():
    assert threshold_mask(torch.zeros(0, 5), 0.9).shape == (0, 5)
    assert threshold_counts(torch.zeros(3, 0, 5), 0.9).shape == (3, 0)
    lay = threshold_layout(torch.zeros(0, 2, 4, 4), 0.9, 128, 128, 32, 32)
    assert lay.counts.shape == (0, 2, 4) and lay.indices.shape == (0, 2, 4, 0)


def test_bad_inputs(monkeypatch):
    x = _scores(4, 8)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        threshold_mask(x.double(), 0.9)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        topn_mask(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="threshold must be"):
        threshold_mask(x, 0.0)
    with pytest.raises(ValueError, match="shape"):
        topn_mask(x, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer tensor"):
        topn_mask(x, torch.ones(4))
    with pytest.raises(ValueError, match="4 dims"):
        threshold_layout(x, 0.9, 128, 256, 32, 32)
    with pytest.raises(ValueError, match="need"):
        threshold_layout(x[None, None], 0.9, 128, 300, 32, 32)
    with pytest.raises(ValueError, match="q_len"):
        threshold_layout(x[None, None], 0.9, 300, 256, 32, 32)
    with pytest.raises(ValueError, match="multiple of the 2 score heads"):
        topn_layout(_scores(1, 2, 4, 8), torch.ones(1, 3, 4, dtype=torch.int32), 128, 256, 32, 32)
    with pytest.raises(ValueError, match=f"MAX_N={MAX_N}"):
        threshold_layout(torch.rand(1, 1, 1, MAX_N + 1), 0.9, 16, (MAX_N + 1) * 16, 16, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        threshold_mask(x, 0.9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("S, block", [(32768, 128), (131072, 128), (65536, 64)])
def test_gpu_layouts_match_torch(S, block):
    """Llama-3.1-8B head count at long context: the Triton layout equals the torch path's (scores on the GPU,
    torch selection on the CPU copy). Scores are a random permutation of 1..n per row: no ties, and every partial
    sum is exact in float32, so the tree (kernel) and sequential (torch) sums cannot land on different sides of the
    threshold."""
    causal, _ = causal_block_mask(S, S, block, block, device="cuda")
    nq, nk = causal.shape
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.rand(1, 8, nq, nk, generator=g, device="cuda").argsort(-1).float() + 1
    got = threshold_layout(s, 0.9, S, S, block, block)
    sc, cc = s.cpu(), causal.cpu()
    want = build_block_layout(keep_by_threshold(sc.masked_fill(~cc, 0), 0.9), S, S, block, block)
    assert torch.equal(got.counts.cpu(), want.counts) and torch.equal(got.indices.cpu(), want.indices)
    n = torch.randint(0, nk, (1, 32, nq), generator=g, device="cuda")
    got = topn_layout(s, n, S, S, block, block)
    ranking = sc.masked_fill(~cc, -1.0).repeat_interleave(4, dim=1)
    want = build_block_layout(top_n_mask(ranking, n.cpu()) & cc, S, S, block, block)
    assert torch.equal(got.counts.cpu(), want.counts) and torch.equal(got.indices.cpu(), want.indices)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_policies_match_cpu_path():
    """XAttention and ProxyAttn layouts on CUDA (Triton scores + Triton selection) vs their CPU torch paths on the
    same inputs (fp32 so both score paths agree closely)."""
    from accel.policies import AttentionContext
    from accel.policies.proxy import ProxyPolicy
    from accel.policies.xattention import XAttentionPolicy

    ctx = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 8, 2048, 64, generator=g) * 2, torch.randn(1, 2, 2048, 64, generator=g) * 2
    for pol in (XAttentionPolicy.from_options(threshold=0.9), ProxyPolicy.from_options(gamma=0.9)):
        a = pol.plan(q.cuda(), k.cuda(), ctx)
        b = pol.plan(q, k, ctx)
        kept_a = a.counts.sum().item()
        kept_b = b.counts.sum().item()
        assert abs(kept_a - kept_b) <= 0.01 * kept_b  # score rounding may move blocks at the margin
