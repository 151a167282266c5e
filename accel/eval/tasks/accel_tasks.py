"""Dataset builders and scoring for accel's offline lm-eval tasks (see accel/eval/synth.py for the tasks).

Metadata keys (``--metadata`` JSON, merged with ``--model_args`` by lm-eval):
  max_seq_lengths  prompt lengths in tokens of the model's tokenizer (default [4096]); several lengths are pooled
                   into one score, so run one length per call to get a score per length
  num_samples      samples per length (default 20)
  seed             generation seed (default 0)
  depths           needle depths for the niah tasks, fractions 0..1 (default 0, .25, .5, .75, 1)
  tokenizer / pretrained   the tokenizer: a folder, hub id, demo model name (smollm2, gemma3) or .gguf file
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=8)
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from accel.eval.lm import is_accel_loaded
    from accel.models import resolve_model

    if is_accel_loaded(name):
        source, gguf = resolve_model(name, quiet=True)
        return AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    return AutoTokenizer.from_pretrained(name)


def _resolve(kwargs: dict):
    for key in ("tokenizer", "pretrained", "model"):
        v = kwargs.get(key)
        if isinstance(v, str) and v:
            return _tokenizer(v)
        if v is not None and hasattr(v, "encode") and callable(v):
            return v
    raise ValueError(
        "accel's offline tasks size their prompts in tokens of the model's tokenizer; pass one with "
        "--model_args pretrained=... or --metadata '{\"tokenizer\": \"PATH\"}'")


def _build(task: str, **kwargs):
    import datasets

    from accel.eval.synth import generate_samples

    tok = _resolve(kwargs)
    lengths = kwargs.get("max_seq_lengths") or [4096]
    if isinstance(lengths, (int, str)):
        lengths = [lengths]
    rows = []
    for length in lengths:
        rows += generate_samples(task, tok, int(length), num_samples=int(kwargs.get("num_samples", 20)),
                                 seed=int(kwargs.get("seed", 0)), depths=kwargs.get("depths"),
                                 use_chat_template=False)
    for r in rows:
        r.pop("prompt", None)
        r["depth"] = -1.0 if r["depth"] is None else float(r["depth"])
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def niah_single(**kw):
    return _build("niah_single", **kw)


def niah_multikey(**kw):
    return _build("niah_multikey", **kw)


def niah_multivalue(**kw):
    return _build("niah_multivalue", **kw)


def niah_multiquery(**kw):
    return _build("niah_multiquery", **kw)


def vt(**kw):
    return _build("vt", **kw)


def cwe(**kw):
    return _build("cwe", **kw)


def fwe(**kw):
    return _build("fwe", **kw)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    from accel.eval.synth import score_sample

    return {"score": score_sample(results[0], doc["outputs"])}
