"""FlashAttention backend: FlashAttention-4 (``flash_attn.cute``, CuTe DSL, Hopper and newer) when installed,
else FlashAttention-2 (``flash_attn``). Dense (optionally windowed) layouts and sink-free streaming layouts.

FA takes tensors as [batch, seq, heads, dim]; the transposes stay inside this backend. Both FA2 (>= 2.1) and FA4
align the causal mask to the bottom-right corner when there are fewer queries than keys, which is the convention of
accel.layouts (query i sits at key index Sk - Sq + i). Nothing heavy is imported until the backend is used."""

from __future__ import annotations

import importlib
import importlib.util

from accel.layouts import DenseLayout, StreamingLayout

INSTALL_HINT = ("pip install 'accel[flash]' (flash-attn-4, Hopper or newer), or flash-attn 2 (Ampere or newer), "
                "and run on a CUDA GPU")


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class FlashBackend:
    """FlashAttention-4 if importable on a CUDA device, else FlashAttention-2."""

    name = "flash"

    def __init__(self):
        self._fn = None
        self.version: str | None = None  # "fa4" or "fa2" once resolved

    def _resolve(self) -> str:
        """Load a FlashAttention function; returns '' on success, else why not."""
        if self._fn is not None:
            return ""
        import torch

        if not torch.cuda.is_available():
            return f"no CUDA device; {INSTALL_HINT}"
        why = []
        if _find("flash_attn.cute"):
            major, _ = torch.cuda.get_device_capability()
            if major >= 9:
                try:
                    self._fn = importlib.import_module("flash_attn.cute").flash_attn_func
                    self.version = "fa4"
                    return ""
                except Exception as e:  # broken install: say so, try FA2
                    why.append(f"flash_attn.cute failed to import ({type(e).__name__}: {e})")
            else:
                why.append(f"flash-attn-4 needs compute capability 9.0 or newer, this GPU has {major}.x")
        if _find("flash_attn.flash_attn_interface"):
            try:
                self._fn = importlib.import_module("flash_attn").flash_attn_func
                self.version = "fa2"
                return ""
            except Exception as e:
                why.append(f"flash_attn failed to import ({type(e).__name__}: {e})")
        why.append(INSTALL_HINT)
        return "; ".join(why)

    def available(self) -> tuple[bool, str]:
        reason = self._resolve()
        return (not reason), reason

    def supports(self, layout, q) -> str | None:
        import torch

        if isinstance(layout, StreamingLayout):
            if layout.sink:
                return "streaming layouts with sink tokens (FlashAttention has a window, not sinks)"
        elif not isinstance(layout, DenseLayout):
            return f"layout {type(layout).__name__} is not supported by the flash backend"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {q.dtype} (FlashAttention takes float16 or bfloat16)"
        if q.device.type != "cuda":
            return "tensors are not on a CUDA device"
        if q.shape[-1] > 256 or q.shape[-1] % 8:
            return f"head_dim {q.shape[-1]} (FlashAttention takes a multiple of 8 up to 256)"
        return None

    def run(self, layout, q, k, v, *, scale, softcap=None, kv_start=None):
        if kv_start is not None:
            raise ValueError("the flash backend does not support left-padded batches (kv_start); "
                             "use backend='triton' or 'reference'")
        reason = self.supports(layout, q)
        if reason is not None:
            raise ValueError(f"the flash backend cannot run this call: {reason}")
        reason = self._resolve()
        if reason:
            raise RuntimeError(f"the flash backend is unavailable: {reason}")
        window = layout.window
        if window is not None and window >= k.shape[2]:
            window = None
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D] views
        if self.version == "fa4":
            out = self._fn(qt, kt, vt, softmax_scale=scale, causal=True,
                           window_size=(None, None) if window is None else (window - 1, 0),
                           softcap=0.0 if softcap is None else float(softcap))
            if isinstance(out, tuple):
                out = out[0]
        else:
            out = self._fn(qt, kt, vt, dropout_p=0.0, softmax_scale=scale, causal=True,
                           window_size=(-1, -1) if window is None else (window - 1, 0),
                           softcap=0.0 if softcap is None else float(softcap))
        return out.transpose(1, 2)


__all__ = ["FlashBackend"]
