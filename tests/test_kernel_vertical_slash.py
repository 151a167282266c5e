"""Triton vertical-slash attention vs its torch reference (CPU under TRITON_INTERPRET=1; GPU tests marked)."""

import math

import pytest
import torch

from accel.kernels import reference_sparse as rs
from accel.kernels.reference import attention as dense_attention
from accel.kernels.triton.vertical_slash import plan_vertical_slash, vertical_slash_attention
from accel.layouts import VerticalSlashLayout

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, s, D, generator=g).to(device=device, dtype=dtype)
                 for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))


def _layout(B, H, Sk, n_cols, n_diag, seed=0, device="cpu"):
    """Random columns and offsets with some padding (-1), repeats and the main diagonal."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.randint(-3, Sk, (B, H, n_cols), generator=g).clamp(min=-1)
    offs = torch.randint(-3, Sk, (B, H, n_diag), generator=g).clamp(min=-1)
    if n_diag:
        offs[..., 0] = 0
    return VerticalSlashLayout(cols.to(device), offs.to(device))


def _compare(q, k, v, layout, softcap=None, ref=None, **kw):
    out, lse = vertical_slash_attention(q, k, v, layout, softcap=softcap, return_lse=True, check=True, **kw)
    ro, rl = ref if ref is not None else rs.vertical_slash_attention(q, k, v, layout, softcap=softcap,
                                                                     return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ro.float(), **TOL[q.dtype])
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin], rl[fin], atol=1e-3, rtol=1e-3)
    return out, lse


# (B, Hq, Hkv, Sq, Sk, D, dtype, n_cols, n_diag)
CASES = [
    (1, 4, 4, 130, 130, 64, torch.float32, 20, 12),
    (1, 4, 1, 65, 257, 64, torch.bfloat16, 40, 20),  # Sq < Sk, GQA 4
    (1, 7, 1, 1, 257, 64, torch.float32, 16, 8),  # one query, GQA 7
    (2, 2, 2, 200, 200, 128, torch.float32, 30, 30),  # head_dim 128, batch 2
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_random_layouts(case):
    B, Hq, Hkv, Sq, Sk, D, dtype, nc, nd = case
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype)
    _compare(q, k, v, _layout(B, Hq, Sk, nc, nd, seed=Sq))


def test_all_offsets_or_all_columns_equal_dense():
    q, k, v = _qkv(1, 4, 2, 100, 150, 64, torch.float32)
    ref = dense_attention(q, k, v, return_lse=True)
    none = torch.zeros(1, 4, 0, dtype=torch.long)
    _compare(q, k, v, VerticalSlashLayout(none, torch.arange(150).expand(1, 4, -1)), ref=ref)
    _compare(q, k, v, VerticalSlashLayout(torch.arange(150).expand(1, 4, -1), none), ref=ref)


def test_empty_layout_and_sink_only():
    q, k, v = _qkv(1, 2, 1, 70, 70, 64, torch.float32)
    empty = VerticalSlashLayout(torch.full((1, 2, 3), -1), torch.full((1, 2, 2), -1))
    out, lse = _compare(q, k, v, empty)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    # a late column: queries before it see nothing
    late = VerticalSlashLayout(torch.tensor([[[60]], [[60]]]).reshape(1, 2, 1), torch.full((1, 2, 1), -1))
    out, lse = _compare(q, k, v, late)
    assert torch.all(lse[..., :60] == -math.inf) and torch.all(torch.isfinite(lse[..., 60:]))


def test_softcap_bf16_head_dim_256():
    q, k, v = _qkv(1, 2, 1, 64, 100, 256, torch.bfloat16)
    _compare(q, k, v, _layout(1, 2, 100, 10, 10, seed=5), softcap=5.0)


def test_shared_layout_heads_batch_broadcast_and_plan_reuse():
    B, Hq, Hkv, S = 2, 4, 2, 130
    q, k, v = _qkv(B, Hq, Hkv, S, S, 64, torch.float32)
    per_kv = _layout(1, Hkv, S, 15, 10, seed=3)
    expanded = VerticalSlashLayout(per_kv.columns.repeat_interleave(2, 1).expand(B, -1, -1),
                                   per_kv.offsets.repeat_interleave(2, 1).expand(B, -1, -1))
    ref = rs.vertical_slash_attention(q, k, v, expanded, return_lse=True)
    _compare(q, k, v, per_kv, ref=ref)
    plan = plan_vertical_slash(per_kv, S, S)
    _compare(q, k, v, per_kv, ref=ref, plan=plan)
    q2, k2, v2 = _qkv(B, Hq, Hkv, S, S, 64, torch.float32, seed=9)  # another layer, same layout
    _compare(q2, k2, v2, per_kv, plan=plan)
    with pytest.raises(ValueError, match="plan was made"):
        vertical_slash_attention(q[:, :, :64], k, v, per_kv, plan=plan)


def test_plan_aligned_view_counts_each_pair_once():
    """The aligned-tile view (previous plan, used by the benchmark's equivalent block layout): tiles crossed by
    slashes + remaining columns cover exactly the reference mask, with no column twice."""
    Sq, Sk = 100, 190
    layout = _layout(1, 2, Sk, 25, 9, seed=11)
    plan = plan_vertical_slash(layout, Sq, Sk, 64, 64)
    mask = rs.vertical_slash_mask(layout, Sq, Sk)
    tiles = rs.layout_to_block_mask(rs.BlockLayout(plan.counts, plan.indices, 64, 64), -(-Sk // 64))
    cover = tiles.repeat_interleave(64, 2)[:, :, :Sq].repeat_interleave(64, 3)[..., :Sk]
    valid = torch.arange(plan.col_indices.shape[-1]) < plan.col_counts[..., None]
    colmask = torch.zeros(1, 2, plan.counts.shape[-1], Sk + 1, dtype=torch.int32)
    colmask.scatter_add_(-1, torch.where(valid, plan.col_indices.long(), Sk), valid.int())
    assert colmask[..., :Sk].max() <= 1
    gathered = colmask[..., :Sk].repeat_interleave(64, 2)[:, :, :Sq] > 0
    assert not torch.any(gathered & cover)
    covered = (cover & mask) | (gathered & mask)
    assert torch.equal(covered, mask)


def _simulate(plan, layout):
    """What the kernel adds per (query, key): full chunks (everything), masked chunks (the exact mask) and the
    gathered columns no chunk covers. Returns the count [B_L, H_L, Sq, Sk] and asserts full chunks need no mask."""
    Sq, Sk, BM, BN = plan.q_len, plan.kv_len, plan.block_m, plan.block_n
    mask = rs.vertical_slash_mask(layout, Sq, Sk)
    BL, HL = plan.work.shape[:2]
    mask = mask.expand(BL, HL, Sq, Sk)
    count = torch.zeros(BL, HL, Sq, Sk, dtype=torch.int32)
    for b in range(BL):
        for h in range(HL):
            for m in range(plan.work.shape[2]):
                n_part, n_full, n_full2, n_cols = plan.work[b, h, m].tolist()
                p0 = Sk - Sq + m * BM
                r0, r1 = m * BM, min(Sq, (m + 1) * BM)
                chunks = [(e, False) for e in plan.full[b, h, :n_full].tolist()]
                chunks += [(e, True) for e in plan.part[b, h, :n_part].tolist()]
                chunks += [(e, True) for e in plan.full[b, h, n_full:n_full2].tolist()]
                assert n_full2 - n_full <= 1
                covered = torch.zeros(Sk, dtype=torch.bool)
                for e, masked in chunks:
                    j0, j1 = max(0, p0 - e), min(Sk, p0 - e + BN)
                    if j1 <= j0:  # starts past the keys: only the last (partial) query tile, masked, wasted
                        assert masked and m == plan.work.shape[2] - 1 and p0 - e >= Sk
                        continue
                    if not masked:
                        assert p0 - e >= 0 and bool(mask[b, h, r0:r1, j0:j1].all()), "full chunk needs a mask"
                    assert not covered[j0:j1].any(), "two chunks of one tile overlap"
                    covered[j0:j1] = True
                    count[b, h, r0:r1, j0:j1] += mask[b, h, r0:r1, j0:j1].int()
                for c in plan.cols[b, h, :n_cols].tolist():
                    assert c <= p0 + BM - 1
                    if not plan.cov[b, h, p0 - c + BM - 1]:
                        assert not covered[c]
                        count[b, h, r0:r1, c] += mask[b, h, r0:r1, c].int()
                    else:
                        assert covered[c]
    return count, mask


RUNS = VerticalSlashLayout(  # runs of adjacent diagonals (a full-chunk band), a lone far one, columns inside/outside
    torch.tensor([[[0, 5, 70, 71, 150, 260, 261, 299, -1], [3, 3, 40, 200, 201, 202, 203, 204, 298]]]),
    torch.cat([torch.arange(0, 200), torch.arange(210, 260), torch.tensor([280, 281, 295, -1] + [-1] * 6)])
    .reshape(1, 1, -1).repeat(1, 2, 1))


@pytest.mark.parametrize("blocks", [(64, 64), (64, 32), (128, 64), (32, 16), (16, 64)])
@pytest.mark.parametrize("which", ["random", "runs", "dense", "columns", "empty"])
@pytest.mark.parametrize("sq", [300, 77])
def test_plan_counts_each_pair_once(blocks, which, sq):
    Sk = 300
    if which == "random":
        layout = _layout(1, 2, Sk, 40, 60, seed=sq)
    elif which == "runs":
        layout = RUNS
    elif which == "dense":
        layout = VerticalSlashLayout(torch.zeros(1, 2, 0, dtype=torch.long), torch.arange(Sk).expand(1, 2, -1))
    elif which == "columns":
        layout = VerticalSlashLayout(torch.arange(0, Sk, 3).expand(1, 2, -1), torch.full((1, 2, 1), -1))
    else:
        layout = VerticalSlashLayout(torch.full((1, 2, 2), -1), torch.zeros(1, 2, 0, dtype=torch.long))
    plan = plan_vertical_slash(layout, sq, Sk, *blocks)
    count, mask = _simulate(plan, layout)
    assert torch.equal(count, mask.int())
    if which in ("runs", "dense") and blocks[0] * 2 < sq:
        assert int(plan.work[..., 1].sum()) > 0, "no full chunk in a band of kept offsets"
    if which == "dense":  # every key of the tile's causal range in full or masked chunks, no gathered column
        assert int(plan.work[..., 3].sum()) == 0


def test_plan_isolated_diagonal_costs_one_chunk():
    S = 1024
    layout = VerticalSlashLayout(torch.full((1, 1, 1), -1), torch.tensor([[[0, 500]]]))
    plan = plan_vertical_slash(layout, S, S, 64, 64)
    full, masked = plan.chunk_counts()
    # diagonal 0: its causal tile; diagonal 500 (not a multiple of 64: crosses two aligned tiles) one chunk
    assert masked[0, 0, -1] == 2 and full.sum() == 0
    assert masked[0, 0, 0] == 1  # 500 > 63: not in tile 0
    assert plan.counts[0, 0, -1] == 3  # the aligned view: 1 + 2 tiles
    st = plan.stats()
    assert 0 < st["chunk_share"] < 1


# runs + columns inside chunks through the kernel: Sq == Sk and Sq < Sk, GQA 1 / 4 / 7, head_dim 64 / 128
KERNEL_CASES = [
    (1, 2, 2, 300, 300, 64, torch.float32, (64, 64)),
    (1, 4, 1, 77, 300, 128, torch.bfloat16, (64, 64)),
    (1, 7, 1, 130, 300, 64, torch.float32, (64, 32)),
    (2, 2, 2, 300, 300, 128, torch.float16, (128, 64)),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_runs_and_columns_in_chunks(case):
    B, Hq, Hkv, Sq, Sk, D, dtype, blocks = case
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq)
    layout = VerticalSlashLayout(RUNS.columns[:, :1], RUNS.offsets[:, :1])  # one layout head for all
    _compare(q, k, v, layout, block_m=blocks[0], block_n=blocks[1])
    per_head = VerticalSlashLayout(RUNS.columns.repeat(1, Hq, 1)[:, :Hq], RUNS.offsets.repeat(1, Hq, 1)[:, :Hq])
    _compare(q, k, v, per_head, block_m=blocks[0], block_n=blocks[1])


@pytest.mark.parametrize("sq", [1024, 333])
def test_skewed_bench_like_layout(sq):
    """The benchmark's layout shape (sink column, local diagonals 0..63, diagonals skewed to the main one, random
    columns) at 1K: full, partial, straddling chunks and gathered columns together."""
    Sk, H = 1024, 2
    g = torch.Generator().manual_seed(1)
    cols = torch.randint(0, Sk, (1, H, 40), generator=g)
    offs = (torch.rand(1, H, 300, generator=g) ** 6 * Sk).long()
    cols[..., 0] = 0
    offs[..., :64] = torch.arange(64)
    offs[:, 1, 64:200] = torch.arange(64, 200)  # head 1: a kept band -> full chunks
    layout = VerticalSlashLayout(cols, offs)
    plan = plan_vertical_slash(layout, sq, Sk, 64, 64)
    full, masked = plan.chunk_counts()
    assert int(full.sum()) > 0 and int(masked.sum()) > 0 and int(plan.work[..., 3].sum()) > 0
    q, k, v = _qkv(1, H, 1, sq, Sk, 64, torch.float32, seed=sq)
    _compare(q, k, v, layout, plan=plan)


def test_dense_band_full_chunks_equal_dense():
    """All offsets kept: the bulk runs as full (unmasked) chunks; equals dense causal attention."""
    q, k, v = _qkv(1, 4, 2, 256, 330, 64, torch.float32)
    layout = VerticalSlashLayout(torch.zeros(1, 1, 0, dtype=torch.long), torch.arange(330).expand(1, 1, -1))
    plan = plan_vertical_slash(layout, 256, 330, 64, 64)
    assert int(plan.work[..., 1].sum()) > 0
    assert bool((plan.work[..., 2] > plan.work[..., 1]).any())  # a full chunk straddling key 0 runs masked
    _compare(q, k, v, layout, ref=dense_attention(q, k, v, return_lse=True), plan=plan)


@pytest.mark.parametrize("make,match", [
    (lambda L, S: VerticalSlashLayout(L.columns.clamp(max=S - 1) + S, L.offsets), "out of range"),
    (lambda L, S: VerticalSlashLayout(L.columns.float(), L.offsets), "int32 or int64"),
    (lambda L, S: VerticalSlashLayout(L.columns[0], L.offsets), r"\[B"),
    (lambda L, S: VerticalSlashLayout(L.columns[:, :1].expand(1, 3, -1), L.offsets[:, :1].expand(1, 3, -1)),
     "divid"),
], ids=["range", "dtype", "shape", "heads"])
def test_bad_layouts_raise(make, match):
    q, k, v = _qkv(1, 2, 1, 64, 64, 64, torch.float32)
    with pytest.raises(ValueError, match=match):
        vertical_slash_attention(q, k, v, make(_layout(1, 2, 64, 4, 4), 64), check=True)


def test_unsupported_shapes_raise():
    L = _layout(1, 2, 64, 4, 4)
    with pytest.raises(ValueError, match="Sq <= Sk"):
        vertical_slash_attention(torch.zeros(1, 2, 80, 64), torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64), L)
    with pytest.raises(ValueError, match="head_dim 48"):
        vertical_slash_attention(torch.zeros(1, 2, 8, 48), torch.zeros(1, 1, 64, 48), torch.zeros(1, 1, 64, 48), L)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [
    (1, 32, 8, 4096, 4096, 128, torch.bfloat16, 1000, 500),
    (1, 28, 4, 1000, 3000, 128, torch.bfloat16, 300, 300),
    (1, 8, 2, 1500, 1500, 64, torch.float16, 100, 100),
    (1, 4, 1, 700, 900, 256, torch.bfloat16, 50, 50),
], ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_gpu_random_layouts(case):
    B, Hq, Hkv, Sq, Sk, D, dtype, nc, nd = case
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device="cuda")
    _compare(q, k, v, _layout(B, Hq, Sk, nc, nd, device="cuda"))
