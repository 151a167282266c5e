"""FlashAttention backend: FlashAttention-4 (``flash_attn.cute``, CuTe DSL, Hopper and newer) when installed,
else FlashAttention-2 (``flash_attn``). Dense (optionally windowed) layouts, sink-free streaming layouts, and with FA4
``BlockLayout`` through its block-sparse forward (128x128 blocks; the layout is converted on the GPU).

FA takes tensors as [batch, seq, heads, dim]; the transposes stay inside this backend. Both FA2 (>= 2.1) and FA4
align the causal mask to the bottom-right corner when there are fewer queries than keys, which is the convention of
accel.layouts (query i sits at key index Sk - Sq + i). Nothing heavy is imported until the backend is used."""

from __future__ import annotations

import importlib
import importlib.util

from accel.layouts import BlockLayout, DenseLayout, StreamingLayout

# Block sizes of FA4's block-sparse forward that we use: its Hopper tile is 128 query rows x 128 keys, and a layout
# block must map onto whole tiles.
FA4_BLOCKS = ((128, 128),)

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
        self._missing: str | None = None  # why not, once found missing (module lookups cost ~0.6 ms per call)

    def _resolve(self) -> str:
        """Load a FlashAttention function; returns '' on success, else why not."""
        if self._fn is not None:
            return ""
        if self._missing is not None:  # auto asks at every decode step of every layer
            return self._missing
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
        self._missing = "; ".join(why)
        return self._missing

    def available(self) -> tuple[bool, str]:
        reason = self._resolve()
        return (not reason), reason

    def supports(self, layout, q) -> str | None:
        import torch

        if isinstance(layout, StreamingLayout):
            if layout.sink:
                return "streaming layouts with sink tokens (FlashAttention has a window, not sinks)"
        elif isinstance(layout, BlockLayout):
            if self._resolve() or self.version != "fa4":
                return "block-sparse layouts need flash-attn-4 (FA2 has no block-sparse forward)"
            if q.shape[-1] != 128:
                return (f"head_dim {q.shape[-1]} with a block-sparse layout (FA4's Hopper tiles match 128x128 blocks "
                        "at head_dim 128 only; at 256 its key tile is 80)")
            if (layout.block_q, layout.block_k) not in FA4_BLOCKS:
                return (f"block size {layout.block_q}x{layout.block_k} (FA4's block-sparse forward takes "
                        f"{' or '.join(f'{a}x{b}' for a, b in FA4_BLOCKS)})")
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
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D] views
        if isinstance(layout, BlockLayout):
            out = self._fn(qt, kt, vt, softmax_scale=scale, causal=True,
                           softcap=0.0 if softcap is None else float(softcap),
                           block_sparse_tensors=fa4_block_sparse(layout, q.shape[0], q.shape[1], q.shape[2],
                                                                 k.shape[2]))
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
        window = layout.window
        if window is not None and window >= k.shape[2]:
            window = None
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


def fa4_block_sparse(layout: BlockLayout, batch: int, heads: int, q_len: int, kv_len: int):
    """Our BlockLayout as FA4's ``BlockSparseTensorsTorch`` (see ``fa4_tensors``)."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    mc, mi, fc, fi = fa4_tensors(layout, batch, heads, q_len, kv_len)
    return BlockSparseTensorsTorch(mc, mi, fc, fi, block_size=(layout.block_q, layout.block_k))


def fa4_tensors(layout: BlockLayout, batch: int, heads: int, q_len: int, kv_len: int, *,
                use_triton: bool | None = None):
    """(mask_counts, mask_indices, full_counts, full_indices) for FA4: blocks crossing the causal diagonal (or the end
    of the keys) go to the "mask" lists, the rest to the "full" lists (no mask applied); FA4 wants one entry per
    query head and index tensors as wide as the number of key blocks. On CUDA one Triton launch
    (kernels/triton/fa4_layout.py), else (or ``use_triton=False``) the torch ops it replaces; equal outputs."""
    import torch

    if use_triton is None:
        use_triton = layout.counts.is_cuda
    if use_triton:
        from .triton.fa4_layout import fa4_split

        return fa4_split(layout, batch, heads, q_len, kv_len)
    from .reference_sparse import _layout_heads, split_full_partial

    mc, mi, fc, fi = split_full_partial(layout, q_len, kv_len)
    if mc.shape[1] != heads:  # layouts may be shared by the query heads of a group (or all heads)
        sel = _layout_heads(mc.shape[1], heads).to(mc.device)
        mc, mi, fc, fi = (t.index_select(1, sel) for t in (mc, mi, fc, fi))
    if mc.shape[0] != batch:
        mc, mi, fc, fi = (t.expand(batch, *t.shape[1:]) for t in (mc, mi, fc, fi))
    nk = -(-kv_len // layout.block_k)

    def width(idx):
        if idx.shape[-1] >= nk:
            return idx[..., :nk].contiguous()
        return torch.nn.functional.pad(idx, (0, nk - idx.shape[-1])).contiguous()

    return mc.contiguous(), width(mi), fc.contiguous(), width(fi)


__all__ = ["FlashBackend", "fa4_block_sparse", "fa4_tensors"]
