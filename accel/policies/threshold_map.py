"""Per-layer thresholds for XAttention, calibrated offline per model (XAttention's threshold prediction, per layer).

A map is JSON: ``{"format": "accel-xattention-thresholds/1", "model": <model signature>, "target_recall": r,
"thresholds": [one float per layer, null for the model's sliding-window layers], "calibration": {...}}``, made by
``scripts/calibrate_xattention.py MODEL`` and shipped as ``configs/xattention_<name>.json``."""

from __future__ import annotations

import json
import os
from importlib import resources

from .duo import model_signature

FORMAT = "accel-xattention-thresholds/1"
PREFIX = "xattention_"


def _shipped() -> list:
    return sorted(p for p in resources.files("accel.configs").iterdir()
                  if p.name.startswith(PREFIX) and p.name.endswith(".json"))


def shipped_names() -> list[str]:
    return [p.name[len(PREFIX):-5] for p in _shipped()]


def load_threshold_map(name: str, config) -> tuple[str, dict] | None:
    """(source, data) of the map ``name`` for a model of ``config``: ``"auto"`` the shipped map whose signature
    matches (None when there is none), a shipped name (``smollm2``) or a .json path (errors when missing or made
    for another model)."""
    sig = model_signature(config)
    if name == "auto":
        for res in _shipped():
            data = json.loads(res.read_text())
            if data.get("model") == sig:
                return str(res), data
        return None
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"XAttention threshold map {name!r} does not exist; make one with "
                                    "scripts/calibrate_xattention.py MODEL --out FILE")
        src, data = name, json.loads(open(name).read())
    else:
        res = resources.files("accel.configs").joinpath(f"{PREFIX}{name.removeprefix(PREFIX)}.json")
        if not res.is_file():
            raise ValueError(f"unknown XAttention threshold map {name!r}; shipped: "
                             f"{', '.join(shipped_names()) or '(none)'}, or a .json path from "
                             "scripts/calibrate_xattention.py; layer_thresholds='none' for one threshold")
        src, data = str(res), json.loads(res.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{src} is not an XAttention threshold map (format {data.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if data.get("model") != sig:
        raise ValueError(f"XAttention threshold map {src} was made for another model ({data.get('model')}); this "
                         f"model is {sig}. Calibrate one with scripts/calibrate_xattention.py, or pass "
                         "layer_thresholds='none'")
    return src, data


def thresholds_by_layer(data: dict) -> dict[int, float]:
    """{layer: threshold} of the layers the map sets (each in (0, 1])."""
    out = {}
    for i, t in enumerate(data["thresholds"]):
        if t is None:
            continue
        if not 0.0 < float(t) <= 1.0:
            raise ValueError(f"XAttention threshold map: layer {i} has threshold {t}, outside (0, 1]")
        out[i] = float(t)
    return out


__all__ = ["FORMAT", "load_threshold_map", "thresholds_by_layer", "shipped_names"]
