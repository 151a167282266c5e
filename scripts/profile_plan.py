"""Profile where a prefill policy's ``plan`` spends its GPU time (torch profiler, CUDA kernels by total time).

    PYTHONPATH=. python scripts/profile_plan.py --context 131072 --policy xattention flexprefill proxy

Inputs are the structured synthetic q/k of scripts/bench_prefill.py (Llama-3.1-8B heads by default). Prints, per
policy, the wall time of one plan (after a warm-up) and the top CUDA kernels / ops with their share."""

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
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
