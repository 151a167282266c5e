"""tidal: covering budget is dense on every family; sparse layers attend exactly to the positions the selection
layer chose (re-selection included); state per forward call, batch row and generate call; compositions; the
layer rule and bad input."""

import pytest
import torch
import transformers

import accel
from accel.kernels import reference_decode as R
from accel.layouts import DenseLayout, PageSelection
from accel.policies.tidal import TidalPolicy
from conftest import tiny_config, tiny_model
from test_families import _global_layers_model, ids


def _deep(family="llama", layers=4, seed=0, types=None):
    """Tiny model with enough layers for a selection, sparse layers and a re-selection; families with sliding-window
    layers get ``types`` (default: sliding and full-attention layers alternating, so two full ones at 4 layers)."""
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg.num_hidden_layers = layers
    if family in ("gemma2", "gemma3", "qwen2"):
        cfg.layer_types = types or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    cfg._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    return getattr(transformers, type(tiny_model(family)).__name__)(cfg).eval()


def _gen(model, x, n=12, **kw):
    return model.generate(x, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True,
                          **kw)


def _capture(model):
    """Record (layer, q, k, layout) of every decode plan."""
    pol = model._accel_patch.spec.decode
    seen, plan = [], pol.plan

    def spy(q, k, ctx):
        layout = plan(q, k, ctx)
        if ctx.phase == "decode":
            seen.append((ctx.layer_idx, q, k, layout, ctx.cache))
        return layout

    pol.plan = spy
    return seen


def test_budget_covering_everything_is_dense(family, backend="reference"):
    # the tiny Gemma 2 / 3 and Qwen2 have one full-attention layer, which tidal refuses (nothing would reuse it)
    model = _deep(family) if family in ("gemma2", "gemma3", "qwen2") else _global_layers_model(family)
    x = ids(length=40)
    with torch.no_grad():
        ref = _gen(model, x)
        accel.patch(model, "tidal", budget=64, select_layer=0, backend=backend)
        out = _gen(model, x)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-4, rtol=1e-4)
    dec = [layer["decode_density"] for layer in accel.stats(model)["layers"] if layer["sliding_window"] is None]
    assert dec and all(d == 1.0 for d in dec)  # budget above the context: everything, recorded


def test_budget_covering_everything_is_dense_triton():
    test_budget_covering_everything_is_dense("gemma2", backend="triton")  # soft-capping, sliding layers


def test_sparse_layers_reuse_the_selected_positions():
    """Layer 0 selects, layer 1 reuses, layer 2 re-selects (auto rule: round(13 * 4 / 32) = 2), layer 3 reuses;
    each sparse layer's output is attention over exactly those positions."""
    model = _deep(layers=4)
    accel.patch(model, "tidal", budget=16, select_layer=0, backend="reference")
    assert model._accel_patch.spec.decode._layers == (0, 2)
    seen = _capture(model)
    with torch.no_grad():
        model.generate(ids(length=60), max_new_tokens=4, do_sample=False)
    steps = [seen[i:i + 4] for i in range(0, len(seen), 4)]
    assert len(steps) == 3
    pol = model._accel_patch.spec.decode
    differs = False
    for step in steps:
        (_, q0, k0, l0, _), (_, _, k1, l1, _), (_, q2, k2, l2, _), (_, q3, k3, l3, _) = step
        assert isinstance(l0, DenseLayout) and isinstance(l2, DenseLayout)  # selection layers attend densely
        assert isinstance(l1, PageSelection) and isinstance(l3, PageSelection) and l1.page_size == 1
        for (qs, ks), sel in (((q0, k0), l1), ((q2, k2), l3)):
            s = pol.score(qs, ks)
            s[..., -1] = float("inf")
            expect = s.topk(16, dim=-1).indices.sort(-1).values
            assert s.shape[1] == 1  # shared: one selection for every KV head
            assert torch.equal(sel.pages.long(), expect.expand_as(sel.pages))
            assert bool((sel.pages[..., -1] == ks.shape[2] - 1).all())  # newest token kept
        assert not bool((l1.pages >= k1.shape[2] - 16).all())  # not just the recent window
        differs |= not torch.equal(l1.pages, l3.pages)
        keep = R.gather_selected(l3.pages, l3.counts, 1, k3.shape[2])
        assert int(keep.sum()) == keep.shape[0] * keep.shape[1] * 16
    assert differs  # the re-selection layer chose its own positions
    st = accel.stats(model)
    dens = [layer["decode_density"] for layer in st["layers"]]
    assert dens[0] == dens[2] == 1.0 and dens[1] < 0.3 and dens[3] < 0.3


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_shared_selection_keeps_what_any_head_wants(reduce):
    """One set of positions serves every KV head: a key that only query head 0 attends to (in KV head 0's keys)
    is selected for KV head 1 too; with ``shared=False`` each KV head keeps its own group's choice."""
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, S, D, n = 1, 2, 2, 40, 16, 6
    q = torch.randn(B, Hkv * G, 1, D, generator=g) * 0.1
    k = torch.randn(B, Hkv, S, D, generator=g) * 0.1
    q[0, 0, 0] = 0.0
    q[0, 0, 0, 0] = 4.0
    k[0, 0, 7, 0] = 4.0  # query head 0 (KV head 0) wants key 7
    pos, counts = TidalPolicy(budget=n, group_reduce=reduce).select(q, k)
    assert pos.shape == (B, Hkv, n) and counts.tolist() == [[n, n]]
    assert torch.equal(pos[0, 0], pos[0, 1]) and 7 in pos[0, 1].tolist() and pos[0, 0, -1] == S - 1
    own, _ = TidalPolicy(budget=n, group_reduce=reduce, shared=False).select(q, k)
    assert 7 in own[0, 0].tolist() and not torch.equal(own[0, 0], own[0, 1])


def test_sparse_output_matches_manual_mask_and_backends_agree():
    x = ids(length=70)
    res = {}
    for backend in ("reference", "triton"):
        model = _deep(layers=3)
        accel.patch(model, "tidal", budget=24, select_layer=0, reselect_layer=None, backend=backend)
        with torch.no_grad():
            res[backend] = _gen(model, x, n=5)
        assert set(accel.stats(model)["backends_used"]) == {backend}
    assert torch.equal(res["reference"].sequences, res["triton"].sequences)
    torch.testing.assert_close(torch.stack(res["triton"].logits), torch.stack(res["reference"].logits), atol=1e-4,
                               rtol=1e-4)
    dense = _deep(layers=3)
    with torch.no_grad():
        ref = _gen(dense, x, n=5)
    assert not torch.allclose(torch.stack(ref.logits), torch.stack(res["reference"].logits), atol=1e-3)


def test_rows_and_generate_calls_do_not_share_selections():
    model = _deep(layers=4)
    accel.patch(model, "tidal", budget=16, select_layer=0, backend="reference")
    a, b = ids(length=50, seed=3), ids(length=50, seed=4)
    with torch.no_grad():
        alone = [model.generate(p, max_new_tokens=4, do_sample=False) for p in (a, b)]
        both = model.generate(torch.cat([a, b]), max_new_tokens=4, do_sample=False)
        again = model.generate(a, max_new_tokens=4, do_sample=False)  # after other calls: no stale selection
    assert torch.equal(both[0], alone[0][0]) and torch.equal(both[1], alone[1][0])
    assert torch.equal(again, alone[0])


def test_generate_modes():
    model = _deep(layers=4)
    accel.patch(model, "tidal", budget=16, select_layer=0, backend="reference")
    with torch.no_grad():
        for kw in (dict(do_sample=True, top_k=10), dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)):
            out = model.generate(ids(batch=2, length=40), max_new_tokens=4, **kw)
            assert out.shape[1] == 44
    assert accel.stats(model)["layers"][1]["decode_density"] < 0.5


def test_left_padded_batch_with_covering_budget():
    model = _deep(layers=4)
    accel.patch(model, "tidal", budget=4096, select_layer=0, backend="reference")
    a, b = ids(length=40, seed=1), ids(length=30, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 10, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :10] = 0
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
        one = model.generate(b, max_new_tokens=4, do_sample=False)
    assert torch.equal(both[1, -4:], one[0, -4:])


def test_sliding_window_layers_keep_their_window():
    model = _deep("gemma2", layers=4)  # layers 0, 2 sliding; 1, 3 global
    accel.patch(model, "tidal", budget=16, select_layer=0, backend="reference")
    assert model._accel_patch.spec.decode._layers == (1, None)  # moved to the first global layer
    seen = _capture(model)
    with torch.no_grad():
        model.generate(ids(length=60), max_new_tokens=3, do_sample=False)
    for layer, _, _, layout, _ in seen:
        if layer in (0, 2):
            assert layout == DenseLayout(window=24)
        elif layer == 3:
            assert isinstance(layout, PageSelection)


@pytest.mark.parametrize("policy", ["xattention+tidal", {"prefill": "streaming", "decode": "tidal"}])
def test_compositions_generate(policy):
    model = _deep(layers=4)
    accel.patch(model, policy, budget=32, select_layer=0, backend="reference")
    with torch.no_grad():
        out = model.generate(ids(length=300), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 304)
    st = accel.stats(model)
    assert st["layers"][1]["decode_policy"] == "tidal" and st["layers"][1]["decode_density"] < 0.2


def test_layer_rule():
    pol = accel.parse_policy("tidal").decode
    assert (pol.budget, pol.select_layer, pol.reselect_layer) == (4096, 2, -1)
    assert pol.resolve_layers(32, list(range(32))) == (2, 13)  # the paper's Llama setting
    assert pol.resolve_layers(30, list(range(30))) == (2, 12)  # SmolLM2: 13/32 of the depth
    # Gemma 3 (global layers 5, 11, 17): selection moves to 5; re-selection at 11 would leave no layer reusing 5
    assert pol.resolve_layers(18, [5, 11, 17]) == (5, None)
    assert pol.resolve_layers(32, [5, 11, 17, 23, 29]) == (5, 17)
    assert TidalPolicy(reselect_layer=None).resolve_layers(32, list(range(32))) == (2, None)


@pytest.mark.parametrize("opts, match", [
    ({"budget": 0}, "'budget'"), ({"select_layer": -1}, "'select_layer'"),
    ({"select_layer": 3, "reselect_layer": 2}, "'reselect_layer'.*after select_layer"),
    ({"group_reduce": "mean"}, "'group_reduce'"), ({"shared": "yes"}, "'shared'"), ({"window": 3}, "unknown option")])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        accel.parse_policy("tidal", **opts)


def test_layers_outside_the_model_are_refused():
    model = tiny_model("llama")  # 2 layers
    with pytest.raises(ValueError, match="'select_layer' of policy 'tidal' is 2 but the model has 2 layers"):
        accel.patch(model, "tidal")
    with pytest.raises(ValueError, match="'reselect_layer' of policy 'tidal' is 5"):
        accel.patch(model, "tidal", select_layer=0, reselect_layer=5)
    with pytest.raises(ValueError, match="no full-attention layer"):
        accel.patch(tiny_model("gemma3"), "tidal", select_layer=0, reselect_layer=1)  # only layer 2 is global
    assert not accel.is_patched(model)


def test_selection_on_the_last_full_attention_layer_is_refused():
    """A selection layer with no full-attention layer after it leaves nothing to reuse its positions: tidal would
    decode dense, so accel.patch refuses, naming the full-attention layers and what to pass."""
    gemma = _deep("gemma3", layers=6, types=["sliding_attention"] * 5 + ["full_attention"])
    with pytest.raises(ValueError, match=r"selection layer 5 \(select_layer=2\) is the last full-attention layer.*"
                                         r"full-attention layers: \[5\]; .*needs two"):
        accel.patch(gemma, "tidal")
    llama = tiny_model("llama")  # 2 layers
    with pytest.raises(ValueError, match=r"selection layer 1 \(select_layer=1\).*pass select_layer= between 0 and 0"):
        accel.patch(llama, "tidal", select_layer=1)
    two = _deep("gemma3")  # full-attention layers 1 and 3
    with pytest.raises(ValueError, match=r"full-attention layers: \[1, 3\]; pass select_layer= between 0 and 1"):
        accel.patch(two, "tidal", select_layer=2, reselect_layer=None)
    assert not any(accel.is_patched(m) for m in (gemma, llama, two))
    accel.patch(two, "tidal", select_layer=1)
    assert two._accel_patch.spec.decode._layers == (1, None)


def test_selection_needs_the_forward_order():
    """A sparse layer without this forward call's selection raises instead of reusing a stale one."""
    from accel.policies import AttentionContext
    from transformers import DynamicCache

    pol = TidalPolicy(budget=4, select_layer=0, reselect_layer=None)
    pol.resolve_layers(3, [0, 1, 2])
    cache = DynamicCache()
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 20, 16)
    pol.plan(q, k, AttentionContext(0, "decode", None, cache=cache))
    assert isinstance(pol.plan(q, k, AttentionContext(1, "decode", None, cache=cache)), PageSelection)
    with pytest.raises(RuntimeError, match="no token selection of layer 0"):
        pol.plan(q, torch.randn(1, 2, 21, 16), AttentionContext(1, "decode", None, cache=cache))


@pytest.mark.parametrize("reduce,shared", [("sum", False), ("max", False), ("max", True)])
@pytest.mark.parametrize("softcap,padded", [(None, False), (3.0, True)])
def test_static_selection_in_one_pass_matches_torch(reduce, shared, softcap, padded):
    """A selection layer over a static buffer: with the Triton kernels (interpreted here) its dense attention hands
    back the scores it ranks keys by; the kept positions equal the torch path's (scores from a second pass over K),
    and its output is the dense attention the torch path leaves to the caller."""
    from accel.kernels.static_decode import dense_static_decode
    from accel.policies.tidal import _StaticHandle

    g = torch.Generator().manual_seed(7)
    B, Hkv, G, S, D, L = 2, 2, 3, 96, 16, 71  # a 96-slot buffer filled to 71
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g) * 2, torch.randn(B, Hkv, S, D, generator=g)
    start = torch.tensor([0, 9], dtype=torch.int32) if padded else None

    class Layer:
        cumulative_length = torch.tensor(L)

    pol = TidalPolicy(budget=24, group_reduce=reduce, shared=shared)
    kept = {}
    for triton in (False, True):
        counts = torch.full((B, Hkv), 24, dtype=torch.int32)
        h = _StaticHandle(Layer(), torch.zeros(B, 1 if shared else Hkv, 24, dtype=torch.int32), True, counts)
        out = pol.static_decode(q, k, v, h, mask=None, kv_start=start, scale=0.3, softcap=softcap, use_triton=triton)
        kept[triton] = h.positions.sort(-1).values
        if triton:
            pos = torch.arange(S)
            mask = (pos < L) & (pos[None] >= (start if padded else torch.zeros(B)).long()[:, None])
            want = dense_static_decode(q, k, v, mask[:, None, None], 0.3, softcap)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        else:
            assert out is None  # the caller attends densely
    assert torch.equal(kept[True], kept[False])
    assert (kept[True] == L - 1).any(-1).all()  # the newest token, always
    if padded:
        assert (kept[True][1] >= 9).all()  # never a padding slot
    # a reusing layer: the buffer as stored ([B, 1, n] when shared, expanded inside the op) and the handle's counts
    reuse = _StaticHandle(Layer(), h.positions, False, counts)
    outs = [pol.static_decode(q, k, v, reuse, mask=None, kv_start=start, scale=0.3, softcap=softcap, use_triton=t)
            for t in (False, True)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
