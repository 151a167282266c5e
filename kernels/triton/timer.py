"""In-kernel phase timing for GPU probes: where the microseconds of one launch go, program by program.

``stamp(STAMPS, i, ON)`` stores the GPU's global nanosecond timer (``%globaltimer``) at slot ``i`` of a program's
row of stamps when ``ON`` (a constexpr: off, it compiles to nothing). Kernels take it behind a ``stamps`` argument of
their wrapper (select_attend); ``scripts/bench_decode.py --stamps`` prints the medians. The interpreter has no
timer: the wrappers refuse stamps on the CPU. Used to split quest_decode's phases (kernels/triton/NOTES.md, the
fifteenth session), which showed the barriers cheap and every step between them 2-5 us.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import gpu_path


@triton.jit
def stamp(STAMPS, i, ON: tl.constexpr):
    if ON:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        tl.store(STAMPS + i, t)


@triton.jit
def stamp_after(STAMPS, i, dep, ON: tl.constexpr):
    """``stamp`` once the float32 scalar ``dep`` is computed (an input of the timer read, so the compiler cannot
    read the timer before the work that makes it)."""
    if ON:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,f", [dep], dtype=tl.int64, is_pure=False,
                                      pack=1)
        tl.store(STAMPS + i, t)


def check_stamps(stamps: torch.Tensor | None, programs: int, slots: int, fn: str) -> None:
    """A stamps buffer must be int64 on a CUDA device with ``slots`` per program."""
    if stamps is None:
        return
    if not gpu_path(stamps) or stamps.dtype != torch.int64 or stamps.numel() < programs * slots:
        raise ValueError(f"{fn}: stamps must be an int64 CUDA tensor of at least {programs} programs x {slots} "
                         f"slots, got {stamps.dtype} {tuple(stamps.shape)} on {stamps.device} (the interpreter has no "
                         "timer)")


__all__ = ["stamp", "stamp_after", "check_stamps"]
