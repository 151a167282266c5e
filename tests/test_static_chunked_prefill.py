"""Chunked prefill (and a prompt on top of a filled cache) over a transformers StaticCache for the DuoAttention
family (duo, lserve, streaming and compositions on top of them): the static layer presents what the dynamic
DuoSplitLayer presents (retrieval heads' K/V, the streaming heads' ring read back in position order), so the chunks
give the dynamic cache's logits and the decode steps after them its tokens."""

import pytest
import torch
import transformers
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

import accel
from accel.cache import DuoSplitLayer, DuoStaticLayer
from conftest import tiny_model
from test_policy_duo import _head_map

CHUNKS = ((0, 90), (90, 150), (150, 201))  # the second and third chunks wrap the 16-slot ring
STEPS = 6
# chunk-invariant: dense retrieval heads, sink + recent streaming heads (or every head streaming); a composition's
# first chunk runs its prefill policy on every head, so its chunks are compared with the dynamic cache only
POLICIES = ["duo", "lserve", "streaming", "xattention+duo", "flexprefill+lserve"]
INVARIANT = {"duo", "lserve", "streaming"}


def _ids(batch=2, length=201, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _opts(model, policy, tmp_path):
    opts = {}
    if "duo" in policy or "lserve" in policy:  # seed 1: a streaming and a retrieval KV head in each layer
        opts = dict(duo_map=_head_map(model, tmp_path / "m.json", seed=1), ratio=0.5, sink=4, recent=12)
    if "lserve" in policy:
        opts.update(page_size=16, physical_page_size=32, budget=64)
    if "streaming" in policy:
        opts.update(sink=4, window=12)
    if "xattention" in policy:
        opts.update(block_size=64, threshold=0.5)
    return opts


def _chunked(model, cache, x, chunks=CHUNKS, steps=STEPS):
    """Logits of every chunk (concatenated) and ``steps`` greedy tokens decoded after them."""
    logits, tokens = [], []
    with torch.no_grad():
        for lo, hi in chunks:
            logits.append(model(x[:, lo:hi], past_key_values=cache, use_cache=True).logits)
        t = logits[-1][:, -1:].argmax(-1)
        for _ in range(steps):
            t = model(t, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(t)
    return torch.cat(logits, 1), torch.cat(tokens, 1) if tokens else None


@pytest.mark.parametrize("fam", ["llama", "gemma3"])
@pytest.mark.parametrize("policy", POLICIES)
def test_chunked_prefill_over_static_cache_matches_dynamic(fam, policy, tmp_path):
    model = tiny_model(fam)
    accel.patch(model, policy, backend="reference", **_opts(model, policy, tmp_path))
    x = _ids()
    dyn_logits, dyn_tokens = _chunked(model, DynamicCache(config=model.config), x)
    accel.reset_stats(model)
    static = StaticCache(config=model.config, max_cache_len=256)
    logits, tokens = _chunked(model, static, x)
    torch.testing.assert_close(logits, dyn_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, dyn_tokens)
    rings = [layer for layer in static.layers if isinstance(layer, DuoStaticLayer)]
    assert rings and all(int(layer.cumulative_length) == 201 + STEPS for layer in rings)
    if policy != "streaming":  # both kinds of heads in every split layer: both parts of the chunks ran
        assert all(layer.retrieval_idx.numel() and layer.stream_idx.numel() for layer in rings)
    # the decode steps ran device-side over the ring (the static form), not over a dense buffer
    st = accel.stats(model)
    assert st["backends_used"].get("static-paged", 0) >= STEPS * len(rings)
    if policy in INVARIANT:
        with torch.no_grad():
            one_shot = model(x).logits
        torch.testing.assert_close(logits, one_shot, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stream", [[False, True, False], [True, True, True]])
@pytest.mark.parametrize("fill,chunk", [(3, 5), (10, 2), (15, 7), (16, 30), (41, 9), (70, 40)])
def test_static_layer_presents_what_the_dynamic_layer_holds(stream, fill, chunk):
    """Layer level, sink 4 + recent 12 (ring of 16 slots): after ``fill`` tokens (past below the sink, partial
    ring, exactly the kept size, wrapped) a chunk returns exactly the dynamic layer's retrieval K/V and stream_kv
    (its ring read back in position order and trimmed to sink + recent - 1); a second chunk after it too."""
    g = torch.Generator().manual_seed(fill)
    B, H, D = 2, len(stream), 8
    static = DuoStaticLayer.from_layer(StaticLayer(max_cache_len=160), stream, 4, 12)
    dynamic = DuoSplitLayer(stream, 4, 12)
    k, v = (torch.randn(B, H, fill + 2 * chunk, D, generator=g) for _ in range(2))
    for lo, hi in ((0, fill), (fill, fill + chunk), (fill + chunk, fill + 2 * chunk)):
        ks, vs = static.update(k[:, :, lo:hi], v[:, :, lo:hi])
        kd, vd = dynamic.update(k[:, :, lo:hi], v[:, :, lo:hi])
        assert static.full_call == dynamic.full_call == (lo == 0)
        if lo == 0:
            assert torch.equal(ks, kd) and torch.equal(vs, vd)  # every head, for the prefill policy
            continue
        for a, b in zip(static.stream_kv, dynamic.stream_kv):
            assert torch.equal(a, b)
        if all(stream):  # every head streams: the store itself, as SinkWindowLayer returns it
            assert torch.equal(ks, dynamic.stream_kv[0]) and torch.equal(vs, dynamic.stream_kv[1])
        else:
            assert torch.equal(ks, kd) and torch.equal(vs, vd)


def test_a_wrong_ring_order_changes_the_chunks(tmp_path, monkeypatch):
    """The chunks' streaming heads really see the ring's past in position order: read back newest first, the
    logits of the later chunks move away from the dynamic cache's (and the first chunk's stay)."""
    model = tiny_model("llama")
    accel.patch(model, "duo", backend="reference", **_opts(model, "duo", tmp_path))
    x = _ids(batch=1)
    want, _ = _chunked(model, DynamicCache(config=model.config), x, steps=0)
    right = DuoStaticLayer.past_positions
    monkeypatch.setattr(DuoStaticLayer, "past_positions", lambda self, n: right(self, n).flip(0))
    got, _ = _chunked(model, StaticCache(config=model.config, max_cache_len=256), x, steps=0)
    torch.testing.assert_close(got[:, :90], want[:, :90], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, 90:], want[:, 90:], atol=1e-3)


def test_composition_chunks_plan_the_retrieval_heads_with_the_prefill_policy(tmp_path, monkeypatch):
    """``xattention+duo`` on a later chunk: XAttention plans the retrieval query heads over their full K/V (a
    block-sparse layout), the streaming heads attend to their store, on both caches."""
    from accel.layouts import BlockLayout
    from accel.policies.xattention import XAttentionPolicy

    seen = []
    plan = XAttentionPolicy.plan

    def spy(self, q, k, ctx):
        layout = plan(self, q, k, ctx)
        seen.append((q.shape[1], k.shape[1], ctx.q_heads is not None, type(layout)))
        return layout

    monkeypatch.setattr(XAttentionPolicy, "plan", spy)
    model = tiny_model("llama")
    accel.patch(model, "xattention+duo", backend="reference", **_opts(model, "xattention+duo", tmp_path))
    chunks = ((0, 130), (130, 330))  # a 200-token chunk: XAttention's 64-token blocks have something to skip
    x = _ids(batch=1, length=330)
    outs = []
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=400)):
        seen.clear()
        outs.append(_chunked(model, cache, x, chunks=chunks, steps=3))
        first, later = seen[:2], seen[2:]
        assert all(s[:3] == (4, 2, False) for s in first)  # first fill: every head
        assert later and all(s == (2, 1, True, BlockLayout) for s in later)  # retrieval query heads, their KV head
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[1][1], outs[0][1])


def test_left_padded_chunk_is_refused(tmp_path):
    """A dense prefill takes a left-padded first fill, but a chunk on top of DuoAttention's split cache would make
    padding the streaming heads' sink: a clear error on both caches."""
    model = tiny_model("llama")
    accel.patch(model, {"prefill": "dense", "decode": "duo"}, backend="reference", **_opts(model, "duo", tmp_path))
    x = _ids(length=150)
    mask = torch.ones_like(x)
    mask[1, :20] = 0
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=256)):
        with torch.no_grad():
            model(x[:, :100], attention_mask=mask[:, :100], past_key_values=cache, use_cache=True)
            with pytest.raises(ValueError, match="left-padded"):
                model(x[:, 100:], attention_mask=mask, past_key_values=cache, use_cache=True)


def _generate(model, x, **kw):
    with torch.no_grad():
        return model.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, **kw)


needs_prefill_chunk_size = pytest.mark.skipif(not hasattr(transformers.GenerationConfig(), "prefill_chunk_size"),
                                      reason="this transformers has no prefill_chunk_size")


@needs_prefill_chunk_size
@pytest.mark.parametrize("policy", ["duo", "streaming", "flexprefill+lserve"])
def test_generate_static_with_prefill_chunk_size(policy, tmp_path):
    """generate(cache_implementation="static", prefill_chunk_size=N): the dynamic cache's tokens with the same
    chunks (and the one-shot tokens for a chunk-invariant policy)."""
    model = tiny_model("llama")
    accel.patch(model, policy, backend="reference", **_opts(model, policy, tmp_path))
    x = _ids()
    dynamic = _generate(model, x, prefill_chunk_size=70)
    static = _generate(model, x, prefill_chunk_size=70, cache_implementation="static", disable_compile=True)
    assert torch.equal(static, dynamic)
    if policy in INVARIANT:
        assert torch.equal(static, _generate(model, x))


@needs_prefill_chunk_size
def test_compiled_generate_runs_the_chunks_eagerly(tmp_path):
    """transformers compiles the forward of prefill_chunk_size's chunks over a static cache (on a GPU by itself):
    accel sends those calls to the eager forward (its prefill reads cache lengths on the host) and compiles the
    one-token steps, with no graph break (fullgraph), to the dynamic cache's tokens."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    accel.patch(model, "xattention+duo", backend="reference", **_opts(model, "xattention+duo", tmp_path))
    x = _ids()
    dynamic = _generate(model, x, prefill_chunk_size=70)
    cc = transformers.CompileConfig(fullgraph=True, mode="default")
    cc._compile_all_devices = True  # the path transformers takes by itself on a GPU, forced on the CPU
    compiled = _generate(model, x, prefill_chunk_size=70, cache_implementation="static", compile_config=cc)
    assert torch.equal(compiled, dynamic)
    layer0 = accel.stats(model)["layers"][0]
    assert layer0["calls"]["prefill"] == 3 * 2 and layer0["static_cache"]  # 3 eager chunks in each generate
    accel.unpatch(model)
    assert "get_compiled_call" not in model.__dict__


def test_duo_static_layer_refuses_crop():
    layer = DuoStaticLayer(64, [True, False], sink=4, recent=8)
    k = torch.randn(1, 2, 20, 16)
    layer.update(k, k)
    assert not layer.is_croppable
    with pytest.raises(RuntimeError, match="cannot be cropped"):
        layer.crop(-5)
    assert int(layer.get_seq_length()) == 20  # left as it was
