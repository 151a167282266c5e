"""quest: budget >= context is dense decode on every family; small budgets select pages identically on the
reference and Triton backends; composition with prefill policies; bad input."""

import pytest
import torch

import accel
from accel.cache import PagedKVLayer
from conftest import tiny_model
from test_families import _global_layers_model, ids


def _gen(model, x, n=20):
    return model.generate(x, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_budget_covering_everything_is_dense(family, backend):
    model = _global_layers_model(family)  # Mistral's window would cover every layer
    x = ids(length=40)
    with torch.no_grad():
        ref = _gen(model, x)
        accel.patch(model, "quest", budget=64, dense_layers=0, backend=backend)
        out = _gen(model, x)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-4, rtol=1e-4)
    st = accel.stats(model)
    decode = [layer["decode_density"] for layer in st["layers"] if layer["sliding_window"] is None]
    assert decode and all(d == 1.0 for d in decode)  # budget above the context: everything, recorded


def test_small_budget_same_on_both_backends():
    x = ids(length=90)
    res = {}
    for backend in ("reference", "triton"):
        model = tiny_model("qwen3")
        accel.patch(model, "quest", budget=32, dense_layers=1, backend=backend)
        with torch.no_grad():
            res[backend] = _gen(model, x, n=8)
        st = accel.stats(model)
        assert st["backends_used"] == {backend: st["backends_used"][backend]}
        assert st["layers"][0]["decode_density"] == 1.0  # first layer dense
        assert 0.2 < st["layers"][1]["decode_density"] < 0.4  # 32 of ~90-98 keys
    assert torch.equal(res["reference"].sequences, res["triton"].sequences)
    torch.testing.assert_close(torch.stack(res["triton"].logits), torch.stack(res["reference"].logits), atol=1e-4,
                               rtol=1e-4)


def test_small_budget_matches_manual_page_mask():
    """The decode step attends to exactly the selected pages: compare with attention restricted by hand."""
    from accel.kernels import reference_decode as R
    from accel.kernels.reference import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    layer = PagedKVLayer(16)
    layer.update(k, v)
    from accel.policies import AttentionContext
    from accel.policies.quest import QuestPolicy

    pol = QuestPolicy.from_options(budget=32, dense_layers=0)
    sel = pol.plan(q, k, AttentionContext(0, "decode", None, cache_layer=layer))
    keep = R.gather_selected(sel.pages, sel.counts, 16, 70)  # [1, 2, 70]
    assert keep[..., 64:].all() and keep.sum(-1).eq(16 + 6).all()  # one full page + the partial newest one
    out = R.paged_decode_attention(q, k, v, sel.pages, sel.counts, 16)
    for h in range(4):
        idx = keep[0, h // 2].nonzero()[:, 0]
        ref = attention(q[:, h:h + 1], k[:, h // 2:h // 2 + 1, idx], v[:, h // 2:h // 2 + 1, idx], causal=False)
        torch.testing.assert_close(out[:, h:h + 1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["quest", "xattention+quest", {"prefill": "streaming", "decode": "quest"}])
def test_compositions_generate(policy):
    model = tiny_model("llama")
    accel.patch(model, policy, budget=32, dense_layers=0, backend="reference")
    with torch.no_grad():
        out = model.generate(ids(length=300), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 304)
    st = accel.stats(model)
    assert st["layers"][0]["decode_policy"] == "quest"
    assert st["layers"][0]["decode_density"] < 0.2


@pytest.mark.parametrize("budget", [32, 4096])
def test_left_padded_batch(budget):
    """Padding keys are never attended to. With a covering budget a padded row equals the row alone; with a small
    one it may differ slightly, as pages are aligned to the batch's key index rather than to each row's start."""
    model = tiny_model("llama")
    accel.patch(model, "quest", budget=budget, dense_layers=0, backend="reference")
    a, b = ids(length=70, seed=1), ids(length=55, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 15, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :15] = 0
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
        one = model.generate(b, max_new_tokens=5, do_sample=False)
    if budget >= 80:
        assert torch.equal(both[1, -5:], one[0, -5:])
    assert both.shape == (2, 75)


def test_default_is_paper_setting():
    spec = accel.parse_policy("quest")
    pol = spec.decode
    assert (pol.page_size, pol.budget, pol.dense_layers) == (16, 4096, 2)
    assert spec.prefill.name == "dense"


@pytest.mark.parametrize("opts, match", [({"page_size": 12}, "page_size"), ({"budget": 8}, "budget"),
                                          ({"group_reduce": "mean"}, "group_reduce"),
                                          ({"dense_layers": -1}, "dense_layers")])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        accel.parse_policy("quest", **opts)


@pytest.mark.real_model
def test_real_model_needle_with_small_budget():
    """SmolLM2-135M finds a needle in ~2K tokens while quest attends to 512 of them per decode step."""
    from accel import models
    from accel.needle import build_needle_prompt, needle_found

    try:
        path = models.fetch_demo_model("smollm2")
    except models.DownloadError as exc:
        pytest.skip(f"demo model could not be downloaded: {exc}".splitlines()[0])
    model, tok = models.load_model(str(path), dtype="float32", quiet=True)
    p = build_needle_prompt(tok, 2000, depth=0.5, seed=0)
    accel.patch(model, "quest", budget=512)
    ids = torch.tensor([p.input_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert needle_found(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), p.answer)
    dec = [layer["decode_density"] for layer in accel.stats(model)["layers"][2:]]
    assert max(dec) < 0.3
