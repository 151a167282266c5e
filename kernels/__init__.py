"""accel's attention kernels and backends, installed as ``accel.kernels`` (the backends: ``backends.py``).

The repository keeps this folder at its root as ``kernels/`` (the project layout). With the root on ``sys.path``
(``python -m pytest`` or ``python -c`` run from there), ``import kernels`` finds this folder before Hugging Face's
``kernels`` package, which transformers >= 5.25 depends on and imports when it starts. Imported under that name,
this module hands the import over to the installed package when there is one (else it stays what it was)."""

from __future__ import annotations

import importlib.machinery
import os
import sys

_hub_spec = None
if __name__ == "kernels":
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _hub_spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])

if _hub_spec is not None:  # the import system returns what sys.modules holds once this module has run
    import importlib.util

    _hub = importlib.util.module_from_spec(_hub_spec)
    sys.modules["kernels"] = _hub
    _hub_spec.loader.exec_module(_hub)
else:
    from .backends import BACKEND_NAMES, BackendUnavailable, get_backend  # noqa: F401
