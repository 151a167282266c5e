"""XAttention: the antidiagonal estimate against a brute-force twin, threshold selection, and 'keep everything'
(threshold 1.0) reproducing dense output on every family."""

import math

import pytest
import torch

import accel
from accel.policies.block_select import keep_by_threshold
from accel.policies.xattention import antidiagonal_block_scores
from conftest import tiny_model
from test_families import ids


def brute_force_scores(q, k, block, stride):
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    Lq, Lk = math.ceil(Sq / stride), math.ceil(Sk / stride)
    nq, nk = math.ceil(Sq / block), math.ceil(Sk / block)
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            logits = torch.full((Lq, Lk), float("-inf"), dtype=torch.float64)
            for r in range(Lq):
                qpos = Sk - Sq + r * stride + stride - 1
                if r * stride >= Sq:
                    continue
                for c in range(Lk):
                    if c * stride > qpos:
                        continue
                    s = 0.0
                    for i in range(stride):  # antidiagonal of the stride x stride cell
                        qi, ki = r * stride + stride - 1 - i, c * stride + i
                        if qi < Sq and ki < Sk:
                            s += float(q[b, h, qi].double() @ k[b, h // g, ki].double())
                    logits[r, c] = s / math.sqrt(D) / stride
            p = torch.softmax(logits, -1).nan_to_num(0.0)
            for r in range(Lq):
                for c in range(Lk):
                    out[b, h, r * stride // block, c * stride // block] += p[r, c]
    return out


@pytest.mark.parametrize("Sq, Sk, group", [(64, 64, 1), (100, 100, 2), (40, 136, 1), (128, 200, 3)])
def test_antidiagonal_scores_match_brute_force(Sq, Sk, group):
    torch.manual_seed(0)
    q = torch.randn(1, 2 * group, Sq, 8)
    k = torch.randn(1, 2, Sk, 8)
    got = antidiagonal_block_scores(q, k, block=32, stride=4, chunk_rows=16)
    want = brute_force_scores(q, k, 32, 4)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_keep_by_threshold_keeps_fewest_blocks():
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.1, 0.0]])
    assert keep_by_threshold(scores, 0.8).tolist() == [[True, False, True, False, False]]
    assert keep_by_threshold(scores, 0.81).sum() == 3
    assert keep_by_threshold(scores, 1.0).tolist() == [[True, True, True, True, False]]


def test_threshold_one_is_dense(family):
    model = tiny_model(family)
    x = ids(length=200)
    with torch.no_grad():
        dense = model(x).logits
        accel.patch(model, "xattention", threshold=1.0, block_size=64, backend="reference")
        out = model(x).logits
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)


def test_sparse_setting_skips_blocks_and_generates():
    model = tiny_model("llama")
    x = ids(length=400)
    accel.patch(model, "xattention", threshold=0.5, block_size=64, backend="reference", collect_stats=True)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == 405
    layers = accel.stats(model)["layers"]
    assert all(layer["calls"] == {"prefill": 1, "decode": 4} for layer in layers)
    assert all(layer["prefill_density"] < 0.95 for layer in layers)


def test_short_prompt_runs_dense_and_says_so():
    model = tiny_model("llama")
    accel.patch(model, "xattention", block_size=64, backend="reference", collect_stats=True)
    with torch.no_grad():
        model(ids(length=30))
    assert all(layer["prefill_density"] == 1.0 for layer in accel.stats(model)["layers"])


@pytest.mark.parametrize("opts, match", [({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"),
                                         ({"block_size": 100}, "block_size"), ({"stride": 3}, "divide")])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        accel.parse_policy("xattention", **opts)


def test_triton_backend_matches_reference_backend():
    """The policy's layout run through the Triton block-sparse kernel (interpreter) equals the reference."""
    model = tiny_model("qwen3")
    x = ids(length=260)
    with torch.no_grad():
        accel.patch(model, "xattention", threshold=0.6, block_size=64, backend="reference")
        ref = model(x).logits
        accel.patch(model, "xattention", threshold=0.6, block_size=64, backend="triton")
        out = model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert set(accel.stats(model)["backends_used"]) == {"triton"}
