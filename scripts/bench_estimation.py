"""Benchmark: XAttention's antidiagonal estimation (Triton) as a share of the sparse attention it feeds.

Llama-3.1-8B attention shape by default (32 query heads, 8 KV heads, head_dim 128, bf16, causal, batch 1), block 128,
stride 8, threshold 0.9, at 32K and 128K. Per context it times (medians of ``triton.testing.do_bench``, ms):

- ``accel.kernels.triton.antidiag_score.antidiagonal_scores`` as the policy calls it (method "auto": the one-pass
  kernel on CUDA when a head's scratch fits its budget; the achieved TFLOP/s counts the tensor-core work of the
  method taken over the causal strided triangle), and with ``--tune`` other tile configs of both kernels;
- "xattention one-pass": the two-pass and the one-pass kernel (``antidiag_score_onepass.py``) side by side at
  default tiles on the same inputs (ms, TFLOP/s, speedup, max abs difference, same selection, scratch);
- the selection XAttentionPolicy does on those scores (``keep_by_threshold`` over causal blocks at the threshold,
  then ``build_block_layout`` with the always-kept sink and diagonal blocks);
- ``accel.kernels.triton.block_sparse.block_sparse_attention`` on that layout (the sparse attention it feeds);
- dense causal SDPA (flash backend) of the same shape, and the torch reference estimation up to ``--reference-max``.

Random q/k give near-uniform scores (XAttention then keeps almost everything), so the inputs are synthesised with
structure, per KV head (its query heads share it):
  z[t]  a slowly varying shared component: random Gaussian anchor vectors every `span` tokens, linearly interpolated
        along the sequence and rescaled to norm sqrt(D); span = 256, 1K, 4K, 16K tokens cycling over the KV heads
        (very local to fairly global heads);
  q = amp*z + N(0,1) + a*u,  k = amp*z + N(0,1), plus b*u on 16 'sink' keys (positions 0..3 and 12 random ones),
        u a random unit vector per KV head, a*b = sink_boost*sqrt(D) so sink logits gain about `sink_boost`;
  v ~ N(0,1). Defaults amp 1.0, sink_boost 8. Queries then attend to nearby keys (q.k grows as z[t] ~ z[s]) and to
  the sinks. The kept density this yields and the attention recall (dense softmax mass inside the kept blocks, over
  sampled queries) are reported with the timings.

Before timing, the kernel is checked against the torch reference (4K; max abs error and whether the selection is
identical). Every section runs in try/except and records an error string instead of stopping. Writes ``<out>.json``
and ``<out>.md`` (command, device, versions, date).

    PYTHONPATH=. python scripts/bench_estimation.py --out results/bench_estimation

Sections ``lastq_score`` and ``pooled_score`` (``--sections``; all run by default) time the other estimation kernels on
the same inputs and contexts: ``accel.kernels.triton.lastq_score.lastq_scores`` (MInference's last-64-query
column/diagonal mass; also FlexPrefill's last-block variant, n_last = block) as a share of the Triton
vertical-slash attention on the layout VerticalSlashPolicy builds from it (vertical 1000, slash 6096), and
``accel.kernels.triton.pooled_score.pooled_scores`` (FlexPrefill's pooled q/k block softmax) as a share of the Triton
block-sparse attention on the layout FlexPrefillPolicy plans (gamma ``--flex-gamma``, tau ``--flex-tau``). Each
also reports the whole plan time (estimation + selection + layout) and, with ``--tune``, other tile configs. The
lastq section also times both diagonal methods of ``lastq_scores`` (``method="gather"`` vs the default
``"scratch"``) at n_last 64 and 128, with their differences ("lastq_score diagonal methods" table).

Section ``proxy_score`` times ``accel.kernels.triton.proxy_score.proxy_scores`` (ProxyAttn: one proxy per KV head,
sampled rows every ``--proxy-stride``; TFLOP/s over both passes) as a share of the Triton block-sparse attention on
the layout ProxyPolicy plans (gamma ``--proxy-gamma``), with the plan time and tile configs. Section ``select``
times the block selection alone, torch sort path vs ``accel.kernels.triton.block_topk`` (threshold rule on
XAttention's scores -> ``threshold_layout``; top-n on the proxy ranking with its budget -> ``topn_layout``), checks
that both give the same layout, and shows the Triton threshold selection as a share of the XAttention section's
sparse attention ("select (triton)").

GPU time: about 1-2 minutes on an H100 with the defaults (most of it dense 128K SDPA and tile-config compilation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from accel.kernels import reference_sparse as rs  # noqa: E402
from bench_utils import bench  # noqa: E402
from bench_utils import err as _err  # noqa: E402
from accel.kernels.triton.antidiag_score import ONEPASS_FP8_CANDIDATES, antidiagonal_scores  # noqa: E402
from accel.kernels.reference_estimation import lastq_scores_reference, pooled_scores_reference  # noqa: E402
from accel.kernels.triton.lastq_score import DEFAULT_SCRATCH_BYTES as LASTQ_SCRATCH_BYTES  # noqa: E402
from accel.kernels.triton.lastq_score import lastq_scores, scratch_bytes_per_kv_head  # noqa: E402
from accel.kernels.triton.pooled_score import pooled_scores  # noqa: E402
from accel.kernels.triton.block_sparse import block_sparse_attention  # noqa: E402
from accel.policies.block_select import keep_by_threshold  # noqa: E402
from accel.policies.xattention import antidiagonal_block_scores  # noqa: E402
from accel.recall import layout_recall  # noqa: E402

TUNE_CONFIGS = [  # (BLOCK_R, BLOCK_C: strided rows x columns per tile, num_warps, num_stages); default excluded
    dict(BLOCK_R=128, BLOCK_C=128, num_warps=8, num_stages=2),
    dict(BLOCK_R=128, BLOCK_C=64, num_warps=8, num_stages=4),
    dict(BLOCK_R=128, BLOCK_C=64, num_warps=4, num_stages=3),
    dict(BLOCK_R=64, BLOCK_C=128, num_warps=4, num_stages=3),
    dict(BLOCK_R=64, BLOCK_C=64, num_warps=4, num_stages=3),
    dict(BLOCK_R=64, BLOCK_C=128, num_warps=8, num_stages=3),
]
ONEPASS_TUNE = [  # one-pass configs (kernels/triton/antidiag_score_onepass.py; EPI_KB: key blocks per epilogue step);
    # default (128 x 256, 8 warps, 2 stages, EPI_KB 32) excluded; all compile for sm_90 without spills (NOTES.md)
    dict(BLOCK_R=128, BLOCK_C=128, num_warps=8, num_stages=2),
    dict(BLOCK_R=128, BLOCK_C=128, num_warps=8, num_stages=3),
    dict(BLOCK_R=128, BLOCK_C=64, num_warps=8, num_stages=3),
    dict(BLOCK_R=128, BLOCK_C=256, num_warps=16, num_stages=2),
    dict(BLOCK_R=256, BLOCK_C=128, num_warps=16, num_stages=2),
    dict(BLOCK_R=256, BLOCK_C=64, num_warps=8, num_stages=2),
    dict(BLOCK_R=128, BLOCK_C=64, num_warps=8, num_stages=4),
    dict(BLOCK_R=128, BLOCK_C=64, num_warps=8, num_stages=3, EPI_KB=64),
]


def structured_qkv(S, heads, kv_heads, D, device, seed=0, amp=1.0, sink_boost=8.0, n_sinks=16,
                   dtype=torch.bfloat16):
    """q [1, heads, S, D], k, v [1, kv_heads, S, D] with locality and sinks (see the module docstring)."""
    g = torch.Generator(device=device).manual_seed(seed)
    group = heads // kv_heads
    z = torch.empty(kv_heads, S, D, device=device)
    for h in range(kv_heads):
        span = 256 * 4 ** (h % 4)
        anchors = torch.randn(1, D, max(2, S // span + 1), device=device, generator=g)
        z[h] = F.interpolate(anchors, size=S, mode="linear", align_corners=True)[0].T
    z = z / z.norm(dim=-1, keepdim=True) * math.sqrt(D)
    u = torch.randn(kv_heads, D, device=device, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    boost = math.sqrt(sink_boost * math.sqrt(D))
    sinks = torch.cat([torch.arange(4, device=device),
                       torch.randint(4, S, (max(0, n_sinks - 4),), device=device, generator=g)])
    k = amp * z + torch.randn(kv_heads, S, D, device=device, generator=g)
    k[:, sinks] += boost * u[:, None]
    k = k[None].to(dtype)
    q = torch.randn(heads, S, D, device=device, generator=g)
    q += (amp * z + boost * u[:, None]).repeat_interleave(group, 0)
    q = q[None].to(dtype)
    del z
    v = torch.randn(1, kv_heads, S, D, device=device, generator=g).to(dtype)
    return q, k, v



def measure_layout(row: dict, layout, q, k, v, attention) -> None:
    """Recall of ``layout`` (32 sampled rows) and the time of ``attention(q, k, v, layout)``, errors recorded."""
    try:
        row["recall"] = layout_recall(layout, q, k, rows=32)
    except Exception as e:  # noqa: BLE001
        row["recall_error"] = _err(e)
    try:
        row["sparse_attention_ms"] = bench(lambda: attention(q, k, v, layout))
    except Exception as e:  # noqa: BLE001
        row["sparse_attention_error"] = _err(e)

def select(scores, S, block, threshold):
    """XAttentionPolicy's selection: threshold over causal blocks, then sink + diagonal blocks, as a BlockLayout."""
    causal, _ = rs.causal_block_mask(S, S, block, block, device=scores.device)
    keep = keep_by_threshold(scores.masked_fill(~causal, 0), threshold)
    return rs.build_block_layout(keep, S, S, block, block)


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def correctness(args, device) -> dict:
    S = 4096
    q, k, _ = structured_qkv(S, args.heads, args.kv_heads, args.dim, device, seed=1, amp=args.amp,
                             sink_boost=args.sink_boost)
    want = antidiagonal_block_scores(q, k, args.block, args.stride)
    causal, _ = rs.causal_block_mask(S, S, args.block, args.block, device=device)
    keep = keep_by_threshold(want.masked_fill(~causal, 0), args.threshold)
    res = {"context": S}
    for method in ("two_pass", "one_pass"):
        try:
            got = antidiagonal_scores(q, k, block=args.block, stride=args.stride, method=method)
            same = torch.equal(keep_by_threshold(got.masked_fill(~causal, 0), args.threshold), keep)
            suffix = "" if method == "two_pass" else "_one_pass"
            res["max_abs_err" + suffix] = float((got - want).abs().max())
            res["same_selection" + suffix] = bool(same)
        except Exception as e:  # noqa: BLE001
            res[f"{method}_error"] = _err(e)
    return res


def compare_methods(args, S, q, k) -> dict:
    """xattention one-pass: the two-pass and one-pass kernels (default tiles) on the same inputs: ms, TFLOP/s of the
    tensor-core work each does (two passes vs one over the causal strided triangle), max abs difference, whether
    XAttention's selection is the same, the one-pass scratch (per head and peak)."""
    from accel.kernels.triton.antidiag_score_onepass import DEFAULT_SCRATCH_BYTES, scratch_bytes_per_head

    L = S // args.stride
    one_pass_flops = 2.0 * args.heads * (L * (L + 1) / 2) * args.stride * args.dim
    row = {}
    for method in ("two_pass", "one_pass"):
        try:
            ms = bench(lambda: antidiagonal_scores(q, k, block=args.block, stride=args.stride, method=method))
            row[f"{method}_ms"] = ms
            row[f"{method}_tflops"] = one_pass_flops * (2 if method == "two_pass" else 1) / (ms * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001
            row[f"{method}_error"] = _err(e)
    if "two_pass_ms" in row and "one_pass_ms" in row:
        row["one_pass_speedup"] = row["two_pass_ms"] / row["one_pass_ms"]
    try:
        per_head = scratch_bytes_per_head(q, k, block=args.block, stride=args.stride)
        row["one_pass_scratch_mb_per_head"] = per_head / 2**20
        row["one_pass_scratch_mb"] = per_head * max(1, min(args.heads, DEFAULT_SCRATCH_BYTES // per_head)) / 2**20
        two = antidiagonal_scores(q, k, block=args.block, stride=args.stride, method="two_pass")
        one = antidiagonal_scores(q, k, block=args.block, stride=args.stride, method="one_pass")
        row["one_pass_max_abs_diff"] = float((one - two).abs().max())
        causal, _ = rs.causal_block_mask(S, S, args.block, args.block, device=q.device)
        row["one_pass_same_selection"] = bool(torch.equal(
            keep_by_threshold(one.masked_fill(~causal, 0), args.threshold),
            keep_by_threshold(two.masked_fill(~causal, 0), args.threshold)))
        del two
        # the one-pass kernel on FP8 operands (XAttentionPolicy's estimate_dtype="auto" on Hopper), quantisation
        # of q and centred k included; against the bf16 one-pass on the same inputs
        row["fp8_ms"] = bench(lambda: antidiagonal_scores(q, k, block=args.block, stride=args.stride, fp8=True))
        row["fp8_tflops"] = one_pass_flops / (row["fp8_ms"] * 1e-3) / 1e12
        f8 = antidiagonal_scores(q, k, block=args.block, stride=args.stride, fp8=True)
        row["fp8_max_abs_diff"] = float((f8 - one).abs().max())
        keep1 = keep_by_threshold(one.masked_fill(~causal, 0), args.threshold)
        keep8 = keep_by_threshold(f8.masked_fill(~causal, 0), args.threshold)
        row["fp8_kept_blocks_ratio"] = float(keep8.sum()) / max(1.0, float(keep1.sum()))
        row["fp8_selection_agreement"] = float((keep8 == keep1)[causal.expand_as(keep1)].float().mean())
        del one, f8
    except Exception as e:  # noqa: BLE001
        row["one_pass_compare_error"] = _err(e)
    return row


def run_context(args, S, device) -> dict:
    row = {"context": S}
    torch.cuda.empty_cache()
    q, k, v = structured_qkv(S, args.heads, args.kv_heads, args.dim, device, seed=S, amp=args.amp,
                             sink_boost=args.sink_boost)
    L = S // args.stride
    # tensor-core work of both passes over the causal strided triangle
    est_flops = 2 * 2.0 * args.heads * (L * (L + 1) / 2) * args.stride * args.dim
    row["estimation_tflop"] = est_flops / 1e12
    try:  # the policy's call: method "auto" (one-pass on CUDA when a head's scratch fits the budget)
        from accel.kernels.triton.antidiag_score_onepass import DEFAULT_SCRATCH_BYTES, scratch_bytes_per_head

        one = scratch_bytes_per_head(q, k, block=args.block, stride=args.stride) <= DEFAULT_SCRATCH_BYTES
        row["estimation_method"] = "one_pass" if one else "two_pass"
        row["estimation_ms"] = bench(lambda: antidiagonal_scores(q, k, block=args.block, stride=args.stride))
        row["estimation_tflops"] = est_flops / (2 if one else 1) / (row["estimation_ms"] * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001
        row["estimation_error"] = _err(e)
    if args.tune:
        row["tuning"] = []
        for cfg in TUNE_CONFIGS:
            try:
                ms = bench(lambda: antidiagonal_scores(q, k, block=args.block, stride=args.stride, config=cfg,
                                                       method="two_pass"))
                row["tuning"].append({"config": cfg, "method": "two_pass", "ms": ms})
            except Exception as e:  # noqa: BLE001
                row["tuning"].append({"config": cfg, "method": "two_pass", "error": _err(e)})
        for cfg in ONEPASS_TUNE:
            try:
                ms = bench(lambda: antidiagonal_scores(q, k, block=args.block, stride=args.stride, config=cfg,
                                                       method="one_pass"))
                row["tuning"].append({"config": cfg, "method": "one_pass", "ms": ms})
            except Exception as e:  # noqa: BLE001
                row["tuning"].append({"config": cfg, "method": "one_pass", "error": _err(e)})
        for cfg in ONEPASS_FP8_CANDIDATES:  # the FP8 tile race (pointer loads and TMA), quantisation included
            try:
                ms = bench(lambda: antidiagonal_scores(q, k, block=args.block, stride=args.stride, config=cfg,
                                                       method="one_pass", fp8=True))
                row["tuning"].append({"config": cfg, "method": "one_pass fp8", "ms": ms})
            except Exception as e:  # noqa: BLE001
                row["tuning"].append({"config": cfg, "method": "one_pass fp8", "error": _err(e)})
        # the best of the input-dtype configs (the fp8 row of the main table is compared separately)
        timed = [t["ms"] for t in row["tuning"] if "ms" in t and "fp8" not in t["method"]] + (
            [row["estimation_ms"]] if "estimation_ms" in row else [])
        if timed:
            row["estimation_best_ms"] = min(timed)
    try:
        row.update(compare_methods(args, S, q, k))
    except Exception as e:  # noqa: BLE001
        row["one_pass_compare_error"] = _err(e)
    layout = None
    try:
        scores = antidiagonal_scores(q, k, block=args.block, stride=args.stride)
        row["selection_ms"] = bench(lambda: select(scores, S, args.block, args.threshold), rep=50)
        layout = select(scores, S, args.block, args.threshold)
        row["kept_density"] = rs.block_layout_density(layout, S, S)
        nk = -(-S // args.block)
        causal, _ = rs.causal_block_mask(S, S, args.block, args.block, device=device)
        per_head = (rs.layout_to_block_mask(layout, nk)[0] & causal).sum((-1, -2)).float() / causal.sum()
        row["kept_density_per_kv_head"] = [round(float(x), 4) for x in
                                           per_head.reshape(args.kv_heads, -1).mean(-1)]
        del scores
    except Exception as e:  # noqa: BLE001
        row["selection_error"] = _err(e)
    if layout is not None:
        measure_layout(row, layout, q, k, v, block_sparse_attention)
    try:
        row["sdpa_flash_ms"] = bench(lambda: sdpa_flash(q, k, v))
    except Exception as e:  # noqa: BLE001 - flash without enable_gqa support: repeat K/V for the baseline only
        try:
            g = args.heads // args.kv_heads
            kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            row["sdpa_flash_ms"] = bench(lambda: sdpa_flash(q, kr, vr))
            row["sdpa_flash_note"] = f"K/V repeated ({_err(e)})"
            del kr, vr
        except Exception as e2:  # noqa: BLE001
            row["sdpa_flash_error"] = _err(e2)
    if S <= args.reference_max:
        try:
            row["reference_estimation_ms"] = bench(lambda: antidiagonal_block_scores(q, k, args.block, args.stride),
                                                   rep=50, warmup=5)
            ref = antidiagonal_block_scores(q, k, args.block, args.stride)
            row["max_abs_err_vs_reference"] = float((ref - antidiagonal_scores(q, k, block=args.block,
                                                                             stride=args.stride)).abs().max())
            del ref
        except Exception as e:  # noqa: BLE001
            row["reference_estimation_error"] = _err(e)
    if "sparse_attention_ms" in row:
        sp = row["sparse_attention_ms"]
        for key in ("estimation_ms", "estimation_best_ms"):
            if key in row:
                row[key.replace("_ms", "_share_of_sparse")] = row[key] / sp
        if "estimation_ms" in row and "selection_ms" in row:
            row["plan_share_of_sparse"] = (row["estimation_ms"] + row["selection_ms"]) / sp
        if "sdpa_flash_ms" in row and "estimation_ms" in row:
            row["prefill_speedup_vs_sdpa"] = row["sdpa_flash_ms"] / (row["estimation_ms"] + row.get("selection_ms", 0)
                                                                    + sp)
    if "sdpa_flash_ms" in row and "estimation_ms" in row:
        row["estimation_share_of_dense"] = row["estimation_ms"] / row["sdpa_flash_ms"]
    del q, k, v, layout
    return row


LASTQ_TUNE = [  # lastq_scores configs (rows = query heads x padded queries per tile); default excluded
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, PROGRAMS=1056),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, PROGRAMS=264),
    dict(BLOCK_O=128, BLOCK_R=32),  # the scratch method's diagonal pass (default 128 offsets x 16 rows, 4 warps)
    dict(BLOCK_O=256, BLOCK_R=32, slash_warps=8),
]
POOLED_TUNE = [  # pooled_scores configs (ROWS per pooling load; pooled score tiles; dot precision); default excluded
    dict(ROWS=64, BLOCK_M=64, BLOCK_N=32, PREC="ieee", num_warps=4, num_stages=2),
    dict(ROWS=32, BLOCK_M=32, BLOCK_N=32, PREC="ieee", num_warps=4, num_stages=2),
    dict(ROWS=32, BLOCK_M=64, BLOCK_N=64, PREC="tf32x3", num_warps=8, num_stages=2),
    dict(ROWS=32, BLOCK_M=64, BLOCK_N=64, PREC="tf32", num_warps=4, num_stages=2),
]


def _tune(row, fn, configs):
    row["tuning"] = []
    for cfg in configs:
        try:
            row["tuning"].append({"config": cfg, "ms": bench(lambda: fn(cfg))})
        except Exception as e:  # noqa: BLE001
            row["tuning"].append({"config": cfg, "error": _err(e)})
    timed = [t["ms"] for t in row["tuning"] if "ms" in t] + ([row["estimation_ms"]] if "estimation_ms" in row else [])
    if timed:
        row["estimation_best_ms"] = min(timed)


def _shares(row, sparse_key):
    sp = row.get(sparse_key)
    if sp:
        for key in ("estimation_ms", "estimation_best_ms", "plan_ms"):
            if key in row:
                row[key.replace("_ms", "_share_of_sparse")] = row[key] / sp


def run_lastq(args, S, device, q, k, v) -> dict:
    """MInference's estimate (last 64 queries) vs the vertical-slash attention on the layout it feeds."""
    from accel.kernels.triton.vertical_slash import vertical_slash_attention
    from accel.policies.vertical_slash import VerticalSlashPolicy

    row = {"context": S, "n_last": args.last_q}
    # two passes of QK^T over n_last rows x S keys per query head
    row["estimation_tflop"] = 2 * 2.0 * args.heads * args.last_q * S * args.dim / 1e12
    try:
        row["estimation_ms"] = bench(lambda: lastq_scores(q, k, args.last_q))
        row["estimation_tflops"] = row["estimation_tflop"] / (row["estimation_ms"] * 1e-3)
        row["k_read_tb_s"] = 2 * k.numel() * k.element_size() / (row["estimation_ms"] * 1e-3) / 1e12  # 2 passes
    except Exception as e:  # noqa: BLE001
        row["estimation_error"] = _err(e)
    try:  # FlexPrefill's variant: the last block of queries
        row["estimation_last_block_ms"] = bench(lambda: lastq_scores(q, k, args.block))
    except Exception as e:  # noqa: BLE001
        row["estimation_last_block_error"] = _err(e)
    row["methods"] = [_lastq_methods(q, k, n) for n in (64, 128)]
    if args.tune:
        _tune(row, lambda cfg: lastq_scores(q, k, args.last_q, config=cfg), LASTQ_TUNE)
    layout = None
    try:
        pol = VerticalSlashPolicy.from_options(vertical_size=args.vertical, slash_size=args.slash, last_q=args.last_q)
        patterns = ["vertical_slash"] * args.heads
        row["plan_ms"] = bench(lambda: pol.build(q, k, patterns, args.vertical, args.slash), rep=50)
        layout = pol.build(q, k, patterns, args.vertical, args.slash)
        from accel.recall import vertical_slash_density

        row["kept_density"] = vertical_slash_density(layout, S, S)
    except Exception as e:  # noqa: BLE001
        row["plan_error"] = _err(e)
    if layout is not None:
        measure_layout(row, layout, q, k, v, vertical_slash_attention)
    _shares(row, "sparse_attention_ms")
    if S <= args.reference_max:
        try:
            ref = lastq_scores_reference(q, k, args.last_q)
            got = lastq_scores(q, k, args.last_q)
            row["max_abs_err_vs_reference"] = max(float((ref[0] - got[0]).abs().max()),
                                                  float((ref[1] - got[1]).abs().max()))
            row["reference_estimation_ms"] = bench(lambda: lastq_scores_reference(q, k, args.last_q), rep=20,
                                                   warmup=3)
            del ref, got
        except Exception as e:  # noqa: BLE001
            row["reference_estimation_error"] = _err(e)
    return row


def _lastq_methods(q, k, n) -> dict:
    """lastq_scores' two diagonal methods at default tiles: "gather" (in-register skew, 64 queries per launch) vs
    "scratch" (float16 probability scratch + a diagonal pass, the default), timings and how far apart they are."""
    out = {"n_last": n}
    for method in ("gather", "scratch"):
        try:
            out[f"{method}_ms"] = bench(lambda method=method: lastq_scores(q, k, n, method=method))
        except Exception as e:  # noqa: BLE001
            out[f"{method}_error"] = _err(e)
    if "gather_ms" in out and "scratch_ms" in out:
        out["speedup"] = out["gather_ms"] / out["scratch_ms"]
    try:
        per_pair = scratch_bytes_per_kv_head(q, k, n)
        out["scratch_mb"] = per_pair * max(1, min(q.shape[0] * k.shape[1], LASTQ_SCRATCH_BYTES // per_pair)) / 1e6
        vg, sg = lastq_scores(q, k, n, method="gather")
        vs, ss = lastq_scores(q, k, n, method="scratch")
        out["max_abs_diff_vertical"] = float((vs - vg).abs().max())
        out["max_abs_diff_slash"] = float((ss - sg).abs().max())
        big = sg > 1e-3  # relative error where it is meaningful
        out["max_rel_diff_slash"] = float(((ss - sg).abs()[big] / sg[big]).max()) if big.any() else 0.0
        del vg, sg, vs, ss
    except Exception as e:  # noqa: BLE001
        out["diff_error"] = _err(e)
    return out


def _lastq_methods_lines(rows):
    """Markdown: lastq_scores' gather vs scratch diagonal methods at n = 64 and 128."""
    rows = [(r["context"], m) for r in rows for m in r.get("methods", [])]
    if not rows:
        return []
    head = ["context", "n_last", "gather", "scratch (default)", "speedup", "scratch MB", "max abs diff vertical",
            "max abs diff slash", "max rel diff slash (> 1e-3)"]
    lines = ["", "lastq_score diagonal methods (kernels/triton/lastq_score.py; default tiles; ms): in-register gather "
             "vs float16 scratch + diagonal pass", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for ctx, m in rows:
        lines.append("| " + " | ".join([
            f"{ctx // 1024}K", str(m["n_last"]), _fmt(m.get("gather_ms"), 3), _fmt(m.get("scratch_ms"), 3),
            _fmt(m.get("speedup")), _fmt(m.get("scratch_mb"), 0),
            *[f"{m[key]:.1e}" if key in m else "—" for key in ("max_abs_diff_vertical", "max_abs_diff_slash",
                                                                "max_rel_diff_slash")]]) + " |")
    errors = [f"- {ctx} n={m['n_last']}: {key} = {val}" for ctx, m in rows for key, val in m.items()
              if key.endswith("error")]
    return lines + (["", "Errors:", *errors] if errors else [])


def run_pooled(args, S, device, q, k, v) -> dict:
    """FlexPrefill's pooled estimate vs the block-sparse attention on the layout FlexPrefillPolicy plans."""
    from accel.policies import AttentionContext
    from accel.policies.flexprefill import FlexPrefillPolicy

    row = {"context": S, "block": args.block}
    row["input_gb"] = (q.numel() + k.numel()) * q.element_size() / 1e9
    try:
        row["estimation_ms"] = bench(lambda: pooled_scores(q, k, block=args.block))
        row["read_tb_s"] = row["input_gb"] / (row["estimation_ms"] * 1e-3) / 1e3
    except Exception as e:  # noqa: BLE001
        row["estimation_error"] = _err(e)
    if args.tune:
        _tune(row, lambda cfg: pooled_scores(q, k, block=args.block, config=cfg), POOLED_TUNE)
    layout = None
    try:
        pol = FlexPrefillPolicy.from_options(block_size=args.block, gamma=args.flex_gamma, tau=args.flex_tau)
        ctx = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None)
        row["plan_ms"] = bench(lambda: pol.plan(q, k, ctx), rep=50)
        layout = pol.plan(q, k, ctx)
        if hasattr(layout, "counts"):
            row["kept_density"] = rs.block_layout_density(layout, S, S)
        else:
            row["plan_note"] = f"policy planned {type(layout).__name__} (context below min_budget or one block)"
    except Exception as e:  # noqa: BLE001
        row["plan_error"] = _err(e)
    if layout is not None and hasattr(layout, "counts"):
        measure_layout(row, layout, q, k, v, block_sparse_attention)
    _shares(row, "sparse_attention_ms")
    if S <= args.reference_max:
        try:
            ref = pooled_scores_reference(q, k, args.block)
            row["max_abs_err_vs_reference"] = float((ref - pooled_scores(q, k, block=args.block)).abs().max())
            row["reference_estimation_ms"] = bench(lambda: pooled_scores_reference(q, k, args.block), rep=20,
                                                   warmup=3)
            del ref
        except Exception as e:  # noqa: BLE001
            row["reference_estimation_error"] = _err(e)
    return row


def run_other_sections(args, S, device) -> dict:
    """The lastq_score / pooled_score sections at one context, on the same structured inputs as XAttention's."""
    out = {}
    torch.cuda.empty_cache()
    q, k, v = structured_qkv(S, args.heads, args.kv_heads, args.dim, device, seed=S, amp=args.amp,
                             sink_boost=args.sink_boost)
    for name, fn in (("lastq_score", run_lastq), ("pooled_score", run_pooled), ("proxy_score", run_proxy),
                     ("select", run_select)):
        if name in args.sections:
            try:
                out[name] = fn(args, S, device, q, k, v)
            except Exception as e:  # noqa: BLE001
                out[name] = {"context": S, "error": _err(e)}
            print(name, json.dumps(out[name]), flush=True)
    del q, k, v
    return out


PROXY_TUNE = [  # proxy_scores configs (BLOCK_R sampled rows x BLOCK_C keys per tile); default excluded
    dict(BLOCK_R=128, BLOCK_C=64, num_warps=8, num_stages=3),
    dict(BLOCK_R=128, BLOCK_C=128, num_warps=8, num_stages=2),
    dict(BLOCK_R=64, BLOCK_C=128, num_warps=8, num_stages=3),
    dict(BLOCK_R=128, BLOCK_C=64, num_warps=8, num_stages=4),
    dict(BLOCK_R=256, BLOCK_C=64, num_warps=8, num_stages=2),
]


def run_proxy(args, S, device, q, k, v) -> dict:
    """ProxyAttn's proxy-head token-level block scores (Triton) vs the block-sparse attention on the layout
    ProxyPolicy plans (one proxy per KV head, sampled rows every ``--proxy-stride``, gamma ``--proxy-gamma``)."""
    from accel.kernels.triton.proxy_score import proxy_scores
    from accel.policies import AttentionContext
    from accel.policies.proxy import ProxyPolicy, proxy_block_scores

    per = args.heads // args.kv_heads
    P, L = args.heads // per, -(-S // args.proxy_stride)
    row = {"context": S, "proxies": P, "stride": args.proxy_stride}
    # both passes' tensor-core work: P proxies x L sampled rows x ~S/2 causal keys each
    row["estimation_tflop"] = 2 * 2.0 * P * L * (S / 2) * args.dim / 1e12
    fn = lambda cfg=None: proxy_scores(q, k, block=args.block, stride=args.proxy_stride, config=cfg)  # noqa: E731
    try:
        row["estimation_ms"] = bench(fn)
        row["estimation_tflops"] = row["estimation_tflop"] / (row["estimation_ms"] * 1e-3)
    except Exception as e:  # noqa: BLE001
        row["estimation_error"] = _err(e)
    if args.tune:
        _tune(row, fn, PROXY_TUNE)
    layout = None
    try:
        pol = ProxyPolicy.from_options(block_size=args.block, gamma=args.proxy_gamma, query_stride=args.proxy_stride)
        ctx = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None)
        row["plan_ms"] = bench(lambda: pol.plan(q, k, ctx), rep=50)
        layout = pol.plan(q, k, ctx)
        row["kept_density"] = rs.block_layout_density(layout, S, S)
    except Exception as e:  # noqa: BLE001
        row["plan_error"] = _err(e)
    if layout is not None:
        measure_layout(row, layout, q, k, v, block_sparse_attention)
    _shares(row, "sparse_attention_ms")
    if S <= args.reference_max:
        try:
            ref = proxy_block_scores(q, k, args.block, per, args.proxy_stride)
            row["max_abs_err_vs_reference"] = float((ref - fn()).abs().max())
            row["reference_estimation_ms"] = bench(lambda: proxy_block_scores(q, k, args.block, per,
                                                                              args.proxy_stride), rep=20, warmup=3)
            del ref
        except Exception as e:  # noqa: BLE001
            row["reference_estimation_error"] = _err(e)
    return row


def run_select(args, S, device, q, k, v) -> dict:
    """Block selection on real score maps: the torch path (sort + cumsum/argsort + build_block_layout's sort) vs
    the Triton kernels (kernels/triton/block_topk.py) that emit the BlockLayout directly. Threshold rule on
    XAttention's scores (what XAttentionPolicy does), top-n on ProxyAttn's ranking with its proxy budget."""
    from accel.kernels.triton.block_topk import threshold_counts, threshold_layout, topn_layout
    from accel.kernels.triton.proxy_score import proxy_scores
    from accel.policies.block_select import keep_by_threshold_torch
    from accel.policies.flexprefill import top_n_mask

    b, thr = args.block, args.threshold
    causal, _ = rs.causal_block_mask(S, S, b, b, device=device)
    row = {"context": S, "rows": args.heads * causal.shape[0], "n_k_blocks": causal.shape[1]}

    def same(x, y):
        return bool(torch.equal(x.counts, y.counts) and torch.equal(x.indices, y.indices))

    try:
        scores = antidiagonal_scores(q, k, block=b, stride=args.stride)
        torch_sel = lambda: rs.build_block_layout(keep_by_threshold_torch(scores.masked_fill(~causal, 0), thr),  # noqa
                                                  S, S, b, b)
        triton_sel = lambda: threshold_layout(scores, thr, S, S, b, b)  # noqa: E731
        row["threshold_torch_ms"] = bench(torch_sel, rep=50)
        row["threshold_triton_ms"] = bench(triton_sel, rep=50)
        row["threshold_same_layout"] = same(torch_sel(), triton_sel())
        del scores
    except Exception as e:  # noqa: BLE001
        row["threshold_error"] = _err(e)
    try:
        per = args.heads // args.kv_heads
        ranking = proxy_scores(q, k, block=b, stride=args.proxy_stride)
        budget = threshold_counts(ranking.masked_fill(~causal, 0.0), args.proxy_gamma).repeat_interleave(per, 1)
        torch_sel = lambda: rs.build_block_layout(  # noqa: E731
            top_n_mask(ranking.masked_fill(~causal, -1.0).repeat_interleave(per, 1), budget) & causal, S, S, b, b)
        triton_sel = lambda: topn_layout(ranking, budget, S, S, b, b)  # noqa: E731
        row["topn_torch_ms"] = bench(torch_sel, rep=50)
        row["topn_triton_ms"] = bench(triton_sel, rep=50)
        row["topn_same_layout"] = same(torch_sel(), triton_sel())
        row["counts_triton_ms"] = bench(lambda: threshold_counts(ranking, args.proxy_gamma), rep=50)
        del ranking
    except Exception as e:  # noqa: BLE001
        row["topn_error"] = _err(e)
    return row


def _onepass_lines(rows):
    """Markdown: xattention one-pass vs two-pass estimator (default tiles, same inputs)."""
    rows = [r for r in rows if any(k.startswith(("one_pass", "two_pass")) for k in r)]
    if not rows:
        return []
    head = ["context", "method (auto)", "two-pass", "TFLOP/s", "one-pass", "TFLOP/s", "speedup", "max abs diff",
            "same selection", "scratch MB/head", "scratch MB (peak)"]
    lines = ["", "xattention one-pass vs two-pass (kernels/triton/antidiag_score_onepass.py; default tiles, same "
             "inputs; TFLOP/s of the tensor-core work each does):", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['context'] // 1024}K", str(r.get("estimation_method", "—")), _fmt(r.get("two_pass_ms")),
            _fmt(r.get("two_pass_tflops"), 0), _fmt(r.get("one_pass_ms")), _fmt(r.get("one_pass_tflops"), 0),
            _fmt(r.get("one_pass_speedup")),
            f"{r['one_pass_max_abs_diff']:.1e}" if "one_pass_max_abs_diff" in r else "—",
            str(r.get("one_pass_same_selection", "—")), _fmt(r.get("one_pass_scratch_mb_per_head"), 0),
            _fmt(r.get("one_pass_scratch_mb"), 0)]) + " |")
    f8 = [r for r in rows if "fp8_ms" in r]
    if f8:
        head = ["context", "one-pass bf16", "one-pass fp8 (quantisation incl.)", "TFLOP/s", "speedup",
                "max abs diff", "kept blocks fp8 / bf16", "selection agreement"]
        lines += ["", "xattention FP8 operands (kernels/triton/fp8_quant.py: e4m3 copies of q and "
                  "centred k, a scale per group of stride tokens) vs bf16, both one-pass, ms:", "",
                  "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in f8:
            lines.append("| " + " | ".join([
                f"{r['context'] // 1024}K", _fmt(r.get("one_pass_ms")), _fmt(r.get("fp8_ms")),
                _fmt(r.get("fp8_tflops"), 0), _fmt(r["one_pass_ms"] / r["fp8_ms"]) if "one_pass_ms" in r else "—",
                f"{r['fp8_max_abs_diff']:.1e}", _fmt(r.get("fp8_kept_blocks_ratio"), 3),
                _fmt(r.get("fp8_selection_agreement"), 4)]) + " |")
    return lines


def _select_lines(rows, xatt_rows):
    """Markdown of the selection section; shares against the XAttention section's sparse attention time."""
    sparse = {r["context"]: r.get("sparse_attention_ms") for r in xatt_rows}
    head = ["context", "rows x key blocks", "threshold: torch", "threshold: triton", "same layout", "top-n: torch",
            "top-n: triton", "same layout", "triton threshold / sparse attention"]
    lines = ["", "## select (triton): block selection straight to the BlockLayout vs the torch sort path", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        sp = sparse.get(r["context"])
        share = r["threshold_triton_ms"] / sp if sp and "threshold_triton_ms" in r else None
        lines.append("| " + " | ".join([
            f"{r['context'] // 1024}K", f"{r.get('rows', '—')} x {r.get('n_k_blocks', '—')}",
            _fmt(r.get("threshold_torch_ms"), 3), _fmt(r.get("threshold_triton_ms"), 3),
            str(r.get("threshold_same_layout", "—")), _fmt(r.get("topn_torch_ms"), 3),
            _fmt(r.get("topn_triton_ms"), 3), str(r.get("topn_same_layout", "—")), _pct(share)]) + " |")
    errors = [f"- {r['context']}: {k} = {v}" for r in rows for k, v in r.items() if k.endswith("error")]
    if errors:
        lines += ["", "Errors:", *errors]
    return lines


def _section_lines(title, rows, extra_cols):
    """Markdown table of one estimation section (columns: context, kept density, recall, estimation, best tiles,
    extra, plan, sparse attention, shares, torch reference)."""
    head = ["context", "kept density", "recall", "estimation", "best tiles", *[c for c, _ in extra_cols],
            "plan (est. + selection + layout)", "sparse attention", "est. / sparse", "plan / sparse", "torch ref. est.",
            "max abs err"]
    lines = ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['context'] // 1024}K", _pct(r.get("kept_density")), _fmt(r.get("recall"), 3),
            _fmt(r.get("estimation_ms"), 3), _fmt(r.get("estimation_best_ms"), 3),
            *[_fmt(r.get(key), 3) for _, key in extra_cols],
            _fmt(r.get("plan_ms")), _fmt(r.get("sparse_attention_ms")),
            _pct(r.get("estimation_share_of_sparse")), _pct(r.get("plan_share_of_sparse")),
            _fmt(r.get("reference_estimation_ms")),
            f"{r['max_abs_err_vs_reference']:.1e}" if "max_abs_err_vs_reference" in r else "—"]) + " |")
    for r in rows:
        if r.get("tuning"):
            lines += ["", f"{r['context'] // 1024}K tile configs (default in the table):", ""]
            lines += [f"- {json.dumps(t['config'])}: {_fmt(t.get('ms'), 3) if 'ms' in t else t['error']}"
                      for t in r["tuning"]]
    errors = [f"- {r['context']}: {k} = {v}" for r in rows for k, v in r.items() if k.endswith("error")]
    if errors:
        lines += ["", "Errors:", *errors]
    return lines


def _fmt(x, nd=2):
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}%"


def write(results, out):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    m = results["meta"]
    lines = [
        "# XAttention antidiagonal estimation (Triton) vs the sparse attention it feeds",
        "",
        f"- command: `{m['command']}`",
        f"- device: {m['device']}; date: {m['date']}; wall: {m.get('wall_s', 0):.0f} s",
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- shape: {json.dumps(m['shape'])}; medians of triton.testing.do_bench, ms",
        f"- inputs: {m['inputs']}",
        "",
    ]
    c = results.get("correctness", {})
    if c:
        lines += [f"Correctness vs torch reference ({c.get('context')}, bf16): " + (
            c["error"] if "error" in c else "; ".join(
                f"{name}: " + (c[f"{method}_error"] if f"{method}_error" in c else
                               f"max abs error {c['max_abs_err' + sfx]:.2e}, same selection at the threshold: "
                               f"{c['same_selection' + sfx]}")
                for name, method, sfx in (("two-pass", "two_pass", ""), ("one-pass", "one_pass", "_one_pass")))), ""]
    lines += ["| context | kept density | recall | estimation | best tiles | est. TFLOP/s | selection + layout | "
              "sparse attention | est. / sparse | (est. + sel.) / sparse | dense SDPA flash | est. / dense | "
              "prefill speedup | torch ref. est. |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        lines.append("| " + " | ".join([
            f"{r['context'] // 1024}K", _pct(r.get("kept_density")), _fmt(r.get("recall"), 3),
            _fmt(r.get("estimation_ms")), _fmt(r.get("estimation_best_ms")), _fmt(r.get("estimation_tflops"), 0),
            _fmt(r.get("selection_ms")), _fmt(r.get("sparse_attention_ms")),
            _pct(r.get("estimation_share_of_sparse")), _pct(r.get("plan_share_of_sparse")),
            _fmt(r.get("sdpa_flash_ms")), _pct(r.get("estimation_share_of_dense")),
            _fmt(r.get("prefill_speedup_vs_sdpa")), _fmt(r.get("reference_estimation_ms"))]) + " |")
    lines += _onepass_lines(results["rows"])
    for r in results["rows"]:
        if r.get("kept_density_per_kv_head"):
            lines.append(f"\n{r['context'] // 1024}K kept density per KV head (local span 256, 1K, 4K, 16K cycling): "
                         + ", ".join(_pct(x) for x in r["kept_density_per_kv_head"]))
        if "max_abs_err_vs_reference" in r:
            lines.append(f"\n{r['context'] // 1024}K max abs error vs torch reference: "
                         f"{r['max_abs_err_vs_reference']:.2e}")
        if r.get("tuning"):
            lines += ["", f"{r['context'] // 1024}K tile configs (default in the main table):", ""]
            lines += [f"- {t.get('method', '')} {json.dumps(t['config'])}: "
                      f"{_fmt(t.get('ms')) if 'ms' in t else t['error']}" for t in r["tuning"]]
    errors = [f"- {r['context']}: {k} = {v}" for r in results["rows"] for k, v in r.items() if k.endswith("_error")]
    if errors:
        lines += ["", "Errors:", *errors]
    if results.get("lastq_score"):
        lines += _section_lines(f"lastq_score: MInference last-{m['shape'].get('last_q', 64)}-query column/diagonal "
                                "mass (Triton) vs the vertical-slash attention it feeds", results["lastq_score"],
                                [("est. TFLOP/s", "estimation_tflops"), ("K read TB/s", "k_read_tb_s"),
                                 ("last-block (n=block) est.", "estimation_last_block_ms")])
        lines += _lastq_methods_lines(results["lastq_score"])
    if results.get("pooled_score"):
        lines += _section_lines("pooled_score: FlexPrefill mean-pooled block softmax (Triton) vs the block-sparse "
                                "attention of FlexPrefill's layout", results["pooled_score"],
                                [("q+k read TB/s", "read_tb_s")])
    if results.get("proxy_score"):
        lines += _section_lines("proxy_score: ProxyAttn proxy-head token-level block scores (Triton) vs the "
                                "block-sparse attention of ProxyPolicy's layout", results["proxy_score"],
                                [("est. TFLOP/s", "estimation_tflops")])
    if results.get("select"):
        lines += _select_lines(results["select"], results.get("rows", []))
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--stride", type=int, default=8)
    # defaults: the policies' own defaults (the settings the prefill benchmarks and the README use)
    from accel.policies import FlexPrefillPolicy, ProxyPolicy, XAttentionPolicy

    ap.add_argument("--threshold", type=float, default=XAttentionPolicy.threshold)
    ap.add_argument("--amp", type=float, default=1.0, help="amplitude of the shared slowly varying component")
    ap.add_argument("--sink-boost", type=float, default=8.0, help="logit gain of the sink keys")
    ap.add_argument("--reference-max", type=int, default=32768, help="time the torch reference up to this context")
    ap.add_argument("--tune", action="store_true", default=True, help="time other tile configs")
    ap.add_argument("--no-tune", dest="tune", action="store_false")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sections", nargs="+", default=["xattention", "lastq_score", "pooled_score", "proxy_score",
                                                      "select"],
                    choices=["xattention", "lastq_score", "pooled_score", "proxy_score", "select"],
                    help="which estimators to time")
    ap.add_argument("--last-q", type=int, default=64, help="lastq_score: MInference's number of last queries")
    ap.add_argument("--vertical", type=int, default=1000, help="lastq_score: vertical columns kept per head")
    ap.add_argument("--slash", type=int, default=6096, help="lastq_score: diagonals kept per head")
    ap.add_argument("--flex-gamma", type=float, default=FlexPrefillPolicy.gamma, help="pooled_score: FlexPrefill's gamma")
    ap.add_argument("--flex-tau", type=float, default=0.1, help="pooled_score: FlexPrefill's tau")
    ap.add_argument("--proxy-stride", type=int, default=8, help="proxy_score: ProxyAttn's query sampling stride")
    ap.add_argument("--proxy-gamma", type=float, default=ProxyPolicy.gamma,
                    help="proxy_score / select: ProxyAttn's gamma")
    ap.add_argument("--out", default="results/bench_estimation")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_estimation needs a CUDA GPU")
    device = torch.device("cuda")
    t_start = time.time()

    import triton

    results = {"meta": {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "shape": {"batch": 1, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.dim,
                  "dtype": "bfloat16", "block": args.block, "stride": args.stride, "threshold": args.threshold,
                  "causal": True, "last_q": args.last_q, "vertical": args.vertical, "slash": args.slash,
                  "flex_gamma": args.flex_gamma, "flex_tau": args.flex_tau, "proxy_stride": args.proxy_stride,
                  "proxy_gamma": args.proxy_gamma},
        "inputs": (f"structured: per KV head a shared slowly varying component (anchors every 256/1K/4K/16K tokens, "
                   f"amp {args.amp}) in q and k, 16 sink keys (logit gain ~{args.sink_boost}), N(0,1) noise; "
                   f"v ~ N(0,1)"),
    }, "rows": []}
    if not args.skip_check and "xattention" in args.sections:
        try:
            results["correctness"] = correctness(args, device)
        except Exception as e:  # noqa: BLE001
            results["correctness"] = {"error": _err(e)}
        print("correctness:", json.dumps(results["correctness"]), flush=True)
    for S in args.contexts:
        if "xattention" in args.sections:
            try:
                row = run_context(args, S, device)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory generating inputs
                row = {"context": S, "error": _err(e)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        try:
            other = run_other_sections(args, S, device)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory generating inputs
            other = {name: {"context": S, "error": _err(e)} for name in ("lastq_score", "pooled_score", "proxy_score",
                                                                        "select") if name in args.sections}
        for name, row in other.items():
            results.setdefault(name, []).append(row)
    results["meta"]["wall_s"] = time.time() - t_start
    write(results, args.out)


if __name__ == "__main__":
    main()
