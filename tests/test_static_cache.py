"""transformers' static cache (and torch.compile on top of it) with a patched model: prefill policies run on the
filled part of the preallocated buffer, decode steps are dense over it with transformers' own mask, and the tokens
match the dynamic-cache run of the same policy. Decode policies that need accel's cache layers are refused at the
prefill with a message that names the fix."""

import pytest
import torch
import transformers

import accel
from conftest import tiny_model
from test_policy_duo import _head_map

# xattention with a low threshold so that the 160-token prompt is really block-sparse
POLICIES = ["dense", "xattention:block_size=64,threshold=0.5", "vertical_slash:last_q=16,vertical_size=8,slash_size=8"]


def ids(batch=1, length=160, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def _spec(text):
    name, _, opts = text.partition(":")
    kw = {}
    for item in filter(None, opts.split(",")):
        k, v = item.split("=")
        kw[k] = int(v) if v.isdigit() else float(v)
    return name, kw


def _two_rows(padded: bool):
    """Two 200-token prompts and their mask; ``padded``: the second row left-padded by 37 tokens."""
    x = ids(batch=2, length=200)
    mask = torch.ones_like(x)
    if padded:
        mask[1, :37] = 0
        x[1, :37] = 0
    return x, mask


def _generate(model, x, **kw):
    with torch.no_grad():
        return model.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("policy", POLICIES)
def test_static_cache_matches_dynamic(family, policy):
    model = tiny_model(family)
    name, kw = _spec(policy)
    accel.patch(model, name, backend="reference", **kw)
    x = ids()
    dynamic = _generate(model, x)
    accel.reset_stats(model)
    static = _generate(model, x, cache_implementation="static", disable_compile=True)
    assert torch.equal(static, dynamic)
    st = accel.stats(model)
    assert st["backends_used"].get("static-sdpa", 0) == 11 * len(st["layers"])  # every decode step, every layer
    assert all(layer["calls"] == {"prefill": 1, "decode": 11} for layer in st["layers"])


def test_static_cache_dense_matches_unpatched_with_left_padding(family):
    model = tiny_model(family)
    x = ids(batch=2)
    mask = torch.ones_like(x)
    mask[1, :17] = 0
    x[1, :17] = 0
    ref = _generate(model, x, attention_mask=mask)
    accel.patch(model, "dense", backend="reference")
    out = _generate(model, x, attention_mask=mask, cache_implementation="static", disable_compile=True)
    assert torch.equal(out, ref)


def _compile_config():
    cc = transformers.CompileConfig(fullgraph=True, mode="default")
    cc._compile_all_devices = True  # the path transformers takes by itself on a GPU, forced on the CPU
    return cc


@pytest.mark.parametrize("policy", ["xattention", "quest", "tidal", "duo"])
def test_compiled_static_decode_matches_dynamic(policy, tmp_path):
    """Static cache -> compiled decode step; fullgraph=True proves the patched step has no graph break. The
    compiled tokens equal the dynamic cache's (xattention: sparse prefill, dense decode)."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    opts = {"xattention": dict(block_size=64, threshold=0.5), "quest": dict(budget=64, page_size=16, dense_layers=1),
            "tidal": dict(budget=48, select_layer=0, reselect_layer=None),
            "duo": dict(duo_map=_head_map(model, tmp_path / "m.json"), ratio=0.5, sink=4, recent=12)}[policy]
    accel.patch(model, policy, backend="reference", **opts)
    x = ids()
    dynamic = _generate(model, x)
    accel.reset_stats(model)
    compiled = _generate(model, x, cache_implementation="static", compile_config=_compile_config())
    assert torch.equal(compiled, dynamic)
    # compiled steps are not counted (a Python counter would recompile the step each time); the prefill is, and
    # stats say the cache was static
    layer0 = accel.stats(model)["layers"][0]
    assert layer0["calls"] == {"prefill": 1, "decode": 0} and layer0["static_cache"]


@pytest.mark.parametrize("policy", ["lserve"])
def test_sparse_decode_refuses_static_cache(policy, tmp_path):
    model = tiny_model("llama")
    opts = {"duo_map": _head_map(model, tmp_path / "m.json")} if policy in ("duo", "lserve") else {}
    if policy == "tidal":  # the tiny model has two layers
        opts = {"select_layer": 0, "reselect_layer": 1}
    accel.patch(model, policy, backend="reference", **opts)
    with pytest.raises(TypeError, match="default dynamic cache"):
        _generate(model, ids(), cache_implementation="static", disable_compile=True)
    # the model is usable afterwards with the default cache
    assert _generate(model, ids()).shape[1] == 160 + 12


@pytest.mark.parametrize("fam", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("padded", [False, True])
def test_quest_over_static_cache_matches_dynamic(fam, padded):
    """Quest's device-side selection over PagedStaticLayer picks what the dynamic-cache plan picks."""
    model = tiny_model(fam)
    x, mask = _two_rows(padded)
    accel.patch(model, "quest", budget=64, page_size=16, dense_layers=0, backend="reference")
    dynamic = _generate(model, x, attention_mask=mask)
    accel.reset_stats(model)
    static = _generate(model, x, attention_mask=mask, cache_implementation="static", disable_compile=True)
    assert torch.equal(static, dynamic)
    st = accel.stats(model)
    selecting = [layer for layer in st["layers"] if layer["sliding_window"] is None]
    assert st["backends_used"]["static-paged"] == 11 * len(selecting)


def test_quest_static_cache_bounds_and_budget():
    """The page bounds fold every written key; a budget above the context reproduces dense decode exactly."""
    model = tiny_model("llama")
    x = ids(length=150)
    accel.patch(model, "quest", budget=4096, dense_layers=0, backend="reference")
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                             cache_implementation="static", disable_compile=True, return_dict_in_generate=True)
    layer = out.past_key_values.layers[1]
    assert isinstance(layer, accel.cache.PagedStaticLayer)
    n = int(layer.cumulative_length)
    keys = layer.keys[:, :, :n]
    full = n // 16
    torch.testing.assert_close(layer.kmin[:, :, :full], keys[:, :, : full * 16].unflatten(2, (full, 16)).amin(3))
    torch.testing.assert_close(layer.kmax[:, :, full], keys[:, :, full * 16 :].amax(2))
    assert torch.isinf(layer.kmin[:, :, full + 1 :]).all()
    assert accel.cache_bytes(out.past_key_values) > 2 * keys.numel() * keys.element_size()
    accel.unpatch(model)
    assert torch.equal(out.sequences, _generate_n(model, x, 5))


def _generate_n(model, x, n):
    with torch.no_grad():
        return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("fam", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("padded", [False, True])
def test_tidal_over_static_cache_matches_dynamic(fam, padded):
    """TidalDecode's device-side selection (shared through a static buffer) picks the positions the dynamic plan
    picks, and the reusing layers attend to them."""
    model = tiny_model(fam)
    x, mask = _two_rows(padded)
    full = [i for i, t in enumerate(getattr(model.config, "layer_types", None) or ["full_attention"] * 2)
            if t == "full_attention"]
    accel.patch(model, "tidal", budget=48, select_layer=full[0], reselect_layer=None, backend="reference")
    dynamic = _generate(model, x, attention_mask=mask)
    accel.reset_stats(model)
    static = _generate(model, x, attention_mask=mask, cache_implementation="static", disable_compile=True)
    assert torch.equal(static, dynamic)
    if len(full) > 1:  # a full-attention layer after the selection layer reuses its positions (llama here)
        assert accel.stats(model)["backends_used"].get("static-paged", 0) == 11 * (len(full) - 1)


@pytest.mark.parametrize("policy", ["dense", "quest", "xattention"])
def test_chunked_prefill_over_static_cache(policy):
    """A prompt prefilled in two chunks into a StaticCache, then decoded: the logits of the dynamic cache."""
    from transformers import DynamicCache, StaticCache

    model = tiny_model("llama")
    opts = {"quest": dict(budget=64, dense_layers=0), "xattention": dict(block_size=64, threshold=0.5)}.get(policy, {})
    accel.patch(model, policy, backend="reference", **opts)
    x = ids(length=201)
    outs = []
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=256)):
        with torch.no_grad():
            model(x[:, :130], past_key_values=cache, use_cache=True)
            model(x[:, 130:200], past_key_values=cache, use_cache=True)
            outs.append(model(x[:, 200:], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", ["llama", "qwen3"])
def test_duo_over_static_cache_matches_dynamic(fam, tmp_path):
    """DuoAttention over a static cache (retrieval heads' buffer, streaming heads' ring of sink + recent slots):
    the dynamic cache's tokens, and less KV memory than the dense static cache."""
    model = tiny_model(fam)
    accel.patch(model, "duo", duo_map=_head_map(model, tmp_path / "m.json"), ratio=0.5, sink=4, recent=12,
                backend="reference")
    x = ids(batch=2, length=200)
    dynamic = _generate(model, x)
    accel.reset_stats(model)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                             cache_implementation="static", disable_compile=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, dynamic)
    split = [layer for layer in out.past_key_values.layers if isinstance(layer, accel.cache.DuoStaticLayer)]
    assert split and all(layer.skeys.shape[2] == 16 for layer in split)  # sink 4 + recent 12
    assert accel.stats(model)["backends_used"]["static-paged"] == 11 * len(split)
    accel.unpatch(model)
    with torch.no_grad():
        dense = model.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                               cache_implementation="static", disable_compile=True, return_dict_in_generate=True)
    assert accel.cache_bytes(out.past_key_values) < 0.6 * accel.cache_bytes(dense.past_key_values)


def test_duo_static_cache_refuses_chunked_prefill(tmp_path):
    from transformers import StaticCache

    model = tiny_model("llama")
    accel.patch(model, "duo", duo_map=_head_map(model, tmp_path / "m.json"), ratio=0.5, sink=4, recent=12,
                backend="reference")
    cache = StaticCache(config=model.config, max_cache_len=256)
    x = ids(length=200)
    with torch.no_grad():
        model(x[:, :120], past_key_values=cache, use_cache=True)
        with pytest.raises(RuntimeError, match="chunked prefill"):
            model(x[:, 120:], past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("fam", ["llama", "gemma3"])
def test_streaming_over_static_cache_matches_dynamic(fam):
    """StreamingLLM over a static cache: a ring of sink + window slots per layer, the dynamic cache's tokens, and
    KV memory that does not grow with the cache length."""
    model = tiny_model(fam)
    accel.patch(model, "streaming", sink=4, window=16, backend="reference")
    x = ids(batch=2, length=200)
    dynamic = _generate(model, x)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                             cache_implementation="static", disable_compile=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, dynamic)
    rings = [layer for layer in out.past_key_values.layers if isinstance(layer, accel.cache.DuoStaticLayer)]
    assert rings and all(layer.skeys.shape[2] == 20 and layer.keys.shape[1] == 0 for layer in rings)
