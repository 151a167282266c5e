"""Evaluation: offline long-context tasks, LongBench from local files, the lm-eval model ``accel`` and the
``accel-eval`` grid driver.

The task generators (`accel.eval.synth`), LongBench loader and metrics (`accel.eval.longbench`) and the grid
driver need only the core install. The lm-eval integration (`accel.eval.lm`, ``accel-lm-eval``) needs the
``eval`` extra: ``pip install "accel[eval]"`` (from a checkout: ``pip install -e ".[eval]"``).
"""

from __future__ import annotations

__all__ = ["require_lm_eval", "MissingExtraError"]


class MissingExtraError(ImportError):
    """An optional dependency of the ``eval`` extra is missing; the message names the install command."""


def require_lm_eval() -> None:
    """Raise MissingExtraError naming the fix when lm-eval (or what its RULER tasks import) is not installed."""
    missing = []
    for mod, pkg in (("lm_eval", "lm-eval"), ("datasets", "datasets"), ("wonderwords", "wonderwords"),
                     ("nltk", "nltk")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise MissingExtraError(
            f"the lm-eval integration needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            "installed: pip install \"accel[eval]\" (from a checkout: pip install -e \".[eval]\")")
