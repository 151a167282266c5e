"""Quest layer calibration: find the layers where Quest's page bound loses what attention needs, and write a map
of layers for `quest` to leave dense.

    python scripts/calibrate_quest.py smollm2 --out configs/quest_smollm2.json

Method: Quest (arXiv 2406.10774) ranks a page by an upper bound of q.k from its keys' elementwise min/max and
leaves the first two layers dense because the bound is poor there. How poor it is per layer depends on the model:
on SmolLM2-135M at 8K one later layer (18) ranks its retrieval head's needle page 395th of 511. This script runs
passkey prompts of accel.needle (filler text and a number; not the accel-eval prompts) through the dense model,
and for every query that produces the answer (the prompt's last token and each answer token but the last) and
every query head of a layer Quest selects in, compares the share of the softmax mass inside Quest's selected pages
at ``--budget`` with the share inside the same number of pages an oracle picks by true mass
(accel.recall.quest_capture). A layer where some head keeps less than ``--floor`` of the oracle's share on some
answer query is listed in ``dense_layers``; `accel.patch(model, "quest")` leaves those layers dense when the map
fits (same page size, group reduction, first-page rule and page-bound storage, ``--page-bounds``). CPU is enough
(reference math, float32); a few minutes at 8K on the demo models.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def samples(tokenizer, n: int, length: int, seed: int) -> list[tuple[torch.Tensor, int, float]]:
    """``n`` passkey prompts of ``length`` tokens with their answer appended: (ids [1, S], answer queries, depth)."""
    from accel.needle import build_needle_prompt

    out = []
    for i in range(n):
        depth = (i + 0.5) / n
        p = build_needle_prompt(tokenizer, length, depth=depth, seed=seed + i)
        ans = tokenizer(p.answer, add_special_tokens=False)["input_ids"]
        # the prompt's last token predicts the first answer token; the last answer token predicts nothing needed
        out.append((torch.tensor([list(p.input_ids) + ans[:-1]]), len(ans), depth))
    return out


def layer_ratios(cap: dict, n_queries: int, *, budget: int, page_size: int, group_reduce: str, keep_first: bool,
                 bounds_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quest's kept share over the oracle's, [n_queries, Hq], for the last ``n_queries`` queries of one layer's
    capture (each sees the keys up to itself)."""
    from accel.recall import quest_capture

    q, k = cap["q"], cap["k"]
    S = q.shape[2]
    rows = []
    for pos in range(S - n_queries, S):
        r = quest_capture(q[:, :, pos], k[:, :, :pos + 1], budget=budget, page_size=page_size,
                          group_reduce=group_reduce, keep_first=keep_first, scale=cap["scale"],
                          softcap=cap["softcap"], bounds_dtype=bounds_dtype)
        rows.append((r["quest"] / r["oracle"].clamp_min(1e-12))[0])
    return torch.stack(rows)


def calibrate(model, tokenizer, *, lengths: list[int], n_samples: int, seed: int, budget: int, page_size: int,
              group_reduce: str, keep_first: bool, first_dense: int, floor: float, log=print,
              bounds_dtype: torch.dtype | None = None) -> tuple[list, list]:
    """(dense layers, per-layer report): the layers Quest selects in where some head keeps below ``floor`` of the
    oracle's share on some answer query."""
    from accel.recall import capture_qk

    worst: dict[int, dict] = {}
    sums: dict[int, list] = {}
    for length in lengths:
        for ids, n_ans, depth in samples(tokenizer, n_samples, length, seed):
            t = time.time()
            cap = capture_qk(model, ids)
            for li in sorted(cap):
                c = cap[li]
                if li < first_dense or c["sliding_window"] is not None or c["k"].shape[2] <= budget:
                    continue  # Quest does not select here (dense layer, sliding window, budget covers it)
                ratios = layer_ratios(c, n_ans, budget=budget, page_size=page_size, group_reduce=group_reduce,
                                      keep_first=keep_first, bounds_dtype=bounds_dtype)
                acc = sums.setdefault(li, [0.0, 0])
                acc[0] += float(ratios.sum())
                acc[1] += ratios.numel()
                low = float(ratios.min())
                if li not in worst or low < worst[li]["min_ratio"]:
                    qi, head = divmod(int(ratios.argmin()), ratios.shape[1])
                    worst[li] = {"min_ratio": low, "length": ids.shape[1], "depth": depth, "answer_query": qi,
                                 "head": head}
            log(f"  length {ids.shape[1]} depth {depth:.2f}: {time.time() - t:.0f} s")
            cap = c = None
            gc.collect()  # a long capture holds every layer's q and k: free it before the next
    report = [{"layer": li, "mean_ratio": round(sums[li][0] / sums[li][1], 4),
               **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in worst[li].items()}}
              for li in sorted(worst)]
    dense = [r["layer"] for r in report if r["min_ratio"] < floor]
    return dense, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="demo model name (smollm2, gemma3) or a local model folder")
    ap.add_argument("--out", required=True, help="the map to write, e.g. configs/quest_smollm2.json")
    ap.add_argument("--lengths", default="8000", help="prompt lengths in tokens, comma-separated (above --budget)")
    ap.add_argument("--samples", type=int, default=4, help="prompts per length (needle depths spread over 0-1)")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--group-reduce", default="max", choices=("max", "sum", "max_norm"))
    ap.add_argument("--keep-first-page", action="store_true")
    ap.add_argument("--page-bounds", default="fp8", choices=("fp8", "exact"),
                    help="page bounds as the cache stores them (the policy's option of that name; default fp8)")
    ap.add_argument("--dense-layers", type=int, default=2, help="the first layers Quest leaves dense (not checked)")
    ap.add_argument("--floor", type=float, default=0.5,
                    help="a layer goes dense when some head keeps less than this share of the oracle's mass")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if any(n <= args.budget for n in lengths):
        ap.error(f"--lengths must exceed --budget ({args.budget}): Quest selects nothing below it")
    if not 0.0 < args.floor <= 1.0:
        ap.error("--floor must be in (0, 1]")

    from accel.models import load_model
    from accel.policies.duo import model_signature
    from accel.policies.quest import LAYER_MAP_FORMAT, PAGE_SIZES, bounds_dtype

    if args.page_size not in PAGE_SIZES:
        ap.error(f"--page-size must be one of {PAGE_SIZES}")
    t0 = time.time()
    model, tok = load_model(args.model, device=args.device, dtype=torch.float32, quiet=True)
    print(f"calibrating quest on {args.model}: lengths {lengths}, {args.samples} prompts each, budget "
          f"{args.budget}, page {args.page_size}, {args.page_bounds} page bounds, floor {args.floor}", flush=True)
    dense, report = calibrate(model, tok, lengths=lengths, n_samples=args.samples, seed=args.seed,
                              budget=args.budget, page_size=args.page_size, group_reduce=args.group_reduce,
                              keep_first=args.keep_first_page, first_dense=args.dense_layers, floor=args.floor,
                              log=lambda m: print(m, flush=True), bounds_dtype=bounds_dtype(args.page_bounds))
    for r in report:
        print(f"layer {r['layer']:3d}: mean {r['mean_ratio']:.3f}, worst {r['min_ratio']:.3f} (head {r['head']}, "
              f"depth {r['depth']:.2f}){'  -> dense' if r['layer'] in dense else ''}")
    data = {"format": LAYER_MAP_FORMAT, "model": model_signature(model.config), "floor": args.floor,
            "dense_layers": dense,
            "calibration": {"page_size": args.page_size, "group_reduce": args.group_reduce,
                            "keep_first_page": args.keep_first_page, "page_bounds": args.page_bounds,
                            "budget": args.budget,
                            "first_dense_layers": args.dense_layers, "lengths": lengths, "samples": args.samples,
                            "seed": args.seed, "prompts": "accel.needle passkey prompts",
                            "command": "python scripts/calibrate_quest.py " + " ".join(argv or sys.argv[1:]),
                            "date": datetime.date.today().isoformat(), "device": f"{args.device} "
                            f"({platform.machine()})", "seconds": round(time.time() - t0, 1), "layers": report}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"dense layers {dense}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
