"""kernels/triton/flex_estimate.py against its torch twin (FlexPrefillPolicy.estimate's torch path, then top_n_mask
on the block sums): block budgets, pattern choice, block sums, pooled probabilities, the layout kernel's top-n
tables, slots and query-aware cuts; over shapes, GQA groups, ties, and heads of both patterns."""

import math

import pytest
import torch

from accel.kernels.reference_estimation import block_means, block_sums, lastq_scores_reference
from accel.kernels.triton.flex_estimate import flex_estimate
from accel.kernels.triton.mass_threshold import mass_cut_torch, mass_search
from accel.policies import flexprefill as fp_mod
from accel.policies.flexprefill import FlexPrefillPolicy, pooled_probs, top_n_mask

GAMMA = 0.9


def _qk(B, Hq, Hkv, Sq, Sk, D, seed):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(B, Hkv, 1, D, generator=g)
    q = torch.randn(B, Hq, Sq, D, generator=g) * 0.5 + common.repeat_interleave(Hq // Hkv, 1)
    k = torch.randn(B, Hkv, Sk, D, generator=g) * 0.5
    k[:, :, Sk // 3] = common[:, :, 0] * 2  # a heavy column
    return q, k


def _sqrt_js(vertical, q, k_pool, bs, n_last, scale):
    """The torch path's divergence per head (to place tau between heads)."""
    B, Hq, _, D = q.shape
    v_blk = block_sums(vertical / n_last, bs)
    q_last = q[:, :, -n_last:].float().mean(-2).reshape(B, k_pool.shape[1], -1, 1, D)
    est = torch.softmax(torch.matmul(q_last, k_pool[:, :, None].transpose(-1, -2)).reshape(B, Hq, -1) * scale, -1)
    mid = (est + v_blk) / 2
    js = 0.5 * (torch.special.xlogy(est, est) - torch.special.xlogy(est, mid)).sum(-1) \
        + 0.5 * (torch.special.xlogy(v_blk, v_blk) - torch.special.xlogy(v_blk, mid)).sum(-1)
    return js.clamp_min(0).sqrt(), est


def _cut_counts(x, gamma):
    """tokens_to_cover's CUDA rule (the mass cut: ties at the cut all kept), the one the kernel follows."""
    return (x.float().clamp_min(0).view(torch.int32) >= mass_cut_torch(x, gamma)[..., None]).sum(-1)


def _run(q, k, vertical, slash, pol, monkeypatch, *, pooled=False, cut_counts=False):
    """(kernel outputs, twin estimate) on the same column / diagonal mass (small blocks: the dataclass unvalidated)."""
    B, Hq, Sq, D = q.shape
    bs, Sk = pol.block_size, k.shape[2]
    nk, n_last, scale = -(-Sk // bs), min(bs, Sq), D**-0.5
    k_pool = block_means(k, bs)
    vs = torch.stack((vertical, slash))
    rows = [vs.view(2 * B * Hq, Sk)]
    probs = None
    if pooled:
        probs = pooled_probs(block_means(q, bs), k_pool, Sq, Sk, bs, scale)
        rows.append(probs.view(B * Hq, -1))
    search = mass_search(rows, pol.gamma, block=64, programs=16)  # small blocks: several programs per row
    got = flex_estimate(vs, search, q, k_pool, block=bs, n_last=n_last, tau=pol.tau,
                        min_blocks=min(nk, math.ceil(pol.min_budget / bs)), scale=scale, pooled_rows=pooled)
    with monkeypatch.context() as m:
        m.setattr(fp_mod, "last_query_scores", lambda *a, **kw: (vertical.clone(), slash.clone()))
        if cut_counts:
            m.setattr(fp_mod, "tokens_to_cover", _cut_counts)
        want = pol.estimate(q, k, nk)  # CPU tensors: the torch path
    return got, want, probs


def _check(got, want, *, exact_blocks=False):
    n_vert, n_slash, slots, _ = got.ints
    assert torch.equal(n_vert.long(), want["n_vert"].long())
    assert torch.equal(n_slash.long(), want["n_slash"].long())
    assert torch.equal(slots >= 0, want["query_aware"])
    flat = torch.arange(slots.numel(), dtype=torch.int32).reshape(slots.shape)
    assert torch.equal(slots, torch.where(want["query_aware"], flat, -1))
    v_blk, s_blk, _ = got.blk
    if exact_blocks:  # dyadic inputs: every summation order gives the same sums
        assert torch.equal(v_blk, want["v_blk"]) and torch.equal(s_blk, want["s_blk"])
    else:
        torch.testing.assert_close(v_blk, want["v_blk"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s_blk, want["s_blk"], rtol=1e-5, atol=1e-7)
    assert torch.isinf(v_blk[..., 0]).all() and torch.isinf(s_blk[..., 0]).all()
    # the top-n tables: ties to the lower index (top_n_mask's stable rule) on the kernel's own block sums
    assert torch.equal(got.cols.bool(), top_n_mask(v_blk, n_vert))
    diags = top_n_mask(s_blk, n_slash).int()
    assert torch.equal(got.dcs, torch.nn.functional.pad(diags.cumsum(-1, dtype=torch.int32), (1, 0)))


SHAPES = [  # B, Hq, Hkv, Sq, Sk, D, block
    (1, 4, 2, 256, 256, 16, 32),
    (2, 6, 2, 200, 330, 32, 32),  # GQA 3, chunked prefill (Sq < Sk), a partial last block
    (1, 4, 4, 64, 300, 16, 16),  # no GQA, 19 key blocks
    (1, 8, 1, 128, 640, 64, 64),  # GQA 8
]


@pytest.mark.parametrize("B, Hq, Hkv, Sq, Sk, D, bs", SHAPES)
def test_matches_torch_path(B, Hq, Hkv, Sq, Sk, D, bs, monkeypatch):
    q, k = _qk(B, Hq, Hkv, Sq, Sk, D, seed=Sq + Sk)
    n_last = min(bs, Sq)
    vertical, slash = lastq_scores_reference(q, k, n_last)
    js, _ = _sqrt_js(vertical, q, block_means(k, bs), bs, n_last, D**-0.5)
    # tau between two heads' divergences: some heads query-aware, some vertical-slash
    srt = js.flatten().sort().values
    i = int((srt[1:] - srt[:-1]).argmax()) + 1  # the widest gap
    assert srt[i] - srt[i - 1] > 1e-4 * srt[i]  # a clear margin: the flag cannot flip on rounding
    tau = float(srt[i - 1] + srt[i]) / 2
    pol = FlexPrefillPolicy(block_size=bs, min_budget=2 * bs, gamma=GAMMA, tau=tau)
    got, want, _ = _run(q, k, vertical, slash, pol, monkeypatch)
    assert 0 < int(want["query_aware"].sum()) < B * Hq
    _check(got, want)
    # the pooled last-block probabilities
    _, est = _sqrt_js(vertical, q, block_means(k, bs), bs, n_last, D**-0.5)
    torch.testing.assert_close(got.blk[2], est, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tau", [0.0, 1.0])  # no head / every head query-aware
def test_ties(tau, monkeypatch):
    """Dyadic column / diagonal mass with many equal entries (equal tokens at the cut, equal block sums): the
    counts follow the mass cut (all ties at the cut kept), the top-n tables take tied blocks lowest index first."""
    B, Hq, Hkv, S, D, bs = 1, 4, 2, 256, 16, 16
    q, k = _qk(B, Hq, Hkv, S, S, D, seed=7)
    g = torch.Generator().manual_seed(8)
    vertical = torch.randint(0, 4, (B, Hq, S), generator=g).float() / 64  # n_last * quarter-steps: exact sums
    slash = torch.randint(0, 4, (B, Hq, S), generator=g).float() / 64
    vertical[..., ::bs] = 0.5  # every block gets one equal entry on top of its random ones
    slash[0, 1] = 1 / 64  # a flat head: every entry tied
    pol = FlexPrefillPolicy(block_size=bs, min_budget=3 * bs, gamma=0.8, tau=tau)
    got, want, _ = _run(q, k, vertical, slash, pol, monkeypatch, cut_counts=True)
    _check(got, want, exact_blocks=True)
    assert torch.equal(got.cols.bool(), top_n_mask(want["v_blk"], want["n_vert"]))
    # the flat head's diagonals: its budget's worth of blocks, the lowest offsets
    n = int(got.ints[1, 0, 1])
    assert got.dcs[0, 1, : n + 1].tolist() == list(range(n + 1)) and int(got.dcs[0, 1, -1]) == n


@pytest.mark.parametrize("B, Hq, Hkv, Sq, Sk, D, bs", SHAPES[:2])
def test_pooled_rows_give_every_heads_cut(B, Hq, Hkv, Sq, Sk, D, bs, monkeypatch):
    """With the heads' pooled block maps in the same search: each head's query-aware cut is the mass cut of its map
    (written for every head; the slot of a head that is not query-aware is -1, so the layout never reads it)."""
    q, k = _qk(B, Hq, Hkv, Sq, Sk, D, seed=3)
    vertical, slash = lastq_scores_reference(q, k, min(bs, Sq))
    pol = FlexPrefillPolicy(block_size=bs, min_budget=2 * bs, gamma=GAMMA, tau=0.3)
    got, want, probs = _run(q, k, vertical, slash, pol, monkeypatch, pooled=True)
    _check(got, want)
    assert torch.equal(got.ints[3].flatten(), mass_cut_torch(probs.flatten(-2).flatten(0, 1), GAMMA))


def test_rejects_bad_inputs():
    q, k = _qk(1, 4, 2, 64, 64, 16, seed=0)
    k_pool = block_means(k, 16)
    vs = torch.zeros(2, 1, 4, 64)
    s2 = mass_search([vs.view(8, 64)], 0.9)
    kw = dict(block=16, n_last=16, tau=0.1, min_blocks=1, scale=0.25)
    with pytest.raises(ValueError, match="vs must be"):
        flex_estimate(vs[0], s2, q, k_pool, **kw)
    with pytest.raises(ValueError, match="do not fit"):
        flex_estimate(vs, s2, q, block_means(k, 32), **kw)
    with pytest.raises(ValueError, match="mass search has"):
        flex_estimate(vs, s2, q, k_pool, pooled_rows=True, **kw)
    with pytest.raises(ValueError, match="min_blocks"):
        flex_estimate(vs, s2, q, k_pool, **{**kw, "min_blocks": 5})
