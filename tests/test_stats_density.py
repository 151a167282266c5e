"""accel.stats: a block-sparse prefill's density is known without ``collect_stats`` (its listed blocks, a device sum
read when stats are asked for) and equals the exact share of causal blocks that ``collect_stats`` computes; the
prefill and decode phases are reported apart, so a sparse prefill is not hidden by dense decode steps."""

import pytest
import torch

import accel
from conftest import tiny_model
from test_families import ids

SPARSE = {
    "xattention": dict(threshold=0.5, block_size=64),
    "flexprefill": dict(gamma=0.5, block_size=64, min_budget=64),
    "proxy": dict(gamma=0.5, block_size=64, heads_per_proxy=4),
}


@pytest.mark.parametrize("policy", sorted(SPARSE))
def test_block_prefill_density_without_collect_is_exact(policy):
    model = tiny_model("llama")
    x = ids(length=400)
    got = {}
    for collect in (False, True):
        accel.patch(model, policy, backend="reference", collect_stats=collect, **SPARSE[policy])
        with torch.no_grad():
            model.generate(x, max_new_tokens=3, do_sample=False)
        got[collect] = accel.stats(model)
    fast = [layer["prefill_density"] for layer in got[False]["layers"]]
    exact = [layer["prefill_density"] for layer in got[True]["layers"]]
    assert all(isinstance(d, float) and d < 1.0 for d in fast), fast
    assert fast == pytest.approx(exact, abs=1e-12)
    st = got[False]
    assert st["mean_prefill_density"] == pytest.approx(sum(fast) / len(fast))
    assert st["mean_decode_density"] == 1.0
    assert st["mean_prefill_density"] < st["mean_density"] < 1.0  # the mean over every call mixes in decode


def test_causal_block_count_matches_the_mask():
    from accel.attention import causal_block_count
    from accel.kernels.reference_sparse import causal_block_mask

    for q_len, kv_len, bq, bk in [(400, 400, 64, 64), (100, 400, 64, 128), (1, 300, 128, 128), (257, 900, 128, 64)]:
        causal, _ = causal_block_mask(q_len, kv_len, bq, bk)
        assert causal_block_count(q_len, kv_len, bq, bk) == int(causal.sum())


def test_unknown_prefill_density_is_not_averaged_away():
    """A vertical-slash prefill's density needs collect_stats (it is not free to count): without it the prefill's
    density is unknown (None), and so is the layer's mean over every call, instead of the decode steps' 1.0."""
    model = tiny_model("llama")
    x = ids(length=400)
    opts = dict(vertical_size=32, slash_size=64, last_q=16, backend="reference")
    accel.patch(model, "vertical_slash", **opts)
    with torch.no_grad():
        model.generate(x, max_new_tokens=3, do_sample=False)
    st = accel.stats(model)
    assert all(layer["prefill_density"] is None and layer["density"] is None for layer in st["layers"])
    assert st["mean_prefill_density"] is None and st["mean_density"] is None
    assert st["mean_decode_density"] == 1.0
    accel.patch(model, "vertical_slash", collect_stats=True, **opts)
    with torch.no_grad():
        model.generate(x, max_new_tokens=3, do_sample=False)
    assert accel.stats(model)["mean_prefill_density"] < 0.6
