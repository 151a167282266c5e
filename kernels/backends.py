"""Backends: turn a layout into attention output.

A backend has ``name``, ``available() -> (ok, reason)``, ``supports(layout, q) -> reason | None`` and
``run(layout, q, k, v, *, scale, softcap, kv_start) -> out [B, Hq, Sq, D]``. ``get_backend`` raises a clear error
when an explicitly requested backend cannot run; ``auto`` is resolved per call by accel.attention."""

from __future__ import annotations

from .reference import ReferenceBackend

BACKEND_NAMES = ("auto", "reference", "triton", "flash")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (missing package, wrong device, unsupported layout)."""


def _make(name: str):
    if name == "reference":
        return ReferenceBackend()
    if name == "triton":
        from .triton import TritonBackend

        return TritonBackend()
    if name == "flash":
        from .flash import FlashBackend

        return FlashBackend()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


_CACHE: dict[str, object] = {}


def get_backend(name: str):
    """The backend object for ``name`` (``reference``, ``triton`` or ``flash``)."""
    if name not in _CACHE:
        _CACHE[name] = _make(name)
    return _CACHE[name]
