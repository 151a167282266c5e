"""Benchmark the Triton flash-attention forward against torch SDPA (flash, cuDNN) and FlashAttention-4 (when
installed) on the Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16, batch 1).

Runs on a CUDA machine; the project need not be installed (the kernel file is loaded by path):

    PYTHONPATH=. python3 scripts/bench_kernels.py --out results/        # writes bench_kernels_dense.{json,md}
    ... --sweep          first times a set of tile configs at 32K and uses the fastest for the table
    ... --contexts 8192 32768  --quick

Medians of triton.testing.do_bench. Every kernel's output is checked against an fp32 reference on the last
queries of each shape before it is timed."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import platform
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]


def _load_kernel():
    spec = importlib.util.spec_from_file_location("accel_flash_fwd", ROOT / "kernels" / "triton" / "flash_fwd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ff = _load_kernel()

HQ, HKV, D = 32, 8, 128
SWEEP = {  # head_dim: candidate (BLOCK_M, BLOCK_N, num_warps, num_stages[, edge_stages]) tiles
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3),
          (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3, 3), (64, 64, 4, 4)],
    64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3)],
    256: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2)],
}
STREAM_SWEEP = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 64, 8, 3, 2)]


def visible_pairs(sq, sk, sink=0, window=None):
    """Number of (query, key) pairs the causal (+ sink/window) mask keeps (host arithmetic)."""
    total = 0
    for p in range(sk - sq, sk):  # O(sq), fine for <= 128K
        n = p + 1
        if window is not None and n > window:
            n = window + min(sink, p - window + 1)
        total += n
    return total


def ref_rows(q, k, v, rows, *, sink=0, window=None, chunk=128):
    """fp32 reference for the last ``rows`` queries (GQA by head grouping, chunked to bound memory)."""
    B, Hq, Sq, Dh = q.shape
    Sk = k.shape[2]
    g = Hq // k.shape[1]
    out = []
    kf = k.float()
    vf = v.float()
    for s in range(Sq - rows, Sq, chunk):
        e = min(Sq, s + chunk)
        qc = q[:, :, s:e].float().view(B, k.shape[1], g, e - s, Dh)
        sc = torch.einsum("bhgqd,bhkd->bhgqk", qc, kf) * Dh**-0.5
        p = torch.arange(s, e, device=q.device)[:, None] + (Sk - Sq)
        j = torch.arange(Sk, device=q.device)[None, :]
        keep = j <= p
        if window is not None:
            keep &= (p - j < window) | (j < sink)
        sc = sc.masked_fill(~keep, float("-inf"))
        o = torch.einsum("bhgqk,bhkd->bhgqd", sc.softmax(-1), vf)
        out.append(o.reshape(B, Hq, e - s, Dh))
        del sc
    return torch.cat(out, 2)


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def time_ms(fn, est_ms=None):
    if est_ms is None:
        fn()
        torch.cuda.synchronize()
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record()
        fn()
        ev1.record()
        torch.cuda.synchronize()
        est_ms = ev0.elapsed_time(ev1)
    rep = max(200.0, 10 * est_ms)
    return do_bench(fn, warmup=max(25.0, 2 * est_ms), rep=rep, return_mode="median")


def sdpa_fn(backend, q, k, v, causal=True):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    note = "enable_gqa"

    def run_gqa():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    try:
        run_gqa()
        torch.cuda.synchronize()
        return run_gqa, note
    except Exception:
        g = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        note = "K/V repeated outside the timing"

        def run_rep():
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)

        run_rep()
        torch.cuda.synchronize()
        return run_rep, note


def fa4_fn(q, k, v, *, window=None):
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # not installed: optional
        return None, f"FA4 not importable ({type(e).__name__})"
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    ws = (None, None) if window is None else (window - 1, 0)

    def run():
        out = flash_attn_func(qt, kt, vt, causal=True, window_size=ws)
        out = out[0] if isinstance(out, tuple) else out
        return out

    def run_bhsd():
        return run().transpose(1, 2)

    return run_bhsd, "flash_attn.cute.flash_attn_func"


def inputs(sq, sk, seed=0, d=D):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HQ, sq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, sk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, sk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def sweep(ctx, d, log, configs=None, sink=0, window=None):
    q, k, v = inputs(ctx, ctx, seed=1, d=d)
    flops = 4 * HQ * d * visible_pairs(ctx, ctx, sink, window)
    ref = ref_rows(q, k, v, 256, sink=sink, window=window)
    results = []
    kw = dict(sink=sink, window=window)
    for cfg in configs or SWEEP[d]:
        try:
            out = torch.full_like(q, float("nan"))
            ff.flash_attention(q, k, v, out=out, _config_override=cfg, **kw)
            err = rel_err(out[:, :, -256:], ref)
            if not err < 2e-2 or torch.isnan(out).any():
                raise RuntimeError(f"wrong result: rel err {err:.2e}")
            ms = time_ms(lambda: ff.flash_attention(q, k, v, _config_override=cfg, **kw))
            results.append({"head_dim": d, "ctx": ctx, "window": window, "config": list(cfg), "ms": ms,
                            "tflops": flops / ms / 1e9, "rel_err": err})
            log(f"sweep D={d} {ctx} window={window} cfg={cfg}: {ms:.2f} ms  {flops / ms / 1e9:.0f} TFLOP/s  "
                f"err {err:.1e}")
        except Exception as e:
            results.append({"head_dim": d, "ctx": ctx, "window": window, "config": list(cfg),
                            "error": f"{type(e).__name__}: {str(e)[:300]}"})
            log(f"sweep D={d} {ctx} cfg={cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
    ok = [r for r in results if "ms" in r]
    best = min(ok, key=lambda r: r["ms"])["config"] if ok else None
    log(f"sweep D={d}: best {best}")
    return results, best


def bench_case(name, sq, sk, *, sink=0, window=None, cfg=None, log=print, baselines=True):
    q, k, v = inputs(sq, sk, seed=sq + sk)
    flops = 4 * HQ * D * visible_pairs(sq, sk, sink, window)
    rows = min(sq, 256)
    ref = ref_rows(q, k, v, rows, sink=sink, window=window)
    row = {"case": name, "sq": sq, "sk": sk, "sink": sink, "window": window, "gflop": flops / 1e9}

    def ours():
        return ff.flash_attention(q, k, v, sink=sink, window=window, _config_override=cfg)

    impls = [("triton", ours, "ours" + (f" cfg={tuple(cfg)}" if cfg else " (default table)"))]
    if baselines and window is None:
        causal = sq > 1
        for be in ("flash", "cudnn"):
            try:
                fn, note = sdpa_fn(be, q, k, v, causal=causal)
                impls.append((f"sdpa_{be}", fn, note))
            except Exception as e:
                row[f"sdpa_{be}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if baselines and sq > 1:
        fn, note = fa4_fn(q, k, v, window=window if not sink else None)
        if fn is not None and not (sink and window):
            impls.append(("fa4", fn, note))
        elif fn is None:
            row["fa4_error"] = note
    for key, fn, note in impls:
        try:
            out = fn()
            torch.cuda.synchronize()
            err = rel_err(out[:, :, -rows:], ref)
            if not err < 2e-2:
                raise RuntimeError(f"wrong result: rel err {err:.2e} vs fp32 reference")
            del out
            ms = time_ms(fn)
            row[key] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err": err, "note": note}
            log(f"{name} {key}: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s  err {err:.1e}  ({note})")
        except Exception as e:
            row[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "note": note}
            log(f"{name} {key}: FAILED {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.empty_cache()
    if "ms" in row.get("triton", {}) and "ms" in row.get("sdpa_flash", {}):
        row["speedup_vs_sdpa_flash"] = row["sdpa_flash"]["ms"] / row["triton"]["ms"]
    return row


def versions():
    v = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    try:
        import transformers

        v["transformers"] = transformers.__version__
    except Exception:
        v["transformers"] = None
    try:
        from importlib.metadata import version

        v["flash_attn_4"] = version("flash-attn-4")
    except Exception:
        v["flash_attn_4"] = None
    return v


def markdown(meta, rows, sweep_rows):
    def cell(r, key):
        x = r.get(key)
        if isinstance(x, dict) and "ms" in x:
            return f"{x['ms']:.3f} ({x['tflops']:.0f})"
        if isinstance(x, dict) and "error" in x:
            return "error"
        return "—"

    lines = [
        "# Triton flash-attention forward vs dense baselines",
        "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']}; date: {meta['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- shape: batch 1, {HQ} query heads, {HKV} KV heads, head_dim {D}, bf16; causal (query i at key Sk-Sq+i)",
        f"- triton tiles (BLOCK_M, BLOCK_N, num_warps, num_stages): dense {meta['config']}, "
        f"streaming {meta['config_streaming']}",
        "- cells: median ms of triton.testing.do_bench (TFLOP/s over the kept causal pairs, 4·H·D per pair); "
        "speedup = SDPA-flash ms / ours (streaming rows: dense causal SDPA-flash at the same context / ours). "
        "Every output checked against an fp32 reference (last 256 queries).",
        "",
        "| case | Sq | Sk | ours (Triton) | SDPA flash | SDPA cuDNN | FA4 | speedup vs SDPA flash |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sp = r.get("speedup_vs_sdpa_flash")
        lines.append(f"| {r['case']} | {r['sq']} | {r['sk']} | {cell(r, 'triton')} | {cell(r, 'sdpa_flash')} | "
                     f"{cell(r, 'sdpa_cudnn')} | {cell(r, 'fa4')} | {'—' if sp is None else f'{sp:.2f}x'} |")
    notes = sorted({x.get("note") for r in rows for key, x in r.items()
                    if key.startswith("sdpa") and isinstance(x, dict) and x.get("note")})
    if notes:
        lines += ["", "SDPA GQA handling: " + "; ".join(notes)]
    if sweep_rows:
        lines += ["", "Tile sweep (causal, same heads; head_dim 128 at the sweep context, others at half):", "",
                  "| head_dim | context | window | BLOCK_M | BLOCK_N | warps | stages | edge stages | ms | TFLOP/s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s in sweep_rows:
            c = list(s["config"]) + [1]
            t = f"{s['ms']:.2f} | {s['tflops']:.0f}" if "ms" in s else f"error | {s['error'][:60]}"
            w = "—" if s.get("window") is None else f"128+{s['window']}"
            lines.append(f"| {s['head_dim']} | {s['ctx']} | {w} | {c[0]} | {c[1]} | {c[2]} | {c[3]} | {c[4]} | {t} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results", help="output directory")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--stream-contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--sweep", action="store_true", help="time tile configs at --sweep-ctx first")
    ap.add_argument("--sweep-ctx", type=int, default=32768)
    ap.add_argument("--stream-sweep", action="store_true", help="time tile configs on sink 128 + window 4096")
    ap.add_argument("--use-sweep-best", action="store_true", help="time the table with the sweeps' best tiles "
                    "instead of the kernel's default table")
    ap.add_argument("--sweep-dims", type=int, nargs="*", default=[64, 256], help="other head dims to sweep at half ctx")
    ap.add_argument("--name", default="bench_kernels_dense")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logf = open(out_dir / f"{args.name}.log", "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    torch.backends.cuda.matmul.allow_tf32 = False
    meta = {
        "command": "python3 " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
    }
    log(json.dumps(meta))
    sweep_rows, best = [], {}
    if args.sweep:
        sweep_rows, best["dense"] = sweep(args.sweep_ctx, D, log)
        for d in args.sweep_dims:
            rows_d, best[f"dense_d{d}"] = sweep(args.sweep_ctx // 2, d, log)
            sweep_rows += rows_d
    if args.stream_sweep:
        rows_s, best["streaming"] = sweep(args.sweep_ctx, D, log, configs=STREAM_SWEEP, sink=128, window=4096)
        sweep_rows += rows_s
    meta["sweep_best"] = best
    cfg = best.get("dense") if args.use_sweep_best else None
    scfg = best.get("streaming", cfg) if args.use_sweep_best else None
    meta["config"] = list(cfg) if cfg else list(ff._config(D, 4096, torch.bfloat16))
    meta["config_streaming"] = list(scfg) if scfg else list(ff._config(D, 4096, torch.bfloat16, windowed=True))
    rows = []
    cases = [(f"causal {c // 1024}K", c, c, 0, None) for c in args.contexts]
    cases += [(f"streaming 128+4096 {c // 1024}K", c, c, 128, 4096) for c in args.stream_contexts]
    cases += [(f"decode {c // 1024}K", 1, c, 0, None) for c in (32768, 131072)]
    for name, sq, sk, sink, window in cases:
        try:
            c = (scfg if window else cfg) if sq > 64 else None
            rows.append(bench_case(name, sq, sk, sink=sink, window=window, cfg=c, log=log))
        except Exception as e:
            log(f"{name}: FAILED {traceback.format_exc()}")
            rows.append({"case": name, "sq": sq, "sk": sk, "error": f"{type(e).__name__}: {e}"})
        torch.cuda.empty_cache()
    dense_sdpa = {r["sk"]: r["sdpa_flash"]["ms"] for r in rows
                  if r.get("window") is None and r.get("sq", 0) > 1 and "ms" in r.get("sdpa_flash", {})}
    for r in rows:  # streaming: against dense SDPA at the same context (what the policy replaces)
        if r.get("window") is not None and "ms" in r.get("triton", {}) and r["sk"] in dense_sdpa:
            r["speedup_vs_sdpa_flash"] = dense_sdpa[r["sk"]] / r["triton"]["ms"]
    result = {"meta": meta, "rows": rows, "sweep": sweep_rows}
    (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    md = markdown(meta, rows, sweep_rows)
    (out_dir / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
