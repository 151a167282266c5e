"""PagedKVLayer: page bounds stay exact under incremental appends and generate's batch edits; patch installs it."""

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache

import accel
from accel.cache import PagedKVLayer
from accel.kernels.reference_decode import BOUNDS_FP8, page_bounds
from conftest import tiny_model
from test_families import ids


def _check(layer: PagedKVLayer):
    mn, mx = page_bounds(layer.keys, layer.page_size, layer.kmin.dtype)
    assert layer.kmin.dtype == mn.dtype and torch.equal(layer.kmin.float(), mn.float())
    assert torch.equal(layer.kmax.float(), mx.float())


@pytest.mark.parametrize("bounds_dtype", [None, BOUNDS_FP8])
def test_incremental_bounds_equal_recomputed(bounds_dtype):
    layer = PagedKVLayer(page_size=4, bounds_dtype=bounds_dtype)
    ks, vs = [], []
    for n in (7, 1, 1, 1, 5, 1, 16, 3):
        k, v = torch.randn(2, 3, n, 8), torch.randn(2, 3, n, 8)
        out_k, out_v = layer.update(k, v)
        ks.append(k), vs.append(v)
        assert torch.equal(out_k, torch.cat(ks, -2)) and torch.equal(out_v, torch.cat(vs, -2))
        _check(layer)
    assert layer.get_seq_length() == 35
    layer.crop(-6)
    assert layer.get_seq_length() == 29
    _check(layer)
    layer.update(torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8))
    _check(layer)


def test_append_touches_only_the_last_page(monkeypatch):
    layer = PagedKVLayer(page_size=16)
    layer.update(torch.randn(1, 2, 1000, 8), torch.randn(1, 2, 1000, 8))
    seen = []
    orig = torch.Tensor.amin

    def spy(self, *a, **kw):
        seen.append(self.numel() // (2 * 8))  # keys read per (batch, head)
        return orig(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "amin", spy)
    layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    assert seen == [16]  # only the last partial page (its 9 keys padded to one page), not the 1001 keys


def test_batch_edits_keep_bounds():
    layer = PagedKVLayer(page_size=4)
    layer.update(torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8))
    layer.plan_cache["x"] = 1
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 6 and not layer.plan_cache
    _check(layer)
    layer.reorder_cache(torch.tensor([5, 4, 3, 2, 1, 0]))
    _check(layer)
    layer.batch_select_indices(torch.tensor([0, 2]))
    assert layer.keys.shape[0] == 2
    _check(layer)
    layer.reset()
    assert layer.get_seq_length() == 0


def test_from_filled_layer():
    base = DynamicLayer()
    base.update(torch.randn(1, 2, 21, 8), torch.randn(1, 2, 21, 8))
    layer = PagedKVLayer.from_layer(base, page_size=8)
    assert torch.equal(layer.keys, base.keys)
    _check(layer)


def _quest_model(family="llama"):
    model = tiny_model(family)
    accel.patch(model, "quest", budget=32, dense_layers=0, backend="reference")
    return model


def test_patch_installs_paged_layers_and_generate_works():
    model = _quest_model()
    with torch.no_grad():
        out = model.generate(ids(batch=2, length=50), max_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True)
    cache = out.past_key_values
    assert [type(layer) for layer in cache.layers] == [PagedKVLayer, PagedKVLayer]
    for layer in cache.layers:
        _check(layer)


@pytest.mark.parametrize("kw", [dict(do_sample=True, top_k=20), dict(num_beams=2, do_sample=False),
                                dict(do_sample=True, num_return_sequences=2)])
def test_generate_modes(kw):
    model = _quest_model()
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids(batch=2, length=50), max_new_tokens=5, return_dict_in_generate=True, **kw)
    assert out.sequences.shape[1] == 55
    for layer in out.past_key_values.layers:
        assert isinstance(layer, PagedKVLayer)
        _check(layer)


def test_prefilled_dynamic_cache_is_taken_over():
    """A cache filled before patching is converted (its bounds computed once) on the first patched call."""
    model = tiny_model("llama")
    x = ids(length=60)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(x[:, :-1], past_key_values=cache)
        accel.patch(model, "quest", budget=32, dense_layers=0, backend="reference")
        model(x[:, -1:], past_key_values=cache)
    assert all(isinstance(layer, PagedKVLayer) for layer in cache.layers)


def test_user_static_cache_takes_page_bounds():
    """A StaticCache passed to generate gets Quest's static page-bounds layers (tests/test_static_cache.py has the
    equivalence with the dynamic cache)."""
    model = _quest_model()
    cache = StaticCache(config=model.config, max_cache_len=80)
    with torch.no_grad():
        model.generate(ids(length=40), max_new_tokens=2, past_key_values=cache, disable_compile=True)
    assert any(type(layer).__name__ == "PagedStaticLayer" for layer in cache.layers)


def test_cache_bytes_counts_the_paged_layer():
    model = _quest_model()
    with torch.no_grad():
        out = model.generate(ids(length=40), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    layer = out.past_key_values.layers[0]
    assert accel.cache_bytes(out.past_key_values) > 0
    assert layer.storage_bytes() >= 2 * layer.keys.numel() * layer.keys.element_size()
