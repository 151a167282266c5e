"""A KV cache filled under one decode policy and continued after a re-patch or an unpatch: continued where the new
attention reads what it needs from it, refused (with the fix named) where it would read a streaming layer's dropped
middle or a DuoAttention layer's split heads as the full cache. And a re-patch that fails keeps the old policy."""

import pytest
import torch
from transformers import DynamicCache

import accel
import accel.patching
from conftest import tiny_model
from test_families import ids
from test_policy_duo import _head_map


def _prefill(model, x):
    cache = DynamicCache(config=model.config)  # as generate makes it: the layers exist before the first call
    with torch.no_grad():
        model(x, past_key_values=cache, use_cache=True)
    return cache


def _step(model, cache, tok):
    with torch.no_grad():
        return model(tok, past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("first, then", [
    (("streaming", dict(sink=4, window=32)), ("dense", {})),
    (("streaming", dict(sink=4, window=32)), ("streaming", dict(sink=4, window=64))),
    (("streaming", dict(sink=4, window=32)), ("quest", dict(budget=64, dense_layers=0))),
    (("duo", dict(ratio=0.5, sink=4, recent=12)), ("dense", {})),
    (("quest", dict(budget=64, dense_layers=0, page_size=16)), ("quest", dict(budget=64, dense_layers=0,
                                                                             page_size=32))),
])
def test_repatched_policy_refuses_a_cache_made_for_another(first, then, tmp_path):
    model = tiny_model("llama")
    duo = {"duo_map": _head_map(model, tmp_path / "m.json")}
    x = ids(length=100)
    accel.patch(model, first[0], backend="reference", **first[1], **(duo if first[0] == "duo" else {}))
    cache = _prefill(model, x)
    accel.patch(model, then[0], backend="reference", **then[1])
    with pytest.raises(RuntimeError, match=f"filled under accel's decode policy '{first[0]}'.*Start a new cache"):
        _step(model, cache, x[:, -1:])
    # the model itself is fine: a new cache works
    _prefill(model, x)


def test_unpatched_model_refuses_a_streaming_cache():
    model = tiny_model("llama")
    x = ids(length=100)
    accel.patch(model, "streaming", sink=4, window=32, backend="reference")
    cache = _prefill(model, x)
    accel.unpatch(model)
    with pytest.raises(RuntimeError, match="no longer patched with that policy"):
        _step(model, cache, x[:, -1:])


def test_same_policy_repatched_continues_its_cache():
    """Re-patching with the same decode policy and options (e.g. to turn collect_stats on) keeps the cache usable,
    with the logits of the uninterrupted run."""
    model = tiny_model("llama")
    x = ids(length=100)
    accel.patch(model, "streaming", sink=4, window=32, backend="reference")
    want = _step(model, _prefill(model, x), x[:, -1:])
    cache = _prefill(model, x)
    accel.patch(model, "streaming", sink=4, window=32, backend="reference", collect_stats=True)
    assert torch.equal(_step(model, cache, x[:, -1:]), want)


@pytest.mark.parametrize("then", ["dense", "unpatch"])
def test_quest_cache_keeps_every_token_and_goes_on_dense(then):
    """Quest's paged layer stores every token: dense attention (patched, or the unpatched model) over it gives the
    logits of a plain cache."""
    model = tiny_model("llama")
    x = ids(length=100)
    with torch.no_grad():
        want = model(torch.cat([x, x[:, -1:]], 1)).logits[:, -1:]
    accel.patch(model, "quest", budget=64, dense_layers=0, backend="reference")
    cache = _prefill(model, x)
    if then == "unpatch":
        accel.unpatch(model)
    else:
        accel.patch(model, "dense", backend="reference")
    torch.testing.assert_close(_step(model, cache, x[:, -1:]), want, atol=1e-5, rtol=1e-5)


def test_failed_repatch_keeps_the_previous_policy(monkeypatch):
    """An error while installing the new policy (after the old one was taken off) puts the old one back."""
    model = tiny_model("llama")
    x = ids(length=100)
    accel.patch(model, "streaming", sink=4, window=32, backend="reference")
    with torch.no_grad():
        want = model(x).logits

    original, calls = accel.patching._eager_prefill_chunks, []

    def broken(_model):  # fails for the new policy, works when the old one is put back
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("installing failed")
        return original(_model)

    monkeypatch.setattr(accel.patching, "_eager_prefill_chunks", broken)
    with pytest.raises(RuntimeError, match="installing failed"):
        accel.patch(model, "dense", backend="reference")
    monkeypatch.undo()
    assert accel.is_patched(model)
    assert {layer["decode_policy"] for layer in accel.stats(model)["layers"]} == {"streaming"}
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)


@pytest.mark.parametrize("then", [("dense", {}), ("duo", dict(ratio=0.5, sink=4, recent=16))])
def test_static_cache_filled_under_duo_is_refused_after_a_repatch(then, tmp_path):
    """A StaticCache passed again after a re-patch: DuoAttention's layer keeps a ring for its streaming heads, which
    neither dense attention nor other Duo options can read as they would their own."""
    from transformers import StaticCache

    model = tiny_model("llama")
    duo_map = _head_map(model, tmp_path / "m.json")
    x = ids(length=100)
    accel.patch(model, "duo", duo_map=duo_map, ratio=0.5, sink=4, recent=12, backend="reference")
    cache = StaticCache(config=model.config, max_cache_len=128)
    with torch.no_grad():
        model(x, past_key_values=cache, use_cache=True, cache_position=torch.arange(100))
    accel.patch(model, then[0], backend="reference", **then[1], **({"duo_map": duo_map} if then[0] == "duo" else {}))
    with pytest.raises(RuntimeError, match="static cache was filled under accel's decode policy 'duo'"):
        with torch.no_grad():
            model(x[:, -1:], past_key_values=cache, use_cache=True, cache_position=torch.tensor([100]))


def test_static_quest_cache_goes_on_dense():
    """Quest's static layer holds every token: dense attention continues it exactly."""
    from transformers import StaticCache

    model = tiny_model("llama")
    x = ids(length=100)
    with torch.no_grad():
        want = model(torch.cat([x, x[:, -1:]], 1)).logits[:, -1:]
    accel.patch(model, "quest", budget=64, dense_layers=0, backend="reference")
    cache = StaticCache(config=model.config, max_cache_len=128)
    with torch.no_grad():
        model(x, past_key_values=cache, use_cache=True, cache_position=torch.arange(100))
    accel.patch(model, "dense", backend="reference")
    with torch.no_grad():
        got = model(x[:, -1:], past_key_values=cache, use_cache=True, cache_position=torch.tensor([100])).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
