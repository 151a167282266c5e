"""Benchmark: the attention stage of each sparse prefill policy (estimation + selection + sparse attention) against
dense attention, on queries and keys that carry the structure of real attention.

Llama-3.1-8B attention shape by default (32 query heads, 8 KV heads, head_dim 128, bf16, causal, batch 1), 32K and
128K. Inputs are synthesised (not captured from a model): per KV head a slowly varying shared component gives
locality at spans of 256 tokens to 16K tokens, plus 16 "sink" keys with a logit gain of about 8
(``bench_estimation.structured_qkv``). The attention recall (share of dense softmax mass kept, 64 sampled query rows)
and the density of each layout are reported beside the times, so the speed is read together with what it keeps.

For each policy at its default settings (or the options given with ``--policy name:key=value,...``) it times, as
medians of ``triton.testing.do_bench``:
- ``plan``: the policy's estimation and layout building (what ``accel`` runs before the kernel);
- ``attn``: the sparse attention on that layout, on each backend that can run it (triton; flash = FA4 block-sparse);
- ``total``: plan + attention on the fastest backend, in one timed call.
Dense baselines in the same run: torch SDPA (flash backend), FA4 dense, our Triton dense kernel.

    PYTHONPATH=. python scripts/bench_prefill.py --out results/bench_prefill
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_estimation import sdpa_flash, structured_qkv  # noqa: E402
from bench_utils import bench  # noqa: E402
from bench_utils import err as _err  # noqa: E402
from bench_utils import parse_spec  # noqa: E402

from accel.kernels import get_backend  # noqa: E402
from accel.layouts import BlockLayout, DenseLayout, VerticalSlashLayout  # noqa: E402
from accel.policies import AttentionContext, policy_class  # noqa: E402
from accel.recall import layout_recall  # noqa: E402
from accel.recall import vertical_slash_density  # noqa: E402

POLICIES = ["xattention", "flexprefill", "proxy", "vertical_slash"]


def parse_policy_arg(text: str):
    name, kw = parse_spec(text)
    pol = policy_class(name)(**kw)
    pol.validate()
    label = name if not kw else f"{name}({', '.join(f'{k}={v}' for k, v in kw.items())})"
    return label, pol


def density(layout, S: int) -> float:
    from accel.kernels import reference_sparse as rs

    if isinstance(layout, BlockLayout):
        return rs.block_layout_density(layout, S, S)
    if isinstance(layout, VerticalSlashLayout):
        return vertical_slash_density(layout, S, S)
    return 1.0


def run_context(args, S: int, policies, device) -> dict:
    torch.cuda.empty_cache()
    q, k, v = structured_qkv(S, args.heads, args.kv_heads, args.dim, device, seed=S)
    scale = args.dim**-0.5
    res = {"context": S, "dense": {}, "policies": []}
    dense = res["dense"]
    for name, fn in [
        ("sdpa_ms", lambda: sdpa_flash(q, k, v)),
        ("fa4_ms", lambda: get_backend("flash").run(DenseLayout(), q, k, v, scale=scale)),
        ("triton_ms", lambda: get_backend("triton").run(DenseLayout(), q, k, v, scale=scale)),
    ]:
        try:
            if name == "fa4_ms" and get_backend("flash").available()[0] and get_backend("flash").version != "fa4":
                raise RuntimeError("flash-attn-4 not installed")
            dense[name] = bench(fn, rep=50 if S > 65536 else 100)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is recorded, not fatal
            dense[name.replace("_ms", "_error")] = _err(e)
    print(S, "dense", json.dumps(dense), flush=True)
    ref_dense = dense.get("fa4_ms") or dense.get("sdpa_ms")

    ctx = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None, scale=scale)
    for label, pol in policies:
        row = {"policy": label}
        try:
            layout = pol.plan(q, k, ctx)
            row["layout"] = type(layout).__name__
            row["density"] = density(layout, S)
            row["recall"] = float(layout_recall(layout, q, k, scale=scale))
            row["plan_ms"] = bench(lambda: pol.plan(q, k, ctx), rep=50)
            if args.profile_plan:
                row["plan_profile"] = profile_plan(lambda: pol.plan(q, k, ctx), f"{args.out}_plan_{label}_{S // 1024}k")
            times = {}
            for bname in ("triton", "flash"):
                b = get_backend(bname)
                if not b.available()[0] or b.supports(layout, q) is not None:
                    continue
                try:
                    times[bname] = bench(lambda: b.run(layout, q, k, v, scale=scale), rep=50)
                except Exception as e:  # noqa: BLE001
                    row[f"attn_{bname}_error"] = _err(e)
            row["attn_ms"] = times
            if times:
                best = min(times, key=times.get)
                row["backend"] = best
                b = get_backend(best)
                row["total_ms"] = bench(lambda: b.run(pol.plan(q, k, ctx), q, k, v, scale=scale), rep=50)
                row["estimation_share"] = row["plan_ms"] / row["total_ms"]
                for base in ("fa4_ms", "sdpa_ms", "triton_ms"):
                    if base in dense:
                        row[f"speedup_vs_{base[:-3]}"] = dense[base] / row["total_ms"]
                if "fa4_ms" in dense:  # what this layout would reach with a plan that cost nothing
                    row["free_plan_bound_vs_fa4"] = dense["fa4_ms"] / times[best]
            del layout
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
        res["policies"].append(row)
        print(S, json.dumps(row), flush=True)
    res["reference_dense_ms"] = ref_dense
    return res


def profile_plan(fn, path: str, n: int = 5) -> str:
    """Kernel table (device time per plan, top rows) of ``n`` plans, written to ``path``.txt; returns the path."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    total = sum(e.self_device_time_total for e in ev) / n / 1e3
    text = (f"# {os.path.basename(path)}: {n} plans, {total:.3f} ms of device time per plan\n"
            + ev.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=80))
    print(text, flush=True)
    with open(path + ".txt", "w") as f:
        f.write(text)
    return path + ".txt"


def _f(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def write(results, out):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    m = results["meta"]
    lines = ["# Sparse prefill policies: attention stage (estimation + sparse attention) vs dense", "",
             f"- command: `{m['command']}`", f"- device: {m['device']}; date: {m['date']}; wall {m['wall_s']:.0f} s",
             f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
             f"- shape: {json.dumps(m['shape'])}; inputs: {m['inputs']}", "- medians of triton.testing.do_bench, ms;"
             " speedup = dense time / (plan + sparse attention on the fastest backend); bound with a free plan = FA4"
             " dense / the layout's attention alone on its fastest backend (no plan can do better on that layout)", ""]
    for r in results["contexts"]:
        d = r["dense"]
        lines += [f"## {r['context'] // 1024}K — dense: SDPA {_f(d.get('sdpa_ms'))}, FA4 {_f(d.get('fa4_ms'))}, "
                  f"Triton {_f(d.get('triton_ms'))}", "",
                  "| policy | density | recall | plan | attn triton | attn FA4 | total | plan share | vs FA4 dense | "
                  "vs SDPA | bound with a free plan |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in r["policies"]:
            if "error" in p:
                lines.append(f"| {p['policy']} | error: {p['error']} | | | | | | | | | |")
                continue
            a = p.get("attn_ms", {})
            lines.append(f"| {p['policy']} | {_f(p.get('density'), 3)} | {_f(p.get('recall'), 3)} | "
                         f"{_f(p.get('plan_ms'))} | {_f(a.get('triton'))} | {_f(a.get('flash'))} | "
                         f"{_f(p.get('total_ms'))} | {_f(p.get('estimation_share'))} | "
                         f"{_f(p.get('speedup_vs_fa4'))}x | {_f(p.get('speedup_vs_sdpa'))}x | "
                         f"{_f(p.get('free_plan_bound_vs_fa4'))}x |")
        lines.append("")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--policy", action="append", default=None,
                    help="policy[:key=value,...]; repeatable (default: every prefill policy at its defaults)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--out", default="results/bench_prefill")
    ap.add_argument("--profile-plan", action="store_true", help="also write each plan's kernel table (torch profiler)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill needs a CUDA GPU")
    import triton

    policies = [parse_policy_arg(p) for p in (args.policy or POLICIES)]
    t0 = time.time()
    meta = {"command": " ".join(["python"] + sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(),
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
            "shape": {"batch": 1, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.dim,
                      "dtype": "bfloat16", "causal": True},
            "inputs": "synthetic structured q/k (locality spans 256..16K per KV head, 16 sink keys, "
                      "scripts/bench_estimation.py structured_qkv)"}
    try:
        import flash_attn

        meta["versions"]["flash_attn"] = getattr(flash_attn, "__version__", "installed")
    except Exception:  # noqa: BLE001
        meta["versions"]["flash_attn"] = "not installed"
    results = {"meta": meta, "contexts": []}
    for S in args.contexts:
        results["contexts"].append(run_context(args, S, policies, torch.device("cuda")))
    meta["wall_s"] = time.time() - t0
    write(results, args.out)


if __name__ == "__main__":
    main()
