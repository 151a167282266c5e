"""FlexPrefill: the estimation helpers against brute force, the slash-to-block conversion, pattern choice, and
'keep everything' (gamma 1.0) reproducing dense output on every family."""

import pytest
import torch

import accel
from accel.kernels.reference_sparse import causal_block_mask, layout_to_block_mask
from accel.layouts import DenseLayout
from accel.policies import AttentionContext
from accel.policies.flexprefill import FlexPrefillPolicy, slash_block_mask, tokens_to_cover
from accel.policies.vertical_slash import diagonal_sums, last_query_attention
from conftest import tiny_model
from test_families import ids

CTX = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None)


def test_last_query_attention_and_diagonals_match_brute_force():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 30, 8)
    attn = last_query_attention(q, k, 5)
    for h in range(4):
        for i in range(5):
            pos = 30 - 5 + i
            want = torch.softmax(q[0, h, 15 + i] @ k[0, h // 2, : pos + 1].T / 8**0.5, -1)
            torch.testing.assert_close(attn[0, h, i, : pos + 1], want)
            assert attn[0, h, i, pos + 1:].abs().max() == 0 if pos + 1 < 30 else True
    diag = diagonal_sums(attn)
    want = torch.zeros(4, 30)
    for i in range(5):
        for j in range(30 - 5 + i + 1):
            want[:, 30 - 5 + i - j] += attn[0, :, i, j]
    torch.testing.assert_close(diag[0], want)


@pytest.mark.parametrize("q_len, kv_len", [(256, 256), (200, 330), (64, 300)])
def test_slash_block_mask_matches_token_level(q_len, kv_len):
    bs = 32
    nd = -(-kv_len // bs)
    g = torch.Generator().manual_seed(1)
    sel = torch.rand(2, nd, generator=g) < 0.3
    got = slash_block_mask(sel, q_len, kv_len, bs)
    # brute force: a block is touched when one of its causal pairs has a selected offset block
    pos = torch.arange(q_len)[:, None] + kv_len - q_len
    off = pos - torch.arange(kv_len)[None, :]
    tok = (off >= 0) & sel[:, (off.clamp_min(0) // bs)]
    nq, nk = -(-q_len // bs), -(-kv_len // bs)
    want = torch.nn.functional.pad(tok.float(), (0, nk * bs - kv_len, 0, nq * bs - q_len))
    want = want.reshape(2, nq, bs, nk, bs).amax((2, 4)) > 0
    assert torch.equal(got, want)


def test_tokens_to_cover():
    x = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    assert tokens_to_cover(x, 0.8).tolist() == [2] and tokens_to_cover(x, 0.81).tolist() == [3]


def _structured_qk(S=1024, D=16, heads=2):
    """Keys with a heavy column, queries attending locally: a vertical-slash-friendly head."""
    torch.manual_seed(0)
    common = torch.randn(heads, 1, D)
    q = torch.randn(1, heads, S, D) * 0.3 + common
    k = torch.randn(1, heads, S, D) * 0.3
    k[:, :, 300] = common[:, 0] * 2  # a column every query loves
    return q, k


def test_plan_is_causal_sparse_and_keeps_sink_and_diagonal():
    q, k = _structured_qk()
    pol = FlexPrefillPolicy.from_options(block_size=64, min_budget=128, gamma=0.8)
    layout = pol.plan(q, k, CTX)
    mask = layout_to_block_mask(layout, 16)
    causal, diag = causal_block_mask(1024, 1024, 64, 64)
    assert not (mask & ~causal).any()
    assert mask[..., 0].all() and (mask | ~diag).all()
    assert mask.float().sum() < 0.8 * causal.sum() * 2
    assert mask[..., -1, 300 // 64].all()  # the heavy column is found


def test_tau_switches_pattern():
    """tau=1 makes every head query-aware (pooled map, global gamma); tau=0 none: layouts differ."""
    q, k = _structured_qk()
    kw = dict(block_size=64, min_budget=64, gamma=0.7)
    a = layout_to_block_mask(FlexPrefillPolicy.from_options(tau=0.0, **kw).plan(q, k, CTX), 16)
    b = layout_to_block_mask(FlexPrefillPolicy.from_options(tau=1.0, **kw).plan(q, k, CTX), 16)
    assert not torch.equal(a, b)


def test_short_and_sliding_run_dense():
    q, k = torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    pol = FlexPrefillPolicy.from_options()
    assert pol.plan(q, k, CTX) == DenseLayout()
    sliding = AttentionContext(layer_idx=0, phase="prefill", sliding_window=24)
    assert pol.plan(torch.randn(1, 2, 4000, 16), torch.randn(1, 2, 4000, 16), sliding) == DenseLayout(window=24)


def test_gamma_one_is_dense(family):
    model = tiny_model(family)
    x = ids(length=200)
    with torch.no_grad():
        dense = model(x).logits
        accel.patch(model, "flexprefill", gamma=1.0, block_size=64, min_budget=64, backend="reference")
        out = model(x).logits
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)


def test_sparse_setting_generates_with_stats():
    model = tiny_model("llama")
    x = ids(length=400)
    accel.patch(model, "flexprefill", gamma=0.5, block_size=64, min_budget=64, backend="reference",
                collect_stats=True)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 403
    layers = accel.stats(model)["layers"]
    assert all(layer["calls"] == {"prefill": 1, "decode": 2} for layer in layers)
    assert all(layer["prefill_density"] < 1.0 for layer in layers)


def test_chunked_prefill_on_cache_runs():
    """Queries fewer than keys (prefill on top of a cache): layouts stay causal and the model runs."""
    model = tiny_model("qwen3")
    x = ids(length=330)
    accel.patch(model, "flexprefill", gamma=0.6, block_size=64, min_budget=64, backend="reference")
    with torch.no_grad():
        out = model(x[:, :200], use_cache=True)
        out2 = model(x[:, 200:], past_key_values=out.past_key_values)
    assert torch.isfinite(out2.logits).all()


@pytest.mark.parametrize("opts, match", [({"gamma": 0.0}, "gamma"), ({"gamma": 1.5}, "gamma"),
                                         ({"tau": -0.1}, "tau"), ({"min_budget": 0}, "min_budget"),
                                         ({"block_size": 100}, "block_size")])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        accel.parse_policy("flexprefill", **opts)


def test_triton_backend_matches_reference_backend():
    model = tiny_model("llama")
    x = ids(length=260)
    with torch.no_grad():
        accel.patch(model, "flexprefill", gamma=0.6, block_size=64, min_budget=64, backend="reference")
        ref = model(x).logits
        accel.patch(model, "flexprefill", gamma=0.6, block_size=64, min_budget=64, backend="triton")
        out = model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_reference_sdpa_path_equals_explicit_math():
    """The reference sparse kernels' SDPA path (no lse requested) equals their explicit-math path (lse requested)."""
    from accel.kernels.reference_sparse import (block_sparse_attention, random_block_layout,
                                                vertical_slash_attention)
    from accel.layouts import VerticalSlashLayout

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 150, 16), torch.randn(1, 2, 230, 16), torch.randn(1, 2, 230, 16)
    layout = random_block_layout(1, 4, 150, 230, 32, 32, keep=0.3)
    fast = block_sparse_attention(q, k, v, layout, chunk=64)
    exact, _ = block_sparse_attention(q, k, v, layout, chunk=64, return_lse=True)
    torch.testing.assert_close(fast, exact, atol=1e-5, rtol=1e-5)
    vs = VerticalSlashLayout(columns=torch.tensor([[[0, 5, 77, -1]]]), offsets=torch.tensor([[[0, 1, 40]]]))
    fast = vertical_slash_attention(q, k, v, vs, chunk=64)
    exact, _ = vertical_slash_attention(q, k, v, vs, chunk=64, return_lse=True)
    torch.testing.assert_close(fast, exact, atol=1e-5, rtol=1e-5)


def test_per_layer_gamma_from_a_map(tmp_path):
    """A per-layer map sets each layer's gamma (the XAttention map machinery): a layer at 1.0 keeps every causal
    block, one at 0.3 skips blocks; a map calibrated at another block size does not apply under "auto" semantics and
    raises when named; an explicit gamma is one value for every layer."""
    import json

    from accel.policies.duo import model_signature
    from accel.policies.threshold_map import map_format

    model = tiny_model("llama")
    n = model.config.num_hidden_layers
    path = tmp_path / "gamma.json"
    data = {"format": map_format("flexprefill"), "model": model_signature(model.config), "target_recall": 0.96,
            "thresholds": [1.0] + [0.3] * (n - 1)}
    path.write_text(json.dumps(data))
    x = ids(length=400)
    kw = dict(block_size=64, min_budget=64, backend="reference", collect_stats=True)
    accel.patch(model, "flexprefill", layer_thresholds=str(path), **kw)
    with torch.no_grad():
        model(x)
    st = accel.stats(model)
    assert st["calibration"] == {"flexprefill": str(path)}
    dens = [layer["prefill_density"] for layer in st["layers"]]
    assert dens[0] == 1.0 and all(d < 0.9 for d in dens[1:])
    assert accel.parse_policy("flexprefill", gamma=0.9).prefill.layer_thresholds == "none"
    path.write_text(json.dumps({**data, "calibration": {"block_size": 128}}))
    with pytest.raises(ValueError, match="calibrated with"):
        accel.patch(model, "flexprefill", layer_thresholds=str(path), **kw)
    xmap = tmp_path / "x.json"
    xmap.write_text(json.dumps({**data, "format": map_format("xattention")}))
    with pytest.raises(ValueError, match="is not a flexprefill threshold map"):
        accel.patch(model, "flexprefill", layer_thresholds=str(xmap), **kw)
