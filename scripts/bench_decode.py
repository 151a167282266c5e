"""Decode attention benchmark (GPU): sparse decode (Quest page scoring + top-k + split-KV over selected pages)
versus dense decode (torch SDPA, FlashAttention when installed, our split-KV kernel over every key).

    python scripts/bench_decode.py --out results                 # Llama-3.1-8B head shape, 32K/128K, batch 1/8
    python scripts/bench_decode.py --contexts 131072 --batches 4 --budget 4096

Per case: median ms of one decode step of one layer's attention, page scoring included, timed two ways: with CUDA
events around eager launches (``triton.testing.do_bench``: what an eager decode loop pays, launch overhead
included) and as a replayed CUDA graph (``do_bench_cudagraph``: GPU time only, what a static-cache step under
torch.compile or a captured graph pays). Also the byte floor of each method (dense: K+V; quest: page bounds +
selected pages; quest with a reused selection: selected pages only) and the speedups versus SDPA. ``quest_static``
is the static-cache form (one custom op: scoring, masking, top-k, attention; kernels/static_decode.py). Every sparse
output is first checked against the torch twin.
Writes results/bench_decode.{json,md}. Not run in CPU sessions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch


def bench_case(B, ctx, hq, hkv, d, budget, page, dtype, timers, bounds: str = "fp8"):
    import torch.nn.functional as F

    from accel.kernels import reference_decode as R
    from accel.kernels.triton.decode_attention import paged_decode_attention
    from accel.kernels.triton.decode_score import quest_scores
    from accel.kernels.triton.decode_topk import select_pages
    from accel.kernels.static_decode import quest_static_decode
    from accel.kernels.triton.select_attend import select_attend

    dev = "cuda"
    q = torch.randn(B, hq, 1, d, device=dev, dtype=dtype)
    k = torch.randn(B, hkv, ctx, d, device=dev, dtype=dtype)
    v = torch.randn(B, hkv, ctx, d, device=dev, dtype=dtype)
    kmin, kmax = R.page_bounds(k, page, R.BOUNDS_FP8 if bounds == "fp8" else None)
    n_keep = budget // page

    def quest():
        s = quest_scores(q, kmin, kmax, page_size=page)
        p, c = select_pages(s, n_keep, kv_len=ctx, page_size=page)
        return paged_decode_attention(q, k, v, p, c, page)

    s = quest_scores(q, kmin, kmax, page_size=page)
    pages, counts = select_pages(s, n_keep, kv_len=ctx, page_size=page)
    ref = R.paged_decode_attention(q, k, v, pages, counts, page)
    torch.testing.assert_close(quest().float(), ref.float(), atol=2e-2, rtol=2e-2)
    dense_ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(paged_decode_attention(q, k, v).float(), dense_ref.float(), atol=2e-2, rtol=2e-2)

    length = torch.tensor(ctx, device=dev)

    def quest_static():
        return quest_static_decode(q, k, v, kmin, kmax, length, None, n_keep, page, "max", d**-0.5, 0.0, True)

    torch.testing.assert_close(quest_static().float(), ref.float(), atol=2e-2, rtol=2e-2)

    def quest_fused():  # the top-k inside the split launch (kernels/triton/select_attend.py)
        return select_attend(q, k, v, quest_scores(q, kmin, kmax, page_size=page), n_keep, kv_len=ctx, page_size=page)

    torch.testing.assert_close(quest_fused().float(), ref.float(), atol=2e-2, rtol=2e-2)
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "triton_dense": lambda: paged_decode_attention(q, k, v),
        "quest_score": lambda: quest_scores(q, kmin, kmax, page_size=page),
        "quest_topk": lambda: select_pages(s, n_keep, kv_len=ctx, page_size=page),
        "quest_attn_only": lambda: paged_decode_attention(q, k, v, pages, counts, page),
        "quest_total": quest,
        "quest_static": quest_static,
        "quest_fused": quest_fused,
    }
    try:  # FA4 dense decode (one query row), when flash-attn-4 is installed
        from flash_attn.cute import flash_attn_func

        qf, kf, vf = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        flash_attn_func(qf, kf, vf, causal=False)
        fns["fa4"] = lambda: flash_attn_func(qf, kf, vf, causal=False)
    except Exception as e:  # noqa: BLE001 - optional
        print(f"FA4 decode skipped: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
    t = {name: {tn: timer(fn) for tn, timer in timers.items()} for name, fn in fns.items()}
    el = k.element_size()
    dense_bytes = 2 * B * hkv * ctx * d * el
    meta_bytes = 2 * B * hkv * (ctx // page) * d * kmin.element_size()
    sel_bytes = 2 * B * hkv * min(budget, ctx) * d * el
    return {"batch": B, "context": ctx, "budget": budget, "page": page, "bounds": bounds, "ms": t,
            "floor_speedup_quest": dense_bytes / (meta_bytes + sel_bytes),
            "floor_speedup_reused": dense_bytes / sel_bytes,
            "speedup": {tn: {"quest": t["sdpa"][tn] / t["quest_total"][tn],
                             "quest_static": t["sdpa"][tn] / t["quest_static"][tn],
                             "quest_fused": t["sdpa"][tn] / t["quest_fused"][tn],
                             "reused": t["sdpa"][tn] / t["quest_attn_only"][tn]} for tn in timers}}


def _write_sweep(out: str, stem: str, rows: list, md: list[str]) -> None:
    """A sweep's rows as ``out/stem.json`` and its table as ``out/stem.md`` (printed too)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def topk_sweep(contexts, batches, hkv, budget, page, out) -> None:
    """Top-k page selection alone (graph-replayed median ms) over the search's cuts per pass (1: bisection, 2: two
    counts packed in one reduction) and warps, on Gaussian rows and on Quest score rows: picks decode_topk.N_CUTS /
    _warps. Every setting is checked against the torch twin first."""
    from triton.testing import do_bench_cudagraph

    from accel.kernels import reference_decode as R
    from accel.kernels.triton.decode_topk import select_pages

    rows = []
    for B in batches:
        for ctx in contexts:
            q = torch.randn(B, hkv * 4, 1, 128, device="cuda", dtype=torch.bfloat16)
            kmin, kmax = R.page_bounds(torch.randn(B, hkv, ctx, 128, device="cuda", dtype=torch.bfloat16), page)
            n_keep = budget // page
            for kind, s in (("gaussian", torch.randn(B, hkv, ctx // page, device="cuda")),
                            ("quest", R.quest_scores(q, kmin, kmax).float())):
                ref = R.select_pages(s, n_keep, kv_len=ctx, page_size=page)
                for nc in (1, 2):
                    for w in (4, 8, 16):
                        got = select_pages(s, n_keep, kv_len=ctx, page_size=page, n_cuts=nc, num_warps=w)
                        assert torch.equal(got[0], ref[0]), (nc, w)
                        ms = do_bench_cudagraph(lambda: select_pages(s, n_keep, kv_len=ctx, page_size=page,
                                                                     n_cuts=nc, num_warps=w))
                        rows.append({"batch": B, "context": ctx, "rows": kind, "n_cuts": nc, "warps": w, "ms": ms})
                        print(json.dumps(rows[-1]))
    md = [f"# Top-k page selection: search sweep ({torch.cuda.get_device_name()}, {hkv} KV heads, page {page}, "
          f"budget {budget})", "", f"`python scripts/bench_decode.py --topk-sweep --contexts "
          f"{','.join(map(str, contexts))} --batches {','.join(map(str, batches))}`; graph-replayed median us. "
          "Cuts per pass: 1 = bisection, 2 = two counts packed in one int32 reduction (ternary search). Rows: "
          "N(0, 1) scores, or Quest criticality of random bf16 keys (32 query heads).", "",
          "| batch | context | rows | cuts per pass | 4 warps | 8 | 16 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for B in batches:
        for ctx in contexts:
            for kind in ("gaussian", "quest"):
                for nc in (1, 2):
                    cells = [f"{r['ms'] * 1e3:.1f}" for r in rows
                             if (r["batch"], r["context"], r["rows"], r["n_cuts"]) == (B, ctx, kind, nc)]
                    md.append(f"| {B} | {ctx} | {kind} | {nc} | " + " | ".join(cells) + " |")
    _write_sweep(out, "bench_decode_topk", rows, md)


def _checked_topk_ms(ref, label, **kw) -> float:
    """``select_pages(**kw)`` checked against the torch twin's (pages, counts) ``ref``, then its graph-replayed ms."""
    from triton.testing import do_bench_cudagraph

    from accel.kernels.triton.decode_topk import select_pages

    got = select_pages(**kw)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), label
    return do_bench_cudagraph(lambda: select_pages(**kw))


def topk_tail(batches, hkv, budget, page, out) -> None:
    """Top-k over rows just past a power of two (a static cache of 128K + a few tokens has 8193+ pages): the row in
    one power-of-two block against a power-of-two block plus a tail block (decode_topk.blocks), graph-replayed, each
    checked against the torch twin first."""
    from accel.kernels import reference_decode as R
    from accel.kernels.triton.decode_topk import blocks

    rows = []
    n_keep = budget // page
    for B in batches:
        for n_pages in (8192, 8193, 8200, 8256, 12000):
            s = torch.randn(B, hkv, n_pages, device="cuda")
            ref = R.select_pages(s, n_keep, kv_len=n_pages * page, page_size=page)
            row = {"batch": B, "pages": n_pages, "blocks": list(blocks(n_pages))}
            for name, tail, length in (("one", False, n_pages * page), ("tail", True, n_pages * page),
                                       ("tail_device_len", True, torch.tensor(n_pages * page, device="cuda"))):
                row[name] = _checked_topk_ms(ref, (n_pages, name), scores=s, k=n_keep, kv_len=length,
                                             page_size=page, tail_block=tail)
            rows.append(row)
            print(json.dumps(row))
    md = [f"# Top-k page selection past a power of two ({torch.cuda.get_device_name()}, {hkv} KV heads, page "
          f"{page}, budget {budget})", "", "`python scripts/bench_decode.py --topk-tail --batches "
          f"{','.join(map(str, batches))}`; graph-replayed median us over N(0, 1) rows. one block: the row in one "
          "power-of-two block (the kernel before the tail block); main + tail: the largest power of two that fits "
          "plus a power-of-two block for the rest; device length: the same, the length read from a tensor (the "
          "static-cache path).", "",
          "| batch | pages | blocks (main, tail) | one block | main + tail | main + tail, device length | gain |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['batch']} | {r['pages']} | {tuple(r['blocks'])} | {r['one'] * 1e3:.1f} | "
                  f"{r['tail'] * 1e3:.1f} | {r['tail_device_len'] * 1e3:.1f} | {r['one'] / r['tail']:.2f}x |")
    _write_sweep(out, "bench_decode_topk_tail", rows, md)


def _topk_rows(B, ctx, hkv, page):
    """Quest criticality rows of random bf16 keys (32 query heads, page ``page``) and LServe's physical-page rows
    (each 4 * page tokens, the max of 4 logical pages) of a static cache of ``ctx + 1`` tokens: spare pages past the
    length score NaN. Yields (kind, scores, page size, length, filled pages)."""
    from accel.kernels import reference_decode as R

    q = torch.randn(B, hkv * 4, 1, 128, device="cuda", dtype=torch.bfloat16)
    kmin, kmax = R.page_bounds(torch.randn(B, hkv, ctx + 4 * page, 128, device="cuda", dtype=torch.bfloat16), page)
    quest = R.quest_scores(q, kmin, kmax).float()
    length = ctx + 1  # the newest page holds one token, the last page none
    for kind, s, pg in (("quest", quest, page), ("lserve", quest.unflatten(-1, (-1, 4)).amax(-1), 4 * page)):
        n_filled = -(-length // pg)
        s = s.clone()
        s[..., n_filled:] = float("nan")
        yield kind, s, pg, length, n_filled


def _time_topk_variants(contexts, batches, hkv, budget, page, variants: dict) -> list:
    """Each ``select_pages`` keyword set of ``variants`` (name -> kwargs) on the rows of ``_topk_rows``, checked
    against the torch twin, then graph-replayed: one row per (batch, context, kind) with a time per variant."""
    from accel.kernels import reference_decode as R

    rows = []
    for B in batches:
        for ctx in contexts:
            for kind, s, pg, length, n_filled in _topk_rows(B, ctx, hkv, page):
                k = budget // pg
                ref = R.select_pages(s[..., :n_filled], k, kv_len=length, page_size=pg)
                dev_len = torch.tensor(length, device="cuda")
                row = {"batch": B, "context": ctx, "rows": kind, "pages": s.shape[-1], "k": k}
                for name, kw in variants.items():
                    row[name] = _checked_topk_ms(ref, (kind, name), scores=s, k=k, kv_len=dev_len, page_size=pg,
                                                 **kw)
                rows.append(row)
                print(json.dumps(row))
    return rows


def topk_range(contexts, batches, hkv, budget, page, out) -> None:
    """Top-k with the search starting on the finite scores' range against the whole range (+inf of the forced newest
    page included), on Quest rows (page 16) and LServe rows (each 64-token physical page the max of its 4 logical
    pages) of a static cache (spare pages past the length, read on the device, scoring NaN), graph-replayed, each
    checked against the torch twin first."""
    rows = _time_topk_variants(contexts, batches, hkv, budget, page, {
        "whole": {"search": "ternary", "finite_range": False}, "finite": {"search": "ternary", "finite_range": True}})
    md = [f"# Top-k page selection: where the search starts ({torch.cuda.get_device_name()}, {hkv} KV heads, "
          f"budget {budget})", "", "`python scripts/bench_decode.py --topk-range --contexts "
          f"{','.join(map(str, contexts))} --batches {','.join(map(str, batches))}`; graph-replayed median us. "
          "Rows: Quest criticality of random bf16 keys (32 query heads, page 16), LServe's physical pages (64 "
          "tokens: the max of 4 logical pages); a static cache's row (length read on the device, NaN past it). "
          "whole: the search starts on every valid key's range, up to the +inf of the forced newest page (the kernel "
          "before); finite: on the finite scores' range, the infinite keys counted.", "",
          "| batch | context | rows | pages | k | whole range | finite range | gain |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['batch']} | {r['context']} | {r['rows']} | {r['pages']} | {r['k']} | {r['whole'] * 1e3:.1f} | "
           f"{r['finite'] * 1e3:.1f} | {r['whole'] / r['finite']:.2f}x |" for r in rows]
    _write_sweep(out, "bench_decode_topk_range", rows, md)


def score_tiles(batches, hkv, out, layers: int = 32) -> None:
    """Quest page scoring alone over ``layers`` layers, each with its own page bounds, replayed as one graph (L2 as
    cold as in a model step): per-layer us over pages per program and warps, for Quest (every KV head, pages of 16)
    and LServe (half the KV heads through a head map, each 64-token physical page the max of 4 logical pages), 128K
    plus the spare pages of a static cache. Every setting is checked against the kernel's default first."""
    from bench_utils import graph_of, replay_ms

    from accel.kernels.triton.decode_score import quest_scores

    ctx, d, G, page = 131072, 128, 4, 16
    n_pages = ctx // page + 4
    rows = []
    for case in ("quest", "lserve"):
        hr = hkv if case == "quest" else hkv // 2
        heads = dict(kv_heads=torch.arange(hr, device="cuda", dtype=torch.int32), group=G) if case == "lserve" else {}
        merge = 4 if case == "lserve" else 1
        for B in batches:
            g = torch.Generator(device="cuda").manual_seed(0)
            layer_in = []
            for _ in range(layers):
                mn = torch.randn(B, hr, n_pages, d, device="cuda", dtype=torch.bfloat16, generator=g)
                layer_in.append((torch.randn(B, hkv * G, 1, d, device="cuda", dtype=torch.bfloat16, generator=g),
                                 mn, mn + torch.rand_like(mn)))
            ref = quest_scores(*layer_in[0], merge=merge, **heads)
            for bp in (32, 64, 128):
                for w in (2, 4, 8):
                    got = quest_scores(*layer_in[0], merge=merge, block_p=bp, num_warps=w, **heads)
                    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3), (case, bp, w)

                    def run(bp=bp, w=w):
                        return [quest_scores(*a, merge=merge, block_p=bp, num_warps=w, **heads) for a in layer_in]
                    run()
                    us = replay_ms(graph_of(run)) * 1e3 / layers
                    mb = 2 * B * hr * n_pages * d * 2 / 1e6
                    rows.append({"case": case, "batch": B, "block_p": bp, "warps": w, "us": us, "MB": mb,
                                 "TBps": mb / us})  # MB per us = TB/s
                    print(json.dumps(rows[-1]))
    md = [f"# Quest page scoring over {layers} layers in one graph: pages per program and warps "
          f"({torch.cuda.get_device_name()}, 128K, {hkv * G}/{hkv}/{d})", "",
          f"`python scripts/bench_decode.py --score-tiles --batches {','.join(map(str, batches))}`; median us per "
          "layer (L2 as cold as in a model step); MB = page bounds read per layer; the kernel's default is 64 pages, "
          "4 warps", "", "| case | batch | pages per program | warps | us | MB | TB/s |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['case']} | {r['batch']} | {r['block_p']} | {r['warps']} | {r['us']:.2f} | {r['MB']:.1f} | "
           f"{r['TBps']:.2f} |" for r in rows]
    _write_sweep(out, "bench_decode_score_tiles", rows, md)


def split_sweep(batches, hkv, budget, out) -> None:
    """The split-KV attention alone (graph-replayed median us) over splits, warps and stages, for the three decode
    shapes of a 128K step: dense (every key), Quest (``budget`` tokens in pages of 16) and LServe (half of the KV
    heads over ``budget`` tokens in pages of 64 plus one spare, the other half over a 320-slot ring, one launch).
    Picks the split heuristic of decode_attention.py. Each setting is checked against the auto setting first."""
    from triton.testing import do_bench_cudagraph

    from accel.kernels.triton.decode_attention import paged_decode_attention

    ctx, d, G = 131072, 128, 4
    rows = []
    for B in batches:
        g = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(B, hkv, ctx, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        q = torch.randn(B, hkv * G, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
        end = torch.tensor(ctx, device="cuda")
        hr = hkv // 2
        ring_k = torch.randn(B, hkv - hr, 320, d, device="cuda", dtype=torch.bfloat16, generator=g)
        ring_v = torch.randn_like(ring_k)
        heads_r = torch.arange(hr, device="cuda", dtype=torch.int32)
        heads_s = torch.arange(hr, hkv, device="cuda", dtype=torch.int32)
        n16, n64 = budget // 16, budget // 64 + 1
        p16 = torch.stack([torch.randperm(ctx // 16, device="cuda")[:n16].sort().values for _ in range(B * hkv)])
        p64 = torch.stack([torch.randperm(ctx // 64, device="cuda")[:n64].sort().values for _ in range(B * hr)])
        p16 = p16.view(B, hkv, n16).to(torch.int32)
        p64 = p64.view(B, hr, n64).to(torch.int32)
        c16 = torch.full((B, hkv), n16, device="cuda", dtype=torch.int32)
        c64 = torch.full((B, hr), n64, device="cuda", dtype=torch.int32)
        o = torch.empty_like(q)
        cases = {
            "dense": lambda **kw: paged_decode_attention(q, k, v, kv_end=end, **kw),
            "quest": lambda **kw: paged_decode_attention(q, k, v, p16, c16, 16, kv_end=end, **kw),
            "lserve": lambda **kw: paged_decode_attention(q, k[:, :hr], v[:, :hr], p64, c64, 64, kv_end=end,
                                                          kv_heads=heads_r,
                                                          group=G, out=o, ring=(ring_k, ring_v, heads_s), **kw),
        }
        for name, fn in cases.items():
            ref = fn().clone()
            for ns in (None, 4, 8, 16, 32, 64, 128):
                for w in (4, 8):
                    for st in (2, 3, 4):
                        kw = dict(n_splits=ns, num_warps=w, num_stages=st)
                        torch.testing.assert_close(fn(**kw), ref, atol=2e-2, rtol=2e-2)
                        ms = do_bench_cudagraph(lambda: fn(**kw))
                        rows.append({"batch": B, "case": name, "n_splits": ns or "auto", "warps": w, "stages": st,
                                     "us": ms * 1e3})
                        print(json.dumps(rows[-1]), flush=True)
    md = [f"# Split-KV decode attention: splits / warps / stages sweep ({torch.cuda.get_device_name()}, 128K, "
          f"{hkv * G}/{hkv}/{d}, budget {budget})", "",
          f"`python scripts/bench_decode.py --split-sweep --batches {','.join(map(str, batches))}`; graph-replayed "
          "median us; lserve = half the KV heads over the selected 64-token pages + the other half over a 320-slot "
          "ring in one launch", "", "| batch | case | splits | warps | stages 2 | 3 | 4 |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for B in batches:
        for name in ("dense", "quest", "lserve"):
            for ns in ("auto", 4, 8, 16, 32, 64, 128):
                for w in (4, 8):
                    cells = [f"{r['us']:.1f}" for r in rows if (r["batch"], r["case"], r["n_splits"], r["warps"])
                             == (B, name, ns, w)]
                    md.append(f"| {B} | {name} | {ns} | {w} | " + " | ".join(cells) + " |")
    _write_sweep(out, "bench_decode_splits", rows, md)


def _layer_calls(case: str, B: int, hkv: int, budget: int, layers: int, ctx: int = 131072, d: int = 128,
                 G: int = 4) -> list:
    """``layers`` split-KV calls of one decode case, each over its own K/V (so a graph of them reads from a cold L2,
    as a model step does), each taking the launch overrides as a dict: dense (every key), quest (``budget``
    tokens in pages of 16), lserve (half the KV heads over 64-token pages plus a spare, the other half over a
    320-slot ring, one launch), tidal (``budget`` random token positions, page size 1, one set for every KV head as
    the policy selects them; the results committed before that change drew one set per KV head)."""
    from accel.kernels.triton.decode_attention import paged_decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    end = torch.tensor(ctx, device="cuda")
    hr, page = {"lserve": (hkv // 2, 64), "tidal": (hkv, 1)}.get(case, (hkv, 16))
    n = budget // page + (case == "lserve")
    heads_r = torch.arange(hr, device="cuda", dtype=torch.int32)
    heads_s = torch.arange(hr, hkv, device="cuda", dtype=torch.int32)
    calls = []
    for _ in range(layers):
        k = torch.randn(B, hr, ctx, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        q = torch.randn(B, hkv * G, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
        if case == "dense":
            calls.append(lambda kw, a=(q, k, v): paged_decode_attention(*a, kv_end=end, **kw))
            continue
        rows = B if case == "tidal" else B * hr  # tidal: one set of positions shared by every KV head
        p = torch.stack([torch.randperm(ctx // page, device="cuda", generator=g)[:n].sort().values
                         for _ in range(rows)]).view(B, -1, n).to(torch.int32).expand(B, hr, n)
        c = torch.full((B, hr), n, device="cuda", dtype=torch.int32)
        if case == "lserve":
            rk = torch.randn(B, hkv - hr, 320, d, device="cuda", dtype=torch.bfloat16, generator=g)
            ring = (rk, torch.randn_like(rk), heads_s)
            o = torch.empty_like(q)
            calls.append(lambda kw, a=(q, k, v, p, c), ring=ring, o=o: paged_decode_attention(
                *a, 64, kv_end=end, kv_heads=heads_r, group=G, out=o, ring=ring, **kw))
        else:
            calls.append(lambda kw, a=(q, k, v, p, c), page=page: paged_decode_attention(*a, page, kv_end=end, **kw))
    return calls


def _per_layer_us(calls, kw, check: list | None = None) -> float:
    """Median us per call of ``calls`` (each with launch overrides ``kw``) replayed as one graph; with ``check``
    (the outputs of the kernel's own launch) the outputs are compared with it first."""
    from bench_utils import graph_of, replay_ms

    def run():
        return [f(kw) for f in calls]
    outs = run()
    for o, r in zip(outs, check or []):
        torch.testing.assert_close(o, r, atol=2e-2, rtol=2e-2)
    return replay_ms(graph_of(run)) * 1e3 / len(calls)


def split_stages(batches, hkv, budget, out, layers: int = 32) -> None:
    """The split-KV attention (split + combine) of ``layers`` layers, each over its own K/V, replayed as one graph:
    per-layer us with the L2 cache as cold as in a model step (the isolated sweep's selected pages stay in L2).
    Quest (every KV head, ``budget`` tokens in pages of 16) and LServe (half the KV heads over 64-token pages plus
    a spare, the other half over a 320-slot ring), 128K: pipeline stages 1/2/3 against the kernel's own choice."""
    rows = []
    for case in ("lserve", "quest"):
        for B in batches:
            calls = _layer_calls(case, B, hkv, budget, layers)
            row = {"case": case, "batch": B, "auto": _per_layer_us(calls, {})}
            for st in (1, 2, 3):
                row[f"stages {st}"] = _per_layer_us(calls, {"num_stages": st})
            rows.append(row)
            print(json.dumps(row), flush=True)
            del calls
            torch.cuda.empty_cache()
    md = [f"# Split-KV decode attention over {layers} layers in one graph: pipeline stages "
          f"({torch.cuda.get_device_name()}, 128K, {hkv * 4}/{hkv}/128, budget {budget})", "",
          f"`python scripts/bench_decode.py --split-stages --batches {','.join(map(str, batches))}`; median us per "
          "layer (split + combine, L2 as cold as in a model step); auto = the kernel's choice (decode_attention."
          "_stages: 1 stage for up to 2 blocks per program, 2 for up to 4, else Triton's default 3)", "",
          "| case | batch | auto | stages 1 | stages 2 | stages 3 |", "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['case']} | {r['batch']} | {r['auto']:.2f} | {r['stages 1']:.2f} | {r['stages 2']:.2f} | "
           f"{r['stages 3']:.2f} |" for r in rows]
    _write_sweep(out, "bench_decode_stages", rows, md)


def tile_sweep(batches, hkv, budget, out, layers: int = 32) -> None:
    """Every decode case's split-KV attention (``_layer_calls``: dense, quest, lserve, tidal; 128K, ``layers``
    layers in one graph, L2 cold) at key tiles (block_n) of 64 and 128 by pipeline stages 1/2/3, splits as the
    kernel picks them, against the kernel's own launch; each setting checked against it first."""
    settings = [dict(block_n=bn, num_stages=st) for bn in (64, 128) for st in (1, 2, 3)]
    rows = []
    for case in ("tidal", "quest", "lserve", "dense"):
        for B in batches:
            calls = _layer_calls(case, B, hkv, budget, layers)
            ref = [f({}).clone() for f in calls]
            row = {"case": case, "batch": B, "default": _per_layer_us(calls, {})}
            for kw in settings:
                row[f"{kw['block_n']}/{kw['num_stages']}"] = _per_layer_us(calls, kw, ref)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del calls, ref
            torch.cuda.empty_cache()
    keys = [f"{kw['block_n']}/{kw['num_stages']}" for kw in settings]
    md = [f"# Split-KV decode attention: key tile x pipeline stages, every decode case "
          f"({torch.cuda.get_device_name()}, 128K, {hkv * 4}/{hkv}/128, budget {budget})", "",
          f"`python scripts/bench_decode.py --tile-sweep --batches {','.join(map(str, batches))}`; median us per layer "
          f"over a {layers}-layer graph (split + combine, L2 cold); default = the kernel's own launch; columns: "
          "block_n / stages, splits as the kernel picks them for that tile", "",
          "| case | batch | default | " + " | ".join(keys) + " |", "| --- " * (3 + len(keys)) + "|"]
    md += [f"| {r['case']} | {r['batch']} | {r['default']:.2f} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |"
           for r in rows]
    _write_sweep(out, "bench_decode_tiles", rows, md)


def token_sweep(batches, hkv, budget, out, layers: int = 32) -> None:
    """TidalDecode's sparse layers: the split-KV kernel over ``budget`` token positions per KV head (page size 1),
    128K, ``layers`` layers each over its own K/V in one graph (L2 cold as in a model step). Positions three ways:
    random as torch's unsorted top-k leaves them, the same sorted, and clustered (sorted runs of 64 consecutive
    tokens, as real attention's selections tend to be); launch settings: splits, block_n, warps, stages. Every
    setting is checked against the kernel's own choice first."""
    from accel.kernels.triton.decode_attention import paged_decode_attention

    ctx, d, G = 131072, 128, 4
    end = torch.tensor(ctx, device="cuda")
    settings = [dict()] + [dict(n_splits=ns, block_n=bn, num_warps=w, num_stages=st)
                           for ns in (None, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (1, 2)]
    rows = []

    def positions(kind, B, g):
        if kind == "clustered":
            starts = [torch.randperm(ctx // 64, device="cuda", generator=g)[:budget // 64] * 64
                      for _ in range(B * hkv)]
            p = torch.stack([(s[:, None] + torch.arange(64, device="cuda")).flatten().sort().values for s in starts])
        else:
            p = torch.stack([torch.randperm(ctx, device="cuda", generator=g)[:budget] for _ in range(B * hkv)])
            if kind == "sorted":
                p = p.sort(-1).values
        return p.view(B, hkv, budget).to(torch.int32).contiguous()

    for B in batches:
        g = torch.Generator(device="cuda").manual_seed(0)
        kv = [(torch.randn(B, hkv, ctx, d, device="cuda", dtype=torch.bfloat16, generator=g),
               torch.randn(B, hkv, ctx, d, device="cuda", dtype=torch.bfloat16, generator=g),
               torch.randn(B, hkv * G, 1, d, device="cuda", dtype=torch.bfloat16, generator=g))
              for _ in range(layers)]
        c = torch.full((B, hkv), budget, device="cuda", dtype=torch.int32)
        for kind in ("random", "sorted", "clustered"):
            calls = [lambda kw, a=(q, k, v, positions(kind, B, g)): paged_decode_attention(*a, c, 1, kv_end=end, **kw)
                     for k, v, q in kv]
            ref = [f({}).clone() for f in calls]
            for kw in settings:
                rows.append({"batch": B, "positions": kind, **{k: (v or "auto") for k, v in kw.items()},
                             "us": _per_layer_us(calls, kw, ref)})
                print(json.dumps(rows[-1]), flush=True)
        kv = calls = ref = None  # free this batch's layers before the next
        torch.cuda.empty_cache()
    md = [f"# Split-KV decode attention over token positions (TidalDecode's sparse layers; "
          f"{torch.cuda.get_device_name()}, 128K, {hkv * G}/{hkv}/{d}, {budget} positions per KV head)", "",
          f"`python scripts/bench_decode.py --token-sweep --batches {','.join(map(str, batches))}`; median us per "
          f"layer over a {layers}-layer graph (split + combine, L2 cold); default = the kernel's own launch; "
          "positions: random (unsorted, as torch's unsorted top-k leaves them), sorted, clustered (runs of 64)", "",
          "| batch | positions | default | best | best setting | worst |", "| --- | --- | --- | --- | --- | --- |"]
    for B in batches:
        for kind in ("random", "sorted", "clustered"):
            rs = [r for r in rows if r["batch"] == B and r["positions"] == kind]
            best = min(rs, key=lambda r: r["us"])
            setting = ", ".join(f"{k}={best[k]}" for k in ("n_splits", "block_n", "num_warps", "num_stages")
                                if k in best) or "default"
            md.append(f"| {B} | {kind} | {rs[0]['us']:.2f} | {best['us']:.2f} | {setting} | "
                      f"{max(r['us'] for r in rs):.2f} |")
    _write_sweep(out, "bench_decode_token_sweep", rows, md)


def logits_sweep(batches, hkv, out, layers: int = 4) -> None:
    """TidalDecode's selection layers: dense split-KV attention over every key that also writes each key's score
    (``logits=``), 128K, ``layers`` layers in one graph (L2 cold), over splits x key tiles x stages x warps, against
    cuDNN's SDPA and the same kernel without the scores on the same data; each setting checked against the
    kernel's own launch first."""
    import torch.nn.functional as F

    from accel.kernels.triton.decode_attention import paged_decode_attention

    ctx, d, G = 131072, 128, 4
    rows = []
    for B in batches:
        g = torch.Generator(device="cuda").manual_seed(0)
        end = torch.tensor(ctx, device="cuda")
        data = []
        for _ in range(layers):
            k = torch.randn(B, hkv, ctx, d, device="cuda", dtype=torch.bfloat16, generator=g)
            data.append((torch.randn(B, hkv * G, 1, d, device="cuda", dtype=torch.bfloat16, generator=g), k,
                         torch.randn_like(k), torch.empty(B, hkv * G, ctx, device="cuda")))

        # one call per layer, each taking the launch overrides (as ``_per_layer_us`` passes them)
        scored = [lambda kw, a=a: paged_decode_attention(*a[:3], kv_end=end, return_lse=True, logits=a[3], **kw)[0]
                  for a in data]
        plain = [lambda kw, a=a: paged_decode_attention(*a[:3], kv_end=end, return_lse=True, **kw)[0] for a in data]
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
            sdpa = _per_layer_us([lambda kw, a=a: F.scaled_dot_product_attention(a[0], a[1], a[2], enable_gqa=True)
                                  for a in data], {})
        ref = [f({}).clone() for f in scored]
        base = {"batch": B, "sdpa_cudnn": sdpa, "no_scores": _per_layer_us(plain, {}),
                "default": _per_layer_us(scored, {})}
        print(json.dumps(base), flush=True)
        for ns in (None, 8, 16, 32, 64, 128):
            for bn in (64, 128):
                for st in (1, 2, 3):
                    for w in (4, 8):
                        kw = dict(n_splits=ns, block_n=bn, num_stages=st, num_warps=w)
                        try:
                            t = _per_layer_us(scored, kw, ref)
                        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory at 128 x 3 stages
                            print(f"skip {kw}: {type(e).__name__}", flush=True)
                            continue
                        rows.append({**base, **kw, "n_splits": ns or "auto", "us": t})
                        print(json.dumps(rows[-1]), flush=True)
        data = scored = plain = ref = None  # free this batch's K/V before the next
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        if r["batch"] not in best or r["us"] < best[r["batch"]]["us"]:
            best[r["batch"]] = r
    md = [f"# Dense split-KV decode attention with scores (TidalDecode's selection layers) "
          f"({torch.cuda.get_device_name()}, 128K, {hkv * G}/{hkv}/{d})", "",
          f"`python scripts/bench_decode.py --logits-sweep --batches {','.join(map(str, batches))}`; median us per "
          f"layer over a {layers}-layer graph (split + combine, L2 cold)", "",
          "| batch | cuDNN SDPA | ours, no scores | ours with scores (default launch) | best with scores | its setting |",
          "| --- | --- | --- | --- | --- | --- |"]
    for B, r in best.items():
        md.append(f"| {B} | {r['sdpa_cudnn']:.1f} | {r['no_scores']:.1f} | {r['default']:.1f} | {r['us']:.1f} | "
                  f"splits {r['n_splits']}, block_n {r['block_n']}, stages {r['num_stages']}, warps {r['num_warps']} |")
    md += ["", "| batch | splits | block_n | stages | warps | us |", "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['batch']} | {r['n_splits']} | {r['block_n']} | {r['num_stages']} | {r['num_warps']} | {r['us']:.1f} |"
           for r in sorted(rows, key=lambda r: (r["batch"], r["us"]))]
    _write_sweep(out, "bench_decode_logits", rows, md)


def _quest_layers(B: int, hkv: int, G: int, S: int, d: int, page: int, n: int, g) -> list[tuple]:
    """``n`` layers' (q, k, v, kmin, kmax) for Quest over a static cache of S slots: random bf16 queries and keys,
    each layer its own (L2 as cold as in a model step)."""
    from accel.kernels import reference_decode as R

    out = []
    for _ in range(n):
        k = torch.randn(B, hkv, S, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        kmin, kmax = R.page_bounds(k, page)
        out.append((torch.randn(B, hkv * G, 1, d, device="cuda", dtype=torch.bfloat16, generator=g), k, v, kmin, kmax))
    return out


def select_attend_sweep(batches, hkv, budget, page, out, layers: int = 32) -> None:
    """Quest at 128K: scoring + top-k + split + combine (three launches after the scoring) against scoring + the
    top-k inside the split launch + combine (kernels/triton/select_attend.py) over its warps x splits x key tiles;
    per layer, one layer replayed as a graph (as the main table times it) and ``layers`` layers in one graph (each
    over its own K/V: L2 as cold as in a model step). SDPA over the same layers for the ratios; every setting checked
    against the two-launch output first."""
    import torch.nn.functional as F

    from accel.kernels.triton.decode_attention import paged_decode_attention
    from accel.kernels.triton.decode_score import quest_scores
    from accel.kernels.triton.decode_topk import select_pages
    from accel.kernels.triton.select_attend import select_attend

    ctx, d, G = 131072, 128, 4
    n_keep = budget // page
    end = torch.tensor(ctx + 48, device="cuda")  # a static cache of 128K + 48 slots, filled to 128K + 48
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for B in batches:
        g = torch.Generator(device="cuda").manual_seed(0)
        # ~17 GB of K/V per batch row over 32 layers: fewer at larger batches
        data = _quest_layers(B, hkv, G, ctx + 48, d, page, max(4, layers // B), g)

        def two(kw, a):
            s = quest_scores(a[0], a[3], a[4], page_size=page)
            p, c = select_pages(s, n_keep, kv_len=end, page_size=page)
            return paged_decode_attention(a[0], a[1], a[2], p, c, page, kv_end=end)

        def fused(kw, a):
            return select_attend(a[0], a[1], a[2], quest_scores(a[0], a[3], a[4], page_size=page), n_keep,
                                 kv_len=end, page_size=page, **kw)

        def sdpa(kw, a):
            return F.scaled_dot_product_attention(a[0], a[1], a[2], enable_gqa=True)

        def timed(fn, kw, check=None):
            many = [lambda kw, a=a: fn(kw, a) for a in data]
            return {"one": _per_layer_us(many[:1], kw, check[:1] if check else None),
                    "many": _per_layer_us(many, kw, check)}

        ref = [two({}, a).clone() for a in data]
        base = {"batch": B, "sdpa": timed(sdpa, {}), "two_launch": timed(two, {}, ref)}
        print(json.dumps(base), flush=True)
        auto = max(1, sms // (B * hkv))
        for w in (16,):  # 8 warps and twice the splits measured slower (results/bench_decode_select_attend.md)
            for ns in (None,):
                for bn in (128, 256):
                    kw = dict(num_warps=w, n_splits=ns, block_n=bn)
                    try:
                        t = timed(fused, kw, ref)
                    except Exception as e:  # noqa: BLE001 - e.g. out of registers / shared memory
                        print(f"skip {kw}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                        continue
                    rows.append({**base, **kw, "n_splits": ns or f"auto ({auto})", "fused": t})
                    print(json.dumps(rows[-1]), flush=True)
        rows.append({**base, "default": True, "fused": timed(fused, {}, ref)})
        print(json.dumps(rows[-1]), flush=True)
        data = ref = None
        torch.cuda.empty_cache()
    md = [f"# Quest's top-k inside the split launch ({torch.cuda.get_device_name()}, 128K + 48, {hkv * G}/{hkv}/{d}, "
          f"budget {budget}, page {page})", "",
          f"`python scripts/bench_decode.py --select-attend --batches {','.join(map(str, batches))}`; us per layer: "
          f"one = one layer replayed as a graph (the main table's timing), many = {layers} / batch layers (at least 4) "
          "in one graph (L2 cold); two-launch = scoring + top-k + split + combine; fused = scoring + select_attend (top-k in the "
          "split launch) + combine", "",
          "| batch | warps | splits | block_n | fused one | fused many | two-launch one | two-launch many | SDPA one | "
          "SDPA many | fused vs SDPA (one) | two-launch vs SDPA (one) |", "| --- " * 12 + "|"]
    for r in rows:
        f, t2, sd = r["fused"], r["two_launch"], r["sdpa"]
        setting = ("default", "", "") if r.get("default") else (r["num_warps"], r["n_splits"], r["block_n"])
        md.append(f"| {r['batch']} | {setting[0]} | {setting[1]} | {setting[2]} | {f['one']:.1f} | {f['many']:.1f} | "
                  f"{t2['one']:.1f} | {t2['many']:.1f} | {sd['one']:.1f} | {sd['many']:.1f} | "
                  f"{sd['one'] / f['one']:.2f}x | {sd['one'] / t2['one']:.2f}x |")
    _write_sweep(out, "bench_decode_select_attend", rows, md)


def select_attend_stamps(batches, hkv, budget, page, out, layers: int = 8) -> None:
    """Where select_attend's microseconds go, program by program (kernels/triton/timer.py): Quest at 128K + 48 over
    ``layers`` layers (each its own K/V and bounds: L2 as cold as in a model step) replayed as one CUDA graph of
    scoring + select_attend + combine per layer; every program's global timer at its start, selection done, share of
    page ids stored, attention done and end. Per layer, times since that layer's first program started; medians (and
    the slowest program) over the programs, then the median over the layers. The attention rate is the share's K and
    V bytes over (attention done - share stored)."""
    from bench_utils import graph_of, replay_ms

    from accel.kernels.triton.decode_score import quest_scores
    from accel.kernels.triton.select_attend import SLOTS, select_attend

    ctx, d, G = 131072, 128, 4
    n_keep = budget // page
    end = torch.tensor(ctx + 48, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    names = ["selected", "stored", "attended", "end"]
    rows = []
    for B in batches:
        g = torch.Generator(device="cuda").manual_seed(0)
        n_splits = max(1, sms // (B * hkv))
        data = [(*a, torch.zeros(B * hkv * n_splits * SLOTS.value, dtype=torch.int64, device="cuda"))
                for a in _quest_layers(B, hkv, G, ctx + 48, d, page, layers, g)]

        def run():
            return [select_attend(q, k, v, quest_scores(q, a, b, page_size=page), n_keep, kv_len=end, page_size=page,
                                  stamps=st) for q, k, v, a, b, st in data]

        graph = graph_of(run)
        us = replay_ms(graph) * 1e3 / layers
        per = {n: [] for n in names}
        worst = {n: [] for n in names}
        rate = []
        share_bytes = -(-n_keep // n_splits) * page * 2 * d * 2  # K and V of one program's share, bf16
        for *_, st in data:
            t = st.view(-1, SLOTS.value)[:, :5].double().cpu()
            d_us = (t - t[:, 0].min()) / 1e3
            for i, n in enumerate(names, start=1):
                per[n].append(d_us[:, i].median().item())
                worst[n].append(d_us[:, i].max().item())
            rate.append(share_bytes / ((t[:, 3] - t[:, 2]).median().item() * 1e-9) / 1e9)
        med = {n: float(torch.tensor(per[n]).median()) for n in names}
        mx = {n: float(torch.tensor(worst[n]).median()) for n in names}
        rows.append({"batch": B, "n_splits": n_splits, "us_per_layer": us, "median": med, "slowest": mx,
                     "share_bytes": share_bytes, "attention_GBps_per_program": float(torch.tensor(rate).median())})
        print(json.dumps(rows[-1]), flush=True)
        data = None
        torch.cuda.empty_cache()
    md = [f"# select_attend phase by phase ({torch.cuda.get_device_name()}, Quest 128K + 48, {hkv * G}/{hkv}/{d}, "
          f"budget {budget}, page {page})", "",
          f"`python scripts/bench_decode.py --stamps --batches {','.join(map(str, batches))}`: {layers} layers in one "
          "graph (scoring + select_attend + combine each); each program's global timer (kernels/triton/timer.py), us "
          "since its layer's first program started: median program (slowest program), median over the layers; "
          "attention rate = the share's K + V bytes / (attended - stored), per program", "",
          "| batch | programs / KV head | us per layer (graph) | selected | share stored | attended | end | "
          "share KB | attention GB/s a program |", "| --- " * 9 + "|"]
    for r in rows:
        cells = " | ".join(f"{r['median'][n]:.1f} ({r['slowest'][n]:.1f})" for n in names)
        md.append(f"| {r['batch']} | {r['n_splits']} | {r['us_per_layer']:.1f} | {cells} | "
                  f"{r['share_bytes'] / 1024:.0f} | {r['attention_GBps_per_program']:.1f} |")
    _write_sweep(out, "bench_decode_select_attend_stamps", rows, md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head_dim")
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--bounds", choices=("fp8", "exact"), default="fp8",
                    help="Quest's page bounds: float8_e5m2 rounded outward (the policies' default) or bf16")
    ap.add_argument("--out", default="results")
    ap.add_argument("--topk-sweep", action="store_true", help="only sweep the top-k kernel's cuts per pass / warps")
    ap.add_argument("--topk-tail", action="store_true", help="only time the top-k kernel on rows past a power of two")
    ap.add_argument("--topk-range", action="store_true",
                    help="only time the top-k search started on the finite scores' range against the whole range")
    ap.add_argument("--score-tiles", action="store_true",
                    help="only sweep the Quest scoring kernel's pages per program / warps over a 32-layer graph")
    ap.add_argument("--split-sweep", action="store_true", help="only sweep the split-KV kernel's splits / warps")
    ap.add_argument("--tile-sweep", action="store_true",
                    help="only time every decode case's split-KV kernel at key tiles 64 / 128 by stages (32 layers)")
    ap.add_argument("--token-sweep", action="store_true",
                    help="only sweep the split-KV kernel over token positions (TidalDecode) over a 32-layer graph")
    ap.add_argument("--split-stages", action="store_true",
                    help="only time the split-KV kernel's pipeline stages over a 32-layer graph (L2 cold)")
    ap.add_argument("--logits-sweep", action="store_true",
                    help="only sweep the dense split-KV kernel that also writes the scores (TidalDecode's selection)")
    ap.add_argument("--select-attend", action="store_true",
                    help="only time Quest's top-k inside the split launch against its own launch (128K)")
    ap.add_argument("--stamps", action="store_true",
                    help="only time select_attend's phases inside the kernel, program by program (128K)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    hkv = int(args.heads.split(",")[1])
    sweeps = {  # each flag: one sweep, its own result files
        "select_attend": lambda: select_attend_sweep(batches, hkv, args.budget, args.page, args.out),
        "stamps": lambda: select_attend_stamps(batches, hkv, args.budget, args.page, args.out),
        "logits_sweep": lambda: logits_sweep(batches, hkv, args.out),
        "tile_sweep": lambda: tile_sweep(batches, hkv, args.budget, args.out),
        "token_sweep": lambda: token_sweep(batches, hkv, args.budget, args.out),
        "split_stages": lambda: split_stages(batches, hkv, args.budget, args.out),
        "split_sweep": lambda: split_sweep(batches, hkv, args.budget, args.out),
        "topk_tail": lambda: topk_tail(batches, hkv, args.budget, args.page, args.out),
        "score_tiles": lambda: score_tiles(batches, hkv, args.out),
        "topk_range": lambda: topk_range(contexts, batches, hkv, args.budget, args.page, args.out),
        "topk_sweep": lambda: topk_sweep(contexts, batches, hkv, args.budget, args.page, args.out),
    }
    for flag, sweep in sweeps.items():
        if getattr(args, flag):
            sweep()
            return 0
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    hq, hkv, d = (int(x) for x in args.heads.split(","))
    rows = []
    for B in batches:
        for ctx in contexts:
            r = bench_case(B, ctx, hq, hkv, d, args.budget, args.page, torch.bfloat16,
                           {"graph": lambda f: do_bench_cudagraph(f), "eager": lambda f: do_bench(f)},
                           bounds=args.bounds)
            rows.append(r)
            print(json.dumps(r))
    res = {"rows": rows, "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "versions": {"torch": torch.__version__, "triton": triton.__version__,
                        "python": platform.python_version()},
           "command": " ".join(["python", "scripts/bench_decode.py", *(argv or sys.argv[1:])])}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = [f"# Decode attention, {hq}/{hkv}/{d} bf16, budget {args.budget}, page {args.page}, "
          f"{'float8' if args.bounds == 'fp8' else 'bf16'} page bounds", "",
          f"{res['device']}; {res['versions']}; {res['date']}; `{res['command']}`", "",
          "Median ms of one layer's decode attention. **graph**: the call replayed as a CUDA graph (GPU time: what a "
          "static-cache step under torch.compile or a captured graph pays); **eager**: CUDA events around eager "
          "launches (launch overhead included). quest = page scoring + top-k + split-KV attention; quest static = the "
          "same as one device-side op over a static cache; quest fused = scoring, then the top-k inside the split launch "
          "(kernels/triton/select_attend.py); reused = attention over an already selected set (LServe "
          "reuse). floor = dense bytes / policy bytes read.", ""]
    for tn in ("graph", "eager"):
        md += [f"### {tn}", "",
               "| batch | context | SDPA | FA4 | Triton dense | quest (score + top-k + attn) | quest static | vs SDPA "
               "| static vs SDPA | quest fused | fused vs SDPA | floor | reused vs SDPA | reused floor |",
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            t = {k: v[tn] for k, v in r["ms"].items()}
            sp = r["speedup"][tn]
            fa4 = f"{t['fa4']:.3f}" if "fa4" in t else "—"
            md.append(f"| {r['batch']} | {r['context']} | {t['sdpa']:.3f} | {fa4} | {t['triton_dense']:.3f} | "
                      f"{t['quest_total']:.3f} ({t['quest_score']:.3f} + {t['quest_topk']:.3f} + "
                      f"{t['quest_attn_only']:.3f}) | {t['quest_static']:.3f} | {sp['quest']:.2f}x | "
                      f"{sp['quest_static']:.2f}x | {t['quest_fused']:.3f} | {sp['quest_fused']:.2f}x | "
                      f"{r['floor_speedup_quest']:.2f}x | {sp['reused']:.2f}x | "
                      f"{r['floor_speedup_reused']:.2f}x |")
        md.append("")
    with open(os.path.join(args.out, "bench_decode.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
