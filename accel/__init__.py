"""accel: training-free sparse attention for long-context inference in Hugging Face transformers.

    import accel
    accel.patch(model, policy="streaming", window=2048)
    model.generate(...)
    accel.stats(model)
"""

from __future__ import annotations

from .cache import SinkWindowLayer, cache_bytes
from .kernels import BackendUnavailable
from .patches import UnsupportedModel
from .patching import is_patched, patch, reset_stats, stats, unpatch
from .policies import REGISTRY, PolicyNotImplemented
from .spec import PolicySpec, load_preset, parse_policy, preset_names

__version__ = "0.1.0"


def available_policies() -> dict[str, dict[str, object]]:
    """name -> {phase, description, paper, implemented}."""
    return {
        name: {
            "phase": "+".join(info.phases) if len(info.phases) == 1 else "both",
            "description": info.description,
            "paper": info.paper,
            "implemented": info.cls is not None,
        }
        for name, info in REGISTRY.items()
    }


__all__ = [
    "patch", "unpatch", "stats", "reset_stats", "is_patched", "available_policies", "parse_policy", "PolicySpec",
    "load_preset", "preset_names", "cache_bytes", "SinkWindowLayer", "BackendUnavailable", "UnsupportedModel",
    "PolicyNotImplemented",
]
