"""Triton backend: our own kernels (one file per kernel). ``flash_fwd`` covers dense, causal and sink+window
layouts with soft-capping, left padding and GQA; it runs on CUDA GPUs, or on the CPU under ``TRITON_INTERPRET=1``.

Nothing heavy is imported here: triton and the kernel module load on first use."""

from __future__ import annotations

import importlib.util

from accel.layouts import (BlockLayout, DenseLayout, PageSelection, SplitPageSelection, StreamingLayout,
                            VerticalSlashLayout)

HEAD_DIMS = (16, 32, 64, 128, 256)


class TritonBackend:
    """``flash_fwd`` for DenseLayout (optionally windowed) and StreamingLayout (sink + window); ``block_sparse``
    for BlockLayout; ``vertical_slash`` for VerticalSlashLayout."""

    name = "triton"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install triton)"
        import torch

        from .checks import interpreter_problem

        if torch.cuda.is_available():
            return True, ""
        problem = interpreter_problem()
        if problem is None:
            return True, "TRITON_INTERPRET=1: Triton kernels run (slowly) on the CPU"
        return False, f"no CUDA device ({problem})"

    def supports(self, layout, q) -> str | None:
        if isinstance(layout, SplitPageSelection):  # both head groups in one split-KV launch
            layout = layout.selection
        if isinstance(layout, PageSelection):  # decode_attention.py: split-KV over selected pages
            from .decode_attention import PAGE_SIZES

            if q.shape[2] != 1:
                return "page selections take one query per row (decode)"
            if layout.page_size not in PAGE_SIZES:
                return f"page size {layout.page_size} (the decode kernel takes {', '.join(map(str, PAGE_SIZES))})"
        elif not isinstance(layout, (DenseLayout, StreamingLayout, BlockLayout, VerticalSlashLayout)):
            return f"layout {type(layout).__name__} is not supported by the triton backend yet"
        import torch

        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {q.dtype} (the triton kernel takes float16, bfloat16 or float32)"
        if q.shape[-1] not in HEAD_DIMS:
            return f"head_dim {q.shape[-1]} (the triton kernel takes a power of two from 16 to 256)"
        return None

    def run(self, layout, q, k, v, *, scale, softcap=None, kv_start=None):
        if isinstance(layout, SplitPageSelection):
            from .decode_attention import paged_decode_attention

            sel = layout.selection  # retrieval heads over their pages, the ring (streaming heads) as second source
            return paged_decode_attention(q, k, v, sel.pages, sel.counts, sel.page_size, scale=scale, softcap=softcap,
                                          kv_start=kv_start, kv_heads=layout.kv_heads, group=layout.group,
                                          ring=(layout.ring_k, layout.ring_v, layout.ring_heads),
                                          out=q.new_empty(*q.shape[:3], v.shape[-1]))  # the maps cover every head
        if isinstance(layout, PageSelection):
            from .decode_attention import paged_decode_attention

            return paged_decode_attention(q, k, v, layout.pages, layout.counts, layout.page_size, scale=scale,
                                          softcap=softcap, kv_start=kv_start)
        if isinstance(layout, (BlockLayout, VerticalSlashLayout)):
            if kv_start is not None:
                raise ValueError("sparse prefill policies do not support left-padded batches yet; run prompts one "
                                 "at a time or with equal lengths")
            if isinstance(layout, BlockLayout):
                from .block_sparse import block_sparse_attention

                return block_sparse_attention(q, k, v, layout, scale=scale, softcap=softcap)
            from .vertical_slash import vertical_slash_attention

            return vertical_slash_attention(q, k, v, layout, scale=scale, softcap=softcap)
        sink = layout.sink if isinstance(layout, StreamingLayout) else 0
        if q.shape[2] == 1 and not sink:
            # one-token decode: the split-KV kernel keeps every SM busy (the prefill kernel gives Sq=1 one program
            # per head: 0.43 vs 0.16 ms at 32K on the H100, results/bench_decode.md "Triton dense")
            import torch

            from .decode_attention import paged_decode_attention

            Sk = k.shape[2]
            if layout.window is not None and layout.window < Sk:
                cut = Sk - layout.window  # the window holds the newest `window` keys, the query's own included
                k, v = k[:, :, cut:], v[:, :, cut:]
                if kv_start is not None:
                    kv_start = (kv_start.to(torch.int64) - cut).clamp_min(0).to(torch.int32)
            return paged_decode_attention(q, k, v, scale=scale, softcap=softcap, kv_start=kv_start)
        from .flash_fwd import flash_attention

        return flash_attention(q, k, v, scale=scale, causal=True, sink=sink, window=layout.window,
                               softcap=softcap, kv_start=kv_start)


__all__ = ["TritonBackend"]
