"""Input checks shared by the sparse attention kernels: cheap (no device sync), before any launch."""

from __future__ import annotations

import os
import sys

import torch

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Set by scripts/compile_check.py, which fakes Triton's driver so that launches only compile (for a GPU target, on
# a machine without one): CPU tensors then stand in for CUDA ones and the wrappers pick their GPU configurations.
COMPILE_ONLY = False


_TRITON_MODE: list = []  # [bool] once read from a loaded triton (its mode cannot change after that)


def _triton_interprets() -> bool | None:
    """Whether the loaded triton wrapped its own helpers for the interpreter (None: triton not loaded yet)."""
    if not _TRITON_MODE:
        if "triton" not in sys.modules:
            return None
        try:
            from triton.language import standard

            _TRITON_MODE.append(type(standard.cdiv).__name__ == "InterpretedFunction")
        except (ImportError, AttributeError):  # a triton without these helpers: trust the variable
            _TRITON_MODE.append(True)
    return _TRITON_MODE[0]


def interpreting() -> bool:
    """Whether the Triton kernels run in Triton's interpreter: TRITON_INTERPRET is on, and was when triton was
    imported (Triton reads it then and wraps its own helpers; set later in the process, the kernels would mix
    interpreted and compiled functions and fail at their first call)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and _triton_interprets() is not False


def interpreter_problem() -> str | None:
    """Why the Triton kernels cannot run on the CPU in this process (None: they can): the interpreter is off, or
    TRITON_INTERPRET was set after triton was imported (``import accel`` imports it), which Triton ignores."""
    if interpreting():
        return None
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return ("TRITON_INTERPRET was set after triton was imported (import accel imports it) and Triton ignores "
                "it: set it before Python starts (TRITON_INTERPRET=1 python ...)")
    return "set TRITON_INTERPRET=1 before Python starts (the kernels then run slowly on the CPU)"


def gpu_path(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` takes the GPU configuration (tiles, bf16 dots) rather than the interpreter's."""
    return t.is_cuda or COMPILE_ONLY


def device_ints(t: torch.Tensor, device) -> torch.Tensor:
    """A device-side integer bound (a static cache's length, per-row starts) as a flat tensor on ``device`` that a
    kernel reads directly: int32/int64 pass as they are (a cast would be one more launch per layer and step),
    anything else becomes int32."""
    t = t.to(device=device).reshape(-1)
    return t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str) -> None:
    """q [B, Hq, Sq, D], k and v [B, Hkv, Sk, D] with Hq % Hkv == 0, Sq <= Sk, a supported head_dim and dtype, one
    device, CUDA (or the interpreter). Raises ValueError naming the limit."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q [B, Hq, Sq, D] and k, v [B, Hkv, Sk, D] expected, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of KV heads {Hkv}")
    if Sq > Sk:
        raise ValueError(f"{kernel} kernel needs Sq <= Sk (queries are the last Sq keys), got Sq={Sq} Sk={Sk}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported by the Triton {kernel} kernel; "
                         f"supported: {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of float16/bfloat16/float32, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not gpu_path(q) and not interpreting():
        raise ValueError(f"the Triton {kernel} kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def check_qk(q: torch.Tensor, k: torch.Tensor, what: str, kernel: str, twin: str) -> None:
    """The estimation kernels' q [B, Hq, Sq, D] / k [B, Hkv, Sk, D] checks (no v): ``what`` names the scores in the
    Sq <= Sk message, ``kernel`` the kernel, ``twin`` the torch version to use without CUDA."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
        raise ValueError("q and k must be tensors [batch, heads, seq, head_dim]; got "
                         f"{tuple(getattr(q, 'shape', ()))}, {tuple(getattr(k, 'shape', ()))}")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of KV heads {Hkv}")
    if Sq > Sk:
        raise ValueError(f"{what} need Sq <= Sk (queries are the last Sq keys), got Sq={Sq} Sk={Sk}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported by the Triton {kernel} kernel; "
                         f"supported: {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share one dtype of float16/bfloat16/float32, got {q.dtype}, {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device}, {k.device}")
    if not gpu_path(q) and not interpreting():
        raise ValueError(f"the Triton {kernel} kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                         f"tensors; {twin} is the torch version)")


def check_positive_ints(**values) -> None:
    """Each option a positive int (bools refused), or ValueError naming it."""
    for name, val in values.items():
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")


def head_map(kv_heads: torch.Tensor | None, group: int | None, hq: int, hkv: int, device: torch.device,
             kernel: str) -> tuple[torch.Tensor | None, int]:
    """The decode kernels' optional KV-head map: ``kv_heads`` [hkv] names the layer KV head each head of k/v (or of
    the page bounds) is, ``group`` the query heads per KV head. Returns (the map as int32/int64 on ``device``, or
    None, and the group size: ``hq // hkv`` without a map). Raises ValueError naming the mismatch."""
    if kv_heads is None:
        if hq % hkv:
            raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
        if group is not None and group != hq // hkv:
            raise ValueError(f"{kernel}: group {group} does not match {hq} query / {hkv} KV heads")
        return None, hq // hkv
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise ValueError(f"{kernel}: kv_heads needs group, a positive int (got {group!r})")
    if kv_heads.dim() != 1 or kv_heads.numel() != hkv:
        raise ValueError(f"{kernel}: kv_heads must be [{hkv}] (one id per KV head), got {tuple(kv_heads.shape)}")
    if hq % group:
        raise ValueError(f"query heads ({hq}) must be a multiple of group ({group})")
    if kv_heads.dtype not in (torch.int32, torch.int64):
        kv_heads = kv_heads.to(torch.int32)
    return kv_heads.to(device).contiguous(), group
