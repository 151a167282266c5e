"""vertical_slash (MInference): estimation picks the heavy column, head patterns, head maps (and their mismatch
errors), and 'keep everything' (budgets >= length) reproducing dense output on every family."""

import json

import pytest
import torch

import accel
from accel.kernels.reference_sparse import vertical_slash_mask
from accel.layouts import DenseLayout, VerticalSlashLayout
from accel.policies import AttentionContext
from accel.policies.vertical_slash import VerticalSlashPolicy
from conftest import tiny_model
from test_families import ids

CTX = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None)


def _qk(S=600, D=16, heads=2):
    torch.manual_seed(0)
    common = torch.randn(heads, 1, D)
    q = torch.randn(1, heads, S, D) * 0.3 + common
    k = torch.randn(1, heads, S, D) * 0.3
    k[:, :, min(333, S - 1)] = common[:, 0] * 2
    return q, k


def test_estimation_keeps_heavy_column_sinks_and_local_diagonals():
    q, k = _qk()
    layout = VerticalSlashPolicy.from_options(vertical_size=40, slash_size=120, last_q=16).plan(q, k, CTX)
    assert isinstance(layout, VerticalSlashLayout)
    cols, offs = layout.columns[0], layout.offsets[0]
    for h in range(2):
        assert 333 in cols[h].tolist() and set(range(30)) <= set(cols[h].tolist())
        assert set(range(100)) <= set(offs[h].tolist())
        assert (cols[h] >= 0).sum() == 40 and (offs[h] >= 0).sum() == 120


def _write_map(tmp_path, rows, model="tiny", sizes=None):
    p = tmp_path / f"map{len(list(tmp_path.iterdir()))}.json"
    p.write_text(json.dumps({"model": model, "patterns": rows, **({"sizes": sizes} if sizes else {})}))
    return str(p)


def test_head_map_patterns(tmp_path):
    q, k = _qk()
    path = _write_map(tmp_path, [["a_shape", "block_sparse"]])
    pol = VerticalSlashPolicy.from_options(head_map=path, a_shape_sink=8, a_shape_window=50, block_count=2,
                                           vertical_size=40, slash_size=120, last_q=16)
    layout = pol.plan(q, k, CTX)
    mask = vertical_slash_mask(layout, 600, 600)[0]
    pos = torch.arange(600)[:, None]
    key = torch.arange(600)[None, :]
    a_shape = ((key < 8) | (pos - key < 50)) & (key <= pos)
    assert torch.equal(mask[0], a_shape)
    # block-sparse head: two 64-blocks as columns (block 0 and the heavy column's block) + 64 local diagonals
    assert set(layout.columns[0, 1][layout.columns[0, 1] >= 0].tolist()) == set(range(64)) | set(range(320, 384))
    assert torch.equal(layout.offsets[0, 1][layout.offsets[0, 1] >= 0], torch.arange(64))


def test_head_map_sizes_run_each_pattern_at_its_searched_size(tmp_path):
    """A map with ``sizes`` runs its patterns at them (the search's equal cost), whatever the options' defaults;
    the same map without sizes and the options set to those sizes gives the same layout."""
    q, k = _qk()
    sizes = {"a_shape": {"a_shape_sink": 8, "a_shape_window": 50}, "block_sparse": {"block_count": 2},
             "vertical_slash": {"vertical_size": 40, "slash_size": 120}}
    sized = VerticalSlashPolicy.from_options(head_map=_write_map(tmp_path, [["a_shape", "block_sparse"]],
                                                                 sizes=sizes), last_q=16)
    plain = VerticalSlashPolicy.from_options(head_map=_write_map(tmp_path, [["a_shape", "block_sparse"]]), last_q=16,
                                             a_shape_sink=8, a_shape_window=50, block_count=2, vertical_size=40,
                                             slash_size=120)
    got, want = sized.plan(q, k, CTX), plain.plan(q, k, CTX)
    assert torch.equal(got.columns, want.columns) and torch.equal(got.offsets, want.offsets)
    # without sizes the defaults run: a 1024-key window covers the 600 keys of the A-shape head
    default = VerticalSlashPolicy.from_options(head_map=_write_map(tmp_path, [["a_shape", "a_shape"]]), last_q=16)
    assert isinstance(default.plan(q, k, CTX), DenseLayout)


def test_head_map_sizes_clash_with_options(tmp_path):
    path = _write_map(tmp_path, [["a_shape", "block_sparse"]], sizes={"a_shape": {"a_shape_window": 50}})
    with pytest.raises(ValueError, match="fixes the pattern sizes.*a_shape_window=50.*drop a_shape_window"):
        accel.parse_policy("vertical_slash", head_map=path, a_shape_window=64)
    accel.parse_policy("vertical_slash", head_map=path, block_count=7)  # not fixed by this map: allowed


@pytest.mark.parametrize("sizes", [{"diagonal": {"block_count": 2}}, {"a_shape": {"block_count": 2}},
                                   {"a_shape": {"a_shape_window": 0}}, {"block_sparse": {"block_count": 1.5}},
                                   {"a_shape": [50]}])
def test_bad_sizes_in_map(tmp_path, sizes):
    path = _write_map(tmp_path, [["a_shape"]], sizes=sizes)
    with pytest.raises(ValueError, match="sizes"):
        accel.parse_policy("vertical_slash", head_map=path)


def test_budgets_cover_length_is_dense(family):
    model = tiny_model(family)
    x = ids(length=200)
    with torch.no_grad():
        dense = model(x).logits
        accel.patch(model, "vertical_slash", backend="reference")  # slash 6096 >= 200: keeps everything
        out = model(x).logits
        assert all(layer["prefill_density"] in (None, 1.0) or layer["sliding_window"]
                   for layer in accel.stats(model)["layers"])
        # forced through the vertical-slash kernel path: every diagonal kept == dense
        accel.patch(model, "vertical_slash", vertical_size=1, slash_size=200, last_q=16, backend="reference")
        pol = accel.stats  # noqa: F841
        out2 = model(x).logits
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out2, dense, atol=2e-5, rtol=1e-4)


def test_all_offsets_layout_is_built_and_dense_equivalent():
    q, k = _qk(S=300)
    pol = VerticalSlashPolicy.from_options(vertical_size=1, slash_size=300, last_q=16, head_map="")
    layout = pol.build(q, k, ["vertical_slash"] * 2, 1, 300)
    m = vertical_slash_mask(layout, 300, 300)
    assert torch.equal(m[0, 0], torch.tril(torch.ones(300, 300, dtype=torch.bool)))


def test_sparse_run_generates_with_stats():
    model = tiny_model("llama")
    x = ids(length=400)
    accel.patch(model, "vertical_slash", vertical_size=32, slash_size=64, last_q=16, backend="reference",
                collect_stats=True)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 403
    st = accel.stats(model)
    assert all(layer["prefill_density"] < 0.6 for layer in st["layers"])
    assert 0.0 < st["mean_recall"] <= 1.0


def test_short_and_sliding_run_dense():
    pol = VerticalSlashPolicy.from_options(slash_size=10, vertical_size=10)
    assert pol.plan(torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16), CTX) == DenseLayout()
    sliding = AttentionContext(layer_idx=0, phase="prefill", sliding_window=24)
    assert pol.plan(torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16), sliding) == DenseLayout(window=24)


def test_head_map_for_another_model_raises_and_leaves_model_unpatched(tmp_path):
    model = tiny_model("llama")  # 2 layers x 4 heads
    wrong_heads = _write_map(tmp_path, [["a_shape"] * 3, ["a_shape"] * 3], model="other")
    with pytest.raises(ValueError, match="made for other.*2 layers x 4 heads"):
        accel.patch(model, "vertical_slash", head_map=wrong_heads)
    assert not accel.is_patched(model)
    wrong_layers = _write_map(tmp_path, [["a_shape"] * 4] * 5)
    with pytest.raises(ValueError, match="5 layers"):
        accel.patch(model, "vertical_slash", head_map=wrong_layers)
    good = _write_map(tmp_path, [["a_shape"] * 4, ["vertical_slash", "block_sparse", "a_shape", "a_shape"]])
    accel.patch(model, "vertical_slash", head_map=good, a_shape_window=64, slash_size=64, backend="reference")
    with torch.no_grad():
        assert torch.isfinite(model(ids(length=300)).logits).all()


def test_shipped_head_maps_fit_demo_shapes():
    for name, layers, heads in (("vertical_slash_smollm2", 30, 9), ("vertical_slash_gemma3", 18, 4)):
        pol = VerticalSlashPolicy.from_options(head_map=name)
        rows = [pol.head_patterns(i, heads) for i in range(layers)]
        assert len(rows) == layers and all(len(r) == heads for r in rows)


@pytest.mark.parametrize("opts, match", [({"vertical_size": 0}, "vertical_size"), ({"slash_size": -1}, "slash_size"),
                                         ({"last_q": 0}, "last_q"), ({"a_shape_sink": -1}, "a_shape_sink"),
                                         ({"head_map": "nope"}, "unknown head map"),
                                         ({"head_map": "/no/such.json"}, "does not exist")])
def test_bad_options(opts, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        accel.parse_policy("vertical_slash", **opts)


def test_unknown_head_map_lists_only_vertical_slash_maps():
    with pytest.raises(ValueError, match="unknown head map 'nope'") as err:
        accel.parse_policy("vertical_slash", head_map="nope")
    shipped = str(err.value).split("shipped head maps: ")[1].split(" (")[0].split(", ")
    assert shipped == ["vertical_slash_gemma3", "vertical_slash_smollm2"]


def test_bad_pattern_in_map(tmp_path):
    path = _write_map(tmp_path, [["diagonal"]])
    with pytest.raises(ValueError, match="unknown pattern"):
        accel.parse_policy("vertical_slash", head_map=path)


def test_triton_backend_matches_reference_backend():
    model = tiny_model("llama")
    x = ids(length=260)
    kw = dict(vertical_size=32, slash_size=64, last_q=16)
    with torch.no_grad():
        accel.patch(model, "vertical_slash", backend="reference", **kw)
        ref = model(x).logits
        accel.patch(model, "vertical_slash", backend="triton", **kw)
        out = model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ vectorised layout building vs the per-head loop


def _build_loop_reference(pol, q, k, patterns, vertical_size, slash_size):
    """The per-head Python loop that VerticalSlashPolicy.build used before it was vectorised (kept as the
    reference: layouts must be identical)."""
    from accel.policies.vertical_slash import (BS_BLOCK, LOCAL_DIAGONALS, SINK_COLUMNS, block_sums, diagonal_sums,
                                               last_query_attention)

    B, H = q.shape[:2]
    Sk, dev = k.shape[2], q.device
    attn = None
    if any(p != "a_shape" for p in patterns):
        attn = last_query_attention(q, k, pol.last_q)
        vertical = attn.sum(-2)
    cols, offs = [], []
    for b in range(B):
        for h, pat in enumerate(patterns):
            if pat == "a_shape":
                c = torch.arange(min(pol.a_shape_sink, Sk), device=dev)
                o = torch.arange(min(pol.a_shape_window, Sk), device=dev)
            elif pat == "vertical_slash":
                v = vertical[b, h].clone()
                v[:SINK_COLUMNS] = float("inf")
                c = v.topk(min(vertical_size, Sk)).indices.sort().values
                s = diagonal_sums(attn[b: b + 1, h: h + 1])[0, 0]
                s[:LOCAL_DIAGONALS] = float("inf")
                o = s.topk(min(slash_size, Sk)).indices.sort().values
            else:
                blk = block_sums(vertical[b, h], BS_BLOCK)
                blk[0] = float("inf")
                top = blk.topk(min(pol.block_count, blk.numel())).indices
                c = (top[:, None] * BS_BLOCK + torch.arange(BS_BLOCK, device=dev)).flatten()
                c = c[c < Sk].sort().values
                o = torch.arange(min(BS_BLOCK, Sk), device=dev)
            cols.append(c)
            offs.append(o)

    def pad(rows):
        width = max(1, max(r.numel() for r in rows))
        out = torch.full((len(rows), width), -1, dtype=torch.int64, device=dev)
        for i, r in enumerate(rows):
            out[i, : r.numel()] = r
        return out

    return VerticalSlashLayout(columns=pad(cols).reshape(B, H, -1), offsets=pad(offs).reshape(B, H, -1))


@pytest.mark.parametrize("patterns, S, Sq, opts", [
    (["vertical_slash"] * 3, 600, 600, dict(vertical_size=40, slash_size=120, last_q=16)),
    (["a_shape", "block_sparse", "vertical_slash"], 600, 600,
     dict(a_shape_sink=8, a_shape_window=50, block_count=2, vertical_size=40, slash_size=120, last_q=16)),
    (["block_sparse", "block_sparse", "a_shape"], 650, 300, dict(block_count=3, last_q=20, a_shape_sink=0)),
    (["vertical_slash", "block_sparse", "vertical_slash"], 330, 100,
     dict(vertical_size=20, slash_size=500, block_count=9, last_q=7)),  # budgets above the length, all blocks
    (["a_shape"] * 3, 200, 200, dict(a_shape_sink=300, a_shape_window=64)),
])
@pytest.mark.parametrize("gqa", [False, True])
def test_vectorised_build_matches_loop(patterns, S, Sq, opts, gqa):
    torch.manual_seed(S + Sq)
    H = len(patterns)
    q = torch.randn(2, H, Sq, 16)
    k = torch.randn(2, 1 if gqa else H, S, 16)
    k[:, :, 333 % S] += q[:, -1:, -1] * 0.5
    pol = VerticalSlashPolicy.from_options(**opts)
    vs, ss = pol.vertical_size, pol.slash_size
    got = pol.build(q, k, patterns, vs, ss)
    want = _build_loop_reference(pol, q, k, patterns, vs, ss)
    assert got.columns.dtype == want.columns.dtype == torch.int64
    assert torch.equal(got.columns, want.columns) and torch.equal(got.offsets, want.offsets)


def test_search_candidates_share_one_budget():
    """scripts/search_patterns.py compares the patterns at one cost and records it as the map's sizes: at the
    default budget (the policy's 1000 + 6096) vertical-slash keeps its defaults, A-shape sink + window and the
    block-sparse blocks add up to the same keys per row."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from search_patterns import pattern_sizes

    sizes = pattern_sizes(7096)
    assert sizes["vertical_slash"] == {"vertical_size": 1000, "slash_size": 6096}
    assert sizes["a_shape"]["a_shape_sink"] + sizes["a_shape"]["a_shape_window"] == 7096
    assert abs(sizes["block_sparse"]["block_count"] * 64 - 7096) < 64
    path = Path(__file__).resolve().parents[1] / "configs" / "vertical_slash_gemma3.json"
    shipped = json.loads(path.read_text()).get("sizes")
    if shipped is not None:  # the shipped Gemma map was searched at the default budget
        assert shipped == sizes


def test_map_dense_layers_run_dense(tmp_path):
    """A map's ``dense_layers`` (MInference's starting_layer, as layer indices) leave those layers dense; the others
    keep their patterns."""
    q, k = _qk()
    path = _write_map(tmp_path, [["vertical_slash"] * 2, ["vertical_slash"] * 2])
    data = json.loads(open(path).read())
    data["dense_layers"] = [1]
    open(path, "w").write(json.dumps(data))
    pol = VerticalSlashPolicy.from_options(head_map=path, vertical_size=40, slash_size=120, last_q=16)
    assert isinstance(pol.plan(q, k, CTX), VerticalSlashLayout)
    ctx1 = AttentionContext(layer_idx=1, phase="prefill", sliding_window=None)
    assert isinstance(pol.plan(q, k, ctx1), DenseLayout)


@pytest.mark.parametrize("dense", [[5], [-1], ["0"], 0])
def test_bad_dense_layers_in_map(tmp_path, dense):
    path = _write_map(tmp_path, [["a_shape"], ["a_shape"]])
    data = json.loads(open(path).read())
    data["dense_layers"] = dense
    open(path, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="dense_layers"):
        accel.parse_policy("vertical_slash", head_map=path)


def _gemma3_shaped():
    """A tiny random Gemma-3 of the shipped map's architecture (18 layers, 4 query heads)."""
    import transformers

    cfg = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=18,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=128,
                                        sliding_window=64, max_position_embeddings=1024)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def test_auto_head_map_is_the_shipped_one_for_the_architecture():
    """``head_map="auto"`` (default) runs the shipped map made for the model's class, layer and head counts; none
    for other shapes, none when a size option it fixes is set, none with ``"none"``."""
    model = _gemma3_shaped()
    accel.patch(model, "vertical_slash")
    src = accel.stats(model)["calibration"]
    assert any(str(v).endswith("vertical_slash_gemma3.json") for v in src.values()), src
    pol = VerticalSlashPolicy.from_options()
    pol.check_model(model)
    assert pol.map_path().endswith("vertical_slash_gemma3.json") and pol.dense_layer(5)
    assert pol.sized().head_map == "none" and pol.sized().slash_size == 6096
    for opts in ({"slash_size": 4000}, {"head_map": "none"}, {"head_map": None}):  # None: the CLI's 'none'
        other = VerticalSlashPolicy.from_options(**opts)
        other.check_model(model)
        assert other.map_path() is None and not other.dense_layer(5)
    small = VerticalSlashPolicy.from_options()
    small.check_model(tiny_model("llama"))
    assert small.map_path() is None


def test_needle_check_keeps_dense_the_layers_that_lose_the_needle(tmp_path, monkeypatch):
    """scripts/search_patterns.py --needle-check: each global layer is tried alone (the others dense through the
    trial map); a layer whose layout alone loses a needle dense finds goes into ``dense_layers``. Generation is
    stubbed: 'layer 3 alone' loses it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import search_patterns

    monkeypatch.setattr("accel.eval.synth.generate_samples", lambda *a, **k: [{"prompt": "p"}, {"prompt": "q"}])
    seen = []

    def answers(model, tok, prompts, opts):
        if opts is None:
            return [True, False]  # dense finds the first needle only: the second is not checked
        data = json.loads(Path(opts["head_map"]).read_text())
        seen.append(data["dense_layers"])
        return [3 in data["dense_layers"]] * len(prompts)  # found unless layer 3 runs sparse

    monkeypatch.setattr(search_patterns, "_answers", answers)
    monkeypatch.setattr("accel.unpatch", lambda model: model)
    head_map = {"patterns": [None, ["vertical_slash"] * 2, None, ["a_shape"] * 2, ["vertical_slash"] * 2]}
    out = search_patterns.needle_check(None, None, head_map, 4096, [0.5, 0.5], 7, tmp_path / "trial.json")
    assert seen[:3] == [[3, 4], [1, 4], [1, 3]]  # each global layer alone sparse
    assert out["dense_layers"] == [3] and seen[3] == [3]  # then the map with layer 3 dense
    assert out["layer_alone_found"] == {1: [True], 3: [False], 4: [True]} and out["map_found"] == [True]


def test_vs_dense_layer_check_runs_dense_one_layer_alone_and_the_map(tmp_path, monkeypatch):
    """scripts/vs_dense_layer_check.py: dense, the named dense layer of the map run sparse (every other global
    layer dense), then the map as shipped; a layer that is not global is refused before any model loads.
    Generation and loading are stubbed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import vs_dense_layer_check as V

    head_map = {"patterns": [None, ["vertical_slash"] * 2, None, ["a_shape"] * 2], "dense_layers": [1]}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(head_map))
    with pytest.raises(SystemExit, match="not a global layer"):
        V.main(["--map", str(path), "--layer", "2"])
    monkeypatch.setattr(V, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(V, "generate_samples", lambda *a, **k: [{"prompt": "p"}] * len(k["depths"]))
    seen = []

    def answers(model, tok, prompts, opts):
        seen.append(None if opts is None else json.loads(Path(opts["head_map"]).read_text())["dense_layers"])
        return [opts is None or 1 in seen[-1]] * len(prompts)

    monkeypatch.setattr(V, "_answers", answers)
    out = tmp_path / "out.json"
    assert V.main(["--map", str(path), "--layer", "1", "--depths", "0.25,0.75", "--out", str(out)]) == 0
    assert seen == [None, [3], [1]]
    res = json.loads(out.read_text())
    assert res["dense"] == [True, True] and res["layer 1 alone sparse"] == [False, False]
    assert res["map as shipped"] == [True, True] and res["map_dense_layers"] == [1]
