"""Triton flash-attention forward (kernels/triton/flash_fwd.py) against the reference (kernels/reference.py).

On the CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py, and here in case this file runs alone):
shapes stay tiny and the interpreter uses 32x32 tiles, so block edges, multi-block bands and odd lengths are all
exercised. With TRITON_INTERPRET=0 on a CUDA machine the same tests run on the GPU with the tuned tiles, and the
``gpu`` class adds long shapes and the FlashAttention backend's causal convention."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from accel.kernels.reference import ReferenceBackend, attention  # noqa: E402
from accel.kernels.triton import TritonBackend  # noqa: E402
from accel.kernels.triton.flash_fwd import _interpreting, flash_attention  # noqa: E402
from accel.layouts import BlockLayout, DenseLayout, StreamingLayout  # noqa: E402

if _interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover - triton imported without the interpreter on a CPU-only machine
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

# ||out - ref|| / ||ref|| bounds (METHOD.md: fp32 far under 1e-3, 16-bit operands 1e-3..1e-2)
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed, device=DEVICE, dv=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Sk, D, generator=g)
    v = torch.randn(B, Hkv, Sk, dv or D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _compare(q, k, v, *, config=None, **kw):
    """Run the kernel into poisoned buffers and compare output and LSE with the reference."""
    B, Hq, Sq, _ = q.shape
    out = torch.full((B, Hq, Sq, v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Sq), float("nan"), dtype=torch.float32, device=q.device)
    o, l = flash_attention(q, k, v, return_lse=True, out=out, lse_out=lse, _config_override=config, **kw)
    assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
    assert not torch.isnan(o).any(), "output element not written (or NaN)"
    assert not torch.isnan(l).any(), "LSE element not written (or NaN)"
    ro, rl = attention(q.float(), k.float(), v.float(), return_lse=True, **kw)
    o, ro = o.float(), ro.float()
    empty = torch.isinf(rl)
    assert torch.equal(torch.isinf(l), empty), "rows without visible keys differ"
    assert (l[empty] < 0).all()
    assert (o[empty] == 0).all(), "rows without visible keys must be 0"
    if (~empty).any():
        err = ((o - ro).norm() / ro.norm()).item()
        assert err < TOL[q.dtype], f"relative error {err:.2e}"
        lerr = (l[~empty] - rl[~empty]).abs().max().item()
        assert lerr < LSE_TOL[q.dtype], f"LSE error {lerr:.2e}"
    return o


# ---------------------------------------------------------------- dense / causal, odd lengths, fewer queries


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (130, 130), (257, 257), (17, 130), (1, 257), (64, 97),
                                   (40, 20)])
def test_dense_lengths(sq, sk, causal):
    q, k, v = _inputs(1, 2, 1, sq, sk, 64, torch.float32, seed=sq * 1000 + sk)
    _compare(q, k, v, causal=causal)


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gqa_groups(group, dtype):
    q, k, v = _inputs(2, 2 * group, 2, 45, 70, 32, dtype, seed=group)
    _compare(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,sq,sk", [(16, 33, 33), (64, 50, 81), (128, 40, 72), (256, 19, 35), (256, 1, 40)])
def test_head_dims_dtypes(D, sq, sk, dtype):
    q, k, v = _inputs(1, 2, 1, sq, sk, D, dtype, seed=D + sq)
    _compare(q, k, v)


def test_value_head_dim_differs():
    q, k, v = _inputs(1, 2, 1, 20, 40, 32, torch.float32, seed=3, dv=64)
    _compare(q, k, v)


def test_custom_scale_and_strides():
    """q/k/v as transformers often holds them: [B, S, H, D] storage viewed as [B, H, S, D]; scale given."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 37, 4, 32, generator=g).to(DEVICE).transpose(1, 2)
    kv = torch.randn(2, 60, 2, 2, 32, generator=g).to(DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    _compare(q, k, v, scale=0.3)


# ---------------------------------------------------------------- sink + window (streaming), soft-capping


@pytest.mark.parametrize("sink,window", [(0, 1), (0, 16), (4, 16), (40, 33), (64, 64), (3, 500), (100, 8)])
@pytest.mark.parametrize("sq,sk", [(130, 130), (9, 150), (1, 200)])
def test_sink_window(sq, sk, sink, window):
    q, k, v = _inputs(1, 2, 1, sq, sk, 32, torch.float32, seed=sink * 7 + window + sq)
    _compare(q, k, v, sink=sink, window=window)


def test_window_not_causal():
    q, k, v = _inputs(1, 2, 1, 70, 90, 16, torch.float32, seed=5)
    _compare(q, k, v, causal=False, sink=5, window=20)


@pytest.mark.parametrize("softcap", [2.0, 30.0])
@pytest.mark.parametrize("window", [None, 24])
def test_softcap(softcap, window):
    q, k, v = _inputs(1, 4, 2, 66, 80, 32, torch.float32, seed=int(softcap))
    _compare(q * 3, k, v, softcap=softcap, window=window, sink=2 if window else 0)


def test_softcap_bf16():
    q, k, v = _inputs(1, 2, 1, 33, 50, 64, torch.bfloat16, seed=17)
    _compare(q, k, v, softcap=5.0, scale=0.2)


# ---------------------------------------------------------------- padding, empty rows


@pytest.mark.parametrize("sq,sk", [(70, 70), (5, 90), (1, 90)])
@pytest.mark.parametrize("sink,window", [(0, None), (4, 16)])
def test_kv_start_padding(sq, sk, sink, window):
    q, k, v = _inputs(3, 2, 1, sq, sk, 32, torch.float32, seed=sq + sink)
    kv_start = torch.tensor([0, 7, 45], dtype=torch.int64, device=DEVICE)
    _compare(q, k, v, sink=sink, window=window, kv_start=kv_start)


def test_empty_rows():
    # Sq > Sk: the first queries precede every key; a fully padded row; a start past some queries
    q, k, v = _inputs(3, 2, 1, 50, 30, 16, torch.float32, seed=1)
    out = _compare(q, k, v, kv_start=torch.tensor([0, 30, 12], device=DEVICE))
    assert (out[:, :, :20] == 0).all() and (out[1] == 0).all()
    q, k, v = _inputs(1, 1, 1, 4, 0, 16, torch.float32, seed=2)
    o, l = flash_attention(q, k, v, return_lse=True)
    assert (o == 0).all() and torch.isneginf(l).all()


def test_zero_queries():
    q, k, v = _inputs(1, 2, 1, 0, 10, 16, torch.float32, seed=2)
    o, l = flash_attention(q, k, v, return_lse=True)
    assert o.shape == (1, 2, 0, 16) and l.shape == (1, 2, 0)


def test_lse_matches_logsumexp_and_out_dtype():
    q, k, v = _inputs(1, 2, 2, 20, 20, 16, torch.bfloat16, seed=4)
    o, l = flash_attention(q, k, v, causal=False, return_lse=True)
    assert o.dtype == torch.bfloat16 and l.dtype == torch.float32 and l.shape == (1, 2, 20)
    s = (q.float() @ k.float().transpose(-1, -2)) * 16**-0.5
    torch.testing.assert_close(l, torch.logsumexp(s, -1), atol=1e-4, rtol=1e-4)
    assert not isinstance(flash_attention(q, k, v), tuple)


# ---------------------------------------------------------------- tile shapes: block classification at every edge


@pytest.mark.parametrize("config", [(16, 16, 4, 1), (16, 64, 4, 1), (64, 16, 4, 1), (64, 32, 4, 1)])
def test_tile_shapes(config):
    for i, (sq, sk, kw) in enumerate([(100, 100, {}), (37, 150, {"sink": 20, "window": 33}),
                                      (3, 99, {"sink": 1, "window": 17}),
                                      (60, 80, {"kv_start": torch.tensor([0, 19], device=DEVICE), "window": 30,
                                                "sink": 3})]):
        q, k, v = _inputs(2, 2, 1, sq, sk, 16, torch.float32, seed=i + config[0] + config[1])
        _compare(q, k, v, config=config, **kw)


@pytest.mark.parametrize("config", [(16, 16, 4, 1), (32, 16, 4, 1)])
def test_window_edges_every_residue(config):
    """Window and sink ends at every offset inside a key block (the band classification's off-by-ones)."""
    q, k, v = _inputs(1, 1, 1, 40, 53, 16, torch.float32, seed=0)
    for window in range(1, 40, 1 if config[0] == 16 else 3):
        _compare(q, k, v, config=config, sink=window % 7, window=window)


def test_random_masks():
    g = torch.Generator().manual_seed(1234)
    for i in range(25):
        sk = int(torch.randint(1, 120, (1,), generator=g))
        sq = int(torch.randint(1, sk + 1, (1,), generator=g))
        window = int(torch.randint(1, sk + 2, (1,), generator=g)) if i % 4 else None
        sink = int(torch.randint(0, 20, (1,), generator=g))
        start = torch.randint(0, sk, (2,), generator=g).to(DEVICE) if i % 3 == 0 else None
        bm, bn = [(16, 16), (32, 16), (16, 32), (64, 32)][i % 4]
        q, k, v = _inputs(2, 2, 1, sq, sk, 16, torch.float32, seed=i)
        _compare(q, k, v, config=(bm, bn, 4, 1), sink=sink, window=window, kv_start=start, causal=i % 5 != 1)


# ---------------------------------------------------------------- errors


def test_errors():
    q, k, v = _inputs(1, 4, 2, 8, 8, 32, torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(q, k[:, :1].expand(1, 3, 8, 32), v[:, :1].expand(1, 3, 8, 32))
    with pytest.raises(ValueError, match="differ"):
        flash_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(q, k[..., :16], v)
    with pytest.raises(ValueError, match="power of two from 16 to 256"):
        flash_attention(*(t[..., :24] for t in (q, k, v)))
    with pytest.raises(ValueError, match="4D"):
        flash_attention(q[0], k, v)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="kv_start"):
        flash_attention(q, k, v, kv_start=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="softcap"):
        flash_attention(q, k, v, softcap=-1.0)


def test_cpu_tensors_need_interpreter(monkeypatch):
    import accel.kernels.triton.flash_fwd as ff

    monkeypatch.setattr(ff, "_interpreting", lambda: False)
    q, k, v = _inputs(1, 1, 1, 4, 4, 16, torch.float32, seed=0, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ff.flash_attention(q, k, v)


# ---------------------------------------------------------------- backends


def test_triton_backend_matches_reference_backend():
    tb, rb = TritonBackend(), ReferenceBackend()
    assert tb.name == "triton" and tb.available()[0]
    q, k, v = _inputs(2, 4, 2, 40, 60, 32, torch.float32, seed=9)
    for layout in (DenseLayout(), DenseLayout(window=10), StreamingLayout(sink=4, window=12)):
        assert tb.supports(layout, q) is None
        for kv_start, softcap in ((None, None), (torch.tensor([0, 9], device=DEVICE), 4.0)):
            out = tb.run(layout, q, k, v, scale=0.2, softcap=softcap, kv_start=kv_start)
            ref = rb.run(layout, q, k, v, scale=0.2, softcap=softcap, kv_start=kv_start)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    blocks = BlockLayout(counts=torch.zeros(1, 1, 1, dtype=torch.int32),
                         indices=torch.zeros(1, 1, 1, 1, dtype=torch.int32))
    assert tb.supports(blocks, q) is None  # block-sparse kernel
    assert "head_dim" in tb.supports(DenseLayout(), q[..., :24])


def test_flash_backend_reports_why_not():
    from accel.kernels.flash import FlashBackend

    fb = FlashBackend()
    assert fb.name == "flash"
    q = torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16)
    assert "sink" in fb.supports(StreamingLayout(sink=4, window=16), q)
    assert "float32" in fb.supports(DenseLayout(), q.float())
    if not torch.cuda.is_available():
        ok, reason = fb.available()
        assert not ok and "accel[flash]" in reason


def test_flash_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, accel.kernels.flash, accel.kernels.triton; "
            "print(any(m.startswith(('flash_attn', 'accel.kernels.triton.')) for m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False", res.stdout + res.stderr


# ---------------------------------------------------------------- GPU: long shapes with the tuned tiles


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or DEVICE != "cuda",
                    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
class TestGPU:
    @pytest.mark.parametrize("sq,sk", [(4096, 4096), (1000, 5000), (1, 8192), (37, 3000), (130, 130)])
    @pytest.mark.parametrize("D", [64, 128, 256])
    def test_causal_bf16(self, sq, sk, D):
        q, k, v = _inputs(1, 8, 2, sq, sk, D, torch.bfloat16, seed=sq + D, device="cuda")
        _compare(q, k, v)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_dtypes(self, dtype):
        q, k, v = _inputs(2, 4, 1, 777, 1500, 128, dtype, seed=1, device="cuda")
        _compare(q, k, v)

    @pytest.mark.parametrize("sq,sk", [(8192, 8192), (100, 9000), (1, 9000)])
    def test_streaming(self, sq, sk):
        q, k, v = _inputs(1, 8, 2, sq, sk, 128, torch.bfloat16, seed=sq, device="cuda")
        _compare(q, k, v, sink=128, window=4096)
        _compare(q, k, v, sink=0, window=1000, softcap=30.0)

    def test_padding_and_non_causal(self):
        q, k, v = _inputs(3, 8, 4, 600, 2000, 128, torch.bfloat16, seed=2, device="cuda")
        _compare(q, k, v, kv_start=torch.tensor([0, 100, 1999], device="cuda"), sink=4, window=512)
        _compare(q, k, v, causal=False)

    @pytest.mark.parametrize("sq,sk", [(1024, 1024), (300, 2048), (1, 2048)])
    @pytest.mark.parametrize("window", [None, 256])
    def test_flash_backend_convention(self, sq, sk, window):
        from accel.kernels.flash import FlashBackend

        fb = FlashBackend()
        ok, reason = fb.available()
        if not ok:
            pytest.skip(reason)
        q, k, v = _inputs(1, 8, 2, sq, sk, 128, torch.bfloat16, seed=sq, device="cuda")
        layout = DenseLayout(window=window)
        out = fb.run(layout, q, k, v, scale=128**-0.5)
        ref = attention(q.float(), k.float(), v.float(), window=window)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < TOL[torch.bfloat16], f"{fb.version}: relative error {err:.2e}"
