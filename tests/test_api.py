"""Public API and bad input: every error names the fix and leaves the model exactly as it was."""

import pytest
import torch
import transformers

import accel
from accel.spec import parse_policy
from conftest import tiny_model
from test_families import ids

ALL_NAMES = ["dense", "streaming", "vertical_slash", "xattention", "flexprefill", "proxy", "duo", "quest", "lserve",
             "tidal"]


def test_available_policies_lists_the_fixed_names():
    pols = accel.available_policies()
    assert list(pols) == ALL_NAMES
    assert all(pols[n]["implemented"] for n in ("dense", "streaming", "xattention"))
    assert pols["quest"]["phase"] == "decode" and pols["xattention"]["phase"] == "prefill"
    assert pols["streaming"]["phase"] == "both"
    assert all(p["description"] for p in pols.values())


def test_parse_single_and_composed():
    spec = parse_policy("streaming", window=64)
    assert spec.prefill is spec.decode and spec.prefill.window == 64 and spec.prefill.sink == 128
    spec = parse_policy({"prefill": "dense", "decode": "streaming"}, sink=8)
    assert spec.prefill.name == "dense" and spec.decode.name == "streaming" and spec.decode.sink == 8
    spec = parse_policy("dense+streaming")
    assert spec.describe() == "dense+streaming"
    spec = parse_policy({"prefill": {"name": "streaming", "window": 32}, "decode": "dense"})
    assert spec.prefill.window == 32 and spec.decode.name == "dense"


def test_presets():
    assert "streaming_4k" in accel.preset_names()
    spec = parse_policy("streaming_4k")
    assert (spec.prefill.sink, spec.prefill.window) == (128, 4096)
    assert parse_policy("streaming_4k", window=100).prefill.window == 100  # keyword overrides preset


def test_preset_from_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("prefill: dense\ndecode: streaming\noptions: {window: 77}\n")
    spec = parse_policy(str(p))
    assert spec.decode.window == 77 and spec.prefill.name == "dense"


@pytest.mark.parametrize(
    "policy, options, exc, match",
    [
        ("nope", {}, ValueError, "unknown policy 'nope'; available policies: dense, streaming"),
        ("lserve", {"physical_page_size": 24}, ValueError, "'physical_page_size'.*one of"),
        ("dense+tidal", {"budget": 0}, ValueError, "'budget' of policy 'tidal'"),
        ("streaming", {"windw": 3}, ValueError, "unknown option.*'windw'.*window"),
        ("streaming", {"window": 0}, ValueError, "'window'.*must be > 0"),
        ("streaming", {"window": 2.5}, ValueError, "'window'.*integer"),
        ("streaming", {"sink": -1}, ValueError, "'sink'.*>= 0"),
        ("a+b+c", {}, ValueError, "PREFILL\\+DECODE"),
        ({"prefil": "dense"}, {}, ValueError, "'prefill' and/or 'decode'"),
        ("missing.yaml", {}, FileNotFoundError, "does not exist"),
        (3, {}, TypeError, "policy must be"),
        ("quest+xattention", {}, ValueError, "cannot be used for prefill; did you mean 'xattention\\+quest'\\?"),
        ({"prefill": "quest", "decode": "dense"}, {}, ValueError, "did you mean 'dense\\+quest'\\?"),
        ("xattention", {"threshold": True}, ValueError, "'threshold'.*must be a number, got True"),
        ("duo", {"ratio": False}, ValueError, "'ratio'.*must be a number, got False"),
        ("streaming", {"window": True}, ValueError, "'window'.*must be an integer, got True"),
        ("duo", {"duo_map": 5}, ValueError, "'duo_map'.*must be a string \\(a name or a path\\), got 5"),
    ],
)
def test_bad_policy_input(policy, options, exc, match):
    with pytest.raises(exc, match=match):
        parse_policy(policy, **options)


def test_no_hint_when_swapping_does_not_help_and_bool_options_stay_bools():
    with pytest.raises(ValueError, match="cannot be used for prefill") as err:
        parse_policy("tidal+quest")  # two decode policies: swapping them is no fix
    assert "did you mean" not in str(err.value)
    assert parse_policy("quest", keep_first_page=True, budget=64).decode.keep_first_page is True
    assert parse_policy("tidal", shared=False).decode.shared is False
    from pathlib import Path  # a path option may be a pathlib.Path: taken as its string

    assert parse_policy("xattention", layer_thresholds=Path("maps/x.json")).prefill.layer_thresholds == "maps/x.json"


def _snapshot(model):
    return (model.config._attn_implementation, accel.is_patched(model),
            [hasattr(m, "_accel") for m in model.modules()],
            len(model._forward_pre_hooks), sum(len(m._forward_pre_hooks) for m in model.modules()))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(policy="nope"), ValueError, "unknown policy"),
        (dict(policy="streaming", windw=3), ValueError, "unknown option"),
        (dict(policy="dense", backend="cuda"), ValueError, "unknown backend 'cuda'; choose one of auto"),
        (dict(policy="dense", backend="flash"), accel.BackendUnavailable, "pip install|CUDA"),
    ],
)
@pytest.mark.parametrize("already", [False, True])
def test_failed_patch_leaves_model_as_it_was(kwargs, exc, match, already):
    model = tiny_model("llama")
    if already:
        accel.patch(model, "streaming", sink=2, window=8, backend="reference")
    before = _snapshot(model)
    with torch.no_grad():
        logits = model(ids()).logits
    with pytest.raises(exc, match=match):
        accel.patch(model, **kwargs)
    assert _snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, logits)


def test_unsupported_model_class():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(accel.UnsupportedModel, match="model_type='gpt2'.*supported model types: llama"):
        accel.patch(model)
    assert not accel.is_patched(model)


def test_non_causal_model_refused():
    model = tiny_model("gemma3")
    model.config.use_bidirectional_attention = True
    with pytest.raises(accel.UnsupportedModel, match="bidirectional"):
        accel.patch(model)
    assert model.config._attn_implementation == "sdpa"


def test_context_beyond_position_limit():
    model = tiny_model("llama")
    accel.patch(model, backend="reference")
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the model's position limit \\({limit}"):
        with torch.no_grad():
            model(ids(length=limit + 1))


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny_model("llama")
    with pytest.raises(accel.BackendUnavailable, match="CUDA device.*TRITON_INTERPRET=1"):
        accel.patch(model, backend="triton")
    assert not accel.is_patched(model)


def test_auto_backend_on_cpu_records_choice():
    model = tiny_model("llama")
    accel.patch(model)  # auto
    with torch.no_grad():
        model(ids())
    st = accel.stats(model)
    assert st["backend_requested"] == "auto" and set(st["backends_used"]) == {"reference"}
    notes = st["layers"][0]["auto_notes"]
    assert any(n.startswith("triton:") for n in notes) and any(n.startswith("flash:") for n in notes)


def test_unpatched_accel_impl_raises_clearly():
    model = tiny_model("llama")
    accel.patch(model, backend="reference")
    for m in model.modules():
        if hasattr(m, "_accel"):
            del m._accel
    with pytest.raises(RuntimeError, match="accel.patch"):
        with torch.no_grad():
            model(ids())


def test_stats_name_every_option_in_use():
    model = tiny_model("llama")
    accel.patch(model, "xattention+quest", threshold=0.9, page_bounds="exact", dense_layers=0, backend="reference")
    opts = accel.stats(model)["options"]
    assert set(opts) == {"xattention", "quest"}
    assert opts["xattention"]["threshold"] == 0.9 and opts["xattention"]["stride"] == 8  # set and default alike
    assert opts["quest"]["page_bounds"] == "exact" and opts["quest"]["budget"] == 4096
    accel.patch(model, "quest", dense_layers=0, backend="reference")  # the default: float8 page bounds, named
    assert accel.stats(model)["options"] == {"dense": {}, "quest": {**opts["quest"], "page_bounds": "fp8"}}


def test_stats_on_unpatched_model():
    with pytest.raises(ValueError, match="not patched"):
        accel.stats(tiny_model("llama"))


def test_right_padding_refused():
    model = tiny_model("llama")
    accel.patch(model, backend="reference")
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, -5:] = 0
    with pytest.raises(ValueError, match="padding_side='left'"):
        with torch.no_grad():
            model(ids(batch=2, length=20), attention_mask=mask)


def test_streaming_with_left_padding_refused():
    model = tiny_model("llama")
    accel.patch(model, "streaming", sink=2, window=8, backend="reference")
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    with pytest.raises(ValueError, match="left-padded"):
        with torch.no_grad():
            model(ids(batch=2, length=20), attention_mask=mask)


def test_streaming_takes_a_static_cache_ring():
    """A StaticCache passed by the user: streaming layers become sink + window rings (tests/test_static_cache.py
    has the equivalence with the dynamic cache)."""
    model = tiny_model("llama")
    accel.patch(model, "streaming", sink=2, window=8, backend="reference")
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(ids(length=10), past_key_values=cache, use_cache=True)
    assert all(type(layer).__name__ == "DuoStaticLayer" and layer.skeys.shape[2] == 10 for layer in cache.layers)




def test_left_padding_checked_once_per_mask():
    """The padding check (two host syncs) runs once per forward's mask object, not once per layer."""
    from accel import attention as A

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    first = A._left_padding(mask, 5)
    assert first.tolist() == [2, 0]
    assert A._left_padding(mask, 5) is first  # reused by the next layer
    assert A._left_padding(mask, 3) is None  # another length: checked again (the last 3 keys are all real)
    assert A._left_padding(torch.ones(2, 5, dtype=torch.long), 5) is None
    with pytest.raises(ValueError, match="left padding only"):
        A._left_padding(torch.tensor([[1, 1, 0, 1, 1]]), 5)
