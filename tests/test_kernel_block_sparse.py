"""Triton block-sparse attention vs its torch reference (CPU under TRITON_INTERPRET=1; GPU tests marked)."""

import math

import pytest
import torch

from accel.kernels import reference_sparse as rs
from accel.kernels.reference import attention as dense_attention
from accel.kernels.triton.block_sparse import block_sparse_attention
from accel.layouts import BlockLayout

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def _compare(q, k, v, layout, softcap=None, ref=None):
    out, lse = block_sparse_attention(q, k, v, layout, softcap=softcap, return_lse=True, check=True)
    if ref is None:
        ref = rs.block_sparse_attention(q, k, v, layout, softcap=softcap, return_lse=True)
    ro, rl = ref
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ro.float(), **TOL[q.dtype])
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin], rl[fin], atol=1e-3, rtol=1e-3)
    return out, lse


# (B, Hq, Hkv, Sq, Sk, D, block_q, block_k, dtype, keep)
CASES = [
    (1, 4, 4, 130, 130, 64, 64, 64, torch.float32, 0.4),  # odd length, MHA
    (1, 4, 1, 65, 257, 64, 64, 64, torch.bfloat16, 0.5),  # Sq < Sk, GQA 4
    (1, 7, 1, 1, 257, 64, 64, 64, torch.float32, 0.5),  # one query (decode-like), GQA 7
    (2, 4, 2, 257, 257, 64, 128, 64, torch.bfloat16, 0.3),  # block_q 128 / block_k 64, batch 2
    (1, 2, 2, 200, 256, 128, 128, 128, torch.float32, 0.5),  # head_dim 128, 128x128 blocks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_random_layouts(case):
    B, Hq, Hkv, Sq, Sk, D, bq, bk, dtype, keep = case
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype)
    layout = rs.random_block_layout(B, Hq, Sq, Sk, bq, bk, keep=keep, seed=Sq + Sk)
    _compare(q, k, v, layout)


@pytest.mark.parametrize("Sq,Sk,Hq,Hkv", [(130, 130, 7, 1), (65, 200, 2, 1)])
def test_full_layout_equals_dense(Sq, Sk, Hq, Hkv):
    q, k, v = _qkv(1, Hq, Hkv, Sq, Sk, 64, torch.float32)
    layout = rs.full_block_layout(1, Hq, Sq, Sk, 64, 64)
    ref = dense_attention(q, k, v, return_lse=True)
    _compare(q, k, v, layout, ref=ref)
    torch.testing.assert_close(rs.block_sparse_attention(q, k, v, layout), ref[0], atol=1e-5, rtol=1e-5)


def test_head_dim_256_bf16_softcap():
    q, k, v = _qkv(1, 2, 1, 64, 64, 256, torch.bfloat16)
    _compare(q, k, v, rs.full_block_layout(1, 2, 64, 64, 64, 64), softcap=5.0)


def test_softcap_matches_dense():
    q, k, v = _qkv(1, 2, 2, 100, 130, 64, torch.float32)
    ref = dense_attention(q * 3, k, v, softcap=7.0, return_lse=True)
    _compare(q * 3, k, v, rs.full_block_layout(1, 2, 100, 130, 64, 64), softcap=7.0, ref=ref)


def test_empty_rows_and_empty_layout():
    q, k, v = _qkv(1, 2, 1, 130, 130, 64, torch.float32)
    layout = rs.random_block_layout(1, 2, 130, 130, 64, 64, keep=0.5)
    counts = layout.counts.clone()
    counts[0, 0, 1] = 0
    counts[0, 1, 0] = 0
    empty_rows = BlockLayout(counts, layout.indices, 64, 64)
    out, lse = _compare(q, k, v, empty_rows)
    assert torch.all(out[0, 0, 64:128] == 0) and torch.all(lse[0, 0, 64:128] == -math.inf)
    nothing = BlockLayout(torch.zeros(1, 2, 3, dtype=torch.int32), torch.zeros(1, 2, 3, 0, dtype=torch.int32), 64, 64)
    out, lse = _compare(q, k, v, nothing)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)


def test_single_block_and_future_and_unsorted():
    q, k, v = _qkv(1, 2, 2, 60, 60, 64, torch.float32)
    single = rs.full_block_layout(1, 2, 60, 60, 64, 64)  # whole sequence inside one block
    assert single.indices.shape == (1, 2, 1, 1)
    _compare(q, k, v, single, ref=dense_attention(q, k, v, return_lse=True))
    # only the first (sink) block, rows far from it see only it; listed future blocks are masked by the kernel
    q, k, v = _qkv(1, 2, 2, 257, 257, 64, torch.float32, seed=1)
    nq, nk = 5, 5
    sink_only = rs.build_block_layout(torch.zeros(1, 2, nq, nk, dtype=torch.bool), 257, 257, 64, 64,
                                      keep_diagonal=False)
    assert torch.all(sink_only.counts == 1)
    _compare(q, k, v, sink_only)
    everything = rs.block_mask_to_layout(torch.ones(1, 2, nq, nk, dtype=torch.bool), 64, 64)  # non-causal listing
    _compare(q, k, v, everything, ref=dense_attention(q, k, v, return_lse=True))
    rev = BlockLayout(everything.counts, everything.indices.flip(-1).contiguous(), 64, 64)
    _compare(q, k, v, rev, ref=dense_attention(q, k, v, return_lse=True))


def test_shared_layout_heads_batch_broadcast_and_strides():
    B, Hq, Hkv, S, D = 2, 4, 2, 130, 64
    q, k, v = _qkv(B, Hq, Hkv, S, S, D, torch.float32)
    per_kv = rs.random_block_layout(1, Hkv, S, S, 64, 64, keep=0.3, seed=3)  # one layout per KV group, batch 1
    expanded = BlockLayout(per_kv.counts.repeat_interleave(2, 1).expand(B, -1, -1).contiguous(),
                           per_kv.indices.repeat_interleave(2, 1).expand(B, -1, -1, -1).contiguous(), 64, 64)
    ref = rs.block_sparse_attention(q, k, v, expanded, return_lse=True)
    _compare(q, k, v, per_kv, ref=ref)
    # [B, S, H, D] storage seen through a transpose (what some callers pass)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    _compare(qt, kt, vt, per_kv, ref=ref)


def test_lse_merge_of_split_layout():
    q, k, v = _qkv(1, 4, 1, 130, 257, 64, torch.float32)
    layout = rs.random_block_layout(1, 4, 130, 257, 64, 64, keep=0.5, seed=7)
    mc, mi, fc, fi = rs.split_full_partial(layout, 130, 257)
    parts = [block_sparse_attention(q, k, v, BlockLayout(c, i, 64, 64), return_lse=True) for c, i in ((mc, mi), (fc, fi))]
    out, lse = rs.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    ro, rl = rs.block_sparse_attention(q, k, v, layout, return_lse=True)
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5)


def test_builders():
    causal, diag = rs.causal_block_mask(200, 300, 64, 64)
    assert causal.shape == (4, 5) and diag.shape == (4, 5)
    # query block 0 covers key positions 100..163 -> key blocks 1..2 hold its diagonal
    assert diag[0].tolist() == [False, True, True, False, False] and causal[0].tolist() == [True] * 3 + [False] * 2
    mask = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    layout = rs.block_mask_to_layout(mask, 64, 64)
    assert layout.counts.dtype == torch.int32 and layout.indices.dtype == torch.int32
    assert torch.equal(rs.layout_to_block_mask(layout, 5), mask)
    in_row = torch.arange(1, layout.indices.shape[-1]) < layout.counts[..., None]
    assert torch.all((layout.indices[..., 1:] > layout.indices[..., :-1]) | ~in_row)  # ascending
    full = rs.full_block_layout(1, 1, 200, 300, 64, 64)
    assert rs.block_layout_density(full, 200, 300) == 1.0
    rnd = rs.random_block_layout(1, 8, 2048, 2048, 128, 128, keep=0.1)
    assert 0.1 < rs.block_layout_density(rnd, 2048, 2048) < 0.35  # plus first and diagonal blocks
    built = rs.build_block_layout(torch.zeros(1, 1, 4, 5, dtype=torch.bool), 200, 300, 64, 64)
    assert torch.equal(rs.layout_to_block_mask(built, 5)[0, 0], diag | (torch.arange(5) == 0))


def _bad(layout_fn, match, Sq=130, Sk=130):
    q, k, v = _qkv(1, 2, 1, Sq, Sk, 64, torch.float32)
    good = rs.random_block_layout(1, 2, Sq, Sk, 64, 64, keep=0.5)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, layout_fn(good), check=True)


def _set(t, idx, val):
    t = t.clone()
    t[idx] = val
    return t


@pytest.mark.parametrize("make,match", [
    (lambda L: BlockLayout(L.counts, _set(L.indices, (0, 0, 2, 0), 3), 64, 64), "out of range"),
    (lambda L: BlockLayout(L.counts, _set(L.indices, (0, 1, 0, 0), -1), 64, 64), "out of range"),
    (lambda L: BlockLayout(_set(L.counts, (0, 0, 0), 4), L.indices, 64, 64), "row length"),
    (lambda L: BlockLayout(_set(L.counts, (0, 0, 0), 2), torch.zeros(1, 2, 3, 4, dtype=torch.int32), 64, 64),
     "repeats"),
    (lambda L: BlockLayout(L.counts.long(), L.indices, 64, 64), "int32"),
    (lambda L: BlockLayout(L.counts[:, :, :2], L.indices[:, :, :2], 64, 64), "query blocks"),
    (lambda L: BlockLayout(L.counts, L.indices, 48, 64), "block_q"),
    (lambda L: BlockLayout(L.counts[0], L.indices[0], 64, 64), r"\[B, H"),
    (lambda L: BlockLayout(L.counts[:, :1].expand(1, 3, 3), L.indices[:, :1].expand(1, 3, 3, -1), 64, 64), "divisor"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_layouts_raise(make, match):
    _bad(make, match)


def test_count_above_key_blocks_raises():
    q, k, v = _qkv(1, 1, 1, 64, 64, 64, torch.float32)
    bad = BlockLayout(torch.full((1, 1, 1), 2, dtype=torch.int32), torch.tensor([[[[0, 1]]]], dtype=torch.int32), 64, 64)
    with pytest.raises(ValueError, match="number of key blocks"):
        block_sparse_attention(q, k, v, bad, check=True)


@pytest.mark.parametrize("shape_q,shape_k,dtype,match", [
    ((1, 2, 64, 96), (1, 1, 64, 96), torch.float32, "head_dim 96"),
    ((1, 2, 128, 64), (1, 1, 64, 64), torch.float32, "Sq <= Sk"),
    ((1, 3, 64, 64), (1, 2, 64, 64), torch.float32, "multiple of KV heads"),
    ((1, 2, 64, 64), (1, 1, 64, 64), torch.float64, "dtype"),
])
def test_unsupported_shapes_raise_before_launch(shape_q, shape_k, dtype, match):
    q = torch.zeros(shape_q, dtype=dtype)
    k = torch.zeros(shape_k, dtype=dtype)
    layout = rs.full_block_layout(1, shape_q[1], shape_q[2], min(shape_q[2], shape_k[2]), 64, 64)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, k, layout)


# ----------------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [
    (1, 32, 8, 4096, 4096, 128, 128, 128, torch.bfloat16, 0.1),
    (1, 28, 4, 1000, 3000, 128, 128, 64, torch.bfloat16, 0.3),
    (2, 8, 8, 2048, 2048, 64, 64, 64, torch.float16, 0.2),
    (1, 8, 2, 1500, 1500, 256, 128, 128, torch.bfloat16, 0.2),
    (1, 4, 1, 777, 1234, 128, 64, 64, torch.float32, 0.5),
], ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_random_layouts(case, softcap):
    B, Hq, Hkv, Sq, Sk, D, bq, bk, dtype, keep = case
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device="cuda")
    layout = rs.random_block_layout(B, Hq, Sq, Sk, bq, bk, keep=keep, device="cuda")
    _compare(q, k, v, layout, softcap=softcap)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_full_layout_equals_sdpa():
    q, k, v = _qkv(1, 32, 8, 4096, 4096, 128, torch.bfloat16, device="cuda")
    out = block_sparse_attention(q, k, v, rs.full_block_layout(1, 32, 4096, 4096, device="cuda"))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_ascending_flag_is_checked_and_both_paths_agree():
    q, k, v = _qkv(1, 4, 2, 517, 517, 64, torch.float32, seed=3)
    lay = rs.random_block_layout(1, 4, 517, 517, 64, 64, keep=0.4, seed=3)
    assert lay.ascending
    fast = block_sparse_attention(q, k, v, lay, check=True)
    general = block_sparse_attention(q, k, v, BlockLayout(lay.counts, lay.indices, 64, 64), check=True)
    torch.testing.assert_close(fast, general, atol=1e-5, rtol=1e-5)
    bad = BlockLayout(lay.counts, lay.indices.flip(-1).contiguous(), 64, 64, ascending=True)
    with pytest.raises(ValueError, match="not strictly ascending"):
        block_sparse_attention(q, k, v, bad, check=True)
