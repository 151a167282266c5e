"""The launch floor of a decode step: how fast can a GPU read a step's bytes when each layer is a chain of kernel
launches, each reading its share once and nothing else?

The byte floor of scripts/bench_decode_floor.py (dense bytes / policy bytes) assumes every byte streams at the
dense step's bandwidth. At decode sizes a layer's reads are small (LServe reuses its selection and reads ~9 MB per
layer at 128K, batch 1: ~3 us at 3 TB/s), and each launch in a CUDA graph costs its own ramp-up and tail. This
module measures that cost directly: one CUDA graph of ``_read_kernel`` launches, one per (layer, dependent read),
each summing a distinct slice of a large buffer (no slice is in L2 when it is read), timed like the attention
(median replay). ``dense_ms / policy_ms`` of two such graphs is what plain reads with that many dependent launches
per layer reach: a measured bound (the reads do nothing else) on the speedup a policy's kernels, which also compute,
can show, and so on the share of its byte floor within reach.

Graph replays read the same slices again; that measures cold reads only while one step's reads exceed the L2
(50 MB on an H100; a 128K step reads 0.29 GB or more), so the floor is meant for long contexts.

The kernel is a plain strided sum (int32, wrapping): each program walks BLOCK-element chunks ``programs`` apart and
stores one partial, so the loads cannot be dropped. ``read_sum`` runs it once (tests compare it with torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # int32 elements per program per iteration: 16 KB, 16 elements (4 x 16 B loads) a thread at 8 warps
PROGRAMS_PER_SM = (2, 4, 8, 16)  # grid sizes tried; the fastest graph counts


@triton.jit
def _read_kernel(X, OUT, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(pid * BLOCK, N, step):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < N, other=0)
    tl.store(OUT + pid, tl.sum(acc, 0))


def _grid(n: int, programs: int) -> int:
    return max(1, min(programs, triton.cdiv(n, BLOCK)))


def read_sum(x: torch.Tensor, programs: int = 8, num_warps: int = 8) -> torch.Tensor:
    """Sum of int32 ``x`` (1-D, contiguous) as ``_read_kernel`` reads it: int32 partials, one per program."""
    if x.dtype != torch.int32 or x.dim() != 1 or not x.is_contiguous():
        raise ValueError("read_sum takes a contiguous 1-D int32 tensor")
    grid = _grid(x.numel(), programs)
    out = torch.zeros(grid, dtype=torch.int32, device=x.device)
    _read_kernel[(grid,)](x, out, x.numel(), BLOCK=BLOCK, num_warps=num_warps)
    return out


def slices(buffer: torch.Tensor, layers: list[list[int]]) -> list[list[torch.Tensor]]:
    """Consecutive int32 views of ``buffer`` for each layer's reads (bytes, rounded up to 16), wrapping to the start
    when the buffer runs out: the buffer must hold at least two of the largest reads, so consecutive reads never
    share data (and, larger than L2, a wrapped read finds nothing of its slice left there)."""
    words = [[-(-b // 16) * 4 for b in reads] for reads in layers]
    biggest = max((w for ws in words for w in ws), default=0)
    if buffer.numel() < 2 * biggest:
        raise ValueError(f"read buffer of {buffer.numel() * 4} bytes holds less than two reads of {biggest * 4}")
    out, off = [], 0
    for ws in words:
        views = []
        for w in ws:
            if off + w > buffer.numel():
                off = 0
            views.append(buffer[off:off + w])
            off += w
        out.append(views)
    return out


def launch_floor_ms(layers: list[list[int]], *, buffer_bytes: int = 4 << 30, reps: int = 20,
                    programs_per_sm: tuple[int, ...] = PROGRAMS_PER_SM) -> dict:
    """Median ms of one replay of a CUDA graph reading ``layers`` (per layer: the bytes of each dependent launch, in
    order), at the fastest of the grid sizes tried. Returns {"ms", "programs_per_sm", "launches", "bytes"}."""
    from bench_utils import graph_of, replay_ms

    sm = torch.cuda.get_device_properties(0).multi_processor_count
    total = sum(sum(r) for r in layers)
    biggest = max(b for r in layers for b in r)
    buf_bytes = max(min(buffer_bytes, 2 * total), 2 * (-(-biggest // 16) * 16))
    buf = torch.ones(buf_bytes // 4, dtype=torch.int32, device="cuda")
    views = [v for layer in slices(buf, layers) for v in layer]
    best = None
    for per_sm in programs_per_sm:
        grids = [_grid(v.numel(), per_sm * sm) for v in views]
        outs = [torch.empty(g, dtype=torch.int32, device="cuda") for g in grids]

        def run(grids=grids, outs=outs):
            for v, g, o in zip(views, grids, outs):
                _read_kernel[(g,)](v, o, v.numel(), BLOCK=BLOCK, num_warps=8)

        ms = replay_ms(graph_of(run), reps)
        if best is None or ms < best["ms"]:
            best = {"ms": ms, "programs_per_sm": per_sm}
    del buf
    torch.cuda.empty_cache()
    return {**best, "launches": len(views), "bytes": total}


__all__ = ["read_sum", "slices", "launch_floor_ms", "BLOCK"]
