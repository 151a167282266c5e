"""Policy base: a dataclass config whose ``plan`` returns a layout. A policy never computes attention itself."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class AttentionContext:
    """What a policy may look at besides q and k: where the call sits and what the model already fixed."""

    layer_idx: int
    phase: str  # "prefill" | "decode"
    sliding_window: int | None  # the model's own window for this layer (Gemma, Mistral, Qwen sliding layers)
    cache_layer: Any = None  # decode policies: this layer's cache layer (e.g. PagedKVLayer with page bounds), or None
    cache: Any = None  # the whole transformers Cache of this forward (cross-layer sharing, TidalDecode), or None
    kv_start: Any = None  # [B] int32 first real key per row for left-padded batches, else None
    scale: float | None = None  # the model's attention scale (None: head_dim ** -0.5), for policies scoring softmax
    softcap: float | None = None  # the model's logit soft-capping (Gemma 2), or None
    # the layer's query head ids that q holds when a policy plans a subset of them (a composition's retrieval heads
    # on a chunk over DuoAttention's split cache), else None: q holds every head
    q_heads: Any = None


@dataclass
class Policy:
    """Base class. Subclasses are dataclasses: their fields are the user-facing options, validated in
    ``validate``; ``plan`` returns a layout from accel.layouts."""

    name: ClassVar[str] = ""
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # map options whose "none" means no map: the CLI parses 'none' as None, taken here as the string
    none_options: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        """Raise ValueError naming the option and its valid range."""

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext):
        raise NotImplementedError

    def cache_limit(self, sliding_window: int | None) -> tuple[int, int] | None:
        """(sink, recent) tokens a decode cache must keep for this policy, or None to keep everything."""
        return None

    def cache_kind(self, sliding_window: int | None, layer_idx: int) -> tuple[type, dict[str, Any]] | None:
        """(cache layer class, keyword arguments of its ``from_layer``) that this decode policy needs for the
        layer, installed in place of the default DynamicLayer by accel.patching; None keeps the default."""
        return None

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, **options: Any) -> "Policy":
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            valid = ", ".join(cls.option_names()) or "(none)"
            raise ValueError(f"policy {cls.name!r} has no option {', '.join(map(repr, unknown))}; valid options: {valid}")
        for o in cls.none_options:
            if o in options and options[o] is None:
                options[o] = "none"  # as the CLI parses 'none'
        policy = cls(**options)
        for f in dataclasses.fields(cls):
            value = getattr(policy, f.name)
            if f.type in ("int", int) and not (isinstance(value, int) and not isinstance(value, bool)):
                raise ValueError(f"option {f.name!r} of policy {cls.name!r} must be an integer, got {value!r}")
            # bool is an int subclass: threshold=True must not pass as 1.0
            if f.type in ("float", float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"option {f.name!r} of policy {cls.name!r} must be a number, got {value!r}")
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"option {f.name!r} of policy {cls.name!r} must be True or False, got {value!r}")
            if f.type in ("str", str):  # names and paths (a pathlib.Path is taken as its string)
                if isinstance(value, os.PathLike):
                    setattr(policy, f.name, os.fspath(value))
                elif not isinstance(value, str):
                    raise ValueError(f"option {f.name!r} of policy {cls.name!r} must be a string (a name or a "
                                     f"path), got {value!r}")
        policy.validate()
        return policy


def require_positive(policy: Policy, *names: str) -> None:
    for n in names:
        v = getattr(policy, n)
        if v <= 0:
            raise ValueError(f"option {n!r} of policy {policy.name!r} must be > 0, got {v}")
