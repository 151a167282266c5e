"""The lm-eval model type ``accel``: lm-eval's HF model with the attention patched by ``accel.patch``.

    accel-lm-eval --model accel --model_args pretrained=smollm2,policy=xattention,threshold=0.95 \
        --tasks accel_niah_single --metadata '{"max_seq_lengths": [4096]}' --device cpu

``model_args`` takes everything lm-eval's ``hf`` model takes, plus:

- ``policy`` (name, ``PREFILL+DECODE``, preset or YAML path; default ``dense``), or ``prefill=`` / ``decode=``;
- ``backend`` — an accel backend (``auto``, ``reference``, ``triton``, ``flash``). lm-eval's own ``backend``
  values (``default``, ``causal``, ``seq2seq``) still go to lm-eval; ``accel_backend=`` names ours explicitly;
- every policy option (``window``, ``sink``, ``threshold``, ...), validated by ``accel.parse_policy`` before the
  model is loaded; ``collect_stats=true``;
- ``pretrained`` may be a demo model (``smollm2``, ``gemma3``) or a ``.gguf`` file: it is loaded with
  ``accel.models.load_model``; its tokenizer is saved to a folder so lm-eval's RULER tasks can use it (the
  ``accel-lm-eval`` command passes that folder as ``tokenizer`` for you).

From Python, with a model already loaded: ``AccelLM(pretrained=model, tokenizer=tok, policy="streaming",
window=1024)`` or :func:`evaluate`.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path
from typing import Any

from . import require_lm_eval

require_lm_eval()

import accel  # noqa: E402
from accel.models import DEMO_MODELS, load_model  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

__all__ = ["AccelLM", "evaluate", "tasks_dir", "policy_option_names", "is_accel_loaded", "tokenizer_folder",
           "split_accel_args", "ContextTooLongError"]

LM_EVAL_BACKENDS = ("default", "causal", "seq2seq")
_HFLM_PARAMS = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def tasks_dir() -> str:
    """The folder of accel's lm-eval task YAMLs (pass as ``--include_path``; ``accel-lm-eval`` adds it)."""
    return str(Path(__file__).resolve().parent / "tasks")


def policy_option_names() -> set[str]:
    """Option names of every implemented policy (what ``model_args`` routes to ``accel.patch``)."""
    from accel.policies import REGISTRY

    names: set[str] = set()
    for info in REGISTRY.values():
        if info.cls is not None:
            names |= set(info.cls.option_names())
    return names


def is_accel_loaded(pretrained: Any) -> bool:
    """True when ``pretrained`` is a name that accel loads itself: a demo model or a .gguf file."""
    return isinstance(pretrained, str) and (pretrained in DEMO_MODELS or pretrained.lower().endswith(".gguf"))


def tokenizer_folder(pretrained: str) -> Path:
    """Where the tokenizer of a demo/GGUF model is saved for lm-eval tasks that load one by path."""
    from accel.models import cache_dir

    tag = Path(pretrained).name if pretrained in DEMO_MODELS else (
        Path(pretrained).stem + "-" + hashlib.sha1(str(Path(pretrained).expanduser().resolve()).encode()).hexdigest()[:8])
    return cache_dir().parent / "tokenizers" / tag


def save_tokenizer(tokenizer, folder: Path) -> str:
    """Save a tokenizer to ``folder`` atomically (once); returns the folder as a string."""
    import shutil
    import tempfile

    folder = Path(folder)
    if (folder / "tokenizer_config.json").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=folder.parent))
    try:
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def split_accel_args(kwargs: dict[str, Any]) -> tuple[Any, str, dict[str, Any], dict[str, Any]]:
    """(policy, accel backend, policy options, remaining lm-eval kwargs). Nothing is validated yet."""
    kw = dict(kwargs)
    policy = kw.pop("policy", None)
    prefill, decode = kw.pop("prefill", None), kw.pop("decode", None)
    if prefill is not None or decode is not None:
        if policy is not None:
            raise ValueError("model_args: give either policy=... or prefill=/decode=, not both")
        policy = {"prefill": prefill or "dense", "decode": decode or "dense"}
    backend = kw.pop("accel_backend", None)
    if "backend" in kw and kw["backend"] not in LM_EVAL_BACKENDS:
        if backend is not None:
            raise ValueError("model_args: backend=... and accel_backend=... both name an accel backend")
        backend = kw.pop("backend")
    names = policy_option_names() | {"collect_stats"}
    options = {k: kw.pop(k) for k in list(kw) if k in names and k not in _HFLM_PARAMS}
    return policy, (backend or "auto"), options, kw


@register_model("accel")
class AccelLM(HFLM):
    """lm-eval's HFLM with ``accel.patch`` applied to the model after loading (see the module docstring)."""

    def __init__(self, pretrained="smollm2", **kwargs: Any) -> None:
        policy, backend, options, rest = split_accel_args(kwargs)
        collect = bool(options.pop("collect_stats", False))
        if policy is None and not isinstance(pretrained, str) and accel.is_patched(pretrained):
            spec = None  # an already-patched model object: keep its patch
        else:
            policy = policy if policy is not None else "dense"
            spec = accel.parse_policy(policy, **options)  # bad policy/options fail before the slow load
        from accel.kernels import BACKEND_NAMES

        if backend not in BACKEND_NAMES:
            raise ValueError(f"unknown accel backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)} "
                             f"(lm-eval's own backend values {', '.join(LM_EVAL_BACKENDS)} are passed to lm-eval)")
        self.accel_source = pretrained if isinstance(pretrained, str) else type(pretrained).__name__
        if is_accel_loaded(pretrained):
            device = rest.pop("device", None) or "cpu"
            import torch

            if str(device).startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"
            dtype = rest.pop("dtype", None)
            model, tok = load_model(pretrained, device=str(device), dtype=None if dtype in (None, "auto") else dtype,
                                    quiet=True)
            self.accel_tokenizer_path = save_tokenizer(tok, tokenizer_folder(pretrained))
            if rest.get("tokenizer") is None or rest.get("tokenizer") == self.accel_tokenizer_path:
                rest["tokenizer"] = tok
            for k in ("revision", "subfolder", "gguf_file", "trust_remote_code", "parallelize", "peft", "delta"):
                rest.pop(k, None)
            pretrained = model
        self._accel_user_max_length = rest.get("max_length") is not None
        super().__init__(pretrained=pretrained, **rest)
        if spec is not None:
            accel.patch(self._model, policy=policy, backend=backend, collect_stats=collect, **options)
        self.accel_policy = accel.stats(self._model).get("policy") if accel.is_patched(self._model) else None
        self.accel_backend = backend


def evaluate(model, tokenizer=None, tasks=("accel_niah_single",), *, policy=None, backend="auto",
             metadata: dict | None = None, include_path=None, **kwargs):
    """Run ``lm_eval.simple_evaluate`` on an already-loaded model (or a name) with ``--model accel`` semantics.

    ``metadata`` reaches the tasks (``max_seq_lengths``, ``num_samples``, ...); the tokenizer is saved to a folder
    and passed as ``metadata["tokenizer"]`` so lm-eval's RULER tasks can size their prompts. Other keyword
    arguments go to ``simple_evaluate`` (``limit``, ``batch_size``, ``gen_kwargs`` ...) except policy options,
    which go to ``accel.patch``. A loaded model is patched in place and stays patched with ``policy`` afterwards
    (``accel.unpatch(model)`` restores it).
    """
    import tempfile

    import lm_eval
    from lm_eval.tasks import TaskManager

    options = {k: kwargs.pop(k) for k in list(kwargs) if k in policy_option_names() | {"collect_stats"}}
    model_args: dict[str, Any] = {"pretrained": model, **options}
    if policy is not None:
        model_args["policy"] = policy
    if backend != "auto":
        model_args["accel_backend"] = backend
    if tokenizer is not None:
        model_args["tokenizer"] = tokenizer
    lm = AccelLM(**model_args)
    meta = dict(metadata or {})
    if "tokenizer" not in meta:
        if isinstance(model, str) and not is_accel_loaded(model):
            meta["tokenizer"] = model
        else:
            folder = getattr(lm, "accel_tokenizer_path", None)
            if folder is None:
                digest = hashlib.sha1(repr(sorted(lm.tokenizer.get_vocab().items())[:2000]).encode()).hexdigest()[:10]
                folder = save_tokenizer(lm.tokenizer, Path(tempfile.gettempdir()) / f"accel-tok-{digest}")
            meta["tokenizer"] = folder
    paths = [tasks_dir()] + ([include_path] if isinstance(include_path, str) else list(include_path or []))
    tm = TaskManager(include_path=paths, metadata=meta)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks) if not isinstance(tasks, str) else [tasks],
                                   task_manager=tm, **kwargs)


class ContextTooLongError(ValueError):
    """A task prompt does not fit the model's context."""


def _check_lengths(lm: AccelLM, requests) -> None:
    """A prompt + generation longer than the model's context is an error here, not a silent left-truncation."""
    limit = lm.max_length
    for req in requests:
        context, gen_kwargs = req.args[0], (req.args[1] if len(req.args) > 1 else {}) or {}
        new = int(gen_kwargs.get("max_gen_toks", lm.max_gen_toks))
        n = len(lm.tok_encode(context))
        if n + new > limit:
            raise ContextTooLongError(
                f"a prompt of {n} tokens + {new} generated tokens exceeds the model's context of {limit} tokens "
                f"({lm.accel_source}); lower the task length (--metadata max_seq_lengths=[...]) to at most "
                f"{limit - new}, or pass model_args max_length=N to let lm-eval truncate from the left")


_hf_generate_until = HFLM.generate_until


def _generate_until(self, requests, disable_tqdm: bool = False):
    if not getattr(self, "_accel_user_max_length", False):
        _check_lengths(self, requests)
    return _hf_generate_until(self, requests, disable_tqdm=disable_tqdm)


AccelLM.generate_until = _generate_until
