"""DuoAttention head calibration: optimise one gate per KV head on synthetic passkey data, weights frozen.

    python scripts/calibrate_duo.py smollm2 --out configs/duo_smollm2.json

Method (DuoAttention, arXiv 2410.10819, section 3.2): every attention head's output becomes
``alpha * full_attention + (1 - alpha) * streaming_attention`` (streaming = sink + recent tokens), with one gate
``alpha`` per KV head shared by its query group (the cache is per KV head). The model's weights are frozen; only
the gates train, from 1, to keep the last hidden states of the answer tokens of passkey-retrieval samples close to
the full-attention model (mean squared error) while an L1 penalty pushes gates towards 0 (streaming). Gates are
clipped to [0, 1] after each step. Heads whose gates stay high are retrieval heads; `accel.patch(model, "duo",
ratio=r)` makes the share ``r`` of KV heads with the lowest gates streaming. Runs on the CPU with the demo models
(a few minutes); the samples are the needle prompts of accel.needle (filler text, a number to retrieve).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F


def _gated_attention_fn(gates: dict[int, torch.Tensor], sink: int, recent: int):
    masks: dict[int, torch.Tensor] = {}

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, sliding_window=None,
           **kwargs):
        S, hq, hkv = query.shape[2], query.shape[1], key.shape[1]
        if sliding_window is not None:
            # the model's own sliding layers are not calibrated, but must keep their window: plain causal attention
            # there (past the window, 512 tokens on Gemma-3) moves every hidden state away from the targets by an
            # amount no gate can undo, and that error then steers the gates of the global layers
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            extra = {"softcap": softcap} if softcap is not None else {}
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                          sliding_window=sliding_window, **extra, **kwargs)
        full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=hq != hkv)
        if S not in masks:
            pos = torch.arange(S, device=query.device)
            d = pos[:, None] - pos[None, :]
            masks[S] = (d >= 0) & ((d < recent) | (pos[None, :] < sink))
        stream = F.scaled_dot_product_attention(query, key, value, attn_mask=masks[S], scale=scaling,
                                                enable_gqa=hq != hkv)
        a = gates[module.layer_idx].repeat_interleave(hq // hkv)[None, :, None, None]
        return (a * full + (1 - a) * stream).transpose(1, 2), None

    return fn


def register(name: str, gates: dict[int, torch.Tensor], sink: int, recent: int) -> None:
    """Register the gated attention under ``name``, with transformers' SDPA masks: a custom attention name gets no
    mask otherwise, and the sliding-window layers need theirs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, _gated_attention_fn(gates, sink, recent))
    AttentionMaskInterface.register(name, sdpa_mask)


def samples(tokenizer, n: int, length: int, seed: int):
    from accel.needle import build_needle_prompt

    out = []
    for i in range(n):
        depth = (i + 0.5) / n * 0.8  # needles before the recent window
        p = build_needle_prompt(tokenizer, length, depth=depth, seed=seed + i)
        ans = tokenizer(p.answer, add_special_tokens=False)["input_ids"]
        out.append((torch.tensor([list(p.input_ids) + ans]), len(ans) + 1))
    return out


def calibrate(model, tokenizer, *, steps: int, n_samples: int, length: int, sink: int, recent: int, lr: float,
              reg: float, seed: int, log=print) -> list[list[float]]:
    cfg = getattr(model.config, "text_config", None) or model.config
    for p in model.parameters():
        p.requires_grad_(False)
    gates = {i: torch.ones(cfg.num_key_value_heads, requires_grad=True) for i in range(cfg.num_hidden_layers)}
    register("duo_calib", gates, sink, recent)
    data = samples(tokenizer, n_samples, length, seed)
    original = model.config._attn_implementation
    targets = []
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        for ids, n_ans in data:
            h = model(ids, output_hidden_states=True).hidden_states[-1]
            targets.append(h[:, -n_ans:].clone())
    model.set_attn_implementation("duo_calib")
    opt = torch.optim.Adam(list(gates.values()), lr=lr)
    try:
        for step in range(steps):
            ids, n_ans = data[step % len(data)]
            t0 = time.time()
            h = model(ids, output_hidden_states=True).hidden_states[-1][:, -n_ans:]
            distill = F.mse_loss(h, targets[step % len(data)])
            penalty = torch.stack([g.abs().mean() for g in gates.values()]).mean()
            loss = distill + reg * penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for g in gates.values():
                    g.clamp_(0.0, 1.0)
            log(f"step {step + 1}/{steps}: distill {distill.item():.4f} mean gate {penalty.item():.3f} "
                f"({time.time() - t0:.1f} s)")
    finally:
        model.set_attn_implementation(original)
    return [[round(float(x), 5) for x in gates[i].detach()] for i in range(cfg.num_hidden_layers)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="demo model name (smollm2, gemma3), .gguf file, folder or hub id")
    ap.add_argument("--out", required=True, help="head map JSON to write (configs/duo_NAME.json to ship it)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024, help="tokens per passkey sample")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--recent", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--reg", type=float, default=0.05, help="weight of the L1 penalty on the gates")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from accel.models import load_model
    from accel.policies.duo import model_signature

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype="float32")
    t0 = time.time()
    gates = calibrate(model, tokenizer, steps=args.steps, n_samples=args.samples, length=args.length,
                      sink=args.sink, recent=args.recent, lr=args.lr, reg=args.reg, seed=args.seed)
    import transformers

    data = {
        "format": "accel-duo-headmap/1",
        "model": model_signature(model.config),
        "model_name": args.model,
        "gates": gates,
        "sink": args.sink,
        "recent": args.recent,
        "calibration": {"steps": args.steps, "samples": args.samples, "length": args.length, "lr": args.lr,
                        "reg": args.reg, "seed": args.seed, "seconds": round(time.time() - t0, 1)},
        "command": " ".join(["python", "scripts/calibrate_duo.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "device": "cpu",
    }
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    flat = sorted(g for row in gates for g in row)
    print(f"wrote {args.out}: {len(flat)} KV heads, gates min {flat[0]:.3f} median {flat[len(flat) // 2]:.3f} "
          f"max {flat[-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
