"""Draw, for one layer and head, the dense attention map next to a policy's layout, as a PNG.

    python scripts/inspect_attention.py smollm2 --layer 14 --head 3 --policy xattention --length 4096
    python scripts/inspect_attention.py gemma3 --layer 5 --head 0 --policy vertical_slash \
        --option head_map=vertical_slash_gemma3 --out attn.png

The prompt is a needle-in-a-haystack prompt (accel.needle). Left: dense softmax attention (log scale, max-pooled to
at most --pixels per side). Right: the keys the policy keeps (white), with its density and attention recall (share
of dense softmax mass kept, on all query rows when --rows 0, else on sampled rows). Needs matplotlib
(``pip install -e ".[eval]"``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.kernels.reference_sparse import layout_to_block_mask, vertical_slash_mask  # noqa: E402
from accel.layouts import BlockLayout, DenseLayout, StreamingLayout, VerticalSlashLayout  # noqa: E402
from accel.models import load_model  # noqa: E402
from accel.needle import build_needle_prompt  # noqa: E402
from accel.policies import AttentionContext  # noqa: E402
from accel.recall import capture_qk, dense_rows, layout_keep_rows, layout_recall  # noqa: E402
from accel.spec import parse_policy  # noqa: E402


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def keep_map(layout, head: int, n_heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Bool [q_len, kv_len] of the keys ``layout`` keeps for one query head."""
    rows = torch.arange(q_len)
    if isinstance(layout, VerticalSlashLayout):
        hl = head // (n_heads // layout.columns.shape[1])
        one = VerticalSlashLayout(columns=layout.columns[:1, hl: hl + 1], offsets=layout.offsets[:1, hl: hl + 1])
        return vertical_slash_mask(one, q_len, kv_len)[0, 0]
    if isinstance(layout, BlockLayout):
        hl = head // (n_heads // layout.counts.shape[1])
        bm = layout_to_block_mask(layout, -(-kv_len // layout.block_k))[0, hl]
        keep = bm.repeat_interleave(layout.block_q, 0)[:q_len].repeat_interleave(layout.block_k, 1)[:, :kv_len]
        return keep & (torch.arange(kv_len)[None, :] <= rows[:, None] + kv_len - q_len)
    if isinstance(layout, (DenseLayout, StreamingLayout)):
        return layout_keep_rows(layout, rows, q_len, kv_len, n_heads)[0, head]
    raise ValueError(f"cannot draw a {type(layout).__name__}")


def pool(x: torch.Tensor, pixels: int) -> torch.Tensor:
    f = max(1, -(-max(x.shape) // pixels))
    pad = ((-x.shape[0]) % f, (-x.shape[1]) % f)
    x = torch.nn.functional.pad(x.float(), (0, pad[1], 0, pad[0]))
    return torch.nn.functional.max_pool2d(x[None, None], f)[0, 0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="demo name (smollm2, gemma3), .gguf file, folder or hub id")
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--head", type=int, required=True)
    ap.add_argument("--policy", default="xattention", help="a prefill policy (default xattention)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="policy option (repeatable)")
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    ap.add_argument("--depth", type=float, default=0.5, help="needle depth (default 0.5)")
    ap.add_argument("--pixels", type=int, default=512, help="max pixels per side (max-pooled)")
    ap.add_argument("--rows", type=int, default=0, help="query rows for recall (0: all)")
    ap.add_argument("--out", help="PNG path (default results/attention_<model>_L<layer>_H<head>_<policy>.png)")
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("scripts/inspect_attention.py needs matplotlib: pip install matplotlib (or pip install -e \".[eval]\")",
              file=sys.stderr)
        return 2
    options = dict(o.split("=", 1) for o in args.option)
    spec = parse_policy({"prefill": {"name": args.policy, **{k: _parse_value(v) for k, v in options.items()}}})
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    if hasattr(spec.prefill, "check_model"):  # what accel.patch does: per-model maps ("auto"), their shape checks
        spec.prefill.check_model(model)
    prompt = build_needle_prompt(tok, args.length, depth=args.depth)
    ids = torch.tensor([prompt.input_ids])
    cap = capture_qk(model, ids)
    if args.layer not in cap:
        ap.error(f"--layer must be in 0..{max(cap)}")
    q, k, window = cap[args.layer]["q"], cap[args.layer]["k"], cap[args.layer]["sliding_window"]
    if not 0 <= args.head < q.shape[1]:
        ap.error(f"--head must be in 0..{q.shape[1] - 1}")
    mod = [m for m in model.modules() if getattr(m, "layer_idx", None) == args.layer and hasattr(m, "scaling")][0]
    scale, softcap = mod.scaling, getattr(mod, "attn_logit_softcapping", None)
    layout = spec.prefill.plan(q, k, AttentionContext(layer_idx=args.layer, phase="prefill", sliding_window=window))
    Sq, Sk = q.shape[2], k.shape[2]
    probs = dense_rows(q[:, args.head: args.head + 1], k[:, (args.head * k.shape[1]) // q.shape[1]:][:, :1],
                       torch.arange(Sq), scale=scale, softcap=softcap, window=window)[0, 0]
    keep = keep_map(layout, args.head, q.shape[1], Sq, Sk)
    density = float(keep.sum()) / float((torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + Sk - Sq).sum())
    rows = torch.arange(Sq) if args.rows <= 0 else args.rows
    recall = layout_recall(layout, q, k, scale=scale, softcap=softcap, rows=rows, per_head=True)
    recall_h = float(recall[args.head]) if recall is not None else float("nan")

    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    img = torch.log10(pool(probs, args.pixels).clamp_min(1e-6))
    axes[0].imshow(img.numpy(), cmap="magma", vmin=-6, vmax=0, interpolation="nearest",
                   extent=(0, Sk, Sq, 0))
    axes[0].set_title(f"dense attention (log10), layer {args.layer} head {args.head}")
    axes[1].imshow(pool(keep, args.pixels).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest",
                   extent=(0, Sk, Sq, 0))
    axes[1].set_title(f"{spec.prefill.name} {type(layout).__name__}: density {density:.3f}, recall {recall_h:.3f}")
    for ax in axes:
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle(f"{args.model}, {Sq} tokens, needle at tokens {prompt.needle_token_start}-{prompt.needle_token_end}")
    fig.tight_layout()
    out = Path(args.out or f"results/attention_{Path(args.model).stem}_L{args.layer}_H{args.head}_{args.policy}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"layer {args.layer} head {args.head}: {type(layout).__name__} density {density:.3f} recall {recall_h:.4f}; "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
