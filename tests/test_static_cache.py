"""transformers' static cache (and torch.compile on top of it) with a patched model: prefill policies run on the
filled part of the preallocated buffer, decode steps are dense over it with transformers' own mask, and the tokens
match the dynamic-cache run of the same policy. Decode policies with a static form (quest, tidal, duo, lserve,
streaming) run it device-side and match the dynamic cache too."""

import pytest
import torch
import transformers

import accel
from conftest import tiny_model
from test_policy_duo import _head_map
from test_policy_tidal import _deep

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


def _generate_static(model, x):
    """Static-cache generate (eager steps), with the cache returned for inspection."""
    return _generate(model, x, cache_implementation="static", disable_compile=True, return_dict_in_generate=True)


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


@pytest.mark.parametrize("policy", ["xattention", "quest", "tidal", "duo", "lserve", "lserve_reuse"])
def test_compiled_static_decode_matches_dynamic(policy, tmp_path):
    """Static cache -> compiled decode step; fullgraph=True proves the patched step has no graph break. The
    compiled tokens equal the dynamic cache's (xattention: sparse prefill, dense decode)."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    opts = {"xattention": dict(block_size=64, threshold=0.5), "quest": dict(budget=64, page_size=16, dense_layers=1),
            "tidal": dict(budget=48, select_layer=0, reselect_layer=None),
            "duo": dict(duo_map=_head_map(model, tmp_path / "m.json"), ratio=0.5, sink=4, recent=12),
            "lserve": _lserve_opts(model, tmp_path),
            "lserve_reuse": _lserve_opts(model, tmp_path, reuse_steps=4)}[policy]
    accel.patch(model, policy.removesuffix("_reuse"), backend="reference", **opts)
    x = ids()
    dynamic = _generate(model, x)
    accel.reset_stats(model)
    compiled = _generate(model, x, cache_implementation="static", compile_config=_compile_config())
    assert torch.equal(compiled, dynamic)
    # compiled steps are not counted (a Python counter would recompile the step each time); the prefill is, and
    # stats say the cache was static
    layer0 = accel.stats(model)["layers"][0]
    assert layer0["calls"] == {"prefill": 1, "decode": 0} and layer0["static_cache"]


@pytest.mark.parametrize("policy", ["quest", "quest_keep_first", "tidal"])
def test_compiled_static_decode_triton_kernels(policy):
    """The Triton kernels (interpreted here) inside a fullgraph-compiled decode step: their launch wrappers sit
    behind custom ops, so dynamo never traces them (tracing ``type()`` of a kernel failed on the GPU)."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    opts = {"quest": dict(budget=64, page_size=16, dense_layers=1),
            "quest_keep_first": dict(budget=64, page_size=16, dense_layers=1, keep_first_page=True),
            "tidal": dict(budget=48, select_layer=0, reselect_layer=None)}[policy]
    accel.patch(model, policy.split("_")[0], backend="triton", **opts)
    x = ids()
    dynamic = _generate(model, x)
    compiled = _generate(model, x, cache_implementation="static", compile_config=_compile_config())
    assert torch.equal(compiled, dynamic)


def _lserve_opts(model, tmp_path, budget=64, reuse_steps=1, seed=0):
    return dict(duo_map=_head_map(model, tmp_path / "m.json", seed=seed), ratio=0.5, sink=4, recent=12, page_size=16,
                physical_page_size=32, budget=budget, reuse_steps=reuse_steps)


def _count_mapped_launches(monkeypatch) -> list:
    """Record the split-KV kernel's calls with a KV-head map (kernels/static_decode.py imports it at call time)."""
    from accel.kernels.triton import decode_attention

    calls, kernel = [], decode_attention.paged_decode_attention

    def spy(*args, **kw):
        if kw.get("kv_heads") is not None:
            calls.append(kw["kv_heads"].numel())
        return kernel(*args, **kw)

    monkeypatch.setattr(decode_attention, "paged_decode_attention", spy)
    return calls


def _parts(layers) -> int:
    """Mapped kernel calls per step: one per layer, the streaming heads' ring riding in the retrieval heads'
    launch as its second source."""
    return sum(bool(layer.retrieval_idx.numel() + layer.stream_idx.numel()) for layer in layers)


@pytest.mark.parametrize("fam,backend,reuse", [(f, "reference", r) for f in ("llama", "gemma3", "qwen2") for r in (1, 4)]
                         + [("llama", "triton", 4)])
def test_lserve_over_static_cache_matches_dynamic(fam, backend, reuse, tmp_path, monkeypatch):
    """LServe over a static cache (streaming heads' ring, retrieval heads' buffer with logical-page bounds and a
    device-side physical-page selection, made every ``reuse`` steps with the begun page added in between, as the
    dynamic form): the dynamic cache's tokens, less KV memory than the dense static cache. ``triton``: the
    interpreter runs the scoring, top-k and split-KV kernels with KV-head maps."""
    model = tiny_model(fam)
    opts = _lserve_opts(model, tmp_path, reuse_steps=reuse, seed=int(backend == "triton"))  # triton: both parts
    accel.patch(model, "lserve", backend="reference", **opts)
    x = ids(batch=2, length=200)
    dynamic = _generate(model, x)  # the reference backend's tokens (the interpreter is slow; triton's are equal)
    accel.patch(model, "lserve", backend=backend, **opts)
    accel.reset_stats(model)
    mapped = _count_mapped_launches(monkeypatch)
    out = _generate_static(model, x)
    assert torch.equal(out.sequences, dynamic)
    layers = out.past_key_values.layers
    split = [layer for layer in layers if isinstance(layer, accel.cache.LServeStaticLayer)]
    paged = [layer for layer in layers if type(layer) is accel.cache.PagedStaticLayer]
    assert len(mapped) == (11 * _parts(split) if backend == "triton" else 0)
    # streaming heads: a ring of sink 4 + recent 12 slots, however many tokens the cache holds (212 here)
    assert split and all(layer.skeys.shape[2] == 16 < int(layer.cumulative_length) for layer in split)
    assert all(layer.kmin.shape[1] == layer.retrieval_idx.numel() for layer in split)
    # decode tokens went into the cache through the append kernel exactly when the backend is Triton
    assert all(layer.triton_append == (backend == "triton") for layer in split + paged)
    assert accel.stats(model)["backends_used"]["static-paged"] == 11 * (len(split) + len(paged))
    accel.unpatch(model)
    dense = _generate_static(model, x)
    if fam == "llama":  # every layer global: half the KV heads in a 16-slot ring (plus the bounds, 1/16 of keys)
        assert accel.cache_bytes(out.past_key_values) < 0.6 * accel.cache_bytes(dense.past_key_values)


def test_lserve_static_budget_above_context_is_dense_over_retrieval_heads(tmp_path):
    """A budget covering the context selects every page: the same tokens as duo (streaming heads alike, retrieval
    heads dense)."""
    model = tiny_model("llama")
    opts = _lserve_opts(model, tmp_path, budget=4096)
    accel.patch(model, "lserve", backend="reference", **opts)
    x = ids(length=150)
    lserve = _generate(model, x, cache_implementation="static", disable_compile=True)
    accel.patch(model, "duo", backend="reference", duo_map=opts["duo_map"], ratio=0.5, sink=4, recent=12)
    duo = _generate(model, x, cache_implementation="static", disable_compile=True)
    assert torch.equal(lserve, duo)


@pytest.mark.parametrize("fam,reduce", [("llama", "max"), ("gemma3", "max"), ("qwen2", "max"),
                                        ("llama", "max_norm")])
@pytest.mark.parametrize("padded", [False, True])
def test_quest_over_static_cache_matches_dynamic(fam, reduce, padded):
    """Quest's device-side selection over PagedStaticLayer picks what the dynamic-cache plan picks (the static
    buffer's unwritten pages stay out of max_norm's per-head ceiling)."""
    model = tiny_model(fam)
    x, mask = _two_rows(padded)
    accel.patch(model, "quest", budget=64, page_size=16, dense_layers=0, group_reduce=reduce, backend="reference")
    dynamic = _generate(model, x, attention_mask=mask)
    accel.reset_stats(model)
    static = _generate(model, x, attention_mask=mask, cache_implementation="static", disable_compile=True)
    assert torch.equal(static, dynamic)
    st = accel.stats(model)
    selecting = [layer for layer in st["layers"] if layer["sliding_window"] is None]
    assert st["backends_used"]["static-paged"] == 11 * len(selecting)


@pytest.mark.parametrize("padded", [False, True])
def test_quest_keep_first_page_over_static_cache(padded):
    """``keep_first_page`` (page 0 always selected) over a static cache: the device-side selection forces page 0
    as the dynamic plan does, so both caches generate the same tokens."""
    model = tiny_model("llama")
    x, mask = _two_rows(padded)
    accel.patch(model, "quest", budget=48, page_size=16, dense_layers=0, keep_first_page=True, backend="reference")
    dynamic = _generate(model, x, attention_mask=mask)
    static = _generate(model, x, attention_mask=mask, cache_implementation="static", disable_compile=True)
    assert torch.equal(static, dynamic)


def test_quest_layer_map_over_static_cache(tmp_path):
    """A layer Quest's map lists stays a plain StaticLayer with dense decode under the static cache too, and the
    static run matches the dynamic one."""
    import json

    from accel.policies.duo import model_signature
    from accel.policies.quest import LAYER_MAP_FORMAT

    model = tiny_model("llama")
    path = tmp_path / "quest.json"
    path.write_text(json.dumps({"format": LAYER_MAP_FORMAT, "model": model_signature(model.config),
                                "dense_layers": [1], "calibration": {"page_size": 16, "budget": 64}}))
    x, mask = _two_rows(False)
    accel.patch(model, "quest", budget=64, page_size=16, dense_layers=0, layer_map=str(path), backend="reference")
    dynamic = _generate(model, x, attention_mask=mask)
    accel.reset_stats(model)
    with torch.no_grad():
        out = model.generate(x, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=0, cache_implementation="static", disable_compile=True,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, dynamic)
    layers = out.past_key_values.layers
    assert isinstance(layers[0], accel.cache.PagedStaticLayer)
    assert not isinstance(layers[1], accel.cache.PagedStaticLayer)
    assert accel.stats(model)["backends_used"]["static-paged"] == 11  # layer 0 only


@pytest.mark.parametrize("page_bounds", ["fp8", "exact"])
def test_quest_static_cache_bounds_and_budget(page_bounds):
    """The page bounds fold every written key (float8 ones rounded outward); a budget above the context reproduces
    dense decode exactly."""
    from accel.kernels.reference_decode import BOUNDS_FP8, cast_bounds

    model = tiny_model("llama")
    x = ids(length=150)
    accel.patch(model, "quest", budget=4096, dense_layers=0, backend="reference", page_bounds=page_bounds)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                             cache_implementation="static", disable_compile=True, return_dict_in_generate=True)
    layer = out.past_key_values.layers[1]
    assert isinstance(layer, accel.cache.PagedStaticLayer)
    assert layer.kmin.dtype == (BOUNDS_FP8 if page_bounds == "fp8" else layer.keys.dtype)
    n = int(layer.cumulative_length)
    keys = layer.keys[:, :, :n]
    full = n // 16
    lo, _ = cast_bounds(keys[:, :, : full * 16].unflatten(2, (full, 16)).amin(3), keys[:, :, :1], layer.kmin.dtype)
    _, hi = cast_bounds(keys[:, :, :1], keys[:, :, full * 16 :].amax(2), layer.kmin.dtype)
    torch.testing.assert_close(layer.kmin[:, :, :full].float(), lo.float())
    torch.testing.assert_close(layer.kmax[:, :, full].float(), hi.float())
    assert (layer.kmin[:, :, :full].float() <= keys[:, :, : full * 16].unflatten(2, (full, 16)).amin(3)).all()
    assert torch.isinf(layer.kmin[:, :, full + 1 :].float()).all()
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
    # the tiny Gemma 3 / Qwen2 have one full-attention layer, which tidal refuses: two here, sliding ones between
    model = tiny_model(fam) if fam == "llama" else _deep(fam)
    x, mask = _two_rows(padded)
    full = [i for i, t in enumerate(getattr(model.config, "layer_types", None) or ["full_attention"] * 2)
            if t == "full_attention"]
    accel.patch(model, "tidal", budget=48, select_layer=full[0], reselect_layer=None, backend="reference")
    dynamic = _generate(model, x, attention_mask=mask)
    accel.reset_stats(model)
    static = _generate(model, x, attention_mask=mask, cache_implementation="static", disable_compile=True)
    assert torch.equal(static, dynamic)
    if len(full) > 1:  # a full-attention layer after the selection layer reuses its positions
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


@pytest.mark.parametrize("fam,backend", [("llama", "reference"), ("qwen3", "reference"), ("llama", "triton")])
def test_duo_over_static_cache_matches_dynamic(fam, backend, tmp_path, monkeypatch):
    """DuoAttention over a static cache (retrieval heads' buffer, streaming heads' ring of sink + recent slots):
    the dynamic cache's tokens, and less KV memory than the dense static cache. ``triton``: the interpreter runs the
    split-KV kernel with KV-head maps in the static steps."""
    model = tiny_model(fam)
    # triton: a map with a streaming and a retrieval head in each layer, so both mapped launches run
    opts = dict(duo_map=_head_map(model, tmp_path / "m.json", seed=int(backend == "triton")), ratio=0.5, sink=4,
                recent=12)
    accel.patch(model, "duo", backend="reference", **opts)
    x = ids(batch=2, length=200)
    dynamic = _generate(model, x)  # the reference backend's tokens (the interpreter is slow; triton's are equal)
    accel.patch(model, "duo", backend=backend, **opts)
    mapped = _count_mapped_launches(monkeypatch)
    out = _generate_static(model, x)
    assert torch.equal(out.sequences, dynamic)
    split = [layer for layer in out.past_key_values.layers if isinstance(layer, accel.cache.DuoStaticLayer)]
    assert split and all(layer.skeys.shape[2] == 16 for layer in split)  # sink 4 + recent 12
    # triton: one kernel call per part (retrieval buffer, streaming ring) per layer and step
    assert len(mapped) == (11 * _parts(split) if backend == "triton" else 0)
    assert accel.stats(model)["backends_used"]["static-paged"] == 11 * len(split)
    accel.unpatch(model)
    dense = _generate_static(model, x)
    assert accel.cache_bytes(out.past_key_values) < 0.6 * accel.cache_bytes(dense.past_key_values)


@pytest.mark.parametrize("fam", ["llama", "gemma3"])
def test_streaming_over_static_cache_matches_dynamic(fam):
    """StreamingLLM over a static cache: a ring of sink + window slots per layer, the dynamic cache's tokens, and
    KV memory that does not grow with the cache length."""
    model = tiny_model(fam)
    accel.patch(model, "streaming", sink=4, window=16, backend="reference")
    x = ids(batch=2, length=200)
    dynamic = _generate(model, x)
    out = _generate_static(model, x)
    assert torch.equal(out.sequences, dynamic)
    rings = [layer for layer in out.past_key_values.layers if isinstance(layer, accel.cache.DuoStaticLayer)]
    assert rings and all(layer.skeys.shape[2] == 20 and layer.keys.shape[1] == 0 for layer in rings)


@pytest.mark.parametrize("use_triton", [False, True])
def test_lserve_static_decode_op_matches_reference(use_triton):
    """The device-side LServe step against a hand-built reference: the retrieval head attends to exactly the top
    physical pages (max of its logical pages' Quest scores, newest forced), the streaming head to sink + recent; and
    the selection really drops keys (the output differs from dense)."""
    from transformers.cache_utils import StaticLayer

    from accel.kernels import reference_decode as R
    from accel.kernels.static_decode import lserve_static_decode

    torch.manual_seed(0)
    B, D, S, sink, recent, lp, pp, budget = 1, 16, 200, 4, 12, 16, 32, 64
    layer = accel.cache.LServeStaticLayer.from_layer(StaticLayer(max_cache_len=256), [True, False], sink, recent, lp)
    k, v = torch.randn(B, 2, S + 1, D), torch.randn(B, 2, S + 1, D)
    layer.update(k[:, :, :S], v[:, :, :S])
    layer.update(k[:, :, S:], v[:, :, S:])
    q = torch.randn(B, 4, 1, D)  # query heads 0-1 -> KV head 0 (streaming), 2-3 -> KV head 1 (retrieval)
    out = lserve_static_decode(q, layer, budget=budget, page_size=lp, physical_page_size=pp, scale=None,
                               softcap=None, use_triton=use_triton)  # Triton: the interpreter on the CPU
    n = S + 1
    kmin, kmax = R.page_bounds(k[:, 1:], lp)
    s = R.quest_scores(q[:, 2:], kmin, kmax, group_reduce="max", page_size=lp)[0, 0]
    phys = torch.nn.functional.pad(s, (0, (-s.numel()) % (pp // lp)), value=float("-inf")).view(-1, pp // lp)
    phys = phys.amax(-1)
    phys[(n - 1) // pp] = float("inf")
    keep = torch.zeros(n, dtype=torch.bool)
    for p in phys.topk(budget // pp).indices.tolist():
        keep[p * pp : (p + 1) * pp] = True
    pos = torch.arange(n)
    stream_keep = (pos < sink) | (pos >= n - recent)

    def attend(qh, kk, vv, m):
        logits = (qh @ kk.T) * D**-0.5
        return logits.masked_fill(~m, float("-inf")).softmax(-1) @ vv

    ref = torch.stack([attend(q[0, h, 0], k[0, h // 2], v[0, h // 2], keep if h >= 2 else stream_keep)
                       for h in range(4)])
    torch.testing.assert_close(out[0, :, 0], ref, atol=1e-5, rtol=1e-5)
    dense = attend(q[0, 2, 0], k[0, 1], v[0, 1], torch.ones(n, dtype=torch.bool))
    assert keep.sum() < n and not torch.allclose(out[0, 2, 0], dense, atol=1e-3)


def test_lserve_static_reuse_kernels_match_torch():
    """The reuse bookkeeping on the Triton path (the scoring and top-k kernels decide on the device whether a row
    selects, the top-k keeps its pages and adds the begun page) against the same steps in torch, over ten decode steps
    that cross physical pages; and the spare slot really carries the begun page."""
    from transformers.cache_utils import StaticLayer

    from accel.kernels.static_decode import LServeReuse, lserve_static_decode

    torch.manual_seed(1)
    B, D, S, lp, pp, budget = 1, 16, 120, 16, 16, 48
    layer = accel.cache.LServeStaticLayer.from_layer(StaticLayer(max_cache_len=256), [True, False], 4, 12, lp)
    layer.update(torch.randn(B, 2, S, D), torch.randn(B, 2, S, D))
    states = {t: LServeReuse(B, 1, budget // pp, 3, "cpu") for t in (False, True)}  # selects at 121, 124, 127, 130
    begun_seen = False
    for _ in range(10):
        layer.update(torch.randn(B, 2, 1, D), torch.randn(B, 2, 1, D))
        q = torch.randn(B, 4, 1, D)
        outs = {t: lserve_static_decode(q, layer, budget=budget, page_size=lp, physical_page_size=pp, scale=None,
                                        softcap=None, use_triton=t, reuse=states[t]) for t in (False, True)}
        torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)
        for name in ("sel_len", "counts"):  # per (row, retrieval head), int32: what the kernels index
            assert torch.equal(getattr(states[True], name), getattr(states[False], name)), name
        n = int(layer.cumulative_length)
        newest = (n - 1) // pp
        if (int(states[True].sel_len) - 1) // pp < newest:  # a page begun since the selection, in the spare slot
            begun_seen = True
            assert states[True].pages[0, 0, int(states[True].counts[0, 0])] == newest
    assert begun_seen


def _split_layer(stream, group, dtype, fill, B=2, D=16, seed=0):
    """A DuoStaticLayer of 128 slots (ring: sink 4 + recent 12) holding ``fill`` prefill tokens and one decode
    token, and a query for it."""
    from transformers.cache_utils import StaticLayer

    g = torch.Generator().manual_seed(seed)
    hkv = len(stream)
    layer = accel.cache.DuoStaticLayer.from_layer(StaticLayer(max_cache_len=128), stream, 4, 12)
    k, v = (torch.randn(B, hkv, fill + 1, D, generator=g).to(dtype) for _ in range(2))
    layer.update(k[:, :, :fill], v[:, :, :fill])
    layer.update(k[:, :, fill:], v[:, :, fill:])
    return layer, torch.randn(B, hkv * group, 1, D, generator=g).to(dtype)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fill", [9, 70])  # the ring partly filled / wrapped around
@pytest.mark.parametrize("case", ["plain", "softcap", "padded", "all_stream"])
def test_split_static_decode_triton_matches_torch(group, dtype, fill, case):
    """DuoAttention's static step on the Triton path (the split-KV kernel with KV-head maps, writing one output)
    equals the torch path (gathered query heads, SDPA with transformers' mask, scattered outputs), and launches no
    gather, scatter or SDPA."""
    from accel.kernels.static_decode import split_static_decode

    stream = [True] * 3 if case == "all_stream" else [False, True, False]  # retrieval heads 0 and 2
    layer, q = _split_layer(stream, group, dtype, fill)
    n = int(layer.cumulative_length)
    kv_start = torch.tensor([0, 3], dtype=torch.int32) if case == "padded" else None
    pos = torch.arange(128)
    mask = (pos < n).expand(2, 1, 1, 128)
    if kv_start is not None:  # transformers' mask covers the left padding too
        mask = mask & (pos[None, :] >= kv_start[:, None])[:, None, None, :]
    softcap = 2.0 if case == "softcap" else None
    want = split_static_decode(q, layer, mask, 0.25, softcap, kv_start=kv_start, use_triton=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = split_static_decode(q, layer, mask, 0.25, softcap, kv_start=kv_start, use_triton=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    ops = {e.name for e in prof.events()}
    assert not ops & {"aten::index_select", "aten::index_copy_", "aten::scaled_dot_product_attention"}, ops


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("stream", [[False, True, False], [False, False, False]])
def test_lserve_static_decode_triton_matches_torch(group, stream):
    """LServe's static step on the Triton path (scoring and split-KV attention through the retrieval heads' map,
    the ring through the streaming heads') equals the torch path, with no gather or scatter launched. float32: the
    two paths' page choices agree exactly."""
    from transformers.cache_utils import StaticLayer

    from accel.kernels.static_decode import lserve_static_decode

    g = torch.Generator().manual_seed(group)
    B, D, fill = 2, 16, 100
    if any(stream):
        layer = accel.cache.LServeStaticLayer.from_layer(StaticLayer(max_cache_len=160), stream, 4, 12, 16)
    else:  # no streaming head: lserve's PagedStaticLayer, every KV head selects (no map)
        layer = accel.cache.PagedStaticLayer.from_layer(StaticLayer(max_cache_len=160), 16)
    k, v = (torch.randn(B, 3, fill + 1, D, generator=g) for _ in range(2))
    layer.update(k[:, :, :fill], v[:, :, :fill])
    layer.update(k[:, :, fill:], v[:, :, fill:])
    q = torch.randn(B, 3 * group, 1, D, generator=g)
    kw = dict(budget=64, page_size=16, physical_page_size=32, scale=0.25, softcap=None)
    want = lserve_static_decode(q, layer, use_triton=False, **kw)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = lserve_static_decode(q, layer, use_triton=True, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not {e.name for e in prof.events()} & {"aten::index_select", "aten::index_copy_"}


@pytest.mark.parametrize("kind", ["paged", "duo", "lserve", "duo_all_stream", "paged_fp8", "lserve_fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_append_kernel_matches_torch_update(kind, dtype):
    """A decode token written by one Triton launch (kernels/triton/decode_append.py: buffer rows, ring slot,
    the page's key bounds, float8 ones rounded outward) leaves every buffer exactly as the torch writes do, over
    steps that wrap the ring and cross pages; non-contiguous k/v as the attention hands them over."""
    from transformers.cache_utils import StaticLayer

    from accel.kernels.reference_decode import BOUNDS_FP8

    bd = BOUNDS_FP8 if kind.endswith("_fp8") else None
    kind = kind.removesuffix("_fp8")

    g = torch.Generator().manual_seed(7)
    B, H, D, fill, cap = 2, 3, 16, 21, 64
    stream = {"duo": [True, False, True], "lserve": [False, True, False], "duo_all_stream": [True] * 3}.get(kind)

    def make():
        base = StaticLayer(max_cache_len=cap)
        if kind == "paged":
            return accel.cache.PagedStaticLayer.from_layer(base, 16, bd)
        if kind == "lserve":
            return accel.cache.LServeStaticLayer.from_layer(base, stream, 4, 12, 16, bd)
        return accel.cache.DuoStaticLayer.from_layer(base, stream, 4, 12)

    layers = {flag: make() for flag in (False, True)}
    k, v = (torch.randn(B, H, fill, D, generator=g).to(dtype) for _ in range(2))
    for flag, layer in layers.items():
        layer.update(k, v)
        layer.triton_append = flag
    for _ in range(cap - fill):
        k1, v1 = (torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
        for layer in layers.values():
            layer.update(k1, v1)
    names = ["keys", "values", "cumulative_length"] + (["skeys", "svalues"] if stream else []) + (
        ["kmin", "kmax"] if kind in ("paged", "lserve") else [])
    for name in names:
        a, b = getattr(layers[True], name), getattr(layers[False], name)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype == BOUNDS_FP8 else a,
                                                  b.view(torch.uint8) if b.dtype == BOUNDS_FP8 else b), name
    if bd is not None:  # still bounds of every key of their page
        layer = layers[True]
        kf = layer.keys.float().unflatten(2, (cap // 16, 16))
        assert layer.kmin.dtype == bd and (layer.kmin.float() <= kf.amin(3)).all()
        assert (layer.kmax.float() >= kf.amax(3)).all()
    assert int(layers[True].cumulative_length) == cap
    if stream:  # the ring really wrapped: its slots hold the last tokens, not the first fill's
        assert not torch.equal(layers[True].skeys[:, :, 4:], torch.zeros_like(layers[True].skeys[:, :, 4:]))
