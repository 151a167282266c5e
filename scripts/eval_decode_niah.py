"""Accuracy of the decode policies on a real model (CPU): needle retrieval at several depths and lengths versus
dense, and token agreement with dense generation for a long prompt.

    python scripts/eval_decode_niah.py --out results            # SmolLM2-135M, ~10-15 min on 2 CPU cores
    python scripts/eval_decode_niah.py --lengths 2000 --depths 0.5 --policies dense,duo   # a quick check
    python scripts/eval_decode_niah.py --policies "lserve,tidal b1024" --merge   # add rows, keep the others
    python scripts/eval_decode_niah.py --policies duo,lserve --duo-map /tmp/duo_new.json --out /tmp/new_map

Writes results/decode_niah.json and results/decode_niah.md (command, device, versions, date included). Policies:
dense, quest at its defaults (budget 4096: the whole context at these lengths, so dense by construction) and at
small budgets that make it sparse, duo at its defaults with the shipped head map (ratio 0.5, sink 64, recent 256),
lserve at its defaults (the same streaming heads; budget 4096 covers the retrieval heads' context here) and at a
sparse budget, tidal at sparse budgets (its default 4096 is dense at these lengths; 256 is its paper's code),
"tidal sum" ranking keys by the heads' summed probabilities instead of their max, and "tidal per-head" with one
selection per KV head (its rule before 2026-12-04).
--duo-map PATH gives the duo and lserve rows another head map (from scripts/calibrate_duo.py) than the shipped one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import torch

POLICIES = {
    "dense": ("dense", {}),
    "quest": ("quest", {}),
    "quest b1024": ("quest", {"budget": 1024}),
    "quest b512": ("quest", {"budget": 512}),
    # page bounds in the keys' dtype (before 2026-12-06 the only kind; the default is now float8 rounded outward)
    "quest exact": ("quest", {"page_bounds": "exact"}),
    "quest b512 exact": ("quest", {"budget": 512, "page_bounds": "exact"}),
    "lserve exact": ("lserve", {"page_bounds": "exact"}),
    "quest max_norm": ("quest", {"group_reduce": "max_norm"}),  # reads the max_norm layer map of its bounds
    "duo": ("duo", {}),
    "lserve": ("lserve", {}),
    "lserve b1024": ("lserve", {"budget": 1024}),
    "tidal": ("tidal", {}),
    "tidal b1024": ("tidal", {"budget": 1024}),
    "tidal b256": ("tidal", {"budget": 256}),
    "tidal sum": ("tidal", {"group_reduce": "sum"}),
    "tidal sum b1024": ("tidal", {"budget": 1024, "group_reduce": "sum"}),
    # before the shared selection: one per KV head, from its query group's summed probabilities
    "tidal per-head": ("tidal", {"shared": False, "group_reduce": "sum"}),
    "tidal per-head b1024": ("tidal", {"budget": 1024, "shared": False, "group_reduce": "sum"}),
}


def _generate(model, ids, n, min_new=0):
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=min_new,
                             do_sample=False)
    return out[0, ids.shape[1]:]


def _continuation_prompt(tok, n_tokens: int) -> list[int]:
    """Plain filler text of about ``n_tokens`` tokens for the model to continue (no question, so no early EOS)."""
    from accel.needle import filler_sentences

    ids: list[int] = []
    for sent in filler_sentences(seed=99):
        more = tok(" " + sent, add_special_tokens=False)["input_ids"]
        if len(ids) + len(more) > n_tokens:
            break
        ids += more
    return ids


def run(model, tok, policies, lengths, depths, new_tokens, agree_len, agree_tokens, log=print, duo_map=None):
    import accel
    from accel.needle import build_needle_prompt, needle_found

    cells, agree = [], {}
    prompts = [(n, d, build_needle_prompt(tok, n, depth=d, seed=i)) for i, (n, d) in
               enumerate((n, d) for n in lengths for d in depths)]
    long_ids = torch.tensor([_continuation_prompt(tok, agree_len)])
    dense_long = None
    if "dense" not in policies:  # merging: dense's continuation is the agreement baseline
        accel.patch(model, "dense", backend="reference")
        dense_long = _generate(model, long_ids, agree_tokens, min_new=agree_tokens)
        accel.unpatch(model)
    for label in policies:
        name, opts = POLICIES[label]
        if duo_map and name in ("duo", "lserve"):
            opts = {**opts, "duo_map": duo_map}
        accel.patch(model, name, backend="reference", **opts)
        for n, d, p in prompts:
            t0 = time.time()
            out = _generate(model, torch.tensor([p.input_ids]), new_tokens)
            text = tok.decode(out, skip_special_tokens=True)
            st = accel.stats(model)
            dec = [layer["decode_density"] for layer in st["layers"] if layer["decode_density"] is not None]
            cells.append({"policy": label, "length": p.num_tokens, "target_length": n, "depth": d,
                          "found": needle_found(text, p.answer), "answer": p.answer, "output": text,
                          "decode_density": sum(dec) / len(dec) if dec else None,
                          "calibration": {k: os.path.basename(v) for k, v in (st.get("calibration") or {}).items()},
                          "seconds": round(time.time() - t0, 1)})
            accel.reset_stats(model)
            log(f"{label:12s} {p.num_tokens:5d} tok depth {d:.2f}: {'FOUND' if cells[-1]['found'] else 'miss '} "
                f"{text!r}")
        out = _generate(model, long_ids, agree_tokens, min_new=agree_tokens)
        if label == "dense":
            dense_long = out
        same = (out == dense_long[: out.numel()]).float()
        first = int((same == 0).nonzero()[0, 0]) if bool((same == 0).any()) else out.numel()
        agree[label] = {"agreement": float(same.mean()), "first_divergence": first,
                        "text": tok.decode(out, skip_special_tokens=True)}
        log(f"{label:12s} agreement with dense over {agree_tokens} tokens: {agree[label]['agreement']:.2f} "
            f"(first divergence at {first})")
        accel.unpatch(model)
    return cells, agree, long_ids.shape[1]


def markdown(res) -> str:
    lines = [f"# Decode policies: needle retrieval and agreement with dense ({res['model']})", "",
             f"Command: `{res['command']}`  ", f"Device: {res['device']}; {res['versions']}; {res['date']}  ",
             f"Head map (duo, lserve): {_map_line(res)}", "",
             "| policy | needles found | mean decode density | agreement with dense (long prompt) | first divergence |",
             "| --- | --- | --- | --- | --- |"]
    for label in res["policies"]:
        cs = [c for c in res["cells"] if c["policy"] == label]
        dens = [c["decode_density"] for c in cs if c["decode_density"] is not None]
        a = res["agreement"][label]
        lines.append(f"| {label} | {sum(c['found'] for c in cs)}/{len(cs)} | "
                     f"{sum(dens) / len(dens):.3f} | {a['agreement']:.2f} | {a['first_divergence']} |")
    lines += ["", "| policy | length | depth | found | output |", "| --- | --- | --- | --- | --- |"]
    for c in res["cells"]:
        lines.append(f"| {c['policy']} | {c['length']} | {c['depth']} | {'yes' if c['found'] else 'no'} | "
                     f"{c['output'].strip()!r} |")
    lines += ["", f"Agreement prompt: {res['agree_prompt_tokens']} tokens of filler text to continue, "
                  f"{res['agree_tokens']} greedy tokens."]
    used = {label: cal for c in res["cells"] if (cal := c.get("calibration")) for label in [c["policy"]]}
    if used:  # rows older than this field show nothing here
        lines += ["", "Per-model calibration files a row read (from accel.stats): " + "; ".join(
            f"{label}: {', '.join(cal.values())}" for label, cal in used.items())]
    return "\n".join(lines) + "\n"


def _map_line(res) -> str:
    m = res.get("duo_map")
    cal = res.get("duo_map_calibration")
    line = f"`{m}`" if m else "the shipped map for the model (no --duo-map)"
    return line + (f" (calibration {json.dumps(cal)})" if cal else "")


def _map_calibration(path: str | None, model: str) -> dict | None:
    """The calibration settings recorded in the head map the duo / lserve rows read (``path``, else the shipped map
    of ``model``), or None when there is none to read."""
    from accel.policies.duo import load_head_map

    try:
        return load_head_map(path or model)[1].get("calibration")
    except (OSError, ValueError):
        return None


def _old_results(args) -> dict | None:
    """The results a --merge run adds to; an error if they were made with other lengths, depths or settings."""
    path = os.path.join(args.out, "decode_niah.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        old = json.load(f)
    grid = sorted({(c["target_length"], c["depth"]) for c in old["cells"]})
    new = sorted((int(n), float(d)) for n in args.lengths.split(",") for d in args.depths.split(","))
    cal = old.get("duo_map_calibration")  # absent in files older than the option
    if (old["model"] != args.model or grid != new or old["agree_tokens"] != args.agree_tokens
            or old.get("duo_map") != args.duo_map
            or (cal is not None and cal != _map_calibration(args.duo_map, args.model))):
        raise SystemExit(f"--merge: {path} was made with another model, grid, agreement setting or head map "
                         f"({old['command']}); rerun without --merge")
    return old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma list of {', '.join(POLICIES)}")
    ap.add_argument("--lengths", default="2000,4000")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--agree-length", type=int, default=3000)
    ap.add_argument("--agree-tokens", type=int, default=32)
    ap.add_argument("--duo-map", default=None, metavar="PATH",
                    help="head map (.json from scripts/calibrate_duo.py) for the duo and lserve rows, passed as their "
                         "option duo_map; default: the shipped map for the model")
    ap.add_argument("--out", default="results")
    ap.add_argument("--merge", action="store_true",
                    help="keep the policies of an existing <out>/decode_niah.json that this run does not redo (same "
                         "lengths, depths and agreement settings; dense reruns only for the agreement baseline)")
    args = ap.parse_args(argv)
    if args.duo_map and args.duo_map.endswith(".json") and not os.path.isfile(args.duo_map):
        ap.error(f"--duo-map {args.duo_map}: no such file")
    from accel.models import load_model

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model, tok = load_model(args.model, dtype="float32", quiet=True)
    policies = [p.strip() for p in args.policies.split(",")]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        ap.error(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    old = _old_results(args) if args.merge else None
    if old is None and policies[0] != "dense":
        policies.insert(0, "dense")
    t0 = time.time()
    cells, agree, n_agree = run(model, tok, policies, [int(x) for x in args.lengths.split(",")],
                                [float(x) for x in args.depths.split(",")], args.new_tokens, args.agree_length,
                                args.agree_tokens, duo_map=args.duo_map)
    import transformers

    res = {"model": args.model, "policies": policies, "cells": cells, "agreement": agree,
           "agree_prompt_tokens": n_agree, "agree_tokens": args.agree_tokens,
           "command": shlex.join(["python", "scripts/eval_decode_niah.py", *(argv if argv is not None
                                                                             else sys.argv[1:])]),
           "device": f"cpu ({os.cpu_count()} cores)", "date": datetime.date.today().isoformat(),
           "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, python "
                       f"{platform.python_version()}", "seconds": round(time.time() - t0, 1),
           "duo_map": args.duo_map, "duo_map_calibration": _map_calibration(args.duo_map, args.model)}
    if old is not None:
        res["cells"] = [c for c in old["cells"] if c["policy"] not in policies] + cells
        res["agreement"] = {**old["agreement"], **agree}
        res["policies"] = [p for p in old["policies"] if p not in policies] + policies
        res["command"] = old["command"] + "` then `" + res["command"]
        res["seconds"] = round(old["seconds"] + res["seconds"], 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_niah.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "decode_niah.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
