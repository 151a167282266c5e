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
