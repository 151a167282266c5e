"""``accel-eval``: a grid of policies × lengths × tasks on one model, with tables and plots. Resumable."""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import shlex
import sys
import time
from pathlib import Path

from accel.cli import CLIError

EXAMPLES = """examples:
  accel-eval --model smollm2 --lengths 1024,2048,4096 --samples 5 --out results/eval_smollm2
  accel-eval --policy dense --policy streaming:sink=64,window=512 --policy xattention:threshold=0.9 \\
      --tasks niah_single,vt --lengths 2048
  accel-eval --tasks longbench:hotpotqa --longbench-dir ~/LongBench/data --lengths 4096 --samples 20

Rerunning the same command reuses every finished cell (OUT/cells/*.json); corrupt or half-written cell files, or
cells made with other settings, are reported and recomputed. Outputs: OUT/eval.json, OUT/eval.md and the plots
OUT/needle_heatmap_TASK.png (one per niah task) and OUT/accuracy_vs_length.png.
"""


def build_parser() -> argparse.ArgumentParser:
    from .synth import OFFLINE_TASKS

    p = argparse.ArgumentParser(
        prog="accel-eval", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Accuracy of sparse-attention policies next to dense: runs policies x lengths x tasks on one "
        "model (offline RULER-style tasks generated locally, or LongBench jsonl from a local folder).")
    p.add_argument("--model", default="smollm2",
                   help="demo model (smollm2, gemma3), .gguf file, local folder or hub id (default smollm2)")
    p.add_argument("--policy", action="append", default=None, metavar="NAME[:K=V,...]",
                   help="a policy with its options, repeatable (default: dense and every implemented policy with "
                   "its defaults)")
    p.add_argument("--lengths", default="1024,2048,4096", metavar="N,N,...",
                   help="prompt lengths in the model's own tokens (default 1024,2048,4096)")
    p.add_argument("--tasks", default="niah_single,niah_multikey,vt", metavar="T,T,...",
                   help=f"tasks: {', '.join(OFFLINE_TASKS)}, or longbench:NAME (default niah_single,niah_multikey,vt)")
    p.add_argument("--samples", type=int, default=5, help="samples per cell (default 5)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", metavar="D,D,...",
                   help="needle depths for the niah tasks, cycled over the samples (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="override each task's generation length")
    p.add_argument("--longbench-dir", default=None, metavar="DIR", help="folder of LongBench DATASET.jsonl files")
    p.add_argument("--backend", default="auto", help="attention backend (default auto)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default results/eval_MODEL)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise CLIError(f"--{what} must be comma-separated integers, got {text!r}") from exc
    if not vals or any(v <= 0 for v in vals):
        raise CLIError(f"--{what} must be positive integers, got {text!r}")
    return sorted(set(vals))


def _default_policies() -> list[str]:
    import accel

    return [n for n, info in accel.available_policies().items() if info["implemented"]]


def _versions() -> dict:
    import platform

    import torch
    import transformers

    import accel

    return {"accel": accel.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _device_info(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
           f"{torch.get_num_threads()})"


def run(args) -> dict:
    import accel

    from .grid import GridConfig, parse_policy_entry, run_grid, summarize
    from .synth import get_task

    lengths = _ints(args.lengths, "lengths")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CLIError("--tasks is empty")
    for t in tasks:
        if t.startswith("longbench:"):
            if not args.longbench_dir:
                raise CLIError(f"task {t}: give --longbench-dir DIR, a folder with LongBench's {t[10:]}.jsonl")
            from .longbench import load_longbench

            load_longbench(args.longbench_dir, t[10:], limit=1)
        else:
            get_task(t)
    if args.samples <= 0:
        raise CLIError(f"--samples must be positive, got {args.samples}")
    try:
        depths = [float(x) for x in args.depths.split(",") if x.strip()]
    except ValueError as exc:
        raise CLIError(f"--depths must be comma-separated fractions, got {args.depths!r}") from exc
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise CLIError(f"--depths must be fractions between 0 and 1, got {args.depths!r}")
    entries = [parse_policy_entry(p) for p in (args.policy or _default_policies())]
    if len({e.label for e in entries}) != len(entries):
        raise CLIError("the same --policy is given twice")
    for e in entries:
        accel.parse_policy(e.policy, **e.options)  # bad policies fail before the model loads
    from accel.kernels import BACKEND_NAMES

    if args.backend not in BACKEND_NAMES:
        raise CLIError(f"unknown backend {args.backend!r}; choose one of {', '.join(BACKEND_NAMES)}")

    from accel.cli import _pick_device, _pick_dtype
    from accel.models import load_model

    device = _pick_device(args.device)
    dtype = _pick_dtype(args.dtype, device)
    _log(args, f"loading model {args.model} on {device} ({dtype}) ...")
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device=device, dtype=dtype, quiet=args.quiet)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None:
        from .synth import TASKS
        from .longbench import DATASET_MAXLEN

        for t in tasks:
            new = args.max_new_tokens or (DATASET_MAXLEN.get(t[10:], 64) if t.startswith("longbench:")
                                          else TASKS[t].max_new_tokens)
            too_long = [n for n in lengths if n + new > limit]
            if too_long:
                raise CLIError(
                    f"length {too_long[0]} + {new} generated tokens of task {t} exceeds the model's context of "
                    f"{limit} tokens (config.max_position_embeddings); use lengths up to {limit - new}")
    out = Path(args.out or f"results/eval_{Path(args.model).stem if args.model.endswith('.gguf') else args.model}")
    out = Path(str(out).replace("/", os.sep))
    cfg = GridConfig(model_name=args.model, policies=entries, lengths=lengths, tasks=tasks, samples=args.samples,
                     seed=args.seed, depths=depths, backend=args.backend, max_new_tokens=args.max_new_tokens,
                     longbench_dir=args.longbench_dir)
    t1 = time.perf_counter()
    res = run_grid(model, tokenizer, cfg, out, quiet=args.quiet)
    labels = [e.label for e in entries]
    table = summarize(res["cells"], labels, lengths, tasks)
    command = "accel-eval " + " ".join(shlex.quote(a) for a in args._argv)
    meta = {
        "command": command, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": args.model, "model_class": type(model).__name__, "device": _device_info(device),
        "dtype": str(model.dtype).replace("torch.", ""), "max_position_embeddings": limit,
        "backend": args.backend, "policies": labels, "lengths": lengths, "tasks": tasks, "samples": args.samples,
        "depths": depths, "seed": args.seed, "versions": _versions(),
        "load_s": round(t1 - t0, 1), "run_s": round(time.perf_counter() - t1, 1),
        "cells_reused": res["reused"], "cells_computed": res["computed"], "cells_recomputed": res["recomputed"],
        "cell_seconds": round(sum(c["seconds"] for c in res["cells"]), 1),
        "cells_computed_on": dict(collections.Counter(c.get("computed_on", "not recorded") for c in res["cells"])),
    }
    summary = {"meta": meta, "table": table,
               "cells": [{k: v for k, v in c.items() if k != "samples"} for c in res["cells"]]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    plots = []
    if not args.no_plots:
        from .plots import accuracy_vs_length, needle_heatmaps, plots_available

        if plots_available():
            synth_tasks = [t for t in tasks]
            title = f"{args.model}: "
            for task in ("niah_single", "niah_multikey", "niah_multivalue"):
                if task in tasks:
                    p = needle_heatmaps(res["cells"], labels, lengths, out / f"needle_heatmap_{task}.png", task=task,
                                        title=title + f"{task}, score by needle depth × prompt length")
                    if p:
                        plots.append(p.name)
            plots.append(accuracy_vs_length(res["cells"], labels, lengths, synth_tasks,
                                            out / "accuracy_vs_length.png",
                                            title=title + "score against prompt length").name)
        else:
            _log(args, "matplotlib is not installed: no plots (pip install \"accel[eval]\")")
    md = [f"# accel-eval: {args.model}", "",
          f"Command: `{command}`", "",
          f"Model {args.model} ({meta['model_class']}, {meta['dtype']}), device {meta['device']}, backend "
          f"{args.backend}; {args.samples} samples per cell, seed {args.seed}, needle depths {depths}; "
          f"{meta['date']}; versions {json.dumps(meta['versions'])}. Time in cells: {meta['cell_seconds']} s.", "",
          "Cells computed on (a grid resumed on another machine reuses finished cells; this run's device is where "
          "the table was assembled): " + "; ".join(f"{k}: {v}" for k, v in meta["cells_computed_on"].items()) + ".",
          "",
          "Scores in % (RULER string match: share of expected strings in the answer; LongBench: its metric).", "",
          table, ""]
    md += [f"![{p}]({p})" for p in plots]
    (out / "eval.md").write_text("\n".join(md) + "\n")
    return {"out": str(out), "table": table, "meta": meta, "plots": plots}


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(f"[accel-eval] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = argv
    from accel.models import ModelLoadError

    from .synth import LengthTooSmallError, UnknownTaskError

    try:
        res = run(args)
    except KeyboardInterrupt:
        print("accel-eval: interrupted; every finished cell is saved, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except (CLIError, ModelLoadError, UnknownTaskError, LengthTooSmallError, FileNotFoundError) as exc:
        print(f"accel-eval: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # policy / option validation from accel
        from accel import PolicyNotImplemented

        if isinstance(exc, (PolicyNotImplemented, ValueError)):
            print(f"accel-eval: error: {exc}", file=sys.stderr)
            return 2
        raise
    print(res["table"])
    print(f"\nwrote {res['out']}/eval.json, eval.md" + (", " + ", ".join(res["plots"]) if res["plots"] else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
