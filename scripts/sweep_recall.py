"""Attention recall and density of the prefill policies over a small grid of their main knobs (real demo models).

Cheap by construction: per prompt, ONE dense prefill forward (``accel.recall.capture_qk``, no generation) records
every layer's post-RoPE q/k; each policy setting then only plans its layout on those q/k and measures it, layer by
layer, exactly as ``accel.stats`` does with ``collect_stats=True`` (``layout_recall`` on 64 sampled query rows with
seed = layer index, the model's own scale and soft-capping; density = share of causal pairs computed), over the
model's global (non-sliding) layers. One difference from a patched run (scripts/eval_prefill_niah.py): there,
later layers see q/k computed after earlier layers ran sparse; here every layer sees dense-model q/k.

Writes ``<out>/recall_sweep.json`` and ``<out>/recall_sweep.md``.

    python scripts/sweep_recall.py                                    # the default grid, both demo models
    python scripts/sweep_recall.py --model smollm2 --lengths 2048 --grid "xattention:threshold=0.95 proxy"

A grid entry is ``POLICY[@map][:option=value,option=value]``; entries are separated by spaces or ';'.
``@map`` adds ``head_map=vertical_slash_<model>`` (the shipped MInference head map)."""

from __future__ import annotations

import argparse
import dataclasses
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

from accel.attention import _density  # noqa: E402
from accel.models import load_model  # noqa: E402
from accel.needle import build_needle_prompt  # noqa: E402
from accel.policies import AttentionContext, policy_class  # noqa: E402
from accel.recall import capture_qk, layout_recall  # noqa: E402
from bench_utils import model_policy_spec  # noqa: E402

DEFAULT_GRID = " ".join([
    "xattention", "xattention:threshold=0.93", "xattention:threshold=0.95", "xattention:threshold=0.97",
    "xattention:stride=4", "xattention:threshold=0.93,stride=4", "xattention:threshold=0.95,stride=4",
    "flexprefill", "flexprefill:gamma=0.93", "flexprefill:gamma=0.95",
    "proxy", "proxy:gamma=0.93", "proxy:gamma=0.95", "proxy:query_stride=4", "proxy:gamma=0.93,query_stride=4",
    "proxy:gamma=0.95,query_stride=4",
    # (a head map with sizes fixes its patterns' sizes: size options go with maps without them, or no map)
    "vertical_slash@map", "vertical_slash", "vertical_slash:a_shape_window=2048", "vertical_slash:vertical_size=2000",
])
# (length, depth) prompts per model; the smollm2 and gemma3 4K prompts are those of scripts/eval_prefill_niah.py
# with --depths 0.25,0.75 (same seeds), so the two can be compared.
DEFAULT_PROMPTS = {"smollm2": "2048@0.25,2048@0.75,4096@0.25,4096@0.75",
                   "gemma3": "4096@0.25,4096@0.75,8192@0.5"}


def parse_entry(entry: str, model_name: str) -> tuple[str, str, dict]:
    """``POLICY[@map][:k=v,...]`` -> (label, policy name, options)."""
    return (entry, *model_policy_spec(entry, model_name))


def attention_params(model) -> dict[int, tuple[float | None, float | None]]:
    """layer index -> (scale, softcap) as the model passes them to the attention function."""
    out = {}
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "scaling") and hasattr(mod, "q_proj"):
            out[mod.layer_idx] = (float(mod.scaling), getattr(mod, "attn_logit_softcapping", None))
    return out


def measure(policy, layers: dict, params: dict, rows: int) -> tuple[list[float], list[float], float]:
    """Per global layer recall and density of ``policy``'s layouts, and the planning seconds."""
    recalls, dens, t_plan = [], [], 0.0
    for li, cap in layers.items():
        q, k = cap["q"], cap["k"]
        ctx = AttentionContext(layer_idx=li, phase="prefill", sliding_window=None)
        t0 = time.time()
        layout = policy.plan(q, k, ctx)
        t_plan += time.time() - t0
        scale, softcap = params.get(li, (None, None))
        recalls.append(layout_recall(layout, q, k, scale=scale, softcap=softcap, rows=rows, seed=li))
        d = _density(layout, q.shape[2], k.shape[2], True)
        dens.append(1.0 if d is None else d)
    return recalls, dens, t_plan


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarize(rows: list[dict], entries: list[str], models: list[str]) -> list[dict]:
    """Per (model, setting): means over prompts, worst layer and worst prompt; grouped by policy, defaults first."""
    summary = []
    for model in models:
        for setting in dict.fromkeys(r["setting"] for r in rows if r["model"] == model):
            rs = [r for r in rows if r["model"] == model and r["setting"] == setting]
            by_len: dict[str, list[dict]] = {}
            for r in rs:
                by_len.setdefault(f"{round(r['length'] / 1024)}K", []).append(r)
            summary.append({"model": model, "setting": setting, "prompts": len(rs),
                            "mean_recall": _mean([r["recall"] for r in rs]),
                            "min_layer_recall": min(r["min_layer_recall"] for r in rs),
                            "worst_prompt_recall": min(r["recall"] for r in rs),
                            "mean_density": _mean([r["density"] for r in rs]),
                            "plan_seconds": _mean([r["plan_seconds"] for r in rs]),
                            "by_length": {n: {"prompts": len(v), "recall": _mean([r["recall"] for r in v]),
                                              "density": _mean([r["density"] for r in v])}
                                          for n, v in by_len.items()}})
    pol_order = list(dict.fromkeys(e.partition(":")[0] for e in entries))
    summary.sort(key=lambda s: (pol_order.index(s["setting"].partition(":")[0]), ":" in s["setting"],
                                s["setting"].partition(":")[2], models.index(s["model"])))
    return summary


def markdown(summary: list[dict], meta: dict) -> str:
    defaults = meta.get("defaults", {})
    lines = ["# Attention recall sweep of the prefill policies (real demo models)", "",
             f"Command: `{meta['command']}`  ",
             f"Device: {meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}; {meta['date']}; "
             f"total {meta['seconds']} s.", "",
             "One dense prefill forward per prompt captures every layer's q/k; each setting plans its layouts on "
             f"them and is measured as `accel.stats` does ({meta['rows']} sampled query rows per layer, seed = layer "
             "index): recall = share of the dense softmax mass kept, density = share of causal query-key pairs "
             "computed, over the model's global (non-sliding) layers (SmolLM2: all 30; Gemma-3: the 3 global of 18). "
             "Mean recall and density: averaged over layers and prompts; min layer recall: the worst layer of any "
             "prompt; worst prompt: the lowest per-prompt mean recall. Prompts: "
             + "; ".join(f"{m}: {p}" for m, p in meta["prompts"].items()) + " (tokens@needle depth). "
             "A patched run (scripts/eval_prefill_niah.py) sees q/k after earlier layers ran sparse and can read "
             "slightly lower (xattention ~0.005-0.01 at 4K).", ""]
    if defaults:
        lines += ["\"defaults\" are the options at the time of the run (a setting overrides only what it names): "
                  + "; ".join(f"{p}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for p, o in defaults.items())
                  + ".", ""]
    lines += ["| policy | setting | model | prompts | mean recall | min layer recall | worst prompt | mean density | "
              "plan s/prompt |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        pol, _, setting = s["setting"].partition(":")
        lines.append(f"| {pol} | {setting or 'defaults'} | {s['model']} | {s['prompts']} | {s['mean_recall']:.3f} | "
                     f"{s['min_layer_recall']:.3f} | {s['worst_prompt_recall']:.3f} | {s['mean_density']:.3f} | "
                     f"{s['plan_seconds']:.1f} |")
    lengths = sorted({n for s in summary for n in s.get("by_length", {})}, key=lambda n: int(n[:-1]))
    if lengths:
        lines += ["", "By prompt length (mean recall / mean density):", "",
                  "| policy | setting | model | " + " | ".join(lengths) + " |",
                  "| --- | --- | --- |" + " --- |" * len(lengths)]
        for s in summary:
            pol, _, setting = s["setting"].partition(":")
            cells = [f"{b['recall']:.3f} / {b['density']:.3f}" if (b := s["by_length"].get(n)) else ""
                     for n in lengths]
            lines.append(f"| {pol} | {setting or 'defaults'} | {s['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="demo model (repeatable; default smollm2 and gemma3)")
    ap.add_argument("--prompts", action="append",
                    help="MODEL=LEN@DEPTH,LEN@DEPTH,... (repeatable; defaults: " +
                         "; ".join(f"{m}={p}" for m, p in DEFAULT_PROMPTS.items()) + ")")
    ap.add_argument("--grid", default=DEFAULT_GRID, help="settings, separated by spaces or ';' (see module doc)")
    ap.add_argument("--rows", type=int, default=64, help="sampled query rows per layer (accel.stats uses 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an existing <out>/recall_sweep.json that this run does not redo")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite <out>/recall_sweep.{json,md} tables from the rows of <out>/recall_sweep.json")
    args = ap.parse_args(argv)
    if args.render:
        path = Path(args.out) / "recall_sweep.json"
        data = json.loads(path.read_text())
        models = list(data["meta"]["prompts"])
        entries = list(dict.fromkeys(s["setting"] for s in data["summary"]))
        data["summary"] = summarize(data["rows"], entries, models)
        path.write_text(json.dumps(data, indent=1))
        (Path(args.out) / "recall_sweep.md").write_text(markdown(data["summary"], data["meta"]))
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.time()
    models = args.model or ["smollm2", "gemma3"]
    prompts = dict(DEFAULT_PROMPTS)
    for p in args.prompts or []:
        m, _, spec = p.partition("=")
        prompts[m] = spec
    entries = [e for e in args.grid.replace(";", " ").split() if e]
    rows = []
    for name in models:
        model, tok = load_model(name, device="cpu", dtype="float32", quiet=True)
        params = attention_params(model)
        settings = [parse_entry(e, name) for e in entries]
        policies = {label: policy_class(pname).from_options(**opts) for label, pname, opts in settings}
        for label, pol in policies.items():
            if hasattr(pol, "check_model"):
                pol.check_model(model)
        for i, spec in enumerate(prompts[name].split(",")):
            length, _, depth = spec.partition("@")
            depth = float(depth or 0.5)
            # seed as scripts/eval_prefill_niah.py: seed + index of the depth in its --depths list
            depth_index = [float(s.partition("@")[2] or 0.5) for s in prompts[name].split(",")
                           if s.partition("@")[0] == length].index(depth)
            prompt = build_needle_prompt(tok, int(length), depth=depth, seed=args.seed + depth_index)
            ids = torch.tensor([prompt.input_ids])
            t0 = time.time()
            cap = capture_qk(model, ids)
            t_cap = time.time() - t0
            glob = {li: c for li, c in sorted(cap.items()) if c["sliding_window"] is None}
            del cap
            print(f"{name} {ids.shape[1]} tokens depth {depth}: capture {t_cap:.1f}s, {len(glob)} global layers",
                  flush=True)
            for label, pol in policies.items():
                rec, dens, t_plan = measure(pol, glob, params, args.rows)
                rows.append({"model": name, "setting": label, "length": ids.shape[1], "depth": depth,
                             "recall": _mean(rec), "min_layer_recall": min(rec), "density": _mean(dens),
                             "layer_recall": [round(r, 4) for r in rec], "layer_density": [round(d, 4) for d in dens],
                             "plan_seconds": round(t_plan, 2)})
                print(f"  {label:42s} recall {_mean(rec):.3f} (min layer {min(rec):.3f}) density {_mean(dens):.3f} "
                      f"plan {t_plan:.1f}s", flush=True)
            del glob
        del model
    import transformers

    meta = {"command": "python scripts/sweep_recall.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
            "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
            "seconds": round(time.time() - t_start, 1), "rows": args.rows,
            "prompts": {m: prompts[m] for m in models},
            "defaults": {p: dataclasses.asdict(policy_class(p)()) for p in
                         dict.fromkeys(e.partition(":")[0].removesuffix("@map") for e in entries)}}
    out = Path(args.out)
    old_path = out / "recall_sweep.json"
    if args.merge and old_path.is_file():
        old = json.loads(old_path.read_text())
        key = lambda r: (r["model"], r["setting"], r["length"], r["depth"])  # noqa: E731
        redone = {key(r) for r in rows}
        rows = [r for r in old["rows"] if key(r) not in redone] + rows
        entries = list(dict.fromkeys([s["setting"] for s in old["summary"]] + entries))
        models = list(dict.fromkeys(old["meta"]["prompts"]) | dict.fromkeys(models))
        meta["command"] = old["meta"]["command"] + "` then `" + meta["command"]
        meta["seconds"] = round(old["meta"]["seconds"] + meta["seconds"], 1)
        meta["prompts"] = {**old["meta"]["prompts"], **meta["prompts"]}
        old_defaults = old["meta"].get("defaults", {})
        if any(meta["defaults"].get(p, o) != o for p, o in old_defaults.items()):
            raise SystemExit("--merge: the policies' defaults changed since the old run, rows labelled 'defaults' "
                             "would mix two settings; run without --merge")
        meta["defaults"] = {**old_defaults, **meta["defaults"]}
    summary = summarize(rows, entries, models)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall_sweep.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    (out / "recall_sweep.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
