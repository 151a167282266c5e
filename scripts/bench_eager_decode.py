"""Eager decode step time over the default dynamic cache (what ``model.generate`` runs without a static cache):
a Llama-3.1-8B-shaped model cut to a few layers (random weights), prefilled at one context, then timed greedy steps
for each policy. Small enough to find per-step overheads (host syncs, per-shape plan builds) in a minute.

    python scripts/bench_eager_decode.py --layers 4 --context 131072 --policies dense duo quest
    python scripts/bench_eager_decode.py --policies quest lserve --cprofile /tmp/prof   # + where the CPU goes
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--policies", nargs="+", default=["dense", "duo", "quest", "lserve"])
    ap.add_argument("--cprofile", metavar="DIR", default=None,
                    help="also run the steps again under cProfile and write DIR/cprofile_POLICY.txt (functions by own "
                         "and by cumulative time): where the CPU of a launch-bound step goes, Triton compiles included")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_eager_decode.py needs a CUDA GPU")
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import accel
    from bench_e2e import speed_head_map

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                      max_position_embeddings=args.context + 2 * args.steps + 16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.context), device="cuda")
    for pol in args.policies:
        needs_map = pol in ("duo", "lserve")
        accel.patch(model, pol, **({"duo_map": speed_head_map(model, "/tmp/accel_duo_eager.json")} if needs_map
                                   else {}))
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            tok = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            for _ in range(3):  # kernels compile
                tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            print(f"{pol} step ms {(time.perf_counter() - t) / args.steps * 1e3:.2f}", flush=True)
            if args.cprofile:
                profile_steps(model, tok, cache, args.steps, os.path.join(args.cprofile, f"cprofile_{pol}.txt"))
        accel.unpatch(model)
        del cache
        torch.cuda.empty_cache()


def profile_steps(model, tok, cache, steps: int, path: str) -> None:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumtime").print_stats(60)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(buf.getvalue())


if __name__ == "__main__":
    main()
