"""duo: per-head split cache (retrieval heads full, streaming heads sink + recent, constant memory), exact against
a full recompute under the same per-head masks, ratio 0 / covering windows are dense, head-map checks."""

import json

import pytest
import torch

import accel
from accel.cache import DuoSplitLayer
from accel.policies.duo import model_signature, streaming_assignment
from conftest import tiny_model
from test_families import _global_layers_model, ids


def _head_map(model, path, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    gates = torch.rand(cfg.num_hidden_layers, cfg.num_key_value_heads, generator=g).tolist()
    path.write_text(json.dumps({"model": model_signature(cfg), "gates": gates}))
    return str(path)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_covering_window_is_dense(family, backend, tmp_path):
    model = _global_layers_model(family)
    x = ids(length=40)
    with torch.no_grad():
        ref = model.generate(x, max_new_tokens=12, do_sample=False)
        accel.patch(model, "duo", duo_map=_head_map(model, tmp_path / "m.json"), sink=4, recent=512,
                    backend=backend)
        out = model.generate(x, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3"])
def test_decode_on_split_cache_equals_full_recompute(family, tmp_path):
    """Generating on the split cache gives the logits of a cache-free forward under the same per-head masks."""
    model = tiny_model(family)
    accel.patch(model, "duo", duo_map=_head_map(model, tmp_path / "m.json"), ratio=0.5, sink=4, recent=12,
                backend="reference")
    x = ids(length=48)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
        recomputed = model(out.sequences[:, :-1], use_cache=False).logits[:, -8:]
    torch.testing.assert_close(torch.stack(out.logits, 1), recomputed, atol=5e-5, rtol=1e-4)
    split = [layer for layer in out.past_key_values.layers if isinstance(layer, DuoSplitLayer)]
    assert split
    for layer in split:
        assert layer.skeys.shape[-2] == 4 + 12 - 1


def test_streaming_heads_memory_is_constant(tmp_path):
    model = tiny_model("llama")
    accel.patch(model, "duo", duo_map=_head_map(model, tmp_path / "m.json"), ratio=1.0, sink=4, recent=12,
                backend="reference")
    sizes = []
    with torch.no_grad():
        for length in (40, 160):
            out = model.generate(ids(length=length), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            sizes.append(accel.cache_bytes(out.past_key_values))
    assert sizes[0] == sizes[1]
    accel.patch(model, "duo", duo_map=str(tmp_path / "m.json"), ratio=0.5, sink=4, recent=12, backend="reference")
    with torch.no_grad():
        out = model.generate(ids(length=160), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    dense = 2 * 2 * 2 * 162 * 16 * 4  # layers * (k, v) * kv heads * tokens * head_dim * fp32
    assert accel.cache_bytes(out.past_key_values) < 0.6 * dense


def test_generate_modes(tmp_path):
    model = tiny_model("llama")
    accel.patch(model, "duo", duo_map=_head_map(model, tmp_path / "m.json"), sink=4, recent=12, backend="reference")
    with torch.no_grad():
        for kw in (dict(do_sample=True, top_k=10), dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)):
            out = model.generate(ids(batch=2, length=40), max_new_tokens=4, **kw)
            assert out.shape[1] == 44


def test_ratio_zero_is_dense(tmp_path):
    model = tiny_model("llama")
    x = ids(length=40)
    with torch.no_grad():
        ref = model.generate(x, max_new_tokens=8, do_sample=False)
        accel.patch(model, "duo", duo_map=_head_map(model, tmp_path / "m.json"), ratio=0.0, sink=2, recent=4)
        assert torch.equal(model.generate(x, max_new_tokens=8, do_sample=False), ref)


def test_assignment_takes_lowest_gates():
    gates = [[0.9, 0.1], [0.5, 0.2], [0.05, 0.95]]
    st = streaming_assignment(gates, 0.5, [0, 1, 2])
    assert [st[i].tolist() for i in range(3)] == [[False, True], [False, True], [True, False]]


def test_head_map_for_another_model_is_refused(tmp_path):
    llama, qwen = tiny_model("llama"), tiny_model("qwen3")
    path = _head_map(llama, tmp_path / "m.json")
    with pytest.raises(ValueError, match="another model"):
        accel.patch(qwen, "duo", duo_map=path)
    assert not accel.is_patched(qwen)
    with pytest.raises(ValueError, match="no shipped DuoAttention head map"):
        accel.patch(qwen, "duo")
    with pytest.raises(FileNotFoundError, match="calibrate_duo"):
        accel.parse_policy("duo", duo_map=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="ratio"):
        accel.parse_policy("duo", ratio=1.5)


def test_malformed_gates_are_refused(tmp_path):
    """A head map with the model's signature but no gates, or gates not shaped layers x KV heads: a clear error at
    patch time (not a KeyError, nor an index error at every forward), for duo and lserve alike; the model stays as
    it was."""
    model = tiny_model("llama")  # 2 layers x 2 KV heads
    sig = model_signature(model.config)
    for i, (body, match) in enumerate([
            ({}, "has no 'gates'"),
            ({"gates": [[0.5, 0.5]]}, "has 1 layers x 2 KV heads; this model has 2 layers x 2 KV heads"),
            ({"gates": [[0.1, 0.2, 0.3]] * 2}, "has 2 layers x 3 KV heads"),
            ({"gates": [[0.5], [0.5, 0.5]]}, r"has 2 layers x \[1, 2\] KV heads"),
            ({"gates": [[0.5, "high"]] * 2}, "gates must be finite numbers"),
            ({"gates": {"0": [0.5, 0.5]}}, "has no 'gates'")]):
        path = tmp_path / f"m{i}.json"
        path.write_text(json.dumps({"model": sig, **body}))
        for policy in ("duo", "lserve"):
            with pytest.raises(ValueError, match=match) as err:
                accel.patch(model, policy, duo_map=str(path))
            assert "scripts/calibrate_duo.py MODEL or pass duo_map=PATH" in str(err.value)
            assert not accel.is_patched(model)


def test_padded_batch_refused(tmp_path):
    model = tiny_model("llama")
    accel.patch(model, "duo", duo_map=_head_map(model, tmp_path / "m.json"), ratio=0.5, sink=2, recent=8)
    x = ids(batch=2, length=30)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="left-padded"):
        model.generate(x, attention_mask=mask, max_new_tokens=2)


@pytest.mark.real_model
def test_shipped_head_map_on_the_demo_model():
    """configs/duo_smollm2.json fits SmolLM2-135M (picked by its signature); streaming heads halve the KV bytes."""
    from accel import models
    from accel.needle import build_needle_prompt

    try:
        path = models.fetch_demo_model("smollm2")
    except models.DownloadError as exc:
        pytest.skip(f"demo model could not be downloaded: {exc}".splitlines()[0])
    model, tok = models.load_model(str(path), dtype="float32", quiet=True)
    ids = torch.tensor([build_needle_prompt(tok, 1500, depth=0.9, seed=0).input_ids])
    sizes = {}
    for policy in ("dense", "duo"):
        accel.patch(model, policy)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        sizes[policy] = accel.cache_bytes(out.past_key_values)
    assert sizes["duo"] < 0.7 * sizes["dense"]


def test_shipped_gemma3_head_map_fits_its_architecture():
    """configs/duo_gemma3.json is picked by the signature of Gemma-3-270M's config (configs/models/gemma3.json, read
    from its GGUF) and covers its 18 layers x 1 KV head."""
    import json
    import os

    from transformers import AutoConfig

    from accel.policies.duo import load_head_map

    with open(os.path.join(os.path.dirname(__file__), "..", "configs", "models", "gemma3.json")) as f:
        d = json.load(f)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    src, data = load_head_map("", cfg)
    assert src.endswith("duo_gemma3.json")
    assert len(data["gates"]) == 18 and all(len(g) == 1 for g in data["gates"])


def test_assignment_follows_the_gate_quantile():
    """DuoAttention's rule: heads below the ratio quantile stream, so with 3 heads at 0.5 only one does (the
    median head keeps full attention); ratio 1 streams every head, ratio 0 none."""
    gates = [[0.3], [0.1], [0.7]]
    count = lambda r: sum(int(v.sum()) for v in streaming_assignment(gates, r, [0, 1, 2]).values())  # noqa: E731
    assert streaming_assignment(gates, 0.5, [0, 1, 2])[1].tolist() == [True]
    assert [count(r) for r in (0.0, 0.5, 0.75, 1.0)] == [0, 1, 2, 3]
    assert count(0.5) == 1 and not streaming_assignment(gates, 0.5, [0, 2])[1].any()  # layer 1 not a candidate


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_calibration_gates_at_one_reproduce_the_model(family):
    """scripts/calibrate_duo.py's gated attention with every gate at 1 is the model itself, also on models with
    sliding-window layers and a sequence longer than their window (24 here): those layers keep their window."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "scripts" / "calibrate_duo.py"
    spec = importlib.util.spec_from_file_location("calibrate_duo", path)
    calib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calib)
    model = tiny_model(family)
    cfg = model.config
    gates = {i: torch.ones(cfg.num_key_value_heads) for i in range(cfg.num_hidden_layers)}
    calib.register("duo_calib_test", gates, sink=2, recent=4)
    x = ids(length=60)
    with torch.no_grad():
        want = model(x).logits
        model.set_attn_implementation("duo_calib_test")
        got = model(x).logits
        for g in gates.values():
            g.zero_()
        streamed = model(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(streamed, want, atol=1e-3)  # gates at 0 do stream the global layers


def test_split_layer_appends_in_place():
    """Decode steps write one row into the retrieval heads' capacity buffer (no copy of the whole cache per step),
    and the layer holds what concatenation would."""
    torch.manual_seed(0)
    layer = DuoSplitLayer(torch.tensor([True, False, False]), sink=2, recent=4)
    k, v = torch.randn(2, 3, 300, 8), torch.randn(2, 3, 300, 8)
    layer.update(k[:, :, :290], v[:, :, :290])
    ptrs = set()
    for t in range(290, 300):
        keys, values = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        ptrs.add(keys.data_ptr())
    assert len(ptrs) == 1  # 290 tokens reserved a capacity of 512: every step wrote into it
    torch.testing.assert_close(keys, k[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(values, v[:, 1:], rtol=0, atol=0)
    layer.batch_select_indices(torch.tensor([1]))  # a batch edit keeps the filled part, the next append regrows
    keys, _ = layer.update(k[1:, :, :1], v[1:, :, :1])
    torch.testing.assert_close(keys, torch.cat([k[1:, 1:], k[1:, 1:, :1]], dim=-2), rtol=0, atol=0)
