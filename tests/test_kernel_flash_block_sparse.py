"""FA4's block-sparse forward through our BlockLayout (GPU with flash-attn-4 only), and the measured ``auto`` pick
between FA4 and Triton for block-sparse layouts (CPU: with stand-in timings)."""

import importlib.util

import pytest
import torch

from accel import autopick
from accel.kernels import reference_sparse as rs
from accel.layouts import BlockLayout


def _has_fa4() -> bool:
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        return False


fa4 = pytest.mark.skipif(not (torch.cuda.is_available() and _has_fa4()
                              and torch.cuda.get_device_capability()[0] >= 9),
                         reason="needs flash-attn-4 on a Hopper (or newer) GPU")


@pytest.mark.gpu
@fa4
@pytest.mark.parametrize("q_len,kv_len", [(1024, 1024), (1000, 1000), (512, 1536), (384, 2048)])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 8), (28, 4)])
@pytest.mark.parametrize("layout_heads", ["all", "one"])
def test_fa4_block_sparse_matches_reference(q_len, kv_len, hq, hkv, layout_heads):
    from accel.kernels.flash import FlashBackend

    g = torch.Generator(device="cuda").manual_seed(q_len + hq)
    q = torch.randn(2, hq, q_len, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, hkv, kv_len, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    layout = rs.random_block_layout(2, hq if layout_heads == "all" else 1, q_len, kv_len, 128, 128, keep=0.3,
                                    device="cuda")
    fb = FlashBackend()
    assert fb.supports(layout, q) is None
    out = fb.run(layout, q, k, v, scale=128**-0.5)
    ref = rs.block_sparse_attention(q.float(), k.float(), v.float(), layout)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


class _Fake:
    def __init__(self, name):
        self.name, self.calls = name, 0

    def run(self, layout, q, k, v, **kw):
        self.calls += 1
        return torch.full_like(q, float(len(self.name)))


def test_fastest_times_once_per_bucket_and_reports(monkeypatch):
    autopick.clear()
    speed = {"flash": 2.0, "triton": 1.0}
    monkeypatch.setattr(autopick, "_time_ms", lambda fn: speed[fn.__defaults__[0].name])
    notes: set[str] = set()
    flash, triton = _Fake("flash"), _Fake("triton")
    layout = BlockLayout(torch.ones(1, 2, 4, dtype=torch.int32), torch.zeros(1, 2, 4, 1, dtype=torch.int32))
    q = torch.zeros(1, 2, 500, 8)
    pick = autopick.Fastest([flash, triton], notes)
    out = pick.run(layout, q, q, q, scale=1.0)
    assert pick.name == "triton" and float(out[0, 0, 0, 0]) == len("triton")
    assert any("chose triton" in n and "triton 1.000 ms" in n for n in notes)
    # a length in the same power-of-two bucket reuses the choice without timing again
    speed["triton"] = 9.0
    q2 = torch.zeros(1, 2, 510, 8)
    assert autopick.Fastest([flash, triton], notes).run(layout, q2, q2, q2).shape == q2.shape
    assert triton.calls == 2 and flash.calls == 0
    # another bucket is timed afresh
    q3 = torch.zeros(1, 2, 1500, 8)
    pick = autopick.Fastest([flash, triton], notes)
    pick.run(layout, q3, q3, q3)
    assert pick.name == "flash"
    autopick.clear()


def test_flash_backend_refuses_block_layouts_without_fa4():
    from accel.kernels.flash import FlashBackend

    fb = FlashBackend()
    layout = rs.random_block_layout(1, 2, 256, 256, 128, 128, keep=0.5)
    q = torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16)
    if not (torch.cuda.is_available() and _has_fa4()):
        assert "flash-attn-4" in fb.supports(layout, q)
    layout64 = rs.random_block_layout(1, 2, 256, 256, 64, 64, keep=0.5)
    assert fb.supports(layout64, q) is not None


def test_fastest_config_skips_failing_candidates(monkeypatch):
    autopick.clear()
    cost = {1: 3.0, 2: 1.0}

    def fake_time(fn):
        return fn()

    def run(cfg):
        if cfg["id"] == 0:
            raise RuntimeError("out of shared memory")
        return cost[cfg["id"]]

    monkeypatch.setattr(autopick, "_time_ms", fake_time)
    cands = [{"id": 0}, {"id": 1}, {"id": 2}]
    assert autopick.fastest_config(("k",), cands, run) == {"id": 2}
    cost[2] = 9.0  # remembered: not timed again
    assert autopick.fastest_config(("k",), cands, run) == {"id": 2}
    autopick.clear()


def test_fastest_skips_a_backend_that_fails(monkeypatch):
    autopick.clear()

    class Broken(_Fake):
        def run(self, *a, **kw):
            raise ValueError("Block sparsity requires sparse_block_size[1] to be a multiple of tile_n=80.")

    monkeypatch.setattr(autopick, "_time_ms", lambda fn: (fn(), 1.0)[1])
    notes: set[str] = set()
    layout = BlockLayout(torch.ones(1, 2, 4, dtype=torch.int32), torch.zeros(1, 2, 4, 1, dtype=torch.int32))
    q = torch.zeros(1, 2, 64, 8)
    pick = autopick.Fastest([Broken("flash"), _Fake("triton")], notes)
    pick.run(layout, q, q, q)
    assert pick.name == "triton" and any("flash failed" in n and "tile_n" in n for n in notes)
    autopick.clear()
