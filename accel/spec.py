"""Parse ``policy=`` (name, "prefill+decode", {"prefill": .., "decode": ..}, preset name or YAML path) and options
into a PolicySpec, validating everything before the model is touched."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from .policies import REGISTRY, Policy, policy_class


@dataclass
class PolicySpec:
    prefill: Policy
    decode: Policy

    def describe(self) -> str:
        if self.prefill is self.decode:
            return self.prefill.name
        return f"{self.prefill.name}+{self.decode.name}"


def preset_names() -> list[str]:
    """The presets shipped in configs/ (``accel.patch(model, "streaming_4k")``), by name."""
    return sorted(p.name[:-5] for p in resources.files("accel.configs").iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset: YAML with ``policy`` (or ``prefill``/``decode``) and optional ``options``."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise FileNotFoundError(f"preset file {name_or_path!r} does not exist")
        text = path.read_text()
    else:
        res = resources.files("accel.configs").joinpath(f"{name_or_path}.yaml")
        if not res.is_file():
            raise ValueError(
                f"unknown policy {name_or_path!r}; available policies: {', '.join(REGISTRY)}; "
                f"presets: {', '.join(preset_names())} (or a path to a .yaml preset)"
            )
        text = res.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict) or not ({"policy", "prefill", "decode"} & set(data)):
        raise ValueError(f"preset {name_or_path!r} must be a mapping with 'policy' or 'prefill'/'decode' keys")
    return data


def _split(policy: str | Mapping[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """(prefill part, decode part, preset options). A part is a name or a {"name": .., **options} mapping."""
    if isinstance(policy, Mapping):
        extra = set(policy) - {"prefill", "decode"}
        if extra:
            raise ValueError(f"policy dict keys must be 'prefill' and/or 'decode', got {sorted(extra)}")
        return policy.get("prefill", "dense"), policy.get("decode", "dense"), {}
    if not isinstance(policy, str) or not policy:
        raise TypeError(f"policy must be a name, 'prefill+decode' or a dict, got {policy!r}")
    if "+" in policy:
        parts = policy.split("+")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"composed policy {policy!r} must read 'PREFILL+DECODE', e.g. 'xattention+quest'")
        return parts[0].strip(), parts[1].strip(), {}
    if policy not in REGISTRY:
        data = load_preset(policy)
        options = dict(data.get("options") or {})
        if "policy" in data:
            pre, dec, _ = _split(data["policy"])
        else:
            pre, dec = data.get("prefill", "dense"), data.get("decode", "dense")
        return pre, dec, options
    phases = REGISTRY[policy].phases
    return (policy if "prefill" in phases else "dense"), (policy if "decode" in phases else "dense"), {}


def _part(part: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(part, Mapping):
        part = dict(part)
        if "name" not in part:
            raise ValueError(f"a policy given as a mapping needs a 'name' key, got {part}")
        return part.pop("name"), part
    return part, {}


def parse_policy(policy: str | Mapping[str, Any] = "dense", **options: Any) -> PolicySpec:
    """Build and validate the prefill and decode policies. Options go to every component that declares them;
    an option no component declares is an error."""
    pre, dec, preset_opts = _split(policy)
    (pre_name, pre_own), (dec_name, dec_own) = _part(pre), _part(dec)
    for name, phase in ((pre_name, "prefill"), (dec_name, "decode")):
        cls = policy_class(name)
        if phase not in cls.phases:
            swapped = all(n in REGISTRY and REGISTRY[n].cls is not None and p in REGISTRY[n].phases
                          for n, p in ((pre_name, "decode"), (dec_name, "prefill")))
            hint = f"; did you mean '{dec_name}+{pre_name}'?" if swapped else ""
            raise ValueError(f"policy {name!r} is a {'/'.join(cls.phases)} policy and cannot be used for {phase}"
                             + hint)
    merged = {**preset_opts, **options}
    pre_cls, dec_cls = policy_class(pre_name), policy_class(dec_name)
    known = set(pre_cls.option_names()) | set(dec_cls.option_names())
    unknown = sorted(set(merged) - known)
    if unknown:
        hint = "; ".join(f"{c.name}: {', '.join(c.option_names()) or '(no options)'}" for c in {pre_cls, dec_cls})
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for policy {pre_name}+{dec_name}; "
                         f"valid options — {hint}")

    def build(cls, own):
        return cls.from_options(**{k: v for k, v in merged.items() if k in cls.option_names()}, **own)

    prefill = build(pre_cls, pre_own)
    decode = prefill if (dec_name == pre_name and dec_own == pre_own) else build(dec_cls, dec_own)
    return PolicySpec(prefill=prefill, decode=decode)
