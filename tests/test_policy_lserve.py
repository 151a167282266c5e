"""lserve: ratio 0 with a covering budget is dense on every family, a covering budget equals duo; hierarchical
page selection (logical pages scored, physical pages kept) attends exactly to the chosen pages and is reused for
``reuse_steps`` steps; streaming heads' KV memory is constant; generate modes, compositions, bad input."""

import json

import pytest
import torch

import accel
from accel.cache import PagedKVLayer, PagedSplitLayer
from accel.kernels import reference_decode as R
from accel.layouts import HeadSplitLayout, PageSelection, SplitPageSelection
from accel.policies import AttentionContext
from accel.policies.duo import model_signature
from accel.policies.lserve import LServePolicy
from conftest import tiny_model
from test_families import _global_layers_model, ids
from test_policy_duo import _head_map

SMALL = dict(page_size=8, physical_page_size=16, budget=32)  # sparse at the tiny models' lengths


def _gen(model, x, n=12, **kw):
    return model.generate(x, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True,
                          **kw)


def test_ratio_zero_covering_budget_is_dense(family, backend="reference"):
    model = _global_layers_model(family)
    x = ids(length=40)
    with torch.no_grad():
        ref = _gen(model, x)
        accel.patch(model, "lserve", ratio=0.0, budget=64, physical_page_size=16, backend=backend)
        out = _gen(model, x)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-4, rtol=1e-4)
    dec = [layer["decode_density"] for layer in accel.stats(model)["layers"] if layer["sliding_window"] is None]
    assert dec and all(d == 1.0 for d in dec)  # budget above the context: everything, recorded


def test_ratio_zero_covering_budget_is_dense_triton():
    test_ratio_zero_covering_budget_is_dense("gemma2", backend="triton")


def test_covering_budget_equals_duo(tmp_path):
    """With every retrieval key in budget, lserve is DuoAttention with the same head map, prefill and decode."""
    model = tiny_model("qwen3")
    path = _head_map(model, tmp_path / "m.json")
    x = ids(length=60)
    res = {}
    with torch.no_grad():
        for policy in ("duo", "lserve"):
            accel.patch(model, policy, duo_map=path, ratio=0.5, sink=4, recent=12, backend="reference")
            res[policy] = _gen(model, x, n=6)
    assert torch.equal(res["duo"].sequences, res["lserve"].sequences)
    torch.testing.assert_close(torch.stack(res["lserve"].logits), torch.stack(res["duo"].logits), atol=1e-5,
                               rtol=1e-5)
    assert any(isinstance(layer, PagedSplitLayer) for layer in res["lserve"].past_key_values.layers)


def test_hierarchical_selection_matches_manual_page_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 150, 16), torch.randn(1, 2, 150, 16)
    layer = PagedKVLayer(8)
    layer.update(k, v)
    pol = LServePolicy.from_options(ratio=0.0, **SMALL)
    pol._stream = {0: torch.zeros(2, dtype=torch.bool)}
    sel = pol.plan(q, k, AttentionContext(0, "decode", None, cache_layer=layer))
    assert isinstance(sel, PageSelection) and sel.page_size == 16
    # physical page score = max of its two logical pages' Quest criticality (max over the query group)
    logical = R.quest_scores(q, *R.page_bounds(k, 8), page_size=8)
    phys = torch.nn.functional.pad(logical, (0, 1), value=float("-inf")).unflatten(-1, (-1, 2)).amax(-1)
    torch.testing.assert_close(pol.physical_scores(q, layer), phys)
    phys[..., -1] = float("inf")  # the newest page is always kept
    assert torch.equal(sel.pages.long(), phys.topk(2, dim=-1).indices.sort(-1).values)
    keep = R.gather_selected(sel.pages, sel.counts, 16, 150)
    assert keep[..., 144:].all() and keep.sum(-1).eq(16 + 6).all()
    from accel.kernels.reference import attention

    out = R.paged_decode_attention(q, k, v, sel.pages, sel.counts, 16)
    for h in range(4):
        idx = keep[0, h // 2].nonzero()[:, 0]
        ref = attention(q[:, h:h + 1], k[:, h // 2:h // 2 + 1, idx], v[:, h // 2:h // 2 + 1, idx], causal=False)
        torch.testing.assert_close(out[:, h:h + 1], ref, atol=1e-5, rtol=1e-5)


def test_selection_reused_for_reuse_steps(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "m.json"  # one streaming KV head per layer
    path.write_text(json.dumps({"model": model_signature(model.config), "gates": [[0.1, 0.9], [0.8, 0.2]]}))
    accel.patch(model, "lserve", duo_map=str(path), ratio=0.5, sink=4, recent=12, backend="reference",
                reuse_steps=4, **SMALL)
    pol = model._accel_patch.spec.decode
    calls, score = [], pol.physical_scores
    pol.physical_scores = lambda *a, **kw: calls.append(1) or score(*a, **kw)
    layouts, plan = [], pol.plan
    pol.plan = lambda q, k, ctx: layouts.append((ctx.layer_idx, k.shape[2], plan(q, k, ctx))) or layouts[-1][2]
    with torch.no_grad():
        out = _gen(model, ids(length=61), n=9, min_new_tokens=9)  # 8 decode steps at 62..69 keys: selections at 62 and 66
    assert len(calls) == 2 * 2  # two selections per layer, not eight
    # both kinds of heads in every layer: each decode step is one SplitPageSelection
    assert all(isinstance(lay, SplitPageSelection) for _, n, lay in layouts if n > 61)
    sels = {(i, n): lay.selection for i, n, lay in layouts if n > 61}
    for i in (0, 1):
        first = sels[(i, 62)].pages
        assert torch.equal(sels[(i, 63)].pages, first)
        # a physical page begun during the reuse window (key 64 on) is added, the rest stays
        assert torch.equal(sels[(i, 65)].pages[..., :-1], first) and bool((sels[(i, 65)].pages[..., -1] == 4).all())
    dens = [layer["decode_density"] for layer in accel.stats(model)["layers"]]
    assert all(d < 0.6 for d in dens)
    assert out.sequences.shape[1] == 70


def test_reuse_beyond_a_physical_page():
    """reuse_steps > physical_page_size: the dynamic cache adds every physical page begun since the selection; a
    static cache (one spare page slot per selection) refuses it, naming the fix."""
    model = tiny_model("llama")
    accel.patch(model, "lserve", ratio=0.0, backend="reference", reuse_steps=40, **SMALL)  # physical pages of 16
    pol = model._accel_patch.spec.decode
    layouts, plan = {}, pol.plan
    pol.plan = lambda q, k, ctx: layouts.setdefault((ctx.layer_idx, k.shape[2]), plan(q, k, ctx))
    x = ids(length=61)
    with torch.no_grad():
        _gen(model, x, n=40, min_new_tokens=40)  # decode steps at 62..100 keys: one selection, at 62
    for i in (0, 1):
        first, last = layouts[(i, 62)].pages, layouts[(i, 100)].pages
        assert first.shape[-1] == 2  # budget 32: two physical pages
        assert torch.equal(last[..., :2], first) and last[..., 2:].tolist() == [[[4, 5, 6]] * 2]
    with torch.no_grad(), pytest.raises(ValueError, match="lower reuse_steps to <= 16"):
        model.generate(x, max_new_tokens=2, do_sample=False, cache_implementation="static", disable_compile=True)


def test_sparse_same_on_both_backends(tmp_path):
    model = tiny_model("llama")
    path = _head_map(model, tmp_path / "m.json")
    x = ids(length=90)
    res = {}
    for backend in ("reference", "triton"):
        model = tiny_model("llama")
        accel.patch(model, "lserve", duo_map=path, ratio=0.5, sink=4, recent=12, backend=backend, **SMALL)
        with torch.no_grad():
            res[backend] = _gen(model, x, n=5)
        assert set(accel.stats(model)["backends_used"]) == {backend}
    assert torch.equal(res["reference"].sequences, res["triton"].sequences)
    torch.testing.assert_close(torch.stack(res["triton"].logits), torch.stack(res["reference"].logits), atol=1e-4,
                               rtol=1e-4)
    # the page selection changes the output: lserve differs from duo (its streaming heads alone)
    model = tiny_model("llama")
    accel.patch(model, "duo", duo_map=path, ratio=0.5, sink=4, recent=12, backend="reference")
    with torch.no_grad():
        duo = _gen(model, x, n=5)
    assert not torch.allclose(torch.stack(duo.logits), torch.stack(res["reference"].logits), atol=1e-3)


def test_streaming_heads_memory_is_constant(tmp_path):
    model = tiny_model("llama")
    path = _head_map(model, tmp_path / "m.json")
    accel.patch(model, "lserve", duo_map=path, ratio=1.0, sink=4, recent=12, backend="reference", **SMALL)
    sizes = []
    with torch.no_grad():
        for length in (40, 160):
            out = model.generate(ids(length=length), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            sizes.append(accel.cache_bytes(out.past_key_values))
    assert sizes[0] == sizes[1]
    accel.patch(model, "lserve", duo_map=path, ratio=0.5, sink=4, recent=12, backend="reference", **SMALL)
    with torch.no_grad():
        out = model.generate(ids(length=160), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    dense = 2 * 2 * 2 * 162 * 16 * 4  # layers * (k, v) * kv heads * tokens * head_dim * fp32
    assert accel.cache_bytes(out.past_key_values) < 0.65 * dense  # half the heads + logical-page key bounds


def test_generate_modes(tmp_path):
    model = tiny_model("llama")
    accel.patch(model, "lserve", duo_map=_head_map(model, tmp_path / "m.json"), sink=4, recent=12,
                backend="reference", **SMALL)
    with torch.no_grad():
        for kw in (dict(do_sample=True, top_k=10), dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)):
            out = model.generate(ids(batch=2, length=60), max_new_tokens=6, **kw)
            assert out.shape[1] == 66


@pytest.mark.parametrize("policy", ["xattention+lserve", {"prefill": "streaming", "decode": "lserve"}])
def test_compositions_generate(policy):
    model = tiny_model("llama")
    accel.patch(model, policy, ratio=0.0, backend="reference", **SMALL)
    with torch.no_grad():
        out = model.generate(ids(length=300), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 304)
    st = accel.stats(model)
    assert st["layers"][0]["decode_policy"] == "lserve" and st["layers"][0]["decode_density"] < 0.2


def test_defaults_are_paper_setting():
    spec = accel.parse_policy("lserve")
    pol = spec.decode
    assert spec.prefill is pol and pol.name == "lserve"
    assert (pol.ratio, pol.page_size, pol.physical_page_size, pol.budget, pol.reuse_steps) == (0.5, 16, 64, 4096, 4)


@pytest.mark.parametrize("opts, match", [
    ({"physical_page_size": 48}, "'physical_page_size'.*one of"), ({"page_size": 12}, "'page_size'"),
    ({"page_size": 32, "physical_page_size": 16}, "multiple of 'page_size'"), ({"budget": 0}, "'budget'"),
    ({"budget": 32}, "at least one physical page"), ({"reuse_steps": 0}, "'reuse_steps'"),
    ({"ratio": 1.5}, "'ratio'")])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        accel.parse_policy("lserve", **opts)


def test_head_map_checks(tmp_path):
    llama, qwen = tiny_model("llama"), tiny_model("qwen3")
    path = _head_map(llama, tmp_path / "m.json")
    with pytest.raises(ValueError, match="another model"):
        accel.patch(qwen, "lserve", duo_map=path)
    with pytest.raises(ValueError, match="no shipped DuoAttention head map"):
        accel.patch(qwen, "lserve")  # streaming heads need a head map; ratio=0 does not
    assert not accel.is_patched(qwen)
    accel.patch(qwen, "lserve", ratio=0.0)


def test_stats_count_every_part_of_a_head_split(tmp_path):
    """A split layer's prefill runs two parts (streaming heads, retrieval heads), each on its own backend: stats
    count both, so a part on another backend is never hidden behind the last one. Its decode steps run both kinds
    of heads as one layout (SplitPageSelection: one split-KV launch on the Triton backend): one each."""
    model = tiny_model("llama")
    path = tmp_path / "m.json"  # one streaming and one retrieval KV head in each layer
    path.write_text(json.dumps({"model": model_signature(model.config), "gates": [[0.9, 0.1], [0.1, 0.9]]}))
    accel.patch(model, "lserve", duo_map=str(path), ratio=0.5, sink=4, recent=12, backend="reference", **SMALL)
    with torch.no_grad():
        _gen(model, ids(length=90), n=4)
    for lay in accel.stats(model)["layers"]:  # the prefill's two parts, then one per decode step
        assert lay["calls"] == {"prefill": 1, "decode": 3} and lay["backends"] == {"reference": 2 + 3}
