"""Triton last-query scores (MInference vertical / slash mass) vs the torch twin ``lastq_scores_reference`` (itself
checked against brute force here). CPU under TRITON_INTERPRET=1; GPU tests marked."""

import pytest
import torch

from accel.kernels.reference_estimation import last_query_attention, lastq_scores_reference
from accel.kernels.triton import lastq_score as lq
from accel.kernels.triton.lastq_score import lastq_scores

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-4, rtol=2e-4),
       torch.float16: dict(atol=2e-4, rtol=2e-4)}
# method "scratch" rounds each probability to float16 (unit roundoff 2^-11 = 4.9e-4 relative): the slash sums (of
# non-negative terms) are within 4.9e-4 relative of exact; a diagonal off by one differs by far more on these inputs
SCRATCH_RTOL = 6e-4
METHODS = ["gather", "scratch"]


def _slash_tol(dtype, method):
    tol = dict(TOL[dtype])
    if method == "scratch":
        tol["rtol"] += SCRATCH_RTOL
    return tol


class _Launches:
    """Counts the launches of one kernel (monkeypatched over the module attribute)."""

    def __init__(self, fn):
        self.fn, self.grids = fn, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.fn[grid]


def _qk(B, Hq, Hkv, Sq, Sk, D, dtype, device="cpu", seed=0, scale=2.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (scale * torch.randn(B, Hq, Sq, D, generator=g)).to(device=device, dtype=dtype)
    k = (scale * torch.randn(B, Hkv, Sk, D, generator=g)).to(device=device, dtype=dtype)
    return q, k


def _compare(q, k, n_last, scale=None, config=None, method="auto", **kw):
    vert, slash = lastq_scores(q, k, n_last, scale=scale, config=config, method=method, **kw)
    want_v, want_s = lastq_scores_reference(q, k, n_last, scale)
    assert vert.dtype == slash.dtype == torch.float32 and vert.shape == want_v.shape == slash.shape
    torch.testing.assert_close(vert, want_v, **TOL[q.dtype])  # float32 on either method
    torch.testing.assert_close(slash, want_s, **_slash_tol(q.dtype, lq.resolve_method(q, method)))
    # the heaviest diagonal of every head is the same one, and each head's slash sums to n
    assert torch.equal(slash.argmax(-1), want_s.argmax(-1))
    n = min(n_last, q.shape[2])
    torch.testing.assert_close(slash.sum(-1), torch.full_like(slash[..., 0], float(n)), atol=0, rtol=1e-3)
    return vert, slash


def test_reference_matches_brute_force():
    q, k = _qk(1, 4, 2, 20, 30, 8, torch.float32)
    vert, slash = lastq_scores_reference(q, k, 5, heads_per_chunk=1)
    want_v, want_s = torch.zeros(4, 30), torch.zeros(4, 30)
    for h in range(4):
        for i in range(5):
            pos = 30 - 5 + i
            p = torch.softmax(q[0, h, 15 + i] @ k[0, h // 2, : pos + 1].T / 8**0.5, -1)
            want_v[h, : pos + 1] += p
            want_s[h, : pos + 1] += p.flip(0)  # offset pos - j
    torch.testing.assert_close(vert[0], want_v)
    torch.testing.assert_close(slash[0], want_s)
    torch.testing.assert_close(vert, last_query_attention(q, k, 5).sum(-2))


# (B, Hq, Hkv, Sq, Sk, D, n_last, dtype, config)
CASES = [
    (1, 4, 4, 90, 90, 64, 13, torch.float32, None),  # MHA, n_last odd
    (1, 4, 1, 45, 173, 64, 37, torch.float32, dict(BLOCK_M=128, CHUNK=32)),  # GQA 4 (2 heads/tile), Sq < Sk, chunks
    (2, 7, 1, 77, 130, 64, 50, torch.bfloat16, dict(BLOCK_M=256, CHUNK=64)),  # GQA 7: 4 heads/tile, 3 in the last
    (1, 8, 2, 40, 95, 64, 13, torch.float32, dict(BLOCK_M=64, CHUNK=32)),  # 4 heads of 13 (padded 16) per tile
    (1, 8, 2, 33, 100, 128, 64, torch.bfloat16, dict(BLOCK_M=64, CHUNK=48)),  # n_last > Sq, head_dim 128
    (1, 2, 1, 150, 151, 64, 140, torch.float32, None),  # n_last > MAX_ROWS: two accumulating launches
    (1, 2, 2, 1, 50, 64, 64, torch.float16, None),  # a single query
    (1, 4, 2, 60, 61, 128, 1, torch.float32, dict(CHUNK=16)),  # one last query
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c[:-1]))
def test_matches_reference(case, method):
    B, Hq, Hkv, Sq, Sk, D, n_last, dtype, config = case
    q, k = _qk(B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq + Sk)
    vert, slash = _compare(q, k, n_last, config=config, method=method)
    n = min(n_last, Sq)
    # every query's softmax sums to one: each head's vertical and slash sum to n (slash: float16 terms on scratch)
    torch.testing.assert_close(vert.sum(-1), torch.full((B, Hq), float(n)), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(slash.sum(-1), torch.full((B, Hq), float(n)), atol=1e-3,
                               rtol=1e-4 if method == "gather" else 5e-4)


@pytest.mark.parametrize("method", METHODS)
def test_custom_scale_and_non_contiguous(method):
    q, k = _qk(1, 4, 2, 70, 90, 64, torch.float32, scale=1.0)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] storage, as after a projection
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    got = lastq_scores(qt, kt, 20, scale=0.3, method=method)
    want = lastq_scores_reference(q, k, 20, 0.3)
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1], want[1], **_slash_tol(torch.float32, method))


def test_empty_query():
    q, k = _qk(1, 2, 1, 0, 40, 16, torch.float32)
    v, s = lastq_scores(q, k, 8)
    assert v.shape == s.shape == (1, 2, 40) and not v.any() and not s.any()


def test_bad_inputs(monkeypatch):
    q, k = _qk(1, 2, 1, 40, 40, 16, torch.float32)
    with pytest.raises(ValueError, match="head_dim 24"):
        lastq_scores(torch.randn(1, 2, 40, 24), torch.randn(1, 1, 40, 24))
    with pytest.raises(ValueError, match="Sq <= Sk"):
        lastq_scores(q, k[:, :, :30])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        lastq_scores(q[:, :1], torch.cat([k, k], 1))
    with pytest.raises(ValueError, match="share one dtype"):
        lastq_scores(q, k.half())
    with pytest.raises(ValueError, match="share one dtype"):
        lastq_scores(q.double(), k.double())
    with pytest.raises(ValueError, match="batch or head_dim"):
        lastq_scores(q, k[..., :8])
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        lastq_scores(q[0], k[0])
    with pytest.raises(ValueError, match="n_last must be a positive int"):
        lastq_scores(q, k, 0)
    with pytest.raises(ValueError, match="BLOCK_N"):
        lastq_scores(q, k, 8, config=dict(BLOCK_N=24))
    with pytest.raises(ValueError, match="BLOCK_O"):
        lastq_scores(q, k, 8, config=dict(BLOCK_O=8), method="scratch")
    with pytest.raises(ValueError, match="method must be one of"):
        lastq_scores(q, k, 8, method="atomic")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            lastq_scores(q.cuda(), k)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lastq_scores(q, k)


def test_vertical_slash_policy_routes_equivalently(monkeypatch):
    """The policy's layout is the same whether it estimates with the twin or the kernel."""
    from accel.policies import AttentionContext
    from accel.policies import vertical_slash as vs_mod

    torch.manual_seed(0)
    common = torch.randn(4, 1, 32)
    q = torch.randn(1, 4, 300, 32) * 0.3 + common
    k = torch.randn(1, 2, 300, 32) * 0.3
    k[:, :, 123] = common[::2, 0] * 2
    pol = vs_mod.VerticalSlashPolicy.from_options(vertical_size=40, slash_size=120, last_q=16)
    ctx = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None)
    want = pol.plan(q, k, ctx)
    monkeypatch.setattr(vs_mod, "_use_triton", lambda x: True)
    got = pol.plan(q, k, ctx)
    assert torch.equal(got.columns, want.columns) and torch.equal(got.offsets, want.offsets)
    assert 123 in got.columns[0, 0].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype, Hq, Hkv, Sq, Sk, n_last, config", [
    (torch.bfloat16, 32, 8, 3000, 4100, 64, None),
    (torch.bfloat16, 28, 4, 4096, 4096, 128, None),
    (torch.bfloat16, 32, 8, 2049, 2049, 64, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)),
    (torch.float16, 8, 8, 1500, 2000, 50, dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)),
    (torch.float32, 8, 2, 1500, 2000, 64, None),
    (torch.bfloat16, 4, 1, 1000, 1000, 200, None),  # several row launches
])
def test_gpu_matches_reference(dtype, Hq, Hkv, Sq, Sk, n_last, config, method):
    q, k = _qk(1, Hq, Hkv, Sq, Sk, 128, dtype, device="cuda", scale=1.5)
    got = lastq_scores(q, k, n_last, config=config, method=method)
    want = lastq_scores_reference(q, k, n_last)
    torch.testing.assert_close(got[0], want[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got[1], want[1], atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_last", [64, 128])
def test_gpu_long_context_sums(n_last):
    """128K, Llama-3.1-8B head shape: finite, each head's vertical and slash sum to n_last, deterministic; the two
    methods agree (the scratch's float16 probabilities: ~5e-4 relative on slash)."""
    q, k = _qk(1, 32, 8, 131072, 131072, 128, torch.bfloat16, device="cuda", scale=1.0)
    v, s = lastq_scores(q, k, n_last, method="scratch")
    assert torch.isfinite(v).all() and torch.isfinite(s).all()
    torch.testing.assert_close(v.sum(-1), torch.full_like(v[..., 0], float(n_last)), atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(s.sum(-1), torch.full_like(s[..., 0], float(n_last)), atol=1e-2, rtol=1e-3)
    v2, s2 = lastq_scores(q, k, n_last, method="scratch")
    assert torch.equal(v, v2) and torch.equal(s, s2)
    vg, sg = lastq_scores(q, k, n_last, method="gather")
    torch.testing.assert_close(v, vg, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(s, sg, atol=1e-5, rtol=2e-3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rows", [16, 32])
def test_queries_split_over_launches(rows, method):
    """ROWS caps the queries per launch (the gather method runs 128 last queries on the GPU as two launches of 64);
    later row chunks add into the outputs."""
    q, k = _qk(1, 4, 2, 90, 150, 64, torch.float32, seed=5)
    _compare(q, k, 70, config=dict(ROWS=rows), method=method)


def test_scratch_128_queries_one_launch(monkeypatch):
    """The scratch method needs no BLOCK_N >= n: 128 queries (one head x 128 rows per tile) in ONE launch of each
    pass, with 16-key tiles."""
    launches = {name: _Launches(getattr(lq, name)) for name in ("_lastq_stats", "_lastq_reduce_scratch",
                                                                "_lastq_slash", "_lastq_reduce")}
    for name, counter in launches.items():
        monkeypatch.setattr(lq, name, counter)
    q, k = _qk(1, 2, 1, 130, 150, 16, torch.float32, seed=3)
    _compare(q, k, 128, config=dict(ROWS=128, BLOCK_M=128, BLOCK_N=16), method="scratch")
    assert [len(launches[name].grids) for name in launches] == [1, 1, 1, 0]


def test_scratch_chunking_does_not_change_results(monkeypatch):
    """(batch, KV head) pairs run in chunks whose float16 scratch fits scratch_bytes: bitwise the same results for
    one pair per chunk (a budget of 1 byte), an uneven split (3 + 1 pairs) and all at once; with row chunks too."""
    q, k = _qk(2, 4, 2, 24, 40, 16, torch.float32, seed=11)
    cfg = dict(ROWS=16)
    per_pair = lq.scratch_bytes_per_kv_head(q, k, 24, config=cfg)
    reduce = _Launches(lq._lastq_reduce_scratch)
    monkeypatch.setattr(lq, "_lastq_reduce_scratch", reduce)
    want = _compare(q, k, 24, config=cfg, method="scratch")
    assert len(reduce.grids) == 2  # 2 row chunks (16 + 8 queries) x 1 pair chunk
    for budget, n_chunks in ((1, 4), (3 * per_pair + per_pair // 2, 2)):
        reduce.grids.clear()
        got = lastq_scores(q, k, 24, config=cfg, method="scratch", scratch_bytes=budget)
        assert len(reduce.grids) == 2 * n_chunks
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


class _NanAllocs:
    """Stands in for the module's ``torch``: uninitialised buffers (scratch, chunk statistics) come back NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kw):
        return torch.empty(*args, **kw).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kw):
        return torch.empty_like(*args, **kw).fill_(float("nan"))


@pytest.mark.parametrize("method", METHODS)
def test_reads_only_written_entries(monkeypatch, method):
    """NaN-filled scratch and statistics buffers change nothing: the kernels read only what they wrote (rows past n,
    keys past a row's position, the padding of the scratch rows). POS0 = 14 puts the first 16-offset tile's last
    offset one past the first query's position (the edge of the unmasked diagonal path)."""
    monkeypatch.setattr(lq, "torch", _NanAllocs())
    q, k = _qk(1, 2, 1, 40, 46, 16, torch.float32, seed=2)
    vert, slash = _compare(q, k, 32, method=method)
    assert torch.isfinite(vert).all() and torch.isfinite(slash).all()
