"""scripts/bench_decode_floor.py's CPU-checkable parts: the per-layer attention calls it times compute the layer's
attention, and the bytes each policy's step must read (its byte floor) follow each policy's rule."""

import os
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import accel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import bench_decode_floor as F  # noqa: E402
from bench_e2e import speed_head_map  # noqa: E402

B, L_CTX, HKV, D = 2, 600, 2, 16


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=HKV, vocab_size=1200, max_position_embeddings=1024)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _run(model, tmp_path, name, **opts):
    if name in ("duo", "lserve"):
        opts["duo_map"] = speed_head_map(model, str(tmp_path / "duo.json"))
    accel.patch(model, {"prefill": "dense", "decode": name}, **opts)
    try:
        with torch.no_grad():
            cache, _ = F.filled_cache(model, L_CTX, B, 16)
            outs = [c() for c in F.attention_calls(model, cache, B)]
            return cache, outs, F.attention_bytes(model, cache)
    finally:
        accel.unpatch(model)


def kv(heads, n):  # float32 K and V of n positions
    return 2 * B * heads * n * D * 4


def test_dense_calls_attend_over_the_filled_slots(model, tmp_path):
    cache, outs, (pol, dense) = _run(model, tmp_path, "dense")
    L = int(cache.layers[0].cumulative_length)
    assert L == L_CTX + 2 and pol == dense == 4 * kv(HKV, L)
    g = torch.Generator().manual_seed(1)  # attention_calls' queries
    for i, layer in enumerate(cache.layers):
        q = torch.randn(B, 4, 1, D, generator=g)
        k, v = layer.keys[:, :, :L].repeat_interleave(2, 1), layer.values[:, :, :L].repeat_interleave(2, 1)
        ref = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, -1) @ v
        torch.testing.assert_close(outs[i], ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_policy_bytes_follow_each_rule(model, tmp_path):
    L = L_CTX + 2
    _, _, (quest, dense) = _run(model, tmp_path, "quest", budget=64)
    # first 2 layers dense; then page bounds (min and max of every 16-token page) + the 64 selected tokens
    assert quest == 2 * kv(HKV, L) + 2 * (kv(HKV, -(-L // 16)) + kv(HKV, 64))
    _, _, (tidal, _) = _run(model, tmp_path, "tidal", budget=64)
    # layers 0-1 dense, layer 2 selects (attends densely, ranks keys by those scores), layer 3 reads the 64 positions
    assert tidal == 3 * kv(HKV, L) + kv(HKV, 64)
    cache, _, (duo, _) = _run(model, tmp_path, "duo")
    want = 0
    for layer in cache.layers:
        hr = layer.keys.shape[1]
        want += kv(hr, L) + (kv(layer.skeys.shape[1], 320) if hasattr(layer, "skeys") else 0)  # ring 64 + 256
    assert want == duo < dense
    c_reuse, outs, (lserve, _) = _run(model, tmp_path, "lserve", budget=128)
    _, _, (lserve_select, _) = _run(model, tmp_path, "lserve", budget=128, reuse_steps=1)
    # a selecting step reads the retrieval heads' logical-page bounds on top of what a reusing step reads
    assert lserve_select - lserve == sum(kv(layer.keys.shape[1], -(-L // 16)) for layer in c_reuse.layers)
    assert lserve < duo and all(bool(torch.isfinite(o).all()) for o in outs)
