"""Does vertical_slash's shipped map need its dense layers? On accel-eval niah_single prompts of a seed the map was
not chosen on: dense, the map with one of its dense layers run sparse (the other global layers dense), and the
shipped map as it is.

    python scripts/vs_dense_layer_check.py --model gemma3 --seed 11 --depths 0.25,0.5,0.75 --layer 5

CPU, float32, greedy; about 5-10 min per 32K generation of Gemma-3-270M on 2 cores. Prints one line per run and
writes --out (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from search_patterns import _answers  # noqa: E402

from accel.eval.synth import generate_samples  # noqa: E402
from accel.models import load_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--map", default=None, help="head map JSON (default configs/vertical_slash_<model>.json)")
    ap.add_argument("--length", type=int, default=32736)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--layer", type=int, default=5, help="the dense layer of the map to run sparse")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    path = Path(args.map or os.path.join(ROOT, "configs", f"vertical_slash_{args.model}.json"))
    shipped = json.loads(path.read_text())
    glob = [i for i, row in enumerate(shipped["patterns"]) if row is not None]
    if args.layer not in glob:
        raise SystemExit(f"layer {args.layer} is not a global layer of {path} (global: {glob})")
    depths = [float(x) for x in args.depths.split(",")]
    model, tok = load_model(args.model, device="cpu", quiet=True)
    prompts = generate_samples("niah_single", tok, args.length, num_samples=len(depths), seed=args.seed, depths=depths)
    res = {"model": args.model, "map": str(path), "length": args.length, "seed": args.seed, "depths": depths,
           "layer": args.layer, "map_dense_layers": shipped.get("dense_layers", [])}
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / f"vs_layer{args.layer}_alone.json"
        trial.write_text(json.dumps(dict(shipped, dense_layers=[i for i in glob if i != args.layer])))
        for key, opts in (("dense", None), (f"layer {args.layer} alone sparse", {"head_map": str(trial)}),
                          ("map as shipped", {"head_map": str(path)})):
            res[key] = _answers(model, tok, prompts, opts)
            print(f"{key}: {res[key]} ({time.time() - t:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
