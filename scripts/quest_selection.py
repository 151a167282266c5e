"""How well Quest's page bounds rank pages on a real model: for the query that predicts a middle digit of a needle's
answer, the share of the dense attention mass inside Quest's selected pages, per layer, next to an oracle that keeps
the pages with the most true mass (same budget), and for the worst head the rank Quest gives its heaviest page.

    python scripts/quest_selection.py --model smollm2 --length 8176 --depth 0.5 --out results/quest_selection

CPU is enough (reference math, float32). Writes OUT.md / OUT.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from accel.eval.synth import generate_samples  # noqa: E402
from accel.kernels.reference_decode import BOUNDS_FP8  # noqa: E402
from accel.models import load_model  # noqa: E402
from accel.recall import capture_qk, quest_capture  # noqa: E402


def layer_report(q, k, budget: int, page: int, keep_first: bool, scale=None, softcap=None,
                 bounds_dtype=None) -> dict:
    """q [B, Hq, 1, D] (the decode query), k [B, Hkv, S, D] -> captured mass per query head for Quest and the oracle
    (``bounds_dtype``: the page bounds' storage, None exact)."""
    g = q.shape[1] // k.shape[1]
    cap = quest_capture(q[:, :, -1], k, budget=budget, page_size=page, keep_first=keep_first, scale=scale,
                        softcap=softcap, bounds_dtype=bounds_dtype)
    quest_kept, oracle_kept, mass, scores = cap["quest"][0], cap["oracle"][0], cap["mass"], cap["scores"]
    worst = int(quest_kept.argmin())
    heavy = int(mass[0, worst].argmax())
    rank = int((scores[0, worst // g] > scores[0, worst // g, heavy]).sum())
    return {"quest_mean": float(quest_kept.mean()), "quest_min": float(quest_kept.min()),
            "oracle_mean": float(oracle_kept.mean()), "worst_head": worst, "worst_head_top_page": heavy,
            "worst_head_top_page_mass": float(mass[0, worst, heavy]), "worst_head_top_page_rank": rank,
            "pages": mass.shape[-1]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", type=int, default=8176)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--dense-layers", type=int, default=2, help="layers Quest leaves dense (not reported)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model, tok = load_model(args.model, device="cpu", quiet=True)
    s = generate_samples("niah_single", tok, args.length, num_samples=1, seed=0, depths=[args.depth])[0]
    ids = tok(s["prompt"], return_tensors="pt")["input_ids"]
    answer = s["outputs"][0]
    # the prompt, then the first two answer digits: the last query is the one that must retrieve the third
    extra = tok(" " + answer[:2], add_special_tokens=False)["input_ids"]
    full = torch.cat([ids, torch.tensor([extra])], 1)
    cap = capture_qk(model, full)
    rows = []
    for li in sorted(cap):
        if li < args.dense_layers or cap[li]["sliding_window"] is not None:
            continue
        q, k = cap[li]["q"][:, :, -1:], cap[li]["k"]
        sc = (cap[li]["scale"], cap[li]["softcap"])
        r = {"layer": li, **layer_report(q, k, args.budget, args.page, False, *sc)}
        r["quest_keep_first_mean"] = layer_report(q, k, args.budget, args.page, True, *sc)["quest_mean"]
        f8 = layer_report(q, k, args.budget, args.page, False, *sc, bounds_dtype=BOUNDS_FP8)  # the default storage
        r["quest_fp8_mean"], r["quest_fp8_min"] = f8["quest_mean"], f8["quest_min"]
        rows.append(r)
        print(json.dumps(r), flush=True)
    meta = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + (argv or sys.argv[1:])),
            "model": args.model, "tokens": full.shape[1], "depth": args.depth, "answer": answer,
            "budget": args.budget, "page": args.page, "date": datetime.date.today().isoformat()}
    if not args.out:
        return
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Quest page selection on {args.model}: captured attention mass", "", f"`{meta['command']}`", "",
             f"{meta['tokens']} tokens (needle at depth {args.depth}, answer {answer}; the query predicts its third "
             f"digit), budget {args.budget} tokens in pages of {args.page}. Share of the dense softmax mass inside "
             "the selected pages, over query heads: Quest (its page min/max bound, GQA group max), Quest with page 0 "
             "forced (`keep_first_page`), and an oracle keeping the pages with the most true mass; Quest with its "
             "bounds stored as float8 rounded outward (`page_bounds='fp8'`, the default; the other columns use "
             "exact bounds). Worst head: the rank Quest's exact bound gives that head's heaviest page.", "",
             "| layer | Quest mean | Quest min | float8 bounds: mean | float8 min | + first page | oracle | worst head: "
             "heaviest page (mass), Quest rank |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['quest_mean']:.3f} | {r['quest_min']:.3f} | {r['quest_fp8_mean']:.3f} | "
                     f"{r['quest_fp8_min']:.3f} | {r['quest_keep_first_mean']:.3f} "
                     f"| {r['oracle_mean']:.3f} | h{r['worst_head']}: page {r['worst_head_top_page']} "
                     f"({r['worst_head_top_page_mass']:.2f}), rank {r['worst_head_top_page_rank']} of {r['pages']} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
