"""scripts/bench_e2e.py's CPU-checkable parts: the two-GPU device map and the model shapes."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import bench_e2e  # noqa: E402


@pytest.mark.parametrize("gpus", [1, 2, 3])
def test_split_device_map_spreads_whole_layers(gpus):
    cfg = bench_e2e.model_config("llama70b", 131072)
    dm = bench_e2e.split_device_map(cfg, gpus)
    layers = [dm[f"model.layers.{i}"] for i in range(cfg.num_hidden_layers)]
    assert dm["model.embed_tokens"] == 0 and dm["model.rotary_emb"] == 0
    assert dm["model.norm"] == gpus - 1 and dm["lm_head"] == gpus - 1
    assert layers == sorted(layers) and set(layers) == set(range(gpus))  # contiguous stages, every GPU used
    counts = [layers.count(g) for g in range(gpus)]
    assert max(counts) - min(counts) <= 1


def test_planted_shapes_have_attention_biases():
    assert bench_e2e.model_config("llama8b", 32768, planted=True).attention_bias
    assert not bench_e2e.model_config("llama8b", 32768).attention_bias
    cfg = bench_e2e.model_config("llama70b", 32768)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (80, 8192, 64, 8)


def test_profile_prefill_traces_accel_attention_and_restores_it(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import accel
    from accel.attention import IMPL_NAME, accel_attention

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(cfg).eval()
    accel.patch(model, "xattention", backend="reference", block_size=64)
    out = bench_e2e.profile_prefill(model, torch.randint(0, 256, (1, 160)), str(tmp_path / "p.txt"))
    assert {"accel_attention_ms", "linear_ms", "transformers_other_ms"} <= set(out)
    assert (tmp_path / "p.txt").read_text().startswith("GPU time")
    assert ALL_ATTENTION_FUNCTIONS[IMPL_NAME] is accel_attention  # the tracing wrapper is gone again


def test_static_decode_after_the_runs_own_prefill(tmp_path, monkeypatch):
    """--static-decode on a tiny Llama on the CPU (CUDA syncs stubbed): the composition prefills into a StaticCache
    with its own policy, in chunks (--prefill-chunk; the streaming heads' ring takes them), its compiled steps run,
    its cache (streaming heads in a ring) is smaller than dense's, and the markdown says the prefill was chunked and
    gets the decode table with the ratio against `dense`."""
    import argparse

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import accel

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(bench_e2e, "_sync", lambda: None)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (1, 1024))
    args = argparse.Namespace(decode_batch=2, static_decode=3, prefill_chunk=400)  # chunks of 400, 400, 224
    rows = []
    for run in ("dense", "flexprefill+lserve"):
        extra = {"duo_map": bench_e2e.speed_head_map(model, str(tmp_path / "duo.json"))} if "lserve" in run else {}
        accel.patch(model, run, **extra)
        try:
            rows.append({"run": run, "context": 1024, "ttft_s": 1.0, "peak_gib": 0.0,
                         **bench_e2e.static_decode(model, ids, args)})
        finally:
            accel.unpatch(model)
    dense, comp = rows
    assert dense["static_tok_s"] > 0 and comp["static_tok_s"] > 0 and comp["static_batch"] == 2
    assert comp["static_kv_cache_bytes"] < dense["static_kv_cache_bytes"]
    meta = {"model": "tiny", "shape": "2 layers", "command": "x", "device": "cpu", "date": "d", "versions": {},
            "repeats": 1, "static_decode": 3, "prefill_chunk": 400}
    bench_e2e.write({"meta": meta, "rows": rows}, str(tmp_path / "out"))
    md = (tmp_path / "out.md").read_text()
    assert "| 1K | dense | 2 |" in md and "| 1K | flexprefill+lserve | 2 |" in md and "1.00x" in md
    assert "chunked, 400 tokens per row per forward" in md and "(in chunks of 400 tokens)" in md
