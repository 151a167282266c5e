"""XAttention: the antidiagonal estimate against a brute-force twin, threshold selection, and 'keep everything'
(threshold 1.0) reproducing dense output on every family."""

import math

import pytest
import torch

import accel
from accel.policies.block_select import keep_by_threshold
from accel.policies.xattention import antidiagonal_block_scores
from conftest import tiny_model
from test_families import ids


def brute_force_scores(q, k, block, stride):
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    Lq, Lk = math.ceil(Sq / stride), math.ceil(Sk / stride)
    nq, nk = math.ceil(Sq / block), math.ceil(Sk / block)
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            logits = torch.full((Lq, Lk), float("-inf"), dtype=torch.float64)
            for r in range(Lq):
                qpos = Sk - Sq + r * stride + stride - 1
                if r * stride >= Sq:
                    continue
                for c in range(Lk):
                    if c * stride > qpos:
                        continue
                    s = 0.0
                    for i in range(stride):  # antidiagonal of the stride x stride cell
                        qi, ki = r * stride + stride - 1 - i, c * stride + i
                        if qi < Sq and ki < Sk:
                            s += float(q[b, h, qi].double() @ k[b, h // g, ki].double())
                    logits[r, c] = s / math.sqrt(D) / stride
            p = torch.softmax(logits, -1).nan_to_num(0.0)
            for r in range(Lq):
                for c in range(Lk):
                    out[b, h, r * stride // block, c * stride // block] += p[r, c]
    return out


@pytest.mark.parametrize("Sq, Sk, group", [(64, 64, 1), (100, 100, 2), (40, 136, 1), (128, 200, 3)])
def test_antidiagonal_scores_match_brute_force(Sq, Sk, group):
    torch.manual_seed(0)
    q = torch.randn(1, 2 * group, Sq, 8)
    k = torch.randn(1, 2, Sk, 8)
    got = antidiagonal_block_scores(q, k, block=32, stride=4, chunk_rows=16)
    want = brute_force_scores(q, k, 32, 4)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_keep_by_threshold_keeps_fewest_blocks():
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.1, 0.0]])
    assert keep_by_threshold(scores, 0.8).tolist() == [[True, False, True, False, False]]
    assert keep_by_threshold(scores, 0.81).sum() == 3
    assert keep_by_threshold(scores, 1.0).tolist() == [[True, True, True, True, False]]


def test_threshold_one_is_dense(family):
    model = tiny_model(family)
    x = ids(length=200)
    with torch.no_grad():
        dense = model(x).logits
        accel.patch(model, "xattention", threshold=1.0, block_size=64, backend="reference")
        out = model(x).logits
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)


def test_sparse_setting_skips_blocks_and_generates():
    model = tiny_model("llama")
    x = ids(length=400)
    accel.patch(model, "xattention", threshold=0.5, block_size=64, backend="reference", collect_stats=True)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == 405
    layers = accel.stats(model)["layers"]
    assert all(layer["calls"] == {"prefill": 1, "decode": 4} for layer in layers)
    assert all(layer["prefill_density"] < 0.95 for layer in layers)


def test_short_prompt_runs_dense_and_says_so():
    model = tiny_model("llama")
    accel.patch(model, "xattention", block_size=64, backend="reference", collect_stats=True)
    with torch.no_grad():
        model(ids(length=30))
    assert all(layer["prefill_density"] == 1.0 for layer in accel.stats(model)["layers"])


@pytest.mark.parametrize("opts, match", [({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"),
                                         ({"block_size": 100}, "block_size"), ({"stride": 3}, "divide")])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        accel.parse_policy("xattention", **opts)


def test_triton_backend_matches_reference_backend():
    """The policy's layout run through the Triton block-sparse kernel (interpreter) equals the reference."""
    model = tiny_model("qwen3")
    x = ids(length=260)
    with torch.no_grad():
        accel.patch(model, "xattention", threshold=0.6, block_size=64, backend="reference")
        ref = model(x).logits
        accel.patch(model, "xattention", threshold=0.6, block_size=64, backend="triton")
        out = model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert set(accel.stats(model)["backends_used"]) == {"triton"}


def _threshold_map(path, model, thresholds):
    import json

    from accel.policies.duo import model_signature
    from accel.policies.threshold_map import FORMAT

    path.write_text(json.dumps({"format": FORMAT, "model": model_signature(model.config), "target_recall": 0.96,
                                "thresholds": thresholds}))
    return str(path)


def test_layer_thresholds_from_a_map(tmp_path):
    """A per-layer map sets each layer's threshold: a layer at 1.0 keeps every causal block (dense), one at 0.3
    skips blocks; stats name the map; an explicit ``threshold`` means one threshold for every layer."""
    model = tiny_model("llama")
    n = model.config.num_hidden_layers
    path = _threshold_map(tmp_path / "thr.json", model, [1.0] + [0.3] * (n - 1))
    x = ids(length=400)
    accel.patch(model, "xattention", layer_thresholds=path, block_size=64, backend="reference", collect_stats=True)
    with torch.no_grad():
        model(x)
    st = accel.stats(model)
    assert st["calibration"] == {"xattention": path}
    dens = [layer["prefill_density"] for layer in st["layers"]]
    assert dens[0] == 1.0 and all(d < 0.9 for d in dens[1:])
    assert accel.parse_policy("xattention", threshold=0.5).prefill.layer_thresholds == "none"
    accel.patch(model, "xattention", threshold=0.3, block_size=64, backend="reference", collect_stats=True)
    with torch.no_grad():
        model(x)
    st = accel.stats(model)
    assert st["calibration"] == {} and st["layers"][0]["prefill_density"] < 0.9


def test_layer_thresholds_auto_without_a_shipped_map_is_uniform():
    model = tiny_model("llama")  # no shipped map fits a tiny random model: the uniform threshold
    accel.patch(model, "xattention", block_size=64, backend="reference")
    pol = model._accel_patch.spec.prefill
    assert pol.calibration_source is None and pol.threshold_for(0) == pol.threshold


def test_layer_thresholds_bad_input(tmp_path):
    """A map for another model, a missing file, an unknown name: clear errors, and the model stays as it was."""
    model = tiny_model("llama")
    other = tiny_model("qwen3")
    path = _threshold_map(tmp_path / "other.json", other, [0.9] * other.config.num_hidden_layers)
    for value, match in ((path, "made for another model"), (str(tmp_path / "nope.json"), "does not exist"),
                         ("no_such_model", "unknown xattention threshold map")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            accel.patch(model, "xattention", layer_thresholds=value)
        assert not accel.is_patched(model)
    bad = _threshold_map(tmp_path / "bad.json", model, [1.5] * model.config.num_hidden_layers)
    with pytest.raises(ValueError, match="outside"):
        accel.patch(model, "xattention", layer_thresholds=bad)
    import json

    other_blocks = tmp_path / "blocks.json"
    data = json.loads(open(_threshold_map(other_blocks, model, [0.9] * model.config.num_hidden_layers)).read())
    other_blocks.write_text(json.dumps({**data, "calibration": {"block_size": 128, "stride": 8}}))
    with pytest.raises(ValueError, match="calibrated with"):
        accel.patch(model, "xattention", layer_thresholds=str(other_blocks), block_size=64)
    assert not accel.is_patched(model)


@pytest.mark.parametrize("policy", ["xattention", "flexprefill", "proxy"])
def test_threshold_map_needs_one_value_per_layer(tmp_path, policy):
    """A map with the model's signature but more or fewer values than layers (or none) is refused at patch, not
    silently applied to the first layers."""
    import json

    from accel.policies.duo import model_signature
    from accel.policies.threshold_map import map_format

    model = tiny_model("llama")  # 2 layers
    path = tmp_path / "thr.json"
    for thresholds, match in (([0.9] * 7, "has 7 thresholds; this model has 2 layers"),
                              ([0.9], "has 1 thresholds; this model has 2 layers"),
                              (None, "has no 'thresholds' list"), (0.9, "has no 'thresholds' list")):
        body = {"format": map_format(policy), "model": model_signature(model.config)}
        if thresholds is not None:
            body["thresholds"] = thresholds
        path.write_text(json.dumps(body))
        with pytest.raises(ValueError, match=match) as err:
            accel.patch(model, policy, layer_thresholds=str(path))
        assert "layer_thresholds='none'" in str(err.value)
        assert not accel.is_patched(model)


@pytest.mark.parametrize("policy", ["xattention", "flexprefill", "proxy"])
def test_shipped_maps_fit_their_models(policy):
    """configs/<policy>_*.json: one value per layer of the demo model they name (in the calibration grid, None for
    sliding-window layers), in the policy's map format, calibrated with the policy's default settings."""
    import json
    from importlib import resources

    from accel.models import DEMO_MODELS
    from accel.policies import policy_class
    from accel.policies.threshold_map import CALIBRATED_SETTINGS, map_format

    maps = [p for p in resources.files("accel.configs").iterdir()
            if p.name.startswith(f"{policy}_") and p.name.endswith(".json")]
    assert maps, f"no shipped {policy} threshold map"
    cls = policy_class(policy)
    for p in maps:
        data = json.loads(p.read_text())
        assert p.name[len(policy) + 1:-5] in DEMO_MODELS and data["format"] == map_format(policy)
        cal = data["calibration"]
        assert len(data["thresholds"]) == data["model"]["num_hidden_layers"]
        assert all(t is None or t in cal["grid"] for t in data["thresholds"])
        assert any(t is not None for t in data["thresholds"])
        assert all(cal[k] == getattr(cls, k) for k in CALIBRATED_SETTINGS if k in cal)


def test_calibration_picks_per_layer_thresholds():
    """scripts/calibrate_xattention.py on a tiny random Llama: one threshold of the grid per layer, each the
    smallest reaching the target on the calibration prompt (by the recall table it returns); a higher target never
    lowers a layer's threshold."""
    import os
    import sys

    import transformers

    from test_eval_synth import tiny_tokenizer

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import calibrate_xattention as C

    tok = tiny_tokenizer(chat=False)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM(cfg).eval()
    res = {}
    for target in (0.9, 0.99):
        need, tables = C.calibrate(model, tok, lengths=[600], depths=[0.5], target=target, rows=16, log=lambda m: None)
        assert len(need) == 2 and all(t in C.GRID for t in need)
        (table,) = tables.values()
        for i, t in enumerate(need):
            reached = [g for g, r in zip(C.GRID, table[i]) if r >= target]
            assert t == (reached[0] if reached else C.GRID[-1])
        res[target] = need
    assert all(hi >= lo for lo, hi in zip(res[0.9], res[0.99]))


def test_auto_picks_the_shipped_map_by_model_signature():
    """``layer_thresholds="auto"`` finds the shipped map whose signature is the model's (only its config is read),
    and keeps one threshold where the policy's block size differs from the map's calibration."""
    import json
    from importlib import resources
    from types import SimpleNamespace

    import transformers

    from accel.policies.xattention import XAttentionPolicy

    res = resources.files("accel.configs").joinpath("xattention_smollm2.json")
    data = json.loads(res.read_text())
    sig = data["model"]
    cfg = transformers.LlamaConfig(num_hidden_layers=sig["num_hidden_layers"],
                                   num_attention_heads=sig["num_attention_heads"],
                                   num_key_value_heads=sig["num_key_value_heads"], hidden_size=sig["hidden_size"],
                                   vocab_size=sig["vocab_size"])
    fake = SimpleNamespace(config=cfg)
    pol = XAttentionPolicy.from_options()
    pol.check_model(fake)
    assert pol.calibration_source.endswith("xattention_smollm2.json")
    assert [pol.threshold_for(i) for i in range(sig["num_hidden_layers"])] == data["thresholds"]
    pol = XAttentionPolicy.from_options(block_size=64)
    pol.check_model(fake)
    assert pol.calibration_source is None and pol.threshold_for(3) == pol.threshold
    pol = XAttentionPolicy.from_options(threshold=0.9)  # an explicit threshold: one for every layer
    pol.check_model(fake)
    assert pol.calibration_source is None and pol.threshold_for(3) == 0.9
