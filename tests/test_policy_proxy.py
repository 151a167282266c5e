"""ProxyAttn: proxy scores against brute force, per-head budgets, and 'keep everything' (gamma 1.0) == dense."""

import pytest
import torch

import accel
from accel.kernels.reference_sparse import causal_block_mask, layout_to_block_mask
from accel.layouts import DenseLayout
from accel.policies import AttentionContext
from accel.policies.proxy import ProxyPolicy, proxy_block_scores
from conftest import tiny_model
from test_families import ids

CTX = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None)


@pytest.mark.parametrize("Sq, Sk, per", [(64, 64, 2), (50, 90, 4), (96, 96, 1)])
def test_proxy_scores_match_brute_force(Sq, Sk, per):
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, Sq, 8), torch.randn(1, 2, Sk, 8)
    block, stride = 16, 4
    got = proxy_block_scores(q, k, block, per, stride, chunk_rows=5)
    nq, nk = -(-Sq // block), -(-Sk // block)
    want = torch.zeros(1, 4 // per, nq, nk)
    for p in range(4 // per):
        heads = range(p * per, (p + 1) * per)
        qp = torch.stack([q[0, h] for h in heads]).mean(0)
        kp = torch.stack([k[0, h // 2] for h in heads]).mean(0)
        for r in sorted({min(i, Sq - 1) for i in range(stride - 1, Sq + stride - 1, stride)}):
            pos = Sk - Sq + r
            a = torch.softmax(qp[r] @ kp[: pos + 1].T / 8**0.5, -1)
            for j in range(pos + 1):
                want[0, p, r // block, j // block] += a[j]
    # the last partial block may sample its last row twice (clamped); compare row-normalised shapes
    got_n = got / got.sum(-1, keepdim=True)
    want_n = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(got_n, want_n, atol=1e-5, rtol=1e-4)


def test_heads_of_a_group_share_ranking_but_not_budget():
    torch.manual_seed(0)
    S, D = 1024, 16
    q, k = torch.randn(1, 4, S, D), torch.randn(1, 2, S, D)
    q[:, 1] *= 4  # head 1: sharper than head 0 (same KV head) -> smaller budget
    layout = ProxyPolicy.from_options(block_size=64, gamma=0.6).plan(q, k, CTX)
    mask = layout_to_block_mask(layout, S // 64)
    causal, diag = causal_block_mask(S, S, 64, 64)
    assert not (mask & ~causal).any() and mask[..., 0].all() and (mask | ~diag).all()
    counts = mask.sum((-1, -2))[0]
    assert counts[1] != counts[0]
    assert (mask.sum((-1, -2)) < causal.sum()).all()


def test_short_and_sliding_run_dense():
    pol = ProxyPolicy.from_options()
    assert pol.plan(torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16), CTX) == DenseLayout()
    sliding = AttentionContext(layer_idx=0, phase="prefill", sliding_window=24)
    assert pol.plan(torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16), sliding) == DenseLayout(window=24)


def test_gamma_one_is_dense(family):
    model = tiny_model(family)
    x = ids(length=200)
    with torch.no_grad():
        dense = model(x).logits
        accel.patch(model, "proxy", gamma=1.0, block_size=64, backend="reference")
        out = model(x).logits
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)


def test_sparse_setting_generates_and_chunked_prefill():
    model = tiny_model("llama")
    x = ids(length=400)
    accel.patch(model, "proxy", gamma=0.5, block_size=64, heads_per_proxy=4, backend="reference",
                collect_stats=True)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=3, do_sample=False)
        first = model(x[:, :300], use_cache=True)
        second = model(x[:, 300:], past_key_values=first.past_key_values)
    assert out.shape[1] == 403 and torch.isfinite(second.logits).all()
    layers = accel.stats(model)["layers"]
    assert all(layer["prefill_density"] < 1.0 for layer in layers)


@pytest.mark.parametrize("opts, match", [({"gamma": 0.0}, "gamma"), ({"gamma": 2.0}, "gamma"),
                                         ({"query_stride": 0}, "query_stride"), ({"query_stride": 3}, "divide"),
                                         ({"heads_per_proxy": -1}, "heads_per_proxy"),
                                         ({"block_size": 96}, "block_size")])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        accel.parse_policy("proxy", **opts)


def test_heads_per_proxy_must_divide_heads():
    pol = ProxyPolicy.from_options(heads_per_proxy=3, block_size=64)
    with pytest.raises(ValueError, match="divide"):
        pol.plan(torch.randn(1, 4, 200, 16), torch.randn(1, 2, 200, 16), CTX)


def test_heads_per_proxy_is_checked_against_the_model_at_patch():
    """A heads_per_proxy that does not divide the model's query heads is refused by accel.patch, not at the first
    prefill of 128 tokens or more."""
    model = tiny_model("llama")  # 4 query heads
    with pytest.raises(ValueError, match=r"'heads_per_proxy' \(3\).*4 query heads; pass one of \[1, 2, 4\]"):
        accel.patch(model, "proxy+quest", heads_per_proxy=3, block_size=64, dense_layers=0)
    assert not accel.is_patched(model)
    accel.patch(model, "proxy", heads_per_proxy=4, block_size=64)


def test_per_layer_gamma_from_a_map(tmp_path):
    """A per-layer map sets each layer's gamma (policies/threshold_map.py): a layer at 1.0 keeps every causal block,
    the others at 0.3 skip blocks; a map calibrated with another query stride raises when named; a map of another
    policy raises; an explicit gamma is one value for every layer."""
    import json

    from accel.policies.duo import model_signature
    from accel.policies.threshold_map import map_format

    model = tiny_model("qwen2")
    n = model.config.num_hidden_layers
    path = tmp_path / "gamma.json"
    data = {"format": map_format("proxy"), "model": model_signature(model.config), "target_recall": 0.96,
            "thresholds": [1.0] + [0.3] * (n - 1), "calibration": {"block_size": 64, "query_stride": 8}}
    path.write_text(json.dumps(data))
    kw = dict(block_size=64, backend="reference", collect_stats=True)
    accel.patch(model, "proxy", layer_thresholds=str(path), **kw)
    with torch.no_grad():
        model(ids(length=400))
    st = accel.stats(model)
    assert st["calibration"] == {"proxy": str(path)}
    dens = [layer["prefill_density"] for layer in st["layers"]]
    assert dens[0] == 1.0 and all(d < 0.9 for d in dens[1:])
    accel.unpatch(model)
    assert accel.parse_policy("proxy", gamma=0.9).prefill.layer_thresholds == "none"
    with pytest.raises(ValueError, match="calibrated with"):
        accel.patch(model, "proxy", layer_thresholds=str(path), **{**kw, "query_stride": 4})
    path.write_text(json.dumps({**data, "format": map_format("flexprefill")}))
    with pytest.raises(ValueError, match="is not a proxy threshold map"):
        accel.patch(model, "proxy", layer_thresholds=str(path), **kw)
