"""The evaluation grid behind ``accel-eval``: policies × lengths × tasks on one loaded model, resumable.

Each finished cell is one JSON file under ``OUT/cells/``, written atomically (temporary file + rename) with a
checksum of its content. On a rerun a cell file is used only when it parses, its checksum matches and it was made
with the same settings (model, policy, length, task, samples, seed, depths, generation length), the same resolved
policy configuration (every option, defaults included: a cell made before a default changed is not the same
setting) and the same tokenization (a probe prompt's token ids: another tokenizer, or another transformers release
that tokenizes the same file differently, builds other prompts); anything else is reported and recomputed, never
mixed in. A crash or Ctrl-C loses at most the cell in
progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["PolicyEntry", "parse_policy_entry", "Cell", "run_grid", "read_cell", "write_cell", "CellError",
           "summarize", "CELL_FORMAT", "tokenizer_digest"]

CELL_FORMAT = 1


class CellError(ValueError):
    """A cell file that cannot be used (corrupt, half-written, edited, or made with other settings)."""


@dataclass(frozen=True)
class PolicyEntry:
    label: str  # as given: "streaming:sink=64,window=512"
    policy: str
    options: dict

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", self.label.replace(":", "__").replace("=", "-"))


def parse_policy_entry(text: str) -> PolicyEntry:
    """``NAME`` or ``NAME:key=value,key=value`` (values parsed as int, float, bool or string)."""
    from accel.cli import parse_value

    name, _, rest = text.partition(":")
    opts: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in item:
            raise ValueError(f"policy {text!r}: options must read key=value, got {item!r}")
        k, v = item.split("=", 1)
        opts[k.strip()] = parse_value(v.strip())
    return PolicyEntry(label=text.strip(), policy=name.strip(), options=opts)


@dataclass
class Cell:
    task: str
    policy: PolicyEntry
    length: int

    def filename(self) -> str:
        return f"{self.task.replace(':', '-')}__{self.policy.slug}__{self.length}.json"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _computed_on(model) -> str:
    """Where a cell ran (device and dtype): a grid may be filled by runs on several machines and assembled on
    another, so each cell says where its scores came from."""
    import torch

    p = next(model.parameters())
    dev = torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else p.device.type
    return f"{dev}, {str(p.dtype).replace('torch.', '')}"


def write_cell(path: Path, key: dict, payload: dict) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never a part."""
    body = {"format": CELL_FORMAT, "key": key, "payload": payload}
    body["checksum"] = _digest({"key": key, "payload": payload})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(body, fh, indent=1, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_cell(path: Path, key: dict) -> dict:
    """The payload of a finished cell; CellError says why a file cannot be used."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CellError(f"{path.name} is corrupt or half-written ({type(exc).__name__}: {exc})") from exc
    if not isinstance(body, dict) or body.get("format") != CELL_FORMAT or not {"key", "payload", "checksum"} <= set(
            body):
        raise CellError(f"{path.name} is not an accel-eval cell file of format {CELL_FORMAT}")
    if body["checksum"] != _digest({"key": body["key"], "payload": body["payload"]}):
        raise CellError(f"{path.name} fails its checksum (edited or damaged)")
    if body["key"] != key:
        diff = sorted(k for k in set(key) | set(body["key"]) if key.get(k) != body["key"].get(k))
        raise CellError(f"{path.name} was made with other settings ({', '.join(diff)})")
    return body["payload"]


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[accel-eval] {msg}", file=sys.stderr, flush=True)


@dataclass
class GridConfig:
    model_name: str
    policies: list[PolicyEntry]
    lengths: list[int]
    tasks: list[str]
    samples: int = 5
    seed: int = 0
    depths: list[float] | None = None
    backend: str = "auto"
    max_new_tokens: int | None = None
    longbench_dir: str | None = None
    extra: dict = field(default_factory=dict)


def _samples_for(task: str, tokenizer, length: int, cfg: GridConfig) -> list[dict]:
    if task.startswith("longbench:"):
        from . import longbench

        ds = task.split(":", 1)[1]
        rows = longbench.load_longbench(cfg.longbench_dir, ds, limit=cfg.samples)
        new = cfg.max_new_tokens or longbench.DATASET_MAXLEN.get(ds, 64)
        out = []
        for i, row in enumerate(rows):
            prompt, chat = longbench.build_prompt(ds, row, tokenizer, max(16, length - 32))
            ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
            out.append({"task": task, "index": i, "prompt": prompt, "chat_template": chat, "outputs": row["answers"],
                        "all_classes": row.get("all_classes"), "depth": None, "length": len(ids),
                        "max_length": length, "max_new_tokens": new, "_id": row.get("_id")})
        return out
    from .synth import generate_samples

    s = generate_samples(task, tokenizer, length, num_samples=cfg.samples, seed=cfg.seed, depths=cfg.depths)
    if cfg.max_new_tokens:
        for x in s:
            x["max_new_tokens"] = cfg.max_new_tokens
    return s


def _score(task: str, pred: str, sample: dict) -> float:
    if task.startswith("longbench:"):
        from .longbench import score

        return score(task.split(":", 1)[1], pred, sample["outputs"], sample.get("all_classes"))
    from .synth import score_sample

    return score_sample(pred, sample["outputs"])


def _generate(model, tokenizer, sample: dict) -> tuple[str, int]:
    import torch

    ids = tokenizer(sample["prompt"], add_special_tokens=not sample["chat_template"])["input_ids"]
    x = torch.tensor([ids], device=model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=int(sample["max_new_tokens"]),
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    new = out[0, len(ids):].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(ids)


def run_grid(model, tokenizer, cfg: GridConfig, out_dir: Path, quiet: bool = False,
             progress: Callable | None = None) -> dict:
    """Run every missing cell and return {"cells": [...], "reused": n, "recomputed": [...], "computed": n}."""
    import accel
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    cells_dir = out_dir / "cells"
    cells = [Cell(t, p, n) for p in cfg.policies for n in cfg.lengths for t in cfg.tasks]
    done: dict[str, dict] = {}
    todo: list[tuple[Cell, dict]] = []
    recomputed: list[str] = []
    tokens = tokenizer_digest(tokenizer)
    for c in cells:
        key = _cell_key(c, cfg, model, tokens)
        path = cells_dir / c.filename()
        if path.exists():
            try:
                done[c.filename()] = read_cell(path, key)
                continue
            except CellError as exc:
                _log(f"{exc}; recomputing it", quiet)
                recomputed.append(c.filename())
        todo.append((c, key))
    _log(f"{len(cells)} cells: {len(done)} already finished, {len(todo)} to run", quiet)
    sample_cache: dict[tuple[str, int], list[dict]] = {}
    for c, _ in todo:  # generate every prompt first: a length a task cannot fit fails before any compute
        if (c.task, c.length) not in sample_cache:
            sample_cache[(c.task, c.length)] = _samples_for(c.task, tokenizer, c.length, cfg)
    total = sum(cfg.samples for _ in todo)
    bar = tqdm(total=total, desc="accel-eval", unit="sample", disable=quiet, file=sys.stderr, dynamic_ncols=True)
    current = None
    try:
        for c, key in todo:
            samples = sample_cache[(c.task, c.length)]
            if current != c.policy.label:
                accel.patch(model, policy=c.policy.policy, backend=cfg.backend, collect_stats=True, **c.policy.options)
                current = c.policy.label
            accel.reset_stats(model)
            bar.set_postfix_str(f"{c.policy.label} | {c.task} | {c.length}")
            t0 = time.perf_counter()
            rows = []
            for s in samples:
                pred, n_in = _generate(model, tokenizer, s)
                rows.append({"index": s["index"], "depth": s.get("depth"), "prompt_tokens": n_in,
                             "outputs": s["outputs"], "prediction": pred, "score": _score(c.task, pred, s)})
                bar.update(1)
            st = accel.stats(model)
            payload = {
                "task": c.task, "policy": c.policy.label, "length": c.length,
                "score": sum(r["score"] for r in rows) / max(1, len(rows)), "n": len(rows),
                "seconds": time.perf_counter() - t0, "samples": rows,
                "policy_resolved": st.get("policy"), "backends_used": st.get("backends_used"),
                "mean_density": st.get("mean_density"), "mean_prefill_density": st.get("mean_prefill_density"),
                "mean_decode_density": st.get("mean_decode_density"), "calibration": st.get("calibration"),
                "computed_on": _computed_on(model),
            }
            write_cell(cells_dir / c.filename(), key, payload)
            done[c.filename()] = payload
            if progress:
                progress(c, payload)
            if len(samples) < cfg.samples:
                bar.update(cfg.samples - len(samples))
    finally:
        bar.close()
    ordered = [done[c.filename()] for c in cells if c.filename() in done]
    return {"cells": ordered, "reused": len(cells) - len(todo), "computed": len(todo), "recomputed": recomputed}


def tokenizer_digest(tokenizer) -> str:
    """sha256 of how ``tokenizer`` renders and tokenizes a short niah prompt (its class, vocabulary size and the
    probe's token ids, chat template included). A cell's prompts come from its tokenizer: transformers 5.17 read
    Gemma-3's GGUF tokenizer into other ids than 5.25 did (accel.models rebuilds it now), and a grid resumed across
    such a change would have mixed the two tokenizations' scores."""
    from .synth import generate_samples

    probe = generate_samples("niah_single", tokenizer, 256, num_samples=1, depths=[0.5])[0]
    ids = tokenizer(probe["prompt"], add_special_tokens=not probe["chat_template"])["input_ids"]
    return _digest([type(tokenizer).__name__, len(tokenizer), list(ids)])


def _cell_key(c: Cell, cfg: GridConfig, model=None, tokens: str | None = None) -> dict:
    key = {"model": cfg.model_name, "task": c.task, "policy": c.policy.label, "policy_name": c.policy.policy,
           "options": c.policy.options, "length": c.length, "samples": cfg.samples, "seed": cfg.seed,
           "depths": list(cfg.depths) if cfg.depths else None, "backend": cfg.backend,
           "max_new_tokens": cfg.max_new_tokens}
    if tokens is not None:
        key["tokenizer"] = tokens
    key["config"] = _resolved_config(c.policy)
    digest = _head_map_digest(c.policy, model)
    if digest is not None:  # a recalibrated head map is another setting: its cells are not reused
        key["head_map"] = digest
    digest = _threshold_map_digest(key["config"]["prefill"], model)
    if digest is not None:  # likewise a recalibrated per-layer threshold map
        key["threshold_map"] = digest
    digest = _vs_head_map_digest(key["config"]["prefill"], model)
    if digest is not None:  # vertical_slash's head map (patterns, sizes, dense layers)
        key["vs_head_map"] = digest
    digest = _quest_layer_map_digest(key["config"]["decode"], model)
    if digest is not None:  # and Quest's map of dense layers
        key["quest_layer_map"] = digest
    return key


def _resolved_config(entry: PolicyEntry) -> dict:
    """Every option of the entry's prefill and decode policies, defaults included (as JSON values)."""
    import dataclasses

    import accel

    spec = accel.parse_policy(entry.policy, **entry.options)
    return json.loads(json.dumps({phase: {"name": pol.name, **{f.name: getattr(pol, f.name)
                                                                 for f in dataclasses.fields(pol) if f.init}}
                                  for phase, pol in (("prefill", spec.prefill), ("decode", spec.decode))},
                                 default=str))


def _head_map_digest(entry: PolicyEntry, model) -> str | None:
    """sha256 of the DuoAttention gates a duo / lserve entry reads (its ``duo_map`` or the shipped map that fits
    ``model``); None for other policies, or when no map resolves (patching then raises the error)."""
    if model is None or not {"duo", "lserve"} & set(entry.policy.split("+")):
        return None
    from accel.policies.duo import load_head_map

    try:
        _, data = load_head_map(str(entry.options.get("duo_map", "")), model.config)
    except (ValueError, OSError):
        return None
    return _digest(data.get("gates"))


def _threshold_map_digest(pol: dict, model) -> str | None:
    """sha256 of the per-layer thresholds a resolved prefill config with a ``layer_thresholds`` option (xattention,
    flexprefill, proxy; ``_resolved_config``) reads for ``model`` (its map, or the shipped one that fits), None
    without one."""
    if model is None or pol.get("layer_thresholds", "none") == "none":
        return None
    from accel.policies.threshold_map import load_threshold_map

    return _map_digest(lambda: load_threshold_map(pol["layer_thresholds"], model.config, pol["name"]), "thresholds")


def _quest_layer_map_digest(pol: dict, model) -> str | None:
    """sha256 of the dense layers a resolved ``quest`` decode config reads for ``model`` (its ``layer_map``, or the
    shipped one that fits), None for other policies or without one."""
    if model is None or pol.get("name") != "quest" or pol.get("layer_map", "none") == "none":
        return None
    from accel.policies.quest import CALIBRATED_SETTINGS, load_layer_map

    settings = {k: pol[k] for k in CALIBRATED_SETTINGS if k in pol}
    return _map_digest(lambda: load_layer_map(pol["layer_map"], model.config, settings), "dense_layers")


def _vs_head_map_digest(pol: dict, model) -> str | None:
    """sha256 of what a resolved ``vertical_slash`` prefill config reads from its head map for ``model`` (the named
    map, or the shipped one ``"auto"`` finds), None for other policies or without a map."""
    if model is None or pol.get("name") != "vertical_slash":
        return None
    from accel.policies.vertical_slash import VerticalSlashPolicy, _read_head_map

    try:
        policy = VerticalSlashPolicy.from_options(**{k: v for k, v in pol.items() if k != "name"})
        policy.check_model(model)
        path = policy.map_path()
        data = _read_head_map(path) if path else None
    except (ValueError, OSError):
        return None
    return None if data is None else _digest({k: data.get(k) for k in ("patterns", "sizes", "dense_layers")})


def _map_digest(load: Callable, field: str) -> str | None:
    """sha256 of ``field`` of the map ``load()`` finds; None when it finds none or fails (patching then raises)."""
    try:
        found = load()
    except (ValueError, OSError):
        return None
    return None if found is None else _digest(found[1].get(field))


def summarize(cells: list[dict], policies: list[str], lengths: list[int], tasks: list[str]) -> str:
    """Markdown: one row per policy × length, one column per task, plus the mean over tasks."""
    by = {(c["policy"], c["length"], c["task"]): c for c in cells}
    head = "| policy | length | " + " | ".join(tasks) + " | mean |"
    lines = [head, "|" + " --- |" * (len(tasks) + 3)]
    for p in policies:
        for n in lengths:
            vals = [by.get((p, n, t)) for t in tasks]
            got = [v["score"] for v in vals if v is not None]
            cols = [f"{v['score'] * 100:.0f}" if v is not None else "—" for v in vals]
            mean = f"{sum(got) / len(got) * 100:.1f}" if got else "—"
            lines.append(f"| {p} | {n} | " + " | ".join(cols) + f" | {mean} |")
    return "\n".join(lines)
