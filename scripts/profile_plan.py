"""Profile where a prefill policy's ``plan`` spends its GPU time (torch profiler, CUDA kernels by total time).

    PYTHONPATH=. python scripts/profile_plan.py --context 131072 --policy xattention flexprefill proxy

Inputs are the structured synthetic q/k of scripts/bench_prefill.py (Llama-3.1-8B heads by default). Prints, per
policy, the wall time of one plan (after a warm-up) and the top CUDA kernels / ops with their share.

``--stage``: for the plan alone and for plan + sparse attention (``--backend``, default FA4 where installed), the
host time of one call (Python and launches, timed without a sync over ``--calls`` calls, which stay within the
launch queue), the device time (sum of the kernels' time in the profiler) and the wall time of a synchronised call:
when host > device the stage is launch-bound and the wall time measures the CPU, not the GPU."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_estimation import structured_qkv  # noqa: E402
from bench_prefill import parse_policy_arg  # noqa: E402

from accel.policies import AttentionContext  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--policy", nargs="+", default=["xattention", "flexprefill", "proxy"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--stage", action="store_true", help="host vs device time of plan and plan + attention")
    ap.add_argument("--backend", default=None, help="attention backend for --stage (default: flash, else triton)")
    ap.add_argument("--calls", type=int, default=8)
    args = ap.parse_args(argv)
    if args.stage:
        return stage(args)
    from torch.profiler import ProfilerActivity, profile

    q, k, _ = structured_qkv(args.context, args.heads, args.kv_heads, args.dim, torch.device("cuda"),
                             seed=args.context)
    ctx = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None, scale=args.dim**-0.5)
    for spec in args.policy:
        label, pol = parse_policy_arg(spec)
        pol.plan(q, k, ctx)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            pol.plan(q, k, ctx)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 3 * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            pol.plan(q, k, ctx)
            torch.cuda.synchronize()
        print(f"\n=== {label} at {args.context}: {wall:.2f} ms per plan (wall)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60))


def _host_device_wall(fn, calls: int) -> tuple[float, float, float]:
    """(host ms, device ms, wall ms) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / calls * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device = sum(e.self_device_time_total for e in prof.key_averages()) / calls / 1e3
    return host, device, wall


def stage(args) -> None:
    from accel.kernels import get_backend

    q, k, v = structured_qkv(args.context, args.heads, args.kv_heads, args.dim, torch.device("cuda"),
                             seed=args.context)
    ctx = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None, scale=args.dim**-0.5)
    name = args.backend or ("flash" if get_backend("flash").available()[0] else "triton")
    back = get_backend(name)
    print(f"context {args.context}, backend {name}; ms per call: host (no sync) / device (kernels) / wall (synced)")
    for spec in args.policy:
        label, pol = parse_policy_arg(spec)
        layout = pol.plan(q, k, ctx)
        rows = {"plan": lambda: pol.plan(q, k, ctx),
                "attention": lambda: back.run(layout, q, k, v, scale=ctx.scale),
                "plan + attention": lambda: back.run(pol.plan(q, k, ctx), q, k, v, scale=ctx.scale)}
        for what, fn in rows.items():
            host, device, wall = _host_device_wall(fn, args.calls)
            print(f"{label:>14} {what:>17}: host {host:7.3f}  device {device:7.3f}  wall {wall:7.3f}"
                  + ("  (launch-bound)" if host > device else ""), flush=True)


if __name__ == "__main__":
    main()
