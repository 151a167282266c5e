"""Policy registry. Names are fixed for the whole project; those whose implementation has not landed yet are
listed with their phase and paper and raise a clear error when asked for."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .base import AttentionContext, Policy
from .dense import DensePolicy
from .duo import DuoPolicy
from .flexprefill import FlexPrefillPolicy
from .lserve import LServePolicy
from .proxy import ProxyPolicy
from .quest import QuestPolicy
from .streaming import StreamingPolicy
from .tidal import TidalPolicy
from .vertical_slash import VerticalSlashPolicy
from .xattention import XAttentionPolicy


@dataclass(frozen=True)
class PolicyInfo:
    name: str
    phases: tuple[str, ...]
    description: str
    paper: str
    cls: type[Policy] | None  # None: not implemented yet


_PLANNED: list = []  # every name has landed

NAMES = ("dense", "streaming", "vertical_slash", "xattention", "flexprefill", "proxy", "duo", "quest", "lserve",
         "tidal")
_IMPLEMENTED = {cls.name: cls for cls in (DensePolicy, StreamingPolicy, XAttentionPolicy)}
_IMPLEMENTED.update({cls.name: cls for cls in (FlexPrefillPolicy, ProxyPolicy, VerticalSlashPolicy)})  # issue 5
_IMPLEMENTED.update({cls.name: cls for cls in (QuestPolicy, DuoPolicy, LServePolicy, TidalPolicy)})  # issue 6
_INFO = {n: PolicyInfo(n, c.phases, c.description, c.paper, c) for n, c in _IMPLEMENTED.items()}
_INFO.update({n: PolicyInfo(n, p, d, pp, None) for n, p, d, pp in _PLANNED})
REGISTRY: dict[str, PolicyInfo] = {n: _INFO[n] for n in NAMES}


class PolicyNotImplemented(NotImplementedError):
    pass


def policy_class(name: str) -> type[Policy]:
    """The config class of a policy; clear errors for unknown and not-yet-implemented names."""
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available policies: {', '.join(REGISTRY)}")
    info = REGISTRY[name]
    if info.cls is None:
        ready = ", ".join(n for n, i in REGISTRY.items() if i.cls is not None)
        raise PolicyNotImplemented(
            f"policy {name!r} ({info.paper}) is not implemented yet in this version of accel; "
            f"implemented policies: {ready}"
        )
    return info.cls


def phase_label(name: str) -> str:
    """'prefill', 'decode' or 'both'."""
    phases = REGISTRY[name].phases
    return "both" if len(phases) == 2 else phases[0]


def policy_defaults(name: str) -> dict[str, Any]:
    """Every option of a policy with its default (``accel.patch(model, name, **options)`` overrides them)."""
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(policy_class(name))}


def options_markdown() -> str:
    """The options table of the README (tests/test_models_cli.py keeps the two in agreement)."""
    rows = ["| policy | phase | options (defaults) |", "| --- | --- | --- |"]
    for name in REGISTRY:
        opts = ", ".join(f"`{k}={v!r}`" for k, v in policy_defaults(name).items()) or "—"
        rows.append(f"| `{name}` | {phase_label(name)} | {opts} |")
    return "\n".join(rows)


__all__ = ["AttentionContext", "phase_label", "policy_defaults", "options_markdown", "Policy", "PolicyInfo", "REGISTRY",
           "policy_class", "PolicyNotImplemented", "DensePolicy", "StreamingPolicy", "XAttentionPolicy"]
