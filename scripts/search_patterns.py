"""Offline per-head pattern search for the vertical_slash policy (MInference 1.0, arXiv 2407.02490, section 3.2).

For every head of every global (non-sliding) layer, on one calibration prompt, build each candidate pattern at the
same per-query key budget (kernel-aware: one cost for all; vertical-slash: columns + diagonals from the last 64
queries at MInference's 1000:6096 ratio; A-shape: sink + local window; block-sparse: top 64-token key blocks) and
keep the pattern with the highest attention recall (share of dense softmax mass kept, on sampled query rows, and
on the prompt's last rows, its question, on their own: the worse of the two).
Writes a head map JSON for ``accel.patch(model, "vertical_slash", head_map=...)`` whose ``sizes`` record each
pattern's sizes at that budget: the policy runs every head at the cost its pattern was chosen at.

    python scripts/search_patterns.py gemma3 --length 16384 --needle-check 32736 --check-depths 0.5,0.5 \
        --out configs/vertical_slash_gemma3.json

``--needle-check LENGTH`` then tries each global layer's searched layout alone (every other global layer dense) on
accel-eval's niah_single prompts of LENGTH tokens (their own seed, not the evaluation grids') and leaves dense, in the map's
``dense_layers``, each layer whose layout alone loses a needle dense finds (MInference's ``starting_layer``, per
layer). Recall on sampled rows does not see this: on Gemma-3-270M at 32K the first global layer's layout keeps
0.52-0.98 of each head's mass, about what the later layers keep, yet it alone loses the needle.

The default budget is MInference's 1000 + 6096 = 7096 keys per row, the policy's own vertical_size + slash_size;
the prompt must be well longer than the budget (at least twice: shorter, every pattern keeps nearly everything and
the choice is noise). MODEL is a demo name (smollm2, gemma3), a .gguf file, a folder or a hub id
(accel.models.load_model). CPU is fine (Gemma-3-270M at 16K: a few minutes; the calibration prompt is a
needle-in-a-haystack prompt from accel.needle)."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.models import load_model  # noqa: E402
from accel.needle import build_needle_prompt  # noqa: E402
from accel.patches import find_adapter  # noqa: E402
from accel.policies.vertical_slash import BS_BLOCK, PATTERNS, SIZE_OPTIONS, VerticalSlashPolicy  # noqa: E402
from accel.recall import capture_qk, layout_recall  # noqa: E402


def candidate_policies(budget: int) -> dict[str, tuple[VerticalSlashPolicy, int, int]]:
    """Pattern -> (policy carrying its sizes, vertical_size, slash_size), all at ``budget`` keys per query row."""
    base = VerticalSlashPolicy()
    vertical = max(32, budget * base.vertical_size // (base.vertical_size + base.slash_size))
    sink = min(base.a_shape_sink, budget // 8)
    return {
        "vertical_slash": (VerticalSlashPolicy(vertical_size=vertical, slash_size=budget - vertical), vertical,
                           budget - vertical),
        "a_shape": (VerticalSlashPolicy(a_shape_sink=sink, a_shape_window=budget - sink), 0, 0),
        "block_sparse": (VerticalSlashPolicy(block_count=max(1, budget // BS_BLOCK)), 0, 0),
    }


def pattern_sizes(budget: int) -> dict[str, dict[str, int]]:
    """The head map's ``sizes``: each pattern's options at ``budget`` (what the policy runs it at)."""
    return {pat: {o: getattr(pol, o) for o in SIZE_OPTIONS[pat]} for pat, (pol, _, _) in
            candidate_policies(budget).items()}


def module_params(model) -> dict[int, tuple[float | None, float | None]]:
    out = {}
    for mod in find_adapter(model).attention_modules(model):
        out[mod.layer_idx] = (getattr(mod, "scaling", None), getattr(mod, "attn_logit_softcapping", None))
    return out


def search(model, tok, length: int, budget: int, rows: int, seed: int, depth: float, question_rows: int = 16,
           static_floor: float = 0.9) -> dict:
    prompt = build_needle_prompt(tok, length, depth=depth, seed=seed)
    ids = torch.tensor([prompt.input_ids])
    captured = capture_qk(model, ids)
    params = module_params(model)
    cands = candidate_policies(budget)
    L = ids.shape[1]
    g = torch.Generator().manual_seed(seed)
    # rows from the second half of the prompt (where sparsity matters), plus the last one (the question)
    row_idx = torch.cat([torch.randperm(L - L // 2, generator=g)[: rows - 1] + L // 2, torch.tensor([L - 1])])
    row_idx = row_idx.unique().sort().values
    # and the question's rows on their own: mass there is a small share of the sampled rows' but is the long-range
    # retrieval (a needle beyond an A-shape head's window); a pattern is scored by the worse of the two
    q_idx = torch.arange(max(0, L - question_rows), L)
    patterns, recalls = [], []
    n_layers = max(captured) + 1
    for layer in range(n_layers):
        cap = captured[layer]
        if cap["sliding_window"] is not None:
            patterns.append(None)  # the model's own sliding layers keep their window
            recalls.append(None)
            continue
        q, k = cap["q"], cap["k"]
        scale, softcap = params.get(layer, (None, None))
        per_pattern = {}
        for name, (pol, vs, ss) in cands.items():
            layout = pol.build(q, k, [name] * q.shape[1], vs, ss)
            sampled = layout_recall(layout, q, k, scale=scale, softcap=softcap, rows=row_idx, per_head=True)
            if question_rows:
                asked = layout_recall(layout, q, k, scale=scale, softcap=softcap, rows=q_idx, per_head=True)
                sampled = torch.minimum(sampled, asked)
            per_pattern[name] = sampled
        table = torch.stack([per_pattern[n] for n in PATTERNS])  # [3, H]
        best = table.argmax(0)
        # a static pattern (A-shape, block-sparse) only where it keeps at least static_floor: a head that no pattern
        # covers well is not local, and vertical-slash's columns follow the prompt (Gemma-3-270M at 16K: two such
        # heads, 0.69-0.73 under A-shape, lost the needle that vertical-slash finds)
        vs = PATTERNS.index("vertical_slash")
        best = torch.where(table.max(0).values >= static_floor, best, torch.full_like(best, vs))
        patterns.append([PATTERNS[int(i)] for i in best])
        recalls.append({n: [round(float(x), 4) for x in per_pattern[n]] for n in PATTERNS})
        print(f"layer {layer:2d}: " + " ".join(f"{p[:2]}" for p in patterns[-1])
              + "  best recall " + " ".join(f"{float(table[int(b), h]):.3f}" for h, b in enumerate(best)),
              flush=True)
    return {"prompt_tokens": L, "rows": int(row_idx.numel()), "patterns": patterns, "recall": recalls}


def _answers(model, tok, prompts: list[dict], policy_opts: dict | None, new_tokens: int = 12) -> list[bool]:
    """Whether greedy generation answers each niah prompt (accel.eval.synth samples): dense (``policy_opts``
    None) or vertical_slash with those options."""
    import accel
    from accel.eval.synth import score_sample

    if policy_opts is None:
        accel.unpatch(model)
    else:
        accel.patch(model, "vertical_slash", backend="reference", **policy_opts)
    found = []
    for p in prompts:
        ids = torch.tensor([tok(p["prompt"], add_special_tokens=not p["chat_template"])["input_ids"]])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
        found.append(score_sample(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), p["outputs"]) == 1)
    return found


def needle_check(model, tok, head_map: dict, length: int, depths: list[float], seed: int, path: Path) -> dict:
    """The global layers whose layout alone loses a needle dense finds, on accel-eval's ``niah_single`` prompts of
    ``seed`` (one per depth; accel-eval's own grids use seed 0). For each global layer, the map runs that layer's
    patterns and every other global layer dense; a layer that loses a needle dense finds on these prompts joins
    ``dense_layers``. Then the map with those layers dense is checked on the same prompts. ``path``: where the
    trial maps are written (the final one is the caller's). Gemma-3-270M at 32736 tokens: about 2.5 min a prompt
    on 2 CPU cores."""
    from accel.eval.synth import generate_samples

    prompts = generate_samples("niah_single", tok, length, num_samples=len(depths), seed=seed, depths=depths)
    dense = _answers(model, tok, prompts, None)
    print(f"needle check at {length} tokens, depths {depths}, seed {seed}: dense finds {dense}", flush=True)
    keep = [i for i, ok in enumerate(dense) if ok]
    glob = [i for i, row in enumerate(head_map["patterns"]) if row is not None]
    out = {"length": length, "depths": depths, "seed": seed, "dense_found": dense, "layer_alone_found": {}}
    if not keep:
        print("dense finds no needle at this length: nothing to check against", flush=True)
        out["dense_layers"] = []
        return out
    kept_prompts = [prompts[i] for i in keep]
    dense_layers = []
    for layer in glob:
        trial = dict(head_map, dense_layers=[i for i in glob if i != layer])
        path.write_text(json.dumps(trial))
        found = _answers(model, tok, kept_prompts, {"head_map": str(path)})
        out["layer_alone_found"][layer] = found
        print(f"layer {layer:2d} alone sparse: finds {found}", flush=True)
        if not all(found):
            dense_layers.append(layer)
    path.write_text(json.dumps(dict(head_map, dense_layers=dense_layers)))
    out["dense_layers"] = dense_layers
    out["map_found"] = _answers(model, tok, kept_prompts, {"head_map": str(path)})
    print(f"dense layers {dense_layers}; the map finds {out['map_found']}", flush=True)
    import accel

    accel.unpatch(model)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="demo name (smollm2, gemma3), .gguf file, folder or hub id")
    ap.add_argument("--length", type=int, default=16384, help="calibration prompt length in tokens (default 16384)")
    ap.add_argument("--budget", type=int, default=None,
                    help="keys per query row every pattern gets, and runs at (default: vertical_size + slash_size "
                         "of the policy, 7096)")
    ap.add_argument("--rows", type=int, default=64, help="sampled query rows for recall (default 64)")
    ap.add_argument("--depth", type=float, default=0.5, help="needle depth of the calibration prompt")
    ap.add_argument("--static-floor", type=float, default=0.9,
                    help="A-shape / block-sparse only for heads where it keeps at least this recall; others stay "
                         "vertical-slash (default 0.9)")
    ap.add_argument("--question-rows", type=int, default=16,
                    help="the prompt's last rows (its question), scored on their own too: a head's recall for a "
                         "pattern is the worse of the sampled rows' and these (0: sampled rows only; default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--needle-check", type=int, default=None, metavar="LENGTH",
                    help="after the search, find the global layers whose layout alone loses a needle dense finds "
                         "at LENGTH tokens and leave them dense in the map (its dense_layers); slow: a generation "
                         "per global layer and prompt")
    ap.add_argument("--check-depths", default="0.25,0.5,0.75",
                    help="needle depths of --needle-check's prompts, one prompt each (a depth may repeat)")
    ap.add_argument("--check-seed", type=int, default=7,
                    help="seed of --needle-check's niah_single prompts (accel-eval's grids use seed 0)")
    ap.add_argument("--out", help="output JSON (default configs/vertical_slash_<model>.json)")
    args = ap.parse_args(argv)
    base = VerticalSlashPolicy()
    if args.budget is None:
        args.budget = base.vertical_size + base.slash_size
    if args.budget <= 0 or args.length <= 0 or args.rows <= 0:
        ap.error("--length, --budget and --rows must be > 0")
    if args.question_rows < 0 or not 0.0 <= args.static_floor <= 1.0:
        ap.error("--question-rows must be >= 0 and --static-floor within [0, 1]")
    if args.length < 2 * args.budget:
        ap.error(f"--length {args.length} must be at least twice --budget {args.budget}: shorter, every pattern "
                 "keeps nearly every key and the choice between them is noise")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    res = search(model, tok, args.length, args.budget, args.rows, args.seed, args.depth, args.question_rows,
                 args.static_floor)
    cfg = getattr(model.config, "text_config", None) or model.config
    name = Path(args.model).stem if args.model.endswith(".gguf") else args.model.replace("/", "_")
    counts = {p: sum(row.count(p) for row in res["patterns"] if row) for p in PATTERNS}
    out = {
        "model": name,
        "model_class": type(model).__name__,
        "num_layers": cfg.num_hidden_layers,
        "num_heads": cfg.num_attention_heads,
        "patterns": res["patterns"],
        "pattern_counts": counts,
        "sizes": pattern_sizes(args.budget),
        "search": {
            "command": "python scripts/search_patterns.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "calibration": f"needle prompt, {res['prompt_tokens']} tokens, depth {args.depth}, seed {args.seed}",
            "budget_keys_per_row": args.budget,
            "sampled_rows": res["rows"],
            "recall_per_head": res["recall"],
            "device": f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "seconds": round(time.time() - t0, 1),
        },
    }
    path = Path(args.out or Path(__file__).resolve().parents[1] / "configs" / f"vertical_slash_{name}.json")
    if args.needle_check:
        depths = [float(d) for d in args.check_depths.split(",")]
        check = needle_check(model, tok, out, args.needle_check, depths, args.check_seed, path)
        out["dense_layers"] = check["dense_layers"]
        out["search"]["needle_check"] = check
        out["search"]["seconds"] = round(time.time() - t0, 1)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"patterns: {counts}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
