"""Attention recall (accel.recall): 1.0 for layouts that keep everything, equal to a brute-force share of softmax
mass otherwise, reported per layer by accel.stats with collect_stats=True; exact vertical-slash density."""

import torch

import accel
from accel.kernels.reference_sparse import random_block_layout, vertical_slash_mask, full_block_layout
from accel.layouts import DenseLayout, StreamingLayout, VerticalSlashLayout
from accel.recall import capture_qk, layout_recall, vertical_slash_density
from conftest import tiny_model
from test_families import ids


def _qk(Sq=200, Sk=200):
    torch.manual_seed(0)
    return torch.randn(1, 4, Sq, 16), torch.randn(1, 2, Sk, 16)


def _brute(q, k, keep):
    Sq, Sk = q.shape[2], k.shape[2]
    logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4
    causal = torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + Sk - Sq
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    return float((p * keep).sum(-1).mean())


def test_full_layouts_have_recall_one():
    q, k = _qk(150, 200)
    for layout in (DenseLayout(), StreamingLayout(sink=4, window=1000), full_block_layout(1, 4, 150, 200, 32, 32),
                   VerticalSlashLayout(columns=torch.zeros(1, 1, 1, dtype=torch.long),
                                       offsets=torch.arange(200)[None, None])):
        assert abs(layout_recall(layout, q, k, rows=150) - 1.0) < 1e-6


def test_sparse_recall_matches_brute_force():
    q, k = _qk(160, 200)
    layout = random_block_layout(1, 4, 160, 200, 32, 32, keep=0.3)
    from accel.recall import layout_keep_rows

    keep = layout_keep_rows(layout, torch.arange(160), 160, 200, 4)
    assert abs(layout_recall(layout, q, k, rows=160) - _brute(q, k, keep)) < 1e-5
    streaming = StreamingLayout(sink=8, window=40)
    r = layout_recall(streaming, q, k, rows=160)
    pos = torch.arange(160)[:, None] + 40
    key = torch.arange(200)[None, :]
    assert abs(r - _brute(q, k, (key < 8) | (pos - key < 40))) < 1e-5 and r < 0.9
    assert layout_recall(streaming, q, k, rows=32, seed=1) != layout_recall(streaming, q, k, rows=32, seed=2)


def test_vertical_slash_density_exact():
    g = torch.Generator().manual_seed(0)
    for Sq, Sk in ((100, 100), (60, 130)):
        cols = torch.randint(-1, Sk, (2, 3, 12), generator=g)
        offs = torch.randint(-1, Sk, (2, 3, 9), generator=g)
        layout = VerticalSlashLayout(columns=cols, offsets=offs)
        mask = vertical_slash_mask(layout, Sq, Sk)
        causal = (torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + Sk - Sq).sum()
        want = float(mask.sum()) / float(causal * 6)
        assert abs(vertical_slash_density(layout, Sq, Sk) - want) < 1e-9


def test_stats_report_recall_per_layer():
    model = tiny_model("gemma3")
    x = ids(length=300)
    accel.patch(model, "xattention", threshold=0.5, block_size=64, backend="reference", collect_stats=True)
    with torch.no_grad():
        model(x)
    st = accel.stats(model)
    recalls = [layer["prefill_recall"] for layer in st["layers"]]
    assert all(r is not None and 0 < r <= 1.0 + 1e-6 for r in recalls)
    assert recalls[0] > 0.999 and recalls[1] > 0.999  # sliding layers keep their window: recall 1
    assert st["mean_recall"] is not None
    accel.patch(model, "dense", backend="reference")  # recall is opt-in
    with torch.no_grad():
        model(x)
    assert accel.stats(model)["mean_recall"] is None


def test_capture_qk_leaves_model_as_it_was():
    model = tiny_model("llama")
    x = ids(length=50)
    with torch.no_grad():
        ref = model(x).logits
    cap = capture_qk(model, x)
    assert set(cap) == {0, 1} and cap[0]["q"].shape == (1, 4, 50, 16) and cap[0]["k"].shape == (1, 2, 50, 16)
    assert not accel.is_patched(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref)
    accel.patch(model, "streaming", window=16, sink=4)
    capture_qk(model, x)
    assert accel.stats(model)["policy"] == "streaming"
