"""Per-layer thresholds of a prefill policy for a model: for each full-attention layer, the smallest threshold
(XAttention's ``threshold``, FlexPrefill's and ProxyAttn's ``gamma``) whose layout keeps at least ``--target`` of
the dense attention mass on every calibration prompt (XAttention's threshold prediction, per layer). Writes a map
that the policy loads (``layer_thresholds``; the shipped ones under configs/ are picked automatically for their model).

    python scripts/calibrate_xattention.py smollm2                      # -> configs/xattention_smollm2.json
    python scripts/calibrate_xattention.py gemma3 --lengths 8192
    python scripts/calibrate_xattention.py gemma3 --lengths 8192 --policy flexprefill  # configs/flexprefill_gemma3.json
    python scripts/calibrate_xattention.py smollm2 --policy proxy                     # configs/proxy_smollm2.json
    python scripts/calibrate_xattention.py ./my-model --out /tmp/thr.json --target 0.97

Calibration prompts are needle prompts with seeds (100, 101, ...) that the evaluation scripts do not use, and the
recall rows are sampled with seeds (1000 + layer) other than those of ``accel.stats`` (the layer index), so a map
is not measured on the rows it was fitted to. One dense forward per prompt captures every layer's q/k; each layer
is scored once and its layout tried at every threshold of the grid (CPU: ~1 min per 4K prompt on SmolLM2-135M;
FlexPrefill plans anew at each value of the grid).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accel.models import load_model  # noqa: E402
from accel.needle import build_needle_prompt  # noqa: E402
from accel.policies import AttentionContext, policy_class  # noqa: E402
from accel.policies.duo import model_signature  # noqa: E402
from accel.policies.threshold_map import CALIBRATED_SETTINGS, map_format  # noqa: E402
from accel.policies.xattention import XAttentionPolicy  # noqa: E402
from accel.recall import capture_qk, layout_recall  # noqa: E402
from sweep_recall import attention_params  # noqa: E402

GRID = (0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995)


def layer_recalls(pol, q, k, scale, softcap, rows: int, seed: int, layer: int) -> list[float]:
    """Recall of the layer's layout at every threshold of GRID (XAttention: scores computed once)."""
    if isinstance(pol, XAttentionPolicy):
        scores = pol.score(q, k)
        layouts = (pol.layout_from_scores(scores, t, q.shape[2], k.shape[2]) for t in GRID)
    else:
        ctx = AttentionContext(layer_idx=layer, phase="prefill", sliding_window=None)
        layouts = (dataclasses.replace(pol, **{pol._layer_option: t}).plan(q, k, ctx) for t in GRID)
    return [float(layout_recall(lay, q, k, scale=scale, softcap=softcap, rows=rows, seed=seed)) for lay in layouts]


def calibrate(model, tok, *, lengths: list[int], depths: list[float], target: float, rows: int,
              policy: str = "xattention", log=print) -> tuple[list[float | None], dict]:
    """Per layer the smallest GRID threshold reaching ``target`` on every prompt (the largest of GRID where none
    does), None for sliding-window layers; and the per-prompt recall tables."""
    params = attention_params(model)
    pol = policy_class(policy).from_options(layer_thresholds="none")
    n_layers = (getattr(model.config, "text_config", None) or model.config).num_hidden_layers
    need: list[float | None] = [None] * n_layers
    tables = {}
    seed = 100
    for length in lengths:
        for depth in depths:
            p = build_needle_prompt(tok, length, depth=depth, seed=seed)
            t0 = time.time()
            layers = capture_qk(model, torch.tensor([p.input_ids], device=model.device))
            table = {}
            for i, cap in sorted(layers.items()):
                if cap["sliding_window"] is not None:
                    continue
                scale, softcap = params.get(i, (None, None))
                table[i] = layer_recalls(pol, cap["q"], cap["k"], scale, softcap, rows, 1000 + i, i)
                first = next((t for t, r in zip(GRID, table[i]) if r >= target), GRID[-1])
                need[i] = max(need[i] or 0.0, first)
            tables[f"{p.num_tokens}@{depth}:seed{seed}"] = table
            log(f"  prompt {p.num_tokens} tokens, depth {depth}, seed {seed}: {time.time() - t0:.0f} s")
            seed += 1
    return need, tables


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="demo name (smollm2, gemma3), .gguf file, model folder or hub id")
    ap.add_argument("--policy", default="xattention", choices=["xattention", "flexprefill", "proxy"])
    ap.add_argument("--target", type=float, default=0.96, help="recall each layer must keep (default 0.96)")
    ap.add_argument("--lengths", default="4096", help="calibration prompt lengths, comma-separated (default 4096)")
    ap.add_argument("--depths", default="0.3,0.7", help="needle depths of the calibration prompts")
    ap.add_argument("--rows", type=int, default=128, help="sampled query rows per layer and prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="default configs/<policy>_<model>.json for a demo model")
    args = ap.parse_args(argv)
    if not 0.0 < args.target < 1.0:
        ap.error(f"--target must be in (0, 1), got {args.target}")
    out = args.out or (f"configs/{args.policy}_{args.model}.json" if args.model.isidentifier() else None)
    if out is None:
        ap.error("--out FILE is required for a model that is not a demo name")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu", dtype="float32", quiet=True)
    t0 = time.time()
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    print(f"calibrating {args.policy} on {args.model}: target recall {args.target}, prompts {lengths} x depths {depths}",
          file=sys.stderr)
    need, tables = calibrate(model, tok, lengths=lengths, depths=depths, target=args.target, rows=args.rows,
                             policy=args.policy, log=lambda m: print(m, file=sys.stderr))
    cls = policy_class(args.policy)
    data = {"format": map_format(args.policy), "model": model_signature(model.config), "target_recall": args.target,
            "thresholds": need,
            "calibration": {"command": shlex.join(["python", "scripts/calibrate_xattention.py",
                                                     *(argv if argv is not None else sys.argv[1:])]),
                            "lengths": lengths, "depths": depths, "seeds_from": 100, "rows": args.rows,
                            "grid": list(GRID), "option": cls._layer_option,
                            **{k: getattr(cls, k) for k in CALIBRATED_SETTINGS if hasattr(cls, k)},
                            "date": datetime.date.today().isoformat(), "seconds": round(time.time() - t0, 1),
                            "recall": tables}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}: thresholds {need}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
