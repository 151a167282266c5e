"""Does a vertical-slash prefill layout keep the needle for the answer? For one accel-eval niah sample, each global
layer's per-head layout (MInference's columns and diagonals, captured as the policy builds it) is checked for the
needle number's tokens in the last query row, the row the first answer token comes from.

    python scripts/needle_coverage.py --model gemma3 --length 32736 --sample 1      # depth 0.5 of 0 / 0.5 / 1

Prints the needle's token positions, the greedy next token under the policy, and per layout call and head how many
needle tokens the row keeps as columns, as diagonals, and either way. CPU, float32 (about 10 minutes at 32K on 2 cores).
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--length", type=int, default=32736)
    ap.add_argument("--task", default="niah_single")
    ap.add_argument("--samples", type=int, default=3, help="as accel-eval's --samples (the prompts depend on it)")
    ap.add_argument("--depths", default="0,0.5,1", help="as accel-eval's --depths")
    ap.add_argument("--sample", type=int, default=1, help="which sample (index)")
    ap.add_argument("--option", action="append", default=[], help="vertical_slash option KEY=VALUE, repeatable")
    args = ap.parse_args(argv)

    import accel
    from accel.cli import parse_options
    from accel.eval.synth import generate_samples
    from accel.models import load_model
    from accel.policies import vertical_slash as VS

    model, tok = load_model(args.model, device="cpu", dtype=torch.float32, quiet=True)[:2]
    depths = [float(d) for d in args.depths.split(",")]
    s = generate_samples(args.task, tok, args.length, num_samples=args.samples, seed=0, depths=depths)[args.sample]
    enc = tok(s["prompt"], add_special_tokens=not s["chat_template"], return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    needle = s["outputs"][0]
    at = s["prompt"].index(needle)
    pos = [i for i, (a, b) in enumerate(offs) if b > at and a < at + len(needle)]
    print(f"{len(ids)} tokens; needle {needle!r} (depth {s['depth']}) at tokens {pos[0]}..{pos[-1]}")

    seen = []
    build = VS.VerticalSlashPolicy.build

    def capture(self, q, k, patterns, vertical_size, slash_size):
        layout = build(self, q, k, patterns, vertical_size, slash_size)
        seen.append((patterns, layout))
        return layout

    VS.VerticalSlashPolicy.build = capture
    accel.patch(model, "vertical_slash", **parse_options(args.option))
    with torch.no_grad():
        out = model(torch.tensor([ids]), logits_to_keep=1)
    print(f"next token under vertical_slash: {tok.decode(out.logits[0, -1].argmax())!r}")
    last, p = len(ids) - 1, torch.tensor(pos)
    print("| layout call (global layer) | head | pattern | needle tokens as columns | as diagonals | kept |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, (patterns, layout) in enumerate(seen):
        for h in range(layout.columns.shape[1]):
            cols = torch.isin(p, layout.columns[0, h])
            diag = torch.isin(last - p, layout.offsets[0, h])
            print(f"| {n} | {h} | {patterns[h]} | {cols.sum().item()}/{len(pos)} | {diag.sum().item()}/{len(pos)} | "
                  f"{(cols | diag).sum().item()}/{len(pos)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
