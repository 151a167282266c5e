"""End-to-end benchmark: time to first token (and optionally decode tokens/s) of a whole model, every policy against
dense baselines measured in the same run.

Models are built on the GPU from a config with random weights (``--weights random``, the default); speed depends on
the shapes, not on the weight values:
- ``llama8b``: Llama-3.1-8B shape (32 layers, hidden 4096, 32/8 heads, head_dim 128, MLP 14336, vocab 128256);
- ``llama70b``: Llama-3.1-70B shape (80 layers, hidden 8192, 64/8 heads, MLP 28672): 141 GB of bf16 weights, more
  than one H200 holds, so it runs split over GPUs (``--gpus 2``);
- ``qwen7b``: Qwen2.5-7B shape (28 layers, hidden 3584, 28/4 heads, MLP 18944, vocab 152064);
- ``smollm2`` / ``gemma3``: the demo models' exact architectures (configs/models/*.json, read from their GGUF files:
  SmolLM2-135M, 8K context; Gemma-3-270M with its sliding-window layers, 32K context).

``--gpus N`` splits the model over N GPUs the way accelerate's ``device_map="auto"`` does (``dispatch_model``: whole
decoder layers per GPU, embeddings on the first, norm and head on the last; each GPU's weights filled in place, so a
model larger than one GPU never exists on one). Peak memory is then reported per GPU.

``--weights real`` (``smollm2`` / ``gemma3`` only) loads the real demo model instead (``accel.models.load_model``:
the GGUF from the accel cache, dequantised, bf16 on cuda) and feeds a real text prompt: a niah_single prompt of
``accel.eval.synth`` (needle at depth 0.5) of exactly the context length (the few tokens the sentence-granular prompt
falls short are filler tokens inserted after BOS); duo and lserve use the shipped calibrated head map
(configs/duo_MODEL.json) instead of random gates, and the greedy answer (with ``--decode``) is checked for the needle.

Runs (``--runs``): ``sdpa``, ``flash_attention_4`` and ``flex_attention`` are transformers' own dense attention;
anything else is an accel policy spec (``dense``, ``xattention``, ``xattention+quest``, ``proxy:gamma=0.95`` ...)
patched with ``backend=auto``. Prefill: batch 1, random token ids (real weights: the prompt above), ``logits_to_keep=1``, a fresh DynamicCache; one
warm-up prefill at the same length (compiles kernels, lets ``auto`` time its backends), then the median of
``--repeats`` timed prefills. Decode (``--decode N``): N greedy steps after the prefill, eager, tokens/s. Peak memory
is ``torch.cuda.max_memory_allocated`` over the timed prefill (and decode); accel runs also report mean prefill
density and the backends that ran.

    PYTHONPATH=. python scripts/bench_e2e.py --model llama8b --contexts 32768 131072 --out results/bench_e2e_llama8b
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_utils import err as _err  # noqa: E402
from bench_utils import meta_lines, parse_spec, write_json  # noqa: E402

import accel  # noqa: E402

HF_IMPLS = ("sdpa", "flash_attention_4", "flex_attention", "eager")
DEFAULT_RUNS = ["sdpa", "flash_attention_4", "dense", "xattention", "flexprefill", "proxy", "vertical_slash"]


def model_config(name: str, max_len: int, planted: bool = False):
    from transformers import AutoConfig, LlamaConfig, Qwen2Config

    if name == "llama8b":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=max(131072, max_len),
                           rope_theta=500000.0, attention_bias=planted)
    if name == "llama70b":
        return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=max(131072, max_len),
                           rope_theta=500000.0, attention_bias=planted)
    if name == "qwen7b":
        return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, vocab_size=152064, max_position_embeddings=max(131072, max_len),
                           rope_theta=1000000.0, use_sliding_window=False)
    path = os.path.join(ROOT, "configs", "models", f"{name}.json")
    if not os.path.exists(path):
        raise SystemExit(f"unknown model {name!r}: use llama8b, qwen7b, or one of configs/models/*.json")
    with open(path) as f:
        d = json.load(f)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def build_model(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def split_device_map(cfg, gpus: int) -> dict[str, int]:
    """Whole decoder layers spread evenly over ``gpus`` GPUs (accelerate never splits a layer); the embeddings and
    rotary table on the first GPU, the final norm and the LM head on the last."""
    n = cfg.num_hidden_layers
    dm = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": gpus - 1, "lm_head": gpus - 1}
    dm.update({f"model.layers.{i}": i * gpus // n for i in range(n)})
    return dm


def build_split_model(cfg, gpus: int):
    """The model over ``gpus`` GPUs with accelerate's ``dispatch_model``: built on the meta device, each module
    materialised on its own GPU and filled with random weights there (no GPU ever holds the whole model)."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    dm = split_device_map(cfg, gpus)
    g = torch.Generator("cpu").manual_seed(0)
    for name, dev in dm.items():
        mod = model.get_submodule(name)
        mod.to_empty(device=f"cuda:{dev}")
        for pname, p in mod.named_parameters():
            with torch.no_grad():
                if pname.endswith("norm.weight") or name == "model.norm":
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, cfg.initializer_range, generator=torch.Generator(p.device).manual_seed(
                        int(torch.randint(0, 2**31, (1,), generator=g))))
    # non-persistent buffers (RoPE inverse frequencies) were never computed on meta: rebuild that module in place
    rot = model.model.rotary_emb
    with torch.device("cpu"):
        model.model.rotary_emb = type(rot)(config=cfg).to(f"cuda:{dm['model.rotary_emb']}")
    # the cache is not moved between GPUs by the hooks: each layer's entries live on that layer's GPU (as from_pretrained
    # with device_map does)
    return dispatch_model(model.eval(), device_map=dm, skip_keys=model._skip_keys_device_placement)


def _gpus() -> range:
    return range(torch.cuda.device_count())


def _reset_peak():
    for d in _gpus():
        torch.cuda.reset_peak_memory_stats(d)


def _peaks_gib() -> list[float]:
    return [torch.cuda.max_memory_allocated(d) / 2**30 for d in _gpus()]


def _sync():
    for d in _gpus():
        torch.cuda.synchronize(d)


def _sync_time(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def prefill(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, logits_to_keep=1, use_cache=True)
    return out, cache


def decode(model, out, cache, steps: int, keep: list | None = None) -> float:
    """Greedy decode tokens/s; ``keep`` (a list) receives the generated token ids (the prefill's token first)."""
    tok = out.logits[:, -1:].argmax(-1)
    toks = [tok]
    with torch.no_grad():
        _sync()
        t = time.perf_counter()
        for _ in range(steps):
            o = model(tok, past_key_values=cache, use_cache=True)
            tok = o.logits[:, -1:].argmax(-1)
            toks.append(tok)
        _sync()
    rate = steps / (time.perf_counter() - t)
    if keep is not None:
        keep.extend(int(x) for x in torch.cat(toks, dim=1)[0].tolist())
    return rate


def speed_head_map(model, path: str) -> str:
    """A DuoAttention head map with random gates for a random-weight model: which heads stream changes nothing
    about speed or memory, only the share (``ratio``) does. Calibrate real models with scripts/calibrate_duo.py."""
    from accel.policies.duo import model_signature

    cfg = getattr(model.config, "text_config", None) or model.config
    g = torch.Generator().manual_seed(0)
    gates = torch.rand(cfg.num_hidden_layers, cfg.num_key_value_heads, generator=g).tolist()
    with open(path, "w") as f:
        json.dump({"format": "accel-duo-headmap/1", "model": model_signature(model.config), "model_name": "random",
                   "gates": gates, "note": "random gates for speed benchmarks only"}, f)
    return path


def run_options(model, run: str, args) -> dict:
    """Options a run needs: a head map for the DuoAttention-based policies (random gates on a random-weight model,
    the shipped calibrated map configs/duo_MODEL.json on the real one). An explicit duo_map in the spec wins."""
    names = set(run.split(":")[0].split("+"))
    if names & {"duo", "lserve"} and "duo_map=" not in run:
        if args.weights == "real":
            return {"duo_map": os.path.join(ROOT, "configs", f"duo_{args.model}.json")}
        return {"duo_map": speed_head_map(model, f"/tmp/accel_duo_{args.model}.json")}
    return {}


REAL_MODELS = ("smollm2", "gemma3")


def load_real(name: str):
    """(model, tokenizer) of a real demo model, bf16 on cuda, transformers' sdpa attention to start from."""
    from accel.models import load_model

    model, tok = load_model(name, device="cuda", dtype="bfloat16")
    model.set_attn_implementation("sdpa")
    return model.eval(), tok


def real_prompt(tok, length: int, depth: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Token ids [1, length] of a niah_single prompt (accel.eval.synth) and what to check in the answer.

    The synthetic prompt is the longest whole-sentence haystack that fits ``length``; the tokens it falls short are
    filled with filler-sentence tokens inserted right after BOS, so the prefill is exactly ``length`` tokens."""
    from accel.eval.synth import generate_samples
    from accel.needle import filler_sentences

    s = generate_samples("niah_single", tok, length, num_samples=1, seed=seed, depths=[depth])[0]
    ids = list(tok(s["prompt"], add_special_tokens=not s["chat_template"])["input_ids"])
    short = length - len(ids)
    if short > 0:
        gen = filler_sentences(seed + 7919)
        pad: list[int] = []
        while len(pad) < short:
            pad += tok(" " + next(gen), add_special_tokens=False)["input_ids"]
        at = 1 if ids and ids[0] == tok.bos_token_id else 0
        ids = ids[:at] + pad[:short] + ids[at:]
    assert len(ids) == length, (len(ids), length)
    info = {"task": "niah_single", "depth": s["depth"], "outputs": s["outputs"], "synth_tokens": s["length"],
            "filler_tokens_added": max(0, short), "chat_template": s["chat_template"],
            "gen_prefix": s["gen_prefix"]}
    return torch.tensor([ids], device="cuda"), info


def run_one(model, run: str, ids, args, tok=None, prompt_info=None) -> dict:
    row = {"run": run, "context": ids.shape[1]}
    patched = run not in HF_IMPLS
    try:
        if patched:
            name, opts = parse_spec(run)
            accel.patch(model, name, backend="auto", collect_stats=False, **opts, **run_options(model, run, args))
        else:
            model.set_attn_implementation(run)
        # warm-up: compiles kernels; sparse prefill policies warm up at the same length so that `auto` times its
        # backends and tiles for this shape outside the timed run; so does transformers' flex_attention, which
        # torch.compile builds per sequence length (warmed at 4K, its timed prefill paid a compile: 6.7 s at 8K);
        # SDPA and FA4 compile the same at any length
        spec = accel.parse_policy(name, **opts) if patched else None
        sparse_prefill = patched and spec.prefill.name != "dense"
        # sparse decode policies too: their kernels compile per page-table width, and at 4K a budget of 4096 is
        # dense (the timed decode paid Quest's JIT compilation: 5.0 tok/s against 14.7 for xattention+quest)
        full = (sparse_prefill or run == "flex_attention"
                or (patched and args.decode and spec.decode.name != "dense"))
        w_out, w_cache = prefill(model, ids if full else ids[:, :4096])
        if args.decode:  # and compiles the decode kernels, so the timed decode does not pay their JIT compilation
            decode(model, w_out, w_cache, 2)
        del w_out, w_cache
        torch.cuda.empty_cache()
        if patched:
            accel.reset_stats(model)
        times = []
        for _ in range(args.repeats):
            _reset_peak()
            dt, (out, cache) = _sync_time(lambda: prefill(model, ids))
            times.append(dt)
            if args.decode:
                gen: list[int] = []
                row["decode_tok_s"] = decode(model, out, cache, args.decode, keep=gen)
                if tok is not None and prompt_info is not None:  # real weights: did the answer name the needle?
                    text = tok.decode(gen, skip_special_tokens=True)
                    row["answer"] = text
                    row["needle_found"] = all(o in text for o in prompt_info["outputs"])
            row["kv_cache_bytes"] = accel.cache_bytes(cache)
            del out, cache
        if args.static_decode and patched:
            row.update(static_decode(model, ids, args))
        if args.profile:  # one more prefill under the torch profiler: where the time goes, by op
            row["profile"] = profile_prefill(model, ids, f"{args.out_path}_profile_{run.replace('+', '_')}.txt")
        row["ttft_s"] = statistics.median(times)
        row["ttft_all_s"] = times
        peaks = _peaks_gib()
        row["peak_gib"] = max(peaks)
        if args.gpus > 1:
            row["peak_gib_per_gpu"] = [round(x, 2) for x in peaks[:args.gpus]]
        if patched:
            st = accel.stats(model)
            row["backends"] = st.get("backends_used")
            notes = sorted({n for r in st.get("layers", []) for n in r.get("auto_notes", [])})
            row["auto_notes"] = notes[:8]
            if args.density and sparse_prefill:  # one more, untimed prefill: count kept blocks, sample recall
                accel.patch(model, name, backend="auto", collect_stats=True, **opts, **run_options(model, run, args))
                out, cache = prefill(model, ids)
                del out, cache
                st = accel.stats(model)
                dens = [r["prefill_density"] for r in st["layers"] if r.get("prefill_density") is not None]
                row["mean_prefill_density"] = sum(dens) / len(dens) if dens else None
                row["mean_recall"] = st.get("mean_recall")
    except Exception as e:  # noqa: BLE001 - a run that cannot run is recorded, not fatal
        row["error"] = _err(e)
    finally:
        if patched:
            accel.unpatch(model)
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def static_decode(model, ids, args) -> dict:
    """The run's own prefill of ``ids`` repeated ``--decode-batch`` times into a transformers StaticCache (eager, one
    forward, or chunks of ``--prefill-chunk`` tokens per row: every policy takes chunks over a static cache, duo /
    lserve / streaming through their ring), then ``--static-decode`` compiled greedy steps
    (bench_utils.compiled_decode). Returns the step time, tokens/s, compile time and the static cache's bytes,
    prefixed ``static_``."""
    from transformers import StaticCache

    from bench_utils import compiled_decode

    B, S = args.decode_batch, ids.shape[1]
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    cache = StaticCache(config=model.config, max_cache_len=S + args.static_decode + 16)
    x = ids.expand(B, -1)
    with torch.no_grad():
        t = time.perf_counter()
        chunk = args.prefill_chunk or S
        for lo in range(0, S, chunk):
            out = model(x[:, lo:lo + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync()
        prefill_s = time.perf_counter() - t
    r = compiled_decode(model, cache, out.logits[:, -1:].argmax(-1), args.static_decode)
    res = {f"static_{k}": v for k, v in r.items()}
    res.update(static_batch=B, static_prefill_s=prefill_s, static_kv_cache_bytes=accel.cache_bytes(cache))
    del cache, out
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return res


def profile_prefill(model, ids, path: str, top: int = 25) -> dict:
    """One prefill under ``torch.profiler``: the ops by total GPU time written to ``path``; returns the shares of
    the GPU time in attention kernels, estimation (accel plan kernels) and the rest (linear layers, norms, RoPE ...)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import AttentionInterface

    from accel.attention import IMPL_NAME, accel_attention

    def traced(*a, **kw):  # everything accel does per layer (plan, layout, kernels, copies) under one range
        with record_function("accel_attention"):
            return accel_attention(*a, **kw)

    AttentionInterface.register(IMPL_NAME, traced)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _sync_time(lambda: prefill(model, ids))
    finally:
        AttentionInterface.register(IMPL_NAME, accel_attention)
    averages = prof.key_averages()
    table = averages.table(sort_by="cuda_time_total", row_limit=top)

    # the range appears twice: on the CPU (its CUDA total misses Triton launches) and as a GPU-side annotation
    # whose self time is the GPU span of accel's work in each layer (one stream: nothing else runs inside it)
    accel_ms = sum(getattr(e, "self_device_time_total", 0.0) for e in averages if e.key == "accel_attention") / 1e3
    linear_ms = sum(getattr(e, "device_time_total", 0.0) for e in averages if e.key == "aten::linear") / 1e3
    # kernel-level split of device time (names of our Triton kernels and torch's flash kernels)
    total = attn = est = 0.0
    for e in averages:
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        if e.key == "accel_attention" or (e.device_type.name != "CUDA" and "cuda" not in str(e.device_type).lower()):
            continue  # the range is not a kernel: counting it would count accel's kernels twice
        total += t
        n = e.key.lower()
        if any(w in n for w in ("flash", "attn", "attention", "_sparse_kernel", "_block_sparse", "fmha")):
            attn += t
        elif any(w in n for w in ("antidiag", "score", "topk", "pooled", "lastq", "proxy", "select", "sort")):
            est += t
    # by who launched it: accel's attention hook, the linear layers, and the rest (transformers' RoPE, norms, MLP
    # activation, residual adds, embedding, lm head, copies)
    split = {"accel_attention_ms": accel_ms, "linear_ms": linear_ms,
             "transformers_other_ms": total / 1e3 - accel_ms - linear_ms}
    with open(path, "w") as f:
        f.write(f"GPU time {total / 1e3:.1f} ms: accel attention hook {accel_ms:.1f} ms (plan, layouts, kernels, "
                f"copies), linear layers {linear_ms:.1f} ms, other transformers ops {split['transformers_other_ms']:.1f}"
                " ms\n\n" + table + "\n")
    return {"gpu_ms": total / 1e3, "attention_share": attn / total if total else None,
            "estimation_share": est / total if total else None, **split, "table": os.path.basename(path)}


def write(results, out):
    write_json(results, out)
    m = results["meta"]
    lines = [f"# End to end: {m['model']} ({m['shape']})", "", *meta_lines(m),
             f"- {m.get('weights_note', 'random weights')}, bf16, batch 1; time to first token = prefill with "
             f"logits_to_keep=1 (median of {m['repeats']}, after a warm-up at the same length); speedups against the "
             "dense baselines of the same run"]
    if m.get("static_decode"):
        chunk = m.get("prefill_chunk")
        how = f"chunked, {chunk} tokens per row per forward (`--prefill-chunk {chunk}`)" if chunk else "one forward"
        lines.append(f"- `--static-decode` prefill: {how}")
    lines.append("")
    has_decode = any("decode_tok_s" in r for r in results["rows"])
    has_answer = any("needle_found" in r for r in results["rows"])
    peak_head = "peak GiB (busiest GPU)" if m.get("gpus", 1) > 1 else "peak GiB"
    head = f"| context | run | TTFT s | vs sdpa | vs FA4 | density | recall | {peak_head} | KV GiB |"
    sep = "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    if has_decode:
        head += " decode tok/s | decode vs sdpa |"
        sep += " --- | --- |"
    if has_answer:
        head += " needle in answer |"
        sep += " --- |"
    n_cols = 6 + (2 if has_decode else 0) + (1 if has_answer else 0)
    lines += [head, sep]
    for S in sorted({r["context"] for r in results["rows"]}):
        rows = [r for r in results["rows"] if r["context"] == S]
        base = {r["run"]: r for r in rows if "ttft_s" in r}
        for r in rows:
            if "error" in r:
                lines.append(f"| {S // 1024}K | {r['run']} | error: {r['error']} |" + " |" * n_cols)
                continue

            def ratio(b, key="ttft_s", inv=False):
                if b not in base or key not in base[b] or key not in r:
                    return "—"
                x = r[key] / base[b][key] if inv else base[b][key] / r[key]
                return f"{x:.2f}x"

            dens, rec = r.get("mean_prefill_density"), r.get("mean_recall")
            line = (f"| {S // 1024}K | {r['run']} | {r['ttft_s']:.3f} | {ratio('sdpa')} | {ratio('flash_attention_4')} "
                    f"| {'—' if dens is None else f'{dens:.3f}'} | {'—' if rec is None else f'{rec:.3f}'} | "
                    f"{r['peak_gib']:.1f} | "
                    f"{r.get('kv_cache_bytes', 0) / 2**30:.2f} |")
            if has_decode:
                line += f" {r.get('decode_tok_s', 0):.1f} | {ratio('sdpa', 'decode_tok_s', inv=True)} |"
            if has_answer:
                found = r.get("needle_found")
                line += f" {'—' if found is None else ('yes' if found else 'no')} |"
            lines.append(line)
    static = [r for r in results["rows"] if "static_tok_s" in r]
    if static:
        chunk = m.get("prefill_chunk")
        how = f"in chunks of {chunk} tokens" if chunk else "in one forward"
        lines += ["", f"Compiled decode over a static cache (`--static-decode {m.get('static_decode')}`): the run's own "
                  f"prefill of the prompt repeated to batch {static[0]['static_batch']} ({how}), then "
                  "torch.compile(mode=\"reduce-overhead\") greedy steps; speedup against accel `dense` (dense prefill "
                  "and decode) of the same run (transformers' own sdpa static decode repeats K/V per step: "
                  "results/bench_static_decode.md)", "",
                  "| context | run | batch | step ms | tokens/s | vs dense | KV GiB | compile s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in static:
            base = next((b for b in static if b["run"] == "dense" and b["context"] == r["context"]), None)
            ratio = f"{r['static_tok_s'] / base['static_tok_s']:.2f}x" if base else "—"
            lines.append(f"| {r['context'] // 1024}K | {r['run']} | {r['static_batch']} | {r['static_step_ms']:.2f} | "
                         f"{r['static_tok_s']:.1f} | {ratio} | {r['static_kv_cache_bytes'] / 2**30:.2f} | "
                         f"{r['static_compile_s']:.0f} |")
    notes = [f"- {r['context'] // 1024}K {r['run']}: backends {r.get('backends')}" for r in results["rows"]
             if r.get("backends")]
    if notes:
        lines += ["", "Backends that ran (accel runs):", *notes]
    per_gpu = [f"- {r['context'] // 1024}K {r['run']}: {r['peak_gib_per_gpu']}" for r in results["rows"]
               if r.get("peak_gib_per_gpu")]
    if per_gpu:
        lines += ["", "Peak GiB per GPU:", *per_gpu]
    answers = [f"- {r['context'] // 1024}K {r['run']}: {r['answer']!r}" for r in results["rows"] if "answer" in r]
    if answers:
        lines += ["", f"Greedy answers (expected {m.get('prompt', {}).get('outputs')}):", *answers]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama8b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS,
                    help="transformers attention implementations (sdpa, flash_attention_4, flex_attention) and/or "
                         "accel policy specs")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--decode", type=int, default=0, help="greedy decode steps after the prefill (tokens/s)")
    ap.add_argument("--static-decode", type=int, default=0,
                    help="accel runs: also time this many greedy steps compiled over a transformers StaticCache "
                         "(torch.compile reduce-overhead) after the run's own prefill of the prompt")
    ap.add_argument("--decode-batch", type=int, default=1, help="rows of the --static-decode batch (the prompt "
                    "repeated)")
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="tokens per row per forward of the --static-decode prefill (0: the whole prompt at once). "
                         "Chunks keep the activations of a long batch small, e.g. --decode-batch 4 at 128K with "
                         "--prefill-chunk 16384; the timed batch-1 TTFT prefill stays one forward")
    ap.add_argument("--no-density", dest="density", action="store_false",
                    help="skip the extra untimed prefill that measures density and recall of accel runs")
    ap.add_argument("--weights", choices=("random", "real"), default="random",
                    help="random: the architecture from a config with random weights and random token ids (default); "
                         "real: the real demo model (smollm2, gemma3) from accel.models.load_model with a "
                         "needle-in-a-haystack text prompt and, for duo/lserve, the shipped calibrated head map")
    ap.add_argument("--attention", choices=("random", "planted"), default="random",
                    help="random weights as they come (near-uniform attention: sparse policies keep almost every "
                         "block), or planted: sinks, locality and heavy columns built into the random weights "
                         "(scripts/planted_attention.py; llama8b, llama70b, qwen7b)")
    ap.add_argument("--gpus", type=int, default=1,
                    help="split the model over this many GPUs (accelerate dispatch_model, whole layers per GPU)")
    ap.add_argument("--profile", action="store_true",
                    help="profile one extra prefill per run (torch profiler): op table to OUT_profile_RUN.txt and "
                         "the attention / estimation / other split of GPU time in the JSON")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.gpus < 1:
        ap.error("--gpus must be at least 1")
    if args.gpus > 1 and args.weights == "real":
        ap.error("--gpus > 1 is for the random-weight shapes (the demo models fit one GPU many times over)")
    if args.weights == "real" and args.model not in REAL_MODELS:
        ap.error(f"--weights real needs --model {' or '.join(REAL_MODELS)} (the demo models with real weights)")
    if not torch.cuda.is_available():
        raise SystemExit("bench_e2e needs a CUDA GPU")
    if args.gpus > torch.cuda.device_count():
        raise SystemExit(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPU(s) visible")
    out = args.out or f"results/bench_e2e_{args.model}" + ("_real" if args.weights == "real" else "")
    args.out_path = out
    tok = None
    t_load = time.time()
    if args.weights == "real":
        model, tok = load_real(args.model)
        cfg = model.config
    else:
        planted = args.attention == "planted"
        if planted and args.model not in ("llama8b", "llama70b", "qwen7b"):
            ap.error("--attention planted is for the llama8b, llama70b and qwen7b shapes")
        cfg = model_config(args.model, max(args.contexts), planted=planted)
        model = build_model(cfg) if args.gpus == 1 else build_split_model(cfg, args.gpus)
        if planted:
            from planted_attention import plant

            plant(model, cfg)
    load_s = time.time() - t_load
    t0 = time.time()
    import transformers

    meta = {"model": args.model, "command": " ".join(["python"] + sys.argv),
            "shape": f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads}/"
                     f"{cfg.num_key_value_heads} heads",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() + (f" x{args.gpus} (layers split)" if args.gpus > 1 else ""),
            "gpus": args.gpus, "repeats": args.repeats,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "weights": args.weights, "attention": args.attention, "load_s": round(load_s, 1),
            "static_decode": args.static_decode, "prefill_chunk": args.prefill_chunk}
    if args.attention == "planted":
        meta["weights_note"] = ("random weights with planted attention structure (scripts/planted_attention.py: a sink "
                                "at position 0, 15 heavy tokens, RoPE locality; q/k/v/o biases on); density and "
                                "recall below are measured on it")
    if args.weights == "real":
        meta["weights_note"] = (f"real weights (demo model {args.model} via accel.models.load_model: GGUF dequantised "
                                f"to bf16, {type(model).__name__}); prompt: a niah_single needle-in-a-haystack text "
                                "from accel.eval.synth of exactly the context length, needle at depth 0.5; duo/lserve "
                                f"with the shipped head map configs/duo_{args.model}.json")
    results = {"meta": meta, "rows": []}
    for S in args.contexts:
        extra = max(args.decode, args.static_decode + 8 if args.static_decode else 0)  # + compiled warm-up steps
        if S + extra + 1 > cfg.max_position_embeddings:  # the prompt and the decoded tokens must fit
            S = cfg.max_position_embeddings - extra - 1
            print(f"context {S}: the model's limit ({cfg.max_position_embeddings}) less the decoded tokens", flush=True)
        info = None
        if args.weights == "real":
            ids, info = real_prompt(tok, S)
            meta.setdefault("prompts", {})[str(S)] = info
            meta["prompt"] = info
        else:
            ids = torch.randint(10, cfg.vocab_size - 10, (1, S), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(S))
            if args.attention == "planted":
                from planted_attention import plant_ids

                ids = plant_ids(ids, seed=S)
        for run in args.runs:
            results["rows"].append(run_one(model, run, ids, args, tok=tok, prompt_info=info))
            meta["wall_s"] = time.time() - t0
            write(results, out)  # partial results survive a timeout


if __name__ == "__main__":
    main()
