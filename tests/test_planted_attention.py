"""scripts/planted_attention.py: the random-weight benchmark models get the structure of real attention (sinks,
locality, heavy columns), so a sparse policy at its defaults really skips blocks, with high recall."""

import os
import sys

import pytest
import torch
import transformers

import accel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from planted_attention import HEAVY_ID, SINK_ID, plant, plant_ids  # noqa: E402


def _model(bias: bool = True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=200, max_position_embeddings=8192,
                                   rope_theta=500000.0, attention_bias=bias)
    return transformers.LlamaForCausalLM(cfg).eval()


def _density_recall(model, ids):
    accel.patch(model, "xattention", backend="reference", collect_stats=True)
    with torch.no_grad():
        model(ids, logits_to_keep=1)
    st = accel.stats(model)
    accel.unpatch(model)
    dens = [r["prefill_density"] for r in st["layers"]]
    return sum(dens) / len(dens), st["mean_recall"]


def test_planted_model_is_sparse_with_high_recall():
    ids = plant_ids(torch.randint(10, 190, (1, 2048)), n_heavy=4)
    assert ids[0, 0] == SINK_ID and (ids == HEAVY_ID).sum() == 4
    plain = _model()
    d_plain, _ = _density_recall(plain, ids)
    planted = _model()
    plant(planted)
    d, recall = _density_recall(planted, ids)
    assert d_plain > 0.8  # random weights: near-uniform attention, almost every block kept
    assert d < 0.5 and recall > 0.95, (d, recall)


def test_plant_needs_biases():
    with pytest.raises(ValueError, match="attention_bias=True"):
        plant(_model(bias=False))
