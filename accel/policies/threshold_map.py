"""Per-layer thresholds of a prefill policy, calibrated offline per model: XAttention's ``threshold`` (its paper's
threshold prediction, per layer), FlexPrefill's cumulative-attention ``gamma`` and ProxyAttn's ``gamma``.

A map is JSON: ``{"format": "accel-<policy>-thresholds/1", "model": <model signature>, "target_recall": r,
"thresholds": [one value per layer, null for the model's sliding-window layers], "calibration": {...}}``, made by
``scripts/calibrate_xattention.py MODEL [--policy flexprefill|proxy]`` and shipped as ``configs/<policy>_<name>.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from typing import Callable, ClassVar

from .duo import model_signature

# what a map's calibration records and a policy must share for the map to hold (block grid, estimate settings)
CALIBRATED_SETTINGS = ("block_size", "stride", "tau", "min_budget", "heads_per_proxy", "query_stride")


def map_format(policy: str) -> str:
    return f"accel-{policy}-thresholds/1"


FORMAT = map_format("xattention")


def _shipped(policy: str) -> list:
    return sorted(p for p in resources.files("accel.configs").iterdir()
                  if p.name.startswith(f"{policy}_") and p.name.endswith(".json"))


def shipped_names(policy: str = "xattention") -> list[str]:
    return [p.name[len(policy) + 1:-5] for p in _shipped(policy)]


def load_model_map(name: str, config, policy: str, fmt: str, what: str, make: str, off: str,
                   fits: Callable[[dict], bool] | None = None) -> tuple[str, dict] | None:
    """(source, data) of a per-model calibration file of ``policy`` in format ``fmt``: ``"auto"`` the shipped
    ``configs/<policy>_*.json`` whose signature matches and that ``fits`` accepts, if given (None when there is
    none), a shipped name (``smollm2``) or a .json path (errors when missing, of another format or made for another
    model). ``what`` names the file in errors (``"xattention threshold map"``), ``make`` is the command that makes
    one, ``off`` how to do without."""
    sig = model_signature(config)
    if name == "auto":
        for res in _shipped(policy):
            data = json.loads(res.read_text())
            if data.get("model") == sig and data.get("format") == fmt and (fits is None or fits(data)):
                return str(res), data
        return None
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{what} {name!r} does not exist; make one with {make} --out FILE")
        src, data = name, json.loads(open(name).read())
    else:
        res = resources.files("accel.configs").joinpath(f"{policy}_{name.removeprefix(policy + '_')}.json")
        if not res.is_file():
            raise ValueError(f"unknown {what} {name!r}; shipped: "
                             f"{', '.join(shipped_names(policy)) or '(none)'}, or a .json path from {make}; {off}")
        src, data = str(res), json.loads(res.read_text())
    if data.get("format") != fmt:
        raise ValueError(f"{src} is not a {what} (format {data.get('format')!r}, expected {fmt!r})")
    if data.get("model") != sig:
        raise ValueError(f"{what} {src} was made for another model ({data.get('model')}); this model is {sig}. "
                         f"Calibrate one with {make}, or pass {off}")
    return src, data


def load_threshold_map(name: str, config, policy: str = "xattention") -> tuple[str, dict] | None:
    """(source, data) of ``policy``'s per-layer threshold map ``name`` for a model of ``config`` (see
    ``load_model_map``)."""
    return load_model_map(name, config, policy, map_format(policy), f"{policy} threshold map",
                          f"scripts/calibrate_xattention.py MODEL --policy {policy}",
                          "layer_thresholds='none' for one threshold")


def thresholds_by_layer(data: dict) -> dict[int, float]:
    """{layer: threshold} of the layers the map sets (each in (0, 1])."""
    out = {}
    for i, t in enumerate(data["thresholds"]):
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise ValueError(f"threshold map: layer {i} has threshold {t!r}, outside (0, 1] (null: the policy's "
                             "own value)")
        out[i] = float(t)
    return out


class LayerThresholds:
    """Mixin of a dataclass policy with a ``layer_thresholds`` option (``"auto"``: the shipped map that fits the
    model, if any; ``"none"``: ``_layer_option`` everywhere; a shipped name or .json path) that sets the value of its
    ``_layer_option`` (``"threshold"``, ``"gamma"``) per layer. Passing that option explicitly without
    ``layer_thresholds`` means one value for every layer. A map applies only with the settings it was calibrated
    with (block size, stride, ...): ``"auto"`` keeps one value otherwise, a named map raises."""

    _layer_option: ClassVar[str] = "threshold"
    none_options: ClassVar[tuple[str, ...]] = ("layer_thresholds",)

    @classmethod
    def from_options(cls, **options):
        if cls._layer_option in options and "layer_thresholds" not in options:
            options["layer_thresholds"] = "none"  # an explicit value is one value for every layer
        return super().from_options(**options)

    def _check_layer_thresholds(self) -> None:
        if not isinstance(self.layer_thresholds, str) or not self.layer_thresholds:
            raise ValueError(f"option 'layer_thresholds' of policy {self.name!r} must be 'auto', 'none', a shipped "
                             f"map name or a .json path, got {self.layer_thresholds!r}")

    def check_model(self, model) -> None:
        """Called by accel.patch: load the per-layer values for ``model``."""
        self._by_layer, self._map_source, self._layer_policies = {}, None, {}
        if self.layer_thresholds == "none":
            return
        found = load_threshold_map(self.layer_thresholds, model.config, self.name)
        if found is None:
            return
        src, data = found
        cal = data.get("calibration") or {}
        made = {k: cal[k] for k in CALIBRATED_SETTINGS if k in cal and hasattr(self, k)}
        differs = {k: v for k, v in made.items() if getattr(self, k) != v}
        if differs:  # values calibrated for other settings would not keep what they promise
            if self.layer_thresholds == "auto":
                return  # the shipped map does not apply: one value for every layer
            raise ValueError(f"{self.name} threshold map {src} was calibrated with {made}; this policy has "
                             + ", ".join(f"{k}={getattr(self, k)}" for k in differs)
                             + ". Calibrate one for these settings or pass layer_thresholds='none'")
        cfg = getattr(model.config, "text_config", None) or model.config
        values = data.get("thresholds")
        if not isinstance(values, list) or len(values) != cfg.num_hidden_layers:
            # a map of other length would set the first layers' values and leave the rest silently uniform
            have = f"{len(values)} thresholds" if isinstance(values, list) else "no 'thresholds' list"
            raise ValueError(f"{self.name} threshold map {src} has {have}; this model has {cfg.num_hidden_layers} "
                             "layers and the map needs one value per layer (null for sliding-window layers). "
                             f"Calibrate one with scripts/calibrate_xattention.py MODEL --policy {self.name}, or "
                             "pass layer_thresholds='none'")
        self._map_source, self._by_layer = src, thresholds_by_layer(data)

    @property
    def calibration_source(self) -> str | None:
        """The per-layer map in use (None: one value for every layer)."""
        return getattr(self, "_map_source", None)

    def layer_value(self, layer_idx: int) -> float:
        return getattr(self, "_by_layer", {}).get(layer_idx, getattr(self, self._layer_option))

    def at_layer(self, layer_idx: int):
        """This policy with the layer's value as its one value (itself when that is already so); made once per
        layer, not on every plan."""
        value = self.layer_value(layer_idx)
        if value == getattr(self, self._layer_option):
            return self
        memo = self.__dict__.setdefault("_layer_policies", {})
        if layer_idx not in memo:
            memo[layer_idx] = dataclasses.replace(self, **{self._layer_option: value, "layer_thresholds": "none"})
        return memo[layer_idx]


__all__ = ["FORMAT", "LayerThresholds", "load_model_map", "load_threshold_map", "map_format", "thresholds_by_layer",
           "shipped_names"]
