"""Eager decode step time over the default dynamic cache (what ``model.generate`` runs without a static cache):
a Llama-3.1-8B-shaped model cut to a few layers (random weights), prefilled at one context, then timed greedy steps
for each policy. Small enough to find per-step overheads (host syncs, per-shape plan builds) in a minute.

    python scripts/bench_eager_decode.py --layers 4 --context 131072 --policies dense duo quest
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
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_eager_decode.py needs a CUDA GPU")
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import accel
    from bench_e2e import speed_head_map

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                      max_position_embeddings=args.context + args.steps + 16)
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
        accel.unpatch(model)
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
