"""Every supported family, patched: dense reproduces the unpatched model (prefill logits and 20 greedy tokens),
unpatch restores it exactly, and patching twice switches policy cleanly."""

import pytest
import torch

import accel
from conftest import tiny_model

BACKENDS = ["reference", "triton"]


def ids(batch=1, length=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)  # ids 0-2 are special (pad/bos/eos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_matches_unpatched(family, backend):
    model = tiny_model(family)
    x = ids()
    with torch.no_grad():
        ref_logits = model(x).logits
        ref_tokens = model.generate(x, max_new_tokens=20, do_sample=False)
        accel.patch(model, "dense", backend=backend)
        logits = model(x).logits
        tokens = model.generate(x, max_new_tokens=20, do_sample=False)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)
    st = accel.stats(model)
    assert st["backends_used"] == {backend: st["backends_used"][backend]} and st["backends_used"][backend] > 0
    layers = st["layers"]
    assert all(layer["calls"]["prefill"] == 2 and layer["calls"]["decode"] == 19 for layer in layers)


def _global_layers_model(family):
    """Tiny model whose global layers a streaming window can change (Mistral's config window covers every layer)."""
    model = tiny_model(family)
    if family == "mistral":
        model.config.sliding_window = None
    return model


def test_unpatch_restores_exactly(family):
    model = _global_layers_model(family)
    x = ids()
    impl = model.config._attn_implementation
    with torch.no_grad():
        before = model(x).logits
        accel.patch(model, "streaming", sink=4, window=8, backend="reference")
        during = model(x).logits
        accel.unpatch(model)
        after = model(x).logits
    assert model.config._attn_implementation == impl
    assert not accel.is_patched(model)
    assert not any(hasattr(m, "_accel") for m in model.modules())
    assert torch.equal(before, after)
    assert not torch.allclose(before, during)  # the streaming window really changed attention


def test_patch_twice_switches_policy(family):
    model = _global_layers_model(family)
    x = ids()
    with torch.no_grad():
        dense = model(x).logits
        accel.patch(model, "streaming", sink=4, window=8, backend="reference")
        stream = model(x).logits
        accel.patch(model, "dense", backend="reference")
        again = model(x).logits
    assert accel.stats(model)["policy"] == "dense"
    torch.testing.assert_close(again, dense, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(stream, dense)
    # one set of hooks: a single forward counts one prefill call per layer
    assert all(layer["calls"]["prefill"] == 1 for layer in accel.stats(model)["layers"])


def test_left_padded_batch_matches_single_rows(family):
    model = tiny_model(family)
    a, b = ids(length=30, seed=2)[0], ids(length=22, seed=3)[0]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batch = torch.full((2, 30), pad)
    batch[0], batch[1, 8:] = a, b
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :8] = 0
    with torch.no_grad():
        single = [model.generate(r[None], max_new_tokens=6, do_sample=False)[0, -6:] for r in (a, b)]
        accel.patch(model, "dense", backend="reference")
        out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, -6:]
    assert torch.equal(out[0], single[0]) and torch.equal(out[1], single[1])


def test_chunked_prefill_matches_one_shot(family):
    """Prefill on top of an existing cache (queries fewer than keys) equals one-shot prefill."""
    model = tiny_model(family)
    x = ids(length=40)
    accel.patch(model, "dense", backend="reference")
    with torch.no_grad():
        full = model(x).logits[:, -1]
        first = model(x[:, :25], use_cache=True)
        rest = model(x[:, 25:], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(rest, full, atol=2e-5, rtol=1e-4)
