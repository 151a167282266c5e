"""The streaming policy: exact sink+window attention, a bounded decode cache, and 'keep everything' == dense."""

import pytest
import torch

import accel
from accel.cache import SinkWindowLayer
from conftest import tiny_model
from test_families import ids


def test_window_covering_everything_is_dense(family):
    model = tiny_model(family)
    x = ids(length=40)
    with torch.no_grad():
        dense = model(x).logits
        accel.patch(model, "streaming", sink=4, window=64, backend="reference")
        stream = model(x).logits
    torch.testing.assert_close(stream, dense, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_decode_on_bounded_cache_equals_full_recompute(family):
    """Decoding on the compacted cache gives the logits of a full prefill under the same sink+window mask:
    dropping the tokens nobody can see is exact."""
    model = tiny_model(family)
    x = ids(length=48)
    accel.patch(model, "streaming", sink=4, window=12, backend="reference")
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
        seq = out.sequences
        recomputed = model(seq[:, :-1]).logits[:, -8:]
    torch.testing.assert_close(torch.stack(out.logits, 1), recomputed, atol=5e-5, rtol=1e-4)


def test_streaming_cache_is_bounded():
    model = tiny_model("gemma3")  # global layer streams; sliding layers keep their own window
    accel.patch(model, "streaming", sink=4, window=12, backend="reference")
    sizes = []
    with torch.no_grad():
        for length in (40, 120):
            out = model.generate(ids(length=length), max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
            cache = out.past_key_values
            kinds = [type(layer).__name__ for layer in cache.layers]
            assert kinds == ["DynamicSlidingWindowLayer", "DynamicSlidingWindowLayer", "SinkWindowLayer"]
            stream = cache.layers[2]
            assert stream.keys.shape[-2] == 4 + 12 - 1
            assert stream.get_seq_length() == length + 4  # positions keep counting (last token not yet cached)
            sizes.append(accel.cache_bytes(cache))
    assert sizes[0] == sizes[1]  # KV memory does not grow with the context


def test_streaming_layer_refuses_crop():
    layer = SinkWindowLayer(2, 4)
    layer.update(torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8))
    with pytest.raises(RuntimeError, match="cannot be cropped"):
        layer.crop(-1)


def test_streaming_density_recorded():
    model = tiny_model("llama")
    accel.patch(model, "streaming", sink=4, window=8, backend="reference")
    with torch.no_grad():
        model(ids(length=64))
    d = accel.stats(model)["mean_density"]
    # closed form: per query min(p+1, 8) recent + sink keys older than the window, over causal pairs
    kept = sum(min(p + 1, 8) + min(max(p - 8 + 1, 0), 4) for p in range(64))
    assert d == pytest.approx(kept / (64 * 65 / 2))
