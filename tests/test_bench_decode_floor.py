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
    # first 2 layers dense; then page bounds (min and max of every 16-token page, one byte each) + the 64 selected
    # tokens (float32)
    assert quest == 2 * kv(HKV, L) + 2 * (kv(HKV, -(-L // 16)) // 4 + kv(HKV, 64))
    _, _, (quest_exact, _) = _run(model, tmp_path, "quest", budget=64, page_bounds="exact")
    assert quest_exact == 2 * kv(HKV, L) + 2 * (kv(HKV, -(-L // 16)) + kv(HKV, 64))
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
    assert lserve_select - lserve == sum(kv(layer.keys.shape[1], -(-L // 16)) // 4 for layer in c_reuse.layers)
    assert lserve < duo and all(bool(torch.isfinite(o).all()) for o in outs)


def test_layer_reads_are_the_bytes_as_dependent_launches(model, tmp_path):
    """Quest reads its page bounds, then its pages (two launches a sparse layer); a reusing LServe step reads its
    pages (and ring) in one; dense layers one; the launches sum to attention_bytes."""
    for name, opts in [("quest", {"budget": 64}), ("lserve", {"budget": 128}),
                       ("lserve", {"budget": 128, "reuse_steps": 1}), ("tidal", {"budget": 64})]:
        if name == "lserve":
            opts = {**opts, "duo_map": speed_head_map(model, str(tmp_path / "duo.json"))}
        accel.patch(model, {"prefill": "dense", "decode": name}, **opts)
        try:
            with torch.no_grad():
                cache, _ = F.filled_cache(model, L_CTX, B, 16)
                reads, totals = F.layer_reads(model, cache), F.attention_bytes(model, cache)
        finally:
            accel.unpatch(model)
        L = L_CTX + 2
        assert sum(sum(r) for r, _ in reads) == totals[0] and sum(d for _, d in reads) == totals[1]
        assert all(d == kv(HKV, L) for _, d in reads)
        n = [len(r) for r, _ in reads]
        if name == "quest":  # layers 0-1 dense
            assert n == [1, 1, 2, 2] and reads[2][0] == [kv(HKV, -(-L // 16)) // 4, kv(HKV, 64)]
        elif name == "tidal":
            assert n == [1, 1, 1, 1] and reads[3][0] == [kv(HKV, 64)]
        else:  # layers with retrieval heads select (two launches: their bounds first) unless the step reuses
            selecting = opts.get("reuse_steps") == 1
            hr = [layer.keys.shape[1] for layer in cache.layers]
            assert 0 in hr and n == [2 if selecting and h else 1 for h in hr]
            assert all(r[0] == kv(h, -(-L // 16)) // 4 for (r, _), h in zip(reads, hr) if selecting and h)


def _table(tmp_path, rows) -> str:
    """The markdown bench_decode_floor writes for ``rows``."""
    meta = {"command": "x", "device": "d", "date": "t", "versions": {}, "model": "llama8b", "eager": False}
    F.write({"meta": meta, "rows": rows}, str(tmp_path / "out"))
    return (tmp_path / "out.md").read_text()


def test_table_reports_speedup_floor_share_and_the_lserve_cycle(tmp_path):
    """The markdown row of a run: speedup against dense, byte floor, share of it; LServe's 4-step cycle (one
    selecting step, three reusing) is added from its two runs."""
    rows = [{"run": "dense", "context": 131072, "batch": 1, "attn_ms": 4.0, "layers": 32, "policy_bytes": 16e9,
             "dense_bytes": 16e9},
            {"run": "lserve", "context": 131072, "batch": 1, "attn_ms": 0.5, "layers": 32, "policy_bytes": 0.25e9,
             "dense_bytes": 16e9},
            {"run": "lserve:reuse_steps=1", "context": 131072, "batch": 1, "attn_ms": 1.0, "layers": 32,
             "policy_bytes": 1e9, "dense_bytes": 16e9},
            {"run": "quest", "context": 131072, "batch": 1, "error": "RuntimeError: boom"}]
    md = _table(tmp_path, rows)
    # 4.0 / 0.5 = 8x against a floor of 64x: 12%; 4x of 16x: 25%
    assert "| 128K | 1 | lserve | 0.500 | 15.6 | 8.00x | 64.00x | 12% |" in md
    assert "| 128K | 1 | lserve:reuse_steps=1 | 1.000 | 31.2 | 4.00x | 16.00x | 25% |" in md
    # cycle: (1.0 + 3 * 0.5) / 4 = 0.625 ms; bytes (1 + 3 * 0.25) / 4 = 0.4375 GB: 6.40x of 36.57x
    assert "| 128K | 1 | lserve, 4-step cycle | 0.625 | 19.5 | 6.40x | 36.57x | 18% |" in md
    assert "| 128K | 1 | quest | error: RuntimeError: boom |" in md and "compiled by torch.compile" in md
    assert "launch floor" not in md


def test_table_adds_the_launch_floor_when_timed(tmp_path):
    """With --launch-floor: the plain-read graphs' speedup (dense reads / policy reads), its share of the byte floor,
    and the policy's share of it; the LServe cycle averages its two runs' read graphs."""
    def row(run, ms, pb, launch_ms):
        return {"run": run, "context": 131072, "batch": 1, "attn_ms": ms, "layers": 32, "policy_bytes": pb,
                "dense_bytes": 16e9, "launch_floor": {"ms": launch_ms}, "dense_launch_floor": {"ms": 5.0}}

    rows = [row("dense", 4.0, 16e9, 5.0), row("lserve", 0.5, 0.25e9, 0.25), row("lserve:reuse_steps=1", 1.0, 1e9, 0.45)]
    md = _table(tmp_path, rows)
    # lserve: reads 5.0 / 0.25 = 20x of a 64x byte floor (31%); the policy's 8x is 40% of that
    assert "| 128K | 1 | lserve | 0.500 | 15.6 | 8.00x | 64.00x | 12% | 0.25 | 0.50 | 20.00x | 31% | 40% |" in md
    assert "| 128K | 1 | dense | 4.000 | 125.0 | 1.00x | 1.00x | 100% | 16.00 | 4.00 | 1.00x | 100% | 100% |" in md
    # cycle: reads (0.45 + 3 * 0.25) / 4 = 0.3 ms -> 16.67x of 36.57x (46%); the policy's 6.40x is 38% of it
    assert "| lserve, 4-step cycle | 0.625 | 19.5 | 6.40x | 36.57x | 18% | 0.44 | 0.70 | 16.67x | 46% | 38% |" in md
