"""SplitPageSelection (LServe's decode step over a split cache as one layout): the Triton backend's single split-KV
launch (retrieval heads over their selected pages, streaming heads over their sink + recent ring) equals the
reference backend's two calls and the explicit computation per head group; density weighs the two groups by their
query heads."""

import dataclasses
import json

import pytest
import torch

from transformers import DynamicCache

import accel
import accel.policies.lserve as lserve_mod
from accel.kernels import reference_decode as R
from accel.kernels.reference import ReferenceBackend, attention
from accel.layouts import PageSelection, SplitPageSelection, StreamingLayout
from accel.policies.duo import model_signature
from conftest import tiny_model
from test_families import ids
from test_plan_op_count import counting

PAGE, SINK, RECENT = 16, 4, 16


def _case(group: int, dtype, B: int = 2, D: int = 32, Sk: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r_idx, s_idx = torch.tensor([1, 3]), torch.tensor([0, 2])  # KV heads 1, 3 retrieve; 0, 2 stream
    ar = torch.arange(group)
    q_r, q_s = (r_idx[:, None] * group + ar).flatten(), (s_idx[:, None] * group + ar).flatten()
    q = torch.randn(B, 4 * group, 1, D, generator=g).to(dtype)
    k, v = (torch.randn(B, 2, Sk, D, generator=g).to(dtype) for _ in range(2))
    ring_k, ring_v = (torch.randn(B, 2, SINK + RECENT, D, generator=g).to(dtype) for _ in range(2))
    n_pages = Sk // PAGE
    pages = torch.stack([torch.stack([torch.cat([torch.randperm(n_pages - 1, generator=g)[:2].sort().values,
                                                 torch.tensor([n_pages - 1])]) for _ in range(2)]) for _ in range(B)])
    counts = torch.full((B, 2), 3, dtype=torch.int32)
    counts[0, 1] = 2  # a head that keeps fewer pages
    sel = PageSelection(pages=pages.to(torch.int32), counts=counts, page_size=PAGE, tokens=3 * PAGE)
    layout = SplitPageSelection(sel, r_idx, q_r, ring_k, ring_v, s_idx, q_s, group,
                                StreamingLayout(sink=SINK, window=RECENT))
    return q, k, v, layout


def _expected(q, k, v, layout, softcap):
    out = torch.empty_like(q)
    sel = layout.selection
    out[:, layout.q_heads] = R.paged_decode_attention(q[:, layout.q_heads], k, v, sel.pages, sel.counts, PAGE,
                                                      softcap=softcap)
    # one query sees the whole ring (sink + recent slots)
    out[:, layout.ring_q_heads] = attention(q[:, layout.ring_q_heads], layout.ring_k, layout.ring_v,
                                            softcap=softcap)
    return out


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_split_selection_backends_match(group, dtype, softcap):
    q, k, v, layout = _case(group, dtype)
    want = _expected(q.float(), k.float(), v.float(), _case(group, torch.float32)[3], softcap)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    got_ref = ReferenceBackend().run(layout, q, k, v, scale=None, softcap=softcap)
    torch.testing.assert_close(got_ref.float(), want, **tol)
    from accel.kernels.triton import TritonBackend

    tb = TritonBackend()
    ok, why = tb.available()
    if not ok:
        pytest.skip(why)
    if torch.cuda.is_available():  # compiled Triton on a GPU machine (the interpreter runs CPU tensors)
        q, k, v = q.cuda(), k.cuda(), v.cuda()
        sel = layout.selection
        layout = dataclasses.replace(
            layout, selection=dataclasses.replace(sel, pages=sel.pages.cuda(), counts=sel.counts.cuda()),
            kv_heads=layout.kv_heads.cuda(), q_heads=layout.q_heads.cuda(), ring_k=layout.ring_k.cuda(),
            ring_v=layout.ring_v.cuda(), ring_heads=layout.ring_heads.cuda(),
            ring_q_heads=layout.ring_q_heads.cuda())
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)  # TF32 dots
    assert tb.supports(layout, q) is None
    got = tb.run(layout, q, k, v, scale=None, softcap=softcap)
    assert got.dtype == q.dtype
    torch.testing.assert_close(got.float().cpu(), want, **tol)


def test_split_selection_density():
    _, _, _, layout = _case(2, torch.float32)
    stream = StreamingLayout(sink=SINK, window=RECENT).density(1, 96)
    assert layout.density(1, 96) == pytest.approx((48 / 96 + stream) / 2)
    assert stream == pytest.approx((SINK + RECENT) / 96)


def test_lserve_decode_step_is_one_attention_launch(tmp_path, monkeypatch):
    """An eager LServe decode step on the GPU path (Triton scoring, top-k and attention; run by the interpreter) per
    layer: one scoring, one top-k, one split-KV launch over both head groups and one combine. Before the
    SplitPageSelection layout the streaming heads were a second attention call, with the query gathered and the
    outputs scattered per group (per 2-layer step: 263 torch ops and 10 launches, now 235 and 8)."""
    from accel.kernels.triton import TritonBackend, decode_score, decode_topk

    ok, why = TritonBackend().available()
    if not ok:
        pytest.skip(why)

    def scores(self, q, layer, kv_start=None, kv_heads=None, group=None):  # the policy's CUDA branch
        return decode_score.quest_scores(q, layer.kmin, layer.kmax, group_reduce="max", page_size=self.page_size,
                                         kv_start=kv_start, kv_heads=kv_heads, group=group,
                                         merge=self.physical_page_size // self.page_size)

    monkeypatch.setattr(lserve_mod.LServePolicy, "physical_scores", scores)
    monkeypatch.setattr(lserve_mod, "select_pages", lambda s, k, kv_len, page_size, keep_first: decode_topk.select_pages(
        s, k, kv_len=kv_len, page_size=page_size, keep_first=keep_first))
    model = tiny_model("llama", seed=1)
    path = tmp_path / "m.json"  # one streaming and one retrieval KV head in each layer
    path.write_text(json.dumps({"model": model_signature(model.config), "gates": [[0.9, 0.1], [0.1, 0.9]]}))
    accel.patch(model, "lserve", duo_map=str(path), ratio=0.5, sink=4, recent=12, backend="triton", page_size=8,
                physical_page_size=16, budget=32, reuse_steps=1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        tok = model(ids(length=90), past_key_values=cache).logits[:, -1:].argmax(-1)
        tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
        with counting(monkeypatch) as c:
            model(tok, past_key_values=cache)
    n = model.config.num_hidden_layers
    assert dict(c.launches) == {"_quest_score_kernel": n, "_select_kernel": n, "_split_kernel": n,
                                "_combine_kernel": n}
    assert not any("scaled_dot_product" in op for op in c.ops)  # the streaming heads ran inside the split launch
    assert "aten.index_put_" not in c.ops  # no per-group scatter of outputs


@pytest.mark.parametrize("sink, window", [(0, 16), (4, 16), (64, 5), (3, 300)])
def test_streaming_density_of_one_query_matches_the_general_formula(sink, window):
    """The one-query shortcut of the sink + window density (every decode layer computes it) against the counting
    formula over one-row windows of a longer call, and by hand."""
    from accel.layouts import _mask_density

    for kv_len in range(1, 120):
        by_hand = (min(kv_len, window) + min(max(kv_len - window, 0), sink)) / kv_len
        two = _mask_density(2, kv_len + 1, sink, window) if kv_len > 1 else None  # rows kv_len and kv_len + 1
        assert _mask_density(1, kv_len, sink, window) == pytest.approx(by_hand)
        if two is not None:
            nxt = (min(kv_len + 1, window) + min(max(kv_len + 1 - window, 0), sink))
            assert two == pytest.approx((by_hand * kv_len + nxt) / (2 * kv_len + 1))
