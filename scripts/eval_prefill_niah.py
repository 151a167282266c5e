"""Needle-in-a-haystack accuracy and attention recall of the sparse prefill policies on the real demo models.

For each model, context length and needle depth, the same prompt is answered (greedy, a few tokens) with dense
attention and with each prefill policy at its defaults (reference backend, ``collect_stats=True``), and the table
reports accuracy (needle found), mean attention recall and mean prefill density over the model's global
(non-sliding) layers. Writes ``<out>/prefill_niah.json`` and ``<out>/prefill_niah.md``.

    python scripts/eval_prefill_niah.py                       # smollm2 2K/4K + gemma3 4K, 3 depths (~25 min CPU)
    python scripts/eval_prefill_niah.py --model smollm2 --lengths 4096 --depths 0.5 --policies dense,flexprefill

Policy names are accel policies; ``NAME@map`` adds ``head_map=vertical_slash_<model>`` (the shipped head map),
``NAME@fp8`` ``estimate_dtype="fp8"`` (XAttention's FP8 estimate, which the GPU takes by default; on the CPU the
torch estimate runs on the same quantised values); ``NAME:key=value,key=value`` sets options (then separate the
policies with ';': ``--policies "dense;proxy:gamma=0.95"``)."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accel  # noqa: E402
from accel.models import load_model  # noqa: E402
from accel.needle import build_needle_prompt, needle_found  # noqa: E402
from bench_utils import model_policy_spec  # noqa: E402

DEFAULT_POLICIES = "dense,xattention,flexprefill,proxy,vertical_slash,vertical_slash@map"
DEFAULT_LENGTHS = {"smollm2": [2048, 4096], "gemma3": [4096]}


def run_case(model, tok, policy: str, options: dict, prompt, max_new_tokens: int = 6) -> dict:
    """One greedy answer with ``policy`` (reference backend, stats on): found, recall, density, seconds."""
    accel.patch(model, policy, backend="reference", collect_stats=True, **options)
    ids = torch.tensor([prompt.input_ids])
    t0 = time.time()
    try:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id)
        st = accel.stats(model)
    finally:
        accel.unpatch(model)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    glob = [layer for layer in st["layers"] if layer["sliding_window"] is None]
    rec = [layer["prefill_recall"] for layer in glob if layer["prefill_recall"] is not None]
    dens = [layer["prefill_density"] for layer in glob if layer["prefill_density"] is not None]
    return {
        "found": needle_found(text, prompt.answer),
        "answer": text,
        "expected": prompt.answer,
        "recall": sum(rec) / len(rec) if rec else None,
        "min_layer_recall": min(rec) if rec else None,
        "density": sum(dens) / len(dens) if dens else None,
        "seconds": round(time.time() - t0, 1),
    }


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for pol in dict.fromkeys(r["policy"] for r in rows if r["model"] == model):
            rs = [r for r in rows if r["model"] == model and r["policy"] == pol]
            dense = {(r["length"], r["depth"]): r["found"] for r in rows
                     if r["model"] == model and r["policy"] == "dense"}
            agree = [r["found"] == dense.get((r["length"], r["depth"])) for r in rs if (r["length"], r["depth"]) in dense]
            out.append({
                "model": model, "policy": pol, "cases": len(rs),
                "accuracy": 100.0 * sum(r["found"] for r in rs) / len(rs),
                "agree_with_dense": 100.0 * sum(agree) / len(agree) if agree else None,
                "mean_recall": _mean([r["recall"] for r in rs]),
                "min_layer_recall": min((r["min_layer_recall"] for r in rs if r["min_layer_recall"] is not None),
                                        default=None),
                "mean_density": _mean([r["density"] for r in rs]),
                "seconds": round(sum(r["seconds"] for r in rs), 1),
            })
    return out


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def markdown(summary: list[dict], rows: list[dict], meta: dict) -> str:
    lines = ["# Needle-in-a-haystack with sparse prefill policies (real demo models)", "",
             f"Command: `{meta['command']}`  ", f"Device: {meta['device']}; torch {meta['torch']}, transformers "
             f"{meta['transformers']}; {meta['date']}; total {meta['seconds']} s.", "",
             "Each policy at its defaults (reference backend). Recall: share of the dense softmax mass the layout "
             "keeps (64 sampled query rows per layer and call), density: share of causal query-key pairs computed; "
             "both averaged over the model's global (non-sliding) layers and all prompts.", "",
             "| model | policy | cases | accuracy | same as dense | mean recall | min layer recall | mean density |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        lines.append(f"| {s['model']} | {s['policy']} | {s['cases']} | {s['accuracy']:.0f}% | "
                     f"{_fmt(s['agree_with_dense'], '.0f')}% | {_fmt(s['mean_recall'])} | "
                     f"{_fmt(s['min_layer_recall'])} | {_fmt(s['mean_density'])} |")
    lines += ["", "Per prompt (found / recall / density):", "",
              "| model | length | depth | " + " | ".join(dict.fromkeys(r["policy"] for r in rows)) + " |",
              "| --- | --- | --- |" + " --- |" * len(dict.fromkeys(r["policy"] for r in rows))]
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    for key in dict.fromkeys((r["model"], r["length"], r["depth"]) for r in rows):
        cells = []
        for p in pols:
            r = next((r for r in rows if (r["model"], r["length"], r["depth"]) == key and r["policy"] == p), None)
            cells.append("" if r is None else f"{'✓' if r['found'] else '✗'} {_fmt(r['recall'], '.3f')} "
                                              f"{_fmt(r['density'], '.2f')}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="demo model (repeatable; default smollm2 and gemma3)")
    ap.add_argument("--lengths", help="comma-separated prompt lengths (default per model: smollm2 2048,4096; "
                                      "gemma3 4096)")
    ap.add_argument("--depths", default="0.2,0.5,0.8", help="comma-separated needle depths")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated (default {DEFAULT_POLICIES})")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an existing <out>/prefill_niah.json that this run does not redo")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t_start = time.time()
    models = args.model or ["smollm2", "gemma3"]
    depths = [float(d) for d in args.depths.split(",")]
    policies = [p.strip() for p in args.policies.split(";" if ";" in args.policies else ",") if p.strip()]
    rows = []
    for name in models:
        model, tok = load_model(name, device="cpu", dtype="float32", quiet=True)
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else DEFAULT_LENGTHS.get(name, [4096])
        for length in lengths:
            for i, depth in enumerate(depths):
                prompt = build_needle_prompt(tok, length, depth=depth, seed=args.seed + i)
                for pol in policies:
                    pname, opts = model_policy_spec(pol, name)
                    r = run_case(model, tok, pname, opts, prompt, args.max_new_tokens)
                    r.update(model=name, policy=pol, length=prompt.num_tokens, depth=depth)
                    rows.append(r)
                    print(f"{name} {prompt.num_tokens:5d} d={depth:.1f} {pol:20s} found={r['found']!s:5} "
                          f"recall={_fmt(r['recall'])} density={_fmt(r['density'])} {r['seconds']:.1f}s "
                          f"{r['answer']!r}", flush=True)
        del model
    import transformers

    meta = {"command": "python scripts/eval_prefill_niah.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
            "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
            "seconds": round(time.time() - t_start, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old_path = out / "prefill_niah.json"
    if args.merge and old_path.is_file():
        old = json.loads(old_path.read_text())
        redone = {(r["model"], r["policy"], r["length"], r["depth"]) for r in rows}
        rows = [r for r in old["rows"] if (r["model"], r["policy"], r["length"], r["depth"]) not in redone] + rows
        meta["command"] = old["meta"]["command"] + "` then `" + meta["command"]
        meta["seconds"] = round(old["meta"]["seconds"] + meta["seconds"], 1)
        order = {k: i for i, k in enumerate(dict.fromkeys((r["model"], r["length"], r["depth"]) for r in rows))}
        rows.sort(key=lambda r: order[(r["model"], r["length"], r["depth"])])
    summary = summarize(rows)
    (out / "prefill_niah.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    (out / "prefill_niah.md").write_text(markdown(summary, rows, meta))
    print(markdown(summary, rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
