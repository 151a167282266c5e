"""Sweep the launch settings of FlexPrefill's / ProxyAttn's plan kernels on the GPU (mean pooling rows per load,
the mass search's programs and block, the last-query estimate's config) at the bench inputs.

    python scripts/tune_plan_kernels.py 32768 131072 > results/tune_plan_kernels_h100.txt

Prints medians of triton.testing.do_bench in microseconds; the defaults in kernels/triton/pooled_score.py and
mass_threshold.py cite its H100 run."""

from __future__ import annotations

import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_estimation import structured_qkv  # noqa: E402

from accel.kernels.triton.lastq_score import lastq_scores  # noqa: E402
from accel.kernels.triton.mass_threshold import mass_search  # noqa: E402
from accel.kernels.triton.pooled_score import mean_pool  # noqa: E402
from accel.policies.flexprefill import pooled_probs  # noqa: E402


def us(fn) -> float:
    return do_bench(fn, warmup=10, rep=50) * 1e3


PROXY_CONFIGS = [None] + [dict(BLOCK_R=r, BLOCK_C=c, num_warps=w, num_stages=st)
                          for r, c, w, st in ((128, 128, 8, 3), (128, 128, 8, 2), (128, 128, 8, 4), (64, 128, 4, 3),
                                              (64, 128, 4, 2), (64, 128, 4, 4), (32, 128, 4, 3), (64, 128, 8, 3),
                                              (128, 64, 8, 3), (128, 64, 4, 3), (256, 64, 8, 3), (64, 64, 4, 3))]


def proxy(contexts: list[int]) -> None:
    """ProxyAttn's scores (one proxy per KV head, stride 8, block 128) per config, and the largest difference."""
    from accel.kernels.triton.proxy_score import proxy_scores

    print(f"device: {torch.cuda.get_device_name()}")
    for S in contexts:
        q, k, _ = structured_qkv(S, 32, 8, 128, torch.device("cuda"), seed=S)
        print(f"=== S={S} ProxyAttn scores, block 128, stride 8, 8 proxies")
        ref = proxy_scores(q, k)
        for cfg in PROXY_CONFIGS:
            try:
                out = proxy_scores(q, k, config=cfg)
                t = us(lambda: proxy_scores(q, k, config=cfg))
                print(f"{cfg}: {t:.1f} us, max |diff| vs default {(out - ref).abs().max().item():.2e}")
            except Exception as e:  # a tile past the SM's registers / shared memory
                print(f"{cfg}: failed ({type(e).__name__}: {str(e)[:120]})")


def main(contexts: list[int]) -> None:
    print(f"device: {torch.cuda.get_device_name()}")
    for S in contexts:
        q, k, _ = structured_qkv(S, 32, 8, 128, torch.device("cuda"), seed=S)
        print(f"=== S={S} (32 query heads, 8 KV heads, head_dim 128, bf16)")
        for rows in (16, 32, 64, 128):
            cfg = dict(ROWS=rows)
            print(f"mean_pool rows={rows}: q {us(lambda: mean_pool(q, 128, config=cfg)):.1f} us"
                  f"  k {us(lambda: mean_pool(k, 128, config=cfg)):.1f} us")
        vs = lastq_scores(q, k, 128, stacked=True)
        kp, qp = mean_pool(k, 128), mean_pool(q, 128)
        probs = pooled_probs(qp, kp, S, S, 128, 128**-0.5).view(32, -1)
        rows_in = [vs.view(64, S), probs]  # FlexPrefill's token rows and every head's pooled block map
        print(f"pooled_probs {us(lambda: pooled_probs(qp, kp, S, S, 128, 128**-0.5)):.1f} us")
        for blk in (512, 1024, 2048):
            for progs in (256, 512, 1024, 2048, 4096):
                t = us(lambda: mass_search(rows_in, 0.95, block=blk, programs=progs))
                print(f"mass_search block={blk} programs={progs}: {t:.1f} us")
        for cfg in [dict(), dict(ROWS=128), dict(PROGRAMS=264), dict(PROGRAMS=1056), dict(BLOCK_O=256),
                    dict(BLOCK_O=64), dict(BLOCK_R=32), dict(slash_warps=8)]:
            print(f"lastq {cfg}: {us(lambda: lastq_scores(q, k, 128, stacked=True, config=cfg)):.1f} us")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("tune_plan_kernels.py times GPU kernels: run it on a machine with a CUDA GPU")
    args = sys.argv[1:]
    run = proxy if "--proxy" in args else main
    run([int(a) for a in args if a != "--proxy"] or [32768])
