"""Attention recall: the share of the dense softmax mass that a layout keeps, on sampled query rows.

Recall predicts a sparse policy's accuracy loss cheaply: a query whose kept keys carry 0.99 of its dense attention
mass gets nearly the dense output. Computed with the reference math (float32, the model's scale and soft-capping),
for ``rows`` query rows per call sampled at random (fixed seed), and averaged over batch, heads and rows.

Also: ``capture_qk`` runs a model once and returns each layer's post-RoPE queries and keys (what a policy sees),
for offline tools (scripts/search_patterns.py, scripts/inspect_attention.py)."""

from __future__ import annotations

import torch

from .kernels.reference_sparse import _layout_heads, layout_to_block_mask, vertical_slash_mask
from .layouts import BlockLayout, DenseLayout, StreamingLayout, VerticalSlashLayout

__all__ = ["sample_rows", "layout_keep_rows", "dense_rows", "layout_recall", "capture_qk"]


def sample_rows(q_len: int, rows: int = 64, seed: int = 0, device="cpu") -> torch.Tensor:
    """``rows`` distinct query indices in [0, q_len), sorted (all of them when q_len <= rows)."""
    if q_len <= rows:
        return torch.arange(q_len, device=device)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(q_len, generator=g)[:rows].sort().values.to(device)


def _visible_rows(rows: torch.Tensor, q_len: int, kv_len: int, window: int | None = None) -> torch.Tensor:
    """Bool [R, Sk]: the keys query rows ``rows`` see (causal, and the layer's window). Built for the sampled rows only:
    the full [Sq, Sk] mask is 1 GB at 32K (its int64 intermediates 8 GB)."""
    qpos = rows[:, None] + (kv_len - q_len)
    kpos = torch.arange(kv_len, device=rows.device)[None, :]
    keep = kpos <= qpos
    if window is not None:
        keep = keep & (qpos - kpos < window)
    return keep


def layout_keep_rows(layout, rows: torch.Tensor, q_len: int, kv_len: int, heads: int) -> torch.Tensor | None:
    """Bool [B_L or 1, heads, R, Sk]: keys the layout keeps for query rows ``rows`` (causality included).
    None for layouts recall does not cover (decode page selections)."""
    dev = rows.device
    qpos = rows[:, None] + (kv_len - q_len)
    kpos = torch.arange(kv_len, device=dev)[None, :]
    causal = kpos <= qpos
    if isinstance(layout, DenseLayout):
        return _visible_rows(rows, q_len, kv_len, layout.window)[None, None].expand(1, heads, -1, -1)
    if isinstance(layout, StreamingLayout):
        keep = causal & ((qpos - kpos < layout.window) | (kpos < layout.sink))
        return keep[None, None].expand(1, heads, -1, -1)
    if isinstance(layout, BlockLayout):
        nk = -(-kv_len // layout.block_k)
        bm = layout_to_block_mask(layout, nk).to(dev)  # [B_L, H_L, nq, nk]
        bm = bm[:, _layout_heads(bm.shape[1], heads).to(dev)]
        keep = bm[:, :, rows // layout.block_q].repeat_interleave(layout.block_k, dim=-1)[..., :kv_len]
        return keep & causal
    if isinstance(layout, VerticalSlashLayout):
        parts = [vertical_slash_mask(layout, q_len, kv_len, q_start=int(r), q_end=int(r) + 1) for r in rows]
        keep = torch.cat(parts, dim=2).to(dev)
        return keep[:, _layout_heads(keep.shape[1], heads).to(dev)]
    return None


def dense_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, *, scale: float | None = None,
               softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """Dense softmax probabilities [B, Hq, R, Sk] (float32) of query rows ``rows`` over their causal keys (and the
    model's own sliding window, when the layer has one)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    qr = q[:, :, rows].float().reshape(B, Hkv, g, rows.numel(), D)
    logits = torch.matmul(qr, k.float()[:, :, None].transpose(-1, -2)).reshape(B, Hq, rows.numel(), Sk) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    keep = _visible_rows(rows.to(q.device), Sq, Sk, window)
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


def layout_recall(layout, q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                  softcap: float | None = None, rows: int | torch.Tensor = 64, seed: int = 0,
                  per_head: bool = False):
    """Share of dense attention mass the layout keeps, averaged over sampled rows (and batch, heads). Returns a
    float (or [Hq] tensor with ``per_head``), or None for layouts recall does not cover. The dense reference of a
    sliding-window layer is its own windowed attention (so ``DenseLayout(window=...)`` has recall 1)."""
    Sq, Sk, Hq = q.shape[2], k.shape[2], q.shape[1]
    r = rows if isinstance(rows, torch.Tensor) else sample_rows(Sq, rows, seed, q.device)
    keep = layout_keep_rows(layout, r, Sq, Sk, Hq)
    if keep is None:
        return None
    window = layout.window if isinstance(layout, DenseLayout) else None
    probs = dense_rows(q, k, r, scale=scale, softcap=softcap, window=window)
    kept = (probs * keep).sum(-1)  # [B, Hq, R]
    if per_head:
        return kept.mean((0, 2))
    return float(kept.mean())


def capture_qk(model, input_ids: torch.Tensor) -> dict[int, dict]:
    """Run ``model`` once (dense, reference backend) and return, per layer index, the post-RoPE ``q`` and ``k`` as
    the attention function receives them, with the layer's ``sliding_window``, ``scale`` and ``softcap``. The model
    is left as it was."""
    from . import patching
    from .layouts import DenseLayout as _Dense

    captured: dict[int, dict] = {}

    class _Capture:
        name = "capture"

        def plan(self, q, k, ctx):
            captured[ctx.layer_idx] = {"q": q.detach().clone(), "k": k.detach().clone(),
                                       "sliding_window": ctx.sliding_window, "scale": ctx.scale,
                                       "softcap": ctx.softcap}
            return _Dense(window=ctx.sliding_window)

        def cache_limit(self, sliding_window):
            return None

    was = getattr(model, patching._ATTR, None)
    prev = (was.spec, was.backend) if was is not None else None
    patching.patch(model, "dense", backend="reference")
    record = getattr(model, patching._ATTR)
    record.spec.prefill = _Capture()
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        patching.unpatch(model)
        if prev is not None:
            patching.patch(model, {"prefill": _spec_part(prev[0].prefill), "decode": _spec_part(prev[0].decode)},
                           backend=prev[1])
    return captured


def quest_capture(q: torch.Tensor, k: torch.Tensor, *, budget: int, page_size: int, group_reduce: str = "max",
                  keep_first: bool = False, scale: float | None = None, softcap: float | None = None,
                  bounds_dtype: torch.dtype | None = None) -> dict:
    """How much of one decode query's attention Quest's page selection keeps. ``q`` [B, Hq, D] (the query),
    ``k`` [B, Hkv, S, D] (the keys it sees). Returns, per query head, ``quest`` [B, Hq]: the share of the dense
    softmax mass inside the pages Quest selects at ``budget`` (its page min/max bound, one selection per KV group),
    and ``oracle`` [B, Hq]: the share inside the same number of pages chosen by their true mass summed over the KV
    group (the best one selection per group can keep, with the pages Quest always keeps: the newest, and the first
    with ``keep_first``); with ``mass`` [B, Hq, P] (each page's share) and ``scores`` [B, Hkv, P] (Quest's
    criticality), float32."""
    from .kernels import reference_decode as R

    B, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qf, kf = q.float(), k.float()
    logits = torch.matmul(qf.reshape(B, Hkv, g, D), kf.transpose(-1, -2)).reshape(B, Hq, S)
    logits = logits * (scale if scale is not None else D ** -0.5)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    n_pages = -(-S // page_size)
    mass = torch.nn.functional.pad(logits.softmax(-1), (0, n_pages * page_size - S))
    mass = mass.reshape(B, Hq, n_pages, page_size).sum(-1)
    kmin, kmax = R.page_bounds(kf, page_size, bounds_dtype)  # bounds_dtype: as the cache stores them (None: exact)
    scores = R.quest_scores(qf, kmin, kmax, group_reduce=group_reduce, page_size=page_size)
    n_keep = min(budget // page_size, n_pages)
    pages, _ = R.select_pages(scores, n_keep, kv_len=S, page_size=page_size, keep_first=keep_first)
    keep = torch.zeros(B, Hkv, n_pages, dtype=torch.bool, device=q.device).scatter(-1, pages.long(), True)
    keep = keep.repeat_interleave(g, 1)
    rank = mass.reshape(B, Hkv, g, n_pages).sum(2)
    rank[..., -1] = float("inf")  # the oracle keeps what Quest always keeps: the newest page (and the first)
    if keep_first:
        rank[..., 0] = float("inf")
    top = rank.topk(n_keep, -1).indices
    best = torch.zeros(B, Hkv, n_pages, dtype=torch.bool, device=q.device).scatter(-1, top, True)
    best = best.repeat_interleave(g, 1)
    return {"quest": (mass * keep).sum(-1), "oracle": (mass * best).sum(-1), "mass": mass, "scores": scores}


def _spec_part(policy) -> dict:
    import dataclasses

    return {"name": policy.name, **{f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}}


def vertical_slash_density(layout: VerticalSlashLayout, q_len: int, kv_len: int) -> float:
    """Share of causal (query, key) pairs a VerticalSlashLayout keeps, exact and without an Sq x Sk mask: kept
    diagonals plus kept columns minus pairs on both (counted with a cumulative table of kept offsets)."""
    cols, offs = layout.columns.long(), layout.offsets.long()
    B, H = cols.shape[:2]
    dev = cols.device
    off = kv_len - q_len

    def table(idx):
        t = torch.zeros(B, H, kv_len + 1, dtype=torch.bool, device=dev)
        t.scatter_(-1, torch.where((idx >= 0) & (idx < kv_len), idx, kv_len), True)
        return t[..., :kv_len]

    pos = torch.arange(kv_len, device=dev)
    rows_from = (kv_len - torch.clamp(pos, min=off)).clamp_min(0)  # queries that can see key/offset j
    ct, dt = table(cols), table(offs)
    n_diag = (dt * (kv_len - torch.clamp(pos, min=off))).sum((-1))  # offset o: queries p >= max(off, o)
    n_col = (ct * rows_from).sum(-1)
    cs = torch.nn.functional.pad(dt.long().cumsum(-1), (1, 0))  # cs[x] = kept offsets below x
    lo = torch.clamp(pos, min=off) - pos  # offsets o with c + o in [max(off, c), Sk - 1]
    hi = kv_len - 1 - pos
    both = (cs[..., hi + 1] - cs[..., lo]) * ct
    kept = (n_diag + n_col - both.sum(-1)).sum()
    causal = sum(range(off + 1, kv_len + 1))
    return float(kept) / float(causal * B * H)
