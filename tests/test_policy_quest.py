"""quest: budget >= context is dense decode on every family; small budgets select pages identically on the
reference and Triton backends; composition with prefill policies; bad input."""

import pytest
import torch

import accel
from accel.cache import PagedKVLayer
from conftest import tiny_model
from test_families import _global_layers_model, ids


def _gen(model, x, n=20):
    return model.generate(x, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_budget_covering_everything_is_dense(family, backend):
    model = _global_layers_model(family)  # Mistral's window would cover every layer
    x = ids(length=40)
    with torch.no_grad():
        ref = _gen(model, x)
        accel.patch(model, "quest", budget=64, dense_layers=0, backend=backend)
        out = _gen(model, x)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-4, rtol=1e-4)
    st = accel.stats(model)
    decode = [layer["decode_density"] for layer in st["layers"] if layer["sliding_window"] is None]
    assert decode and all(d == 1.0 for d in decode)  # budget above the context: everything, recorded


@pytest.mark.parametrize("reduce", ["max", "max_norm"])
def test_small_budget_same_on_both_backends(reduce):
    x = ids(length=90)
    res = {}
    for backend in ("reference", "triton"):
        model = tiny_model("qwen3")
        accel.patch(model, "quest", budget=32, dense_layers=1, group_reduce=reduce, backend=backend)
        with torch.no_grad():
            res[backend] = _gen(model, x, n=8)
        st = accel.stats(model)
        assert st["backends_used"] == {backend: st["backends_used"][backend]}
        assert st["layers"][0]["decode_density"] == 1.0  # first layer dense
        assert 0.2 < st["layers"][1]["decode_density"] < 0.4  # 32 of ~90-98 keys
    assert torch.equal(res["reference"].sequences, res["triton"].sequences)
    torch.testing.assert_close(torch.stack(res["triton"].logits), torch.stack(res["reference"].logits), atol=1e-4,
                               rtol=1e-4)


def test_small_budget_matches_manual_page_mask():
    """The decode step attends to exactly the selected pages: compare with attention restricted by hand."""
    from accel.kernels import reference_decode as R
    from accel.kernels.reference import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    layer = PagedKVLayer(16)
    layer.update(k, v)
    from accel.policies import AttentionContext
    from accel.policies.quest import QuestPolicy

    pol = QuestPolicy.from_options(budget=32, dense_layers=0)
    sel = pol.plan(q, k, AttentionContext(0, "decode", None, cache_layer=layer))
    keep = R.gather_selected(sel.pages, sel.counts, 16, 70)  # [1, 2, 70]
    assert keep[..., 64:].all() and keep.sum(-1).eq(16 + 6).all()  # one full page + the partial newest one
    out = R.paged_decode_attention(q, k, v, sel.pages, sel.counts, 16)
    for h in range(4):
        idx = keep[0, h // 2].nonzero()[:, 0]
        ref = attention(q[:, h:h + 1], k[:, h // 2:h // 2 + 1, idx], v[:, h // 2:h // 2 + 1, idx], causal=False)
        torch.testing.assert_close(out[:, h:h + 1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["quest", "xattention+quest", {"prefill": "streaming", "decode": "quest"}])
def test_compositions_generate(policy):
    model = tiny_model("llama")
    accel.patch(model, policy, budget=32, dense_layers=0, backend="reference")
    with torch.no_grad():
        out = model.generate(ids(length=300), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 304)
    st = accel.stats(model)
    assert st["layers"][0]["decode_policy"] == "quest"
    assert st["layers"][0]["decode_density"] < 0.2


@pytest.mark.parametrize("budget", [32, 4096])
def test_left_padded_batch(budget):
    """Padding keys are never attended to. With a covering budget a padded row equals the row alone; with a small
    one it may differ slightly, as pages are aligned to the batch's key index rather than to each row's start."""
    model = tiny_model("llama")
    accel.patch(model, "quest", budget=budget, dense_layers=0, backend="reference")
    a, b = ids(length=70, seed=1), ids(length=55, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 15, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :15] = 0
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
        one = model.generate(b, max_new_tokens=5, do_sample=False)
    if budget >= 80:
        assert torch.equal(both[1, -5:], one[0, -5:])
    assert both.shape == (2, 75)


def test_default_is_paper_setting():
    spec = accel.parse_policy("quest")
    pol = spec.decode
    assert (pol.page_size, pol.budget, pol.dense_layers) == (16, 4096, 2)
    assert spec.prefill.name == "dense"


@pytest.mark.parametrize("opts, match", [({"page_size": 12}, "page_size"), ({"budget": 8}, "budget"),
                                          ({"group_reduce": "mean"}, "group_reduce"),
                                          ({"dense_layers": -1}, "dense_layers"),
                                          ({"page_bounds": "int8"}, "'fp8', 'exact'")])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        accel.parse_policy("quest", **opts)
    if "page_bounds" in opts:
        with pytest.raises(ValueError, match="page_bounds"):
            accel.parse_policy("lserve", ratio=0, **opts)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_page_bounds_fp8_and_exact(cache):
    """Float8 page bounds (the default) halve the bounds' bytes and are installed in the cache; with a small budget
    they select nearly what exact bounds select (same greedy tokens on this prompt), and the reference and Triton
    backends agree on them."""
    x = ids(length=120)
    seqs, nbytes = {}, {}
    for bounds in ("fp8", "exact"):
        model = tiny_model("llama")
        accel.patch(model, "quest", budget=48, dense_layers=1, page_bounds=bounds, backend="reference")
        kw = {"cache_implementation": "static", "disable_compile": True} if cache == "static" else {}
        with torch.no_grad():
            out = model.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True, **kw)
        layer = out.past_key_values.layers[1]
        assert layer.kmin.dtype == (torch.float8_e5m2 if bounds == "fp8" else layer.keys.dtype)
        nbytes[bounds] = layer.kmin.numel() * layer.kmin.element_size()
        seqs[bounds] = out.sequences
    assert nbytes["exact"] == 4 * nbytes["fp8"]  # float32 tiny model: 4 bytes -> 1
    assert torch.equal(seqs["fp8"], seqs["exact"])


def test_dense_layers_covering_the_model_is_refused():
    """dense_layers >= the model's layers would decode everything dense: refused at patch, as tidal's
    select_layer is."""
    model = tiny_model("llama")  # 2 layers
    for policy, n in (("quest", 2), ("xattention+quest", 5)):
        with pytest.raises(ValueError, match=f"'dense_layers' of policy 'quest' is {n} but the model has 2 "
                                             "layers.*pass dense_layers between 0 and 1"):
            accel.patch(model, policy, dense_layers=n, layer_map="none")
        assert not accel.is_patched(model)
    accel.patch(model, "quest", dense_layers=1, budget=32)
    assert model._accel_patch.spec.decode._selects(None, 1)


@pytest.mark.real_model
def test_real_model_needle_with_small_budget():
    """SmolLM2-135M finds a needle in ~2K tokens while quest attends to 512 of them per decode step."""
    from accel import models
    from accel.needle import build_needle_prompt, needle_found

    try:
        path = models.fetch_demo_model("smollm2")
    except models.DownloadError as exc:
        pytest.skip(f"demo model could not be downloaded: {exc}".splitlines()[0])
    model, tok = models.load_model(str(path), dtype="float32", quiet=True)
    p = build_needle_prompt(tok, 2000, depth=0.5, seed=0)
    accel.patch(model, "quest", budget=512)
    ids = torch.tensor([p.input_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert needle_found(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), p.answer)
    st = accel.stats(model)
    assert st["calibration"]["quest"].endswith("quest_smollm2.json")  # the shipped layer map: layer 18 dense
    dec = {i: layer["decode_density"] for i, layer in enumerate(st["layers"]) if i >= 2}
    assert dec.pop(18) == 1.0 and max(dec.values()) < 0.3


# --- layer map: layers a calibration found Quest's bound to lose, left dense ---------------------------------------

def _write_layer_map(path, model, dense, **cal):
    import json

    from accel.policies.duo import model_signature
    from accel.policies.quest import LAYER_MAP_FORMAT

    path.write_text(json.dumps({"format": LAYER_MAP_FORMAT, "model": model_signature(model.config),
                                "dense_layers": dense,
                                "calibration": {"page_size": 16, "group_reduce": "max", "keep_first_page": False,
                                                "budget": 32, **cal}}))
    return str(path)


def _decode_density(model):
    return [layer["decode_density"] for layer in accel.stats(model)["layers"]]


def test_layer_map_leaves_its_layers_dense(tmp_path):
    """A map's layers run dense decode (no page-bounds cache, density 1.0) while the others select; a map of every
    layer reproduces dense generation exactly; stats name the map."""
    x = ids(length=90)
    model = tiny_model("llama")
    with torch.no_grad():
        ref = _gen(model, x, n=6)
    path = _write_layer_map(tmp_path / "one.json", model, [1])
    accel.patch(model, "quest", budget=32, dense_layers=0, layer_map=path, backend="reference")
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    dens = _decode_density(model)
    assert dens[0] < 0.5 and dens[1] == 1.0
    assert accel.stats(model)["calibration"] == {"quest": path}
    assert not torch.equal(torch.stack(out.logits), torch.stack(ref.logits))  # layer 0 still selects
    pol = accel.parse_policy("quest", dense_layers=0, layer_map=path).decode
    pol.check_model(model)
    assert pol.cache_kind(None, 1) is None and pol.cache_kind(None, 0) is not None

    accel.patch(model, "quest", budget=32, dense_layers=0,
                layer_map=_write_layer_map(tmp_path / "all.json", model, [0, 1]), backend="reference")
    with torch.no_grad():
        out = _gen(model, x, n=6)
    assert torch.equal(out.sequences, ref.sequences)
    assert _decode_density(model) == [1.0, 1.0]


def test_layer_map_none_and_auto_without_a_map_select_everywhere(tmp_path):
    model = tiny_model("llama")
    for opt in ({"layer_map": "none"}, {}, {"layer_map": None}):
        accel.patch(model, "quest", budget=32, dense_layers=0, backend="reference", **opt)
        with torch.no_grad():
            model.generate(ids(length=90), max_new_tokens=3, do_sample=False)
        assert all(d < 0.5 for d in _decode_density(model))
        assert "quest" not in accel.stats(model)["calibration"]


def test_layer_map_applies_only_with_its_settings(tmp_path, monkeypatch):
    """A map holds at any budget (its layers lose attention at the calibrated one, and a smaller budget keeps less)
    but not for another page size, group reduction or first-page rule: 'auto' then selects everywhere, a named map
    raises and leaves the model as it was."""
    from accel.policies import quest as Q

    model = tiny_model("llama")
    path = _write_layer_map(tmp_path / "m.json", model, [1], budget=64)
    found = (path, __import__("json").loads(open(path).read()))
    monkeypatch.setattr(Q, "load_layer_map", lambda name, config, settings=None: found if name in ("auto", path)
                        else None)
    for opts, applies in (({"budget": 64}, True), ({"budget": 128}, True), ({"budget": 32}, True),
                          ({"budget": 64, "page_size": 32}, False), ({"budget": 64, "group_reduce": "sum"}, False),
                          ({"budget": 64, "keep_first_page": True}, False)):
        pol = accel.parse_policy("quest", dense_layers=0, **opts).decode
        pol.check_model(model)
        assert (pol.calibration_source == path) is applies, opts
        assert pol._selects(None, 1) is not applies
        if not applies:
            named = accel.parse_policy("quest", dense_layers=0, layer_map=path, **opts).decode
            with pytest.raises(ValueError, match="calibrated with .*layer_map='none'"):
                named.check_model(model)
    with pytest.raises(ValueError, match="calibrated with page_size=16; this policy has page_size=32"):
        accel.patch(model, "quest", page_size=32, layer_map=path)
    assert not accel.is_patched(model)


def test_layer_map_bad_input(tmp_path):
    model = tiny_model("llama")
    other = tiny_model("qwen3")
    with pytest.raises(ValueError, match="made for another model"):
        accel.patch(model, "quest", layer_map=_write_layer_map(tmp_path / "o.json", other, [1]))
    with pytest.raises(ValueError, match="layer indices"):
        accel.patch(model, "quest", budget=32, layer_map=_write_layer_map(tmp_path / "b.json", model, [5]))
    with pytest.raises(FileNotFoundError, match="calibrate_quest.py"):
        accel.patch(model, "quest", layer_map=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown quest layer map"):
        accel.patch(model, "quest", layer_map="nosuchmodel")
    with pytest.raises(ValueError, match="layer_map"):
        accel.parse_policy("quest", layer_map=3)
    assert not accel.is_patched(model)


def test_shipped_layer_maps_fit_demo_shapes():
    """Each shipped map names the demo model it was calibrated on (signature) and only layers Quest would select in."""
    import json
    from importlib import resources

    from accel.policies.quest import LAYER_MAP_FORMAT

    maps = [p for p in resources.files("accel.configs").iterdir() if p.name.startswith("quest_")]
    assert maps
    for res in maps:
        data = json.loads(res.read_text())
        assert data["format"] == LAYER_MAP_FORMAT
        cal = data["calibration"]
        n = data["model"]["num_hidden_layers"]
        assert all(cal["first_dense_layers"] <= i < n for i in data["dense_layers"])
        checked = {r["layer"] for r in cal["layers"]}
        assert set(data["dense_layers"]) == {r["layer"] for r in cal["layers"] if r["min_ratio"] < data["floor"]}
        assert set(data["dense_layers"]) <= checked


def test_quest_capture_is_the_oracle_when_bounds_are_exact():
    """With every page's keys equal, Quest's bound is the page's true logit: its pages are the oracle's. With a
    heavy key hidden in a narrow page among wide random pages, the bound ranks it low and the capture says so."""
    from accel.recall import quest_capture

    torch.manual_seed(0)
    D, P = 16, 12
    q = torch.randn(1, 2, D)
    k = torch.randn(1, 2, P, 1, D).expand(1, 2, P, 16, D).reshape(1, 2, P * 16, D)
    cap = quest_capture(q, k, budget=64, page_size=16)
    torch.testing.assert_close(cap["quest"], cap["oracle"])
    assert cap["mass"].sum(-1).sub(1).abs().max() < 1e-5

    wide = torch.randn(1, 1, P * 16, D) * 3  # pages whose key ranges span much: large bounds, modest logits
    wide[0, 0, 5 * 16:6 * 16] = 0.0
    wide[0, 0, 5 * 16 + 3] = q[0, 0] * 3.5  # the one key this query wants, on an otherwise flat page
    hit = quest_capture(q[:, :1], wide, budget=32, page_size=16)
    assert hit["oracle"][0, 0] > 0.9 and hit["quest"][0, 0] < 0.5 * hit["oracle"][0, 0]


def test_quest_capture_with_float8_bounds():
    """Float8 bounds (rounded outward) score every page at least as high as exact ones, and on random keys keep
    nearly the same mass."""
    from accel.kernels.reference_decode import BOUNDS_FP8
    from accel.recall import quest_capture

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 8, 32, generator=g), torch.randn(1, 2, 1024, 32, generator=g) * 2
    exact = quest_capture(q, k, budget=256, page_size=16)
    f8 = quest_capture(q, k, budget=256, page_size=16, bounds_dtype=BOUNDS_FP8)
    assert (f8["scores"] >= exact["scores"] - 1e-4).all() and not torch.equal(f8["scores"], exact["scores"])
    assert (f8["quest"] - exact["quest"]).abs().mean() < 0.05 and torch.equal(f8["oracle"], exact["oracle"])


def test_calibrate_script_writes_a_map_that_patches(tmp_path):
    """scripts/calibrate_quest.py on a tiny model: the map lists the checked layers below the floor and patches."""
    import importlib.util
    import json
    import pathlib

    import transformers

    from conftest import save_tiny_llama
    from test_eval_synth import tiny_tokenizer

    folder = save_tiny_llama(tmp_path / "tiny", tiny_tokenizer(), num_hidden_layers=3)
    path = pathlib.Path(__file__).parents[1] / "scripts" / "calibrate_quest.py"
    spec = importlib.util.spec_from_file_location("calibrate_quest", path)
    calib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calib)
    out = tmp_path / "quest_tiny.json"
    assert calib.main([str(folder), "--out", str(out), "--lengths", "200", "--samples", "2", "--budget", "32",
                       "--dense-layers", "1", "--floor", "0.9"]) == 0
    data = json.loads(out.read_text())
    rows = data["calibration"]["layers"]
    assert [r["layer"] for r in rows] == [1, 2]  # layer 0 is one of the first dense layers: not checked
    assert all(0.0 <= r["min_ratio"] <= r["mean_ratio"] + 1e-6 for r in rows)
    assert data["dense_layers"] == [r["layer"] for r in rows if r["min_ratio"] < 0.9]
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    accel.patch(model, "quest", budget=32, dense_layers=1, layer_map=str(out), backend="reference")
    assert accel.stats(model)["calibration"] == {"quest": str(out)}
    assert data["calibration"]["page_bounds"] == "fp8"  # the policy's default storage, recorded
    with pytest.raises(ValueError, match="page_bounds=fp8"):  # a map of float8 bounds says nothing of exact ones
        accel.patch(model, "quest", budget=32, dense_layers=1, layer_map=str(out), page_bounds="exact",
                    backend="reference")
    with pytest.raises(SystemExit):
        calib.main([str(folder), "--out", str(out), "--lengths", "20", "--budget", "32"])  # nothing to select


def test_auto_picks_the_shipped_map_of_the_scoring_rule():
    """A model ships one map per group reduction: 'auto' reads the one calibrated with the policy's settings, and
    none for settings no map was made with."""
    import json
    import types
    from importlib import resources

    from accel.policies.quest import load_layer_map

    for name in ("smollm2", "gemma3"):
        data = json.loads(resources.files("accel.configs").joinpath(f"quest_{name}.json").read_text())
        cfg = types.SimpleNamespace(**data["model"])
        base = {"page_size": 16, "keep_first_page": False}
        for reduce, bounds, file in (("max", "fp8", f"quest_{name}.json"),
                                     ("max_norm", "fp8", f"quest_{name}_max_norm.json"),
                                     ("max", "exact", f"quest_{name}_exact.json"),
                                     ("max_norm", "exact", f"quest_{name}_max_norm_exact.json")):
            src, got = load_layer_map("auto", cfg, {**base, "group_reduce": reduce, "page_bounds": bounds})
            assert src.endswith(file) and got["calibration"]["group_reduce"] == reduce
            assert got["calibration"]["page_bounds"] == bounds  # calibrated on the bounds the cache will store
        assert load_layer_map("auto", cfg, {**base, "group_reduce": "sum"}) is None
        assert load_layer_map("auto", cfg, {**base, "group_reduce": "max", "page_size": 32}) is None
