"""``backend="auto"`` between several fast backends: measure, then remember.

When more than one GPU backend can run a layout (a ``BlockLayout`` can run on our Triton kernel and on FA4's
block-sparse forward), which one is faster depends on the GPU, the shape and the kept share. The first call of each
shape bucket times every candidate on its real inputs (one warm-up run, which also compiles, then the median of a
few timed runs) and keeps the winner for the rest of the process. The choice and the times land in
``accel.stats(model)`` under ``auto_notes``."""

from __future__ import annotations

import torch

# (layout type, block sizes, batch, q heads, kv heads, head_dim, dtype, q-len bucket, kv-len bucket, device) -> name
_WINNERS: dict[tuple, str] = {}
_TIMED_RUNS = 3


def _bucket(n: int) -> int:
    """Next power of two: lengths in one bucket cost about the same, relative to each other."""
    return 1 << max(0, (n - 1).bit_length())


def _key(layout, q: torch.Tensor, k: torch.Tensor) -> tuple:
    blocks = (getattr(layout, "block_q", None), getattr(layout, "block_k", None))
    return (type(layout).__name__, blocks, q.shape[0], q.shape[1], k.shape[1], q.shape[-1], q.dtype,
            _bucket(q.shape[2]), _bucket(k.shape[2]), str(q.device))


def _time_ms(fn) -> float:
    fn()  # warm-up: first calls compile (Triton, CuTe DSL)
    times = []
    for _ in range(_TIMED_RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class Fastest:
    """Looks like a backend; ``run`` dispatches to the measured-fastest candidate (``name`` says which ran)."""

    def __init__(self, candidates: list, notes: set[str]):
        self.candidates = {b.name: b for b in candidates}
        self.notes = notes
        self.name = candidates[0].name

    def run(self, layout, q, k, v, **kw):
        key = _key(layout, q, k)
        name = _WINNERS.get(key)
        if name is None:
            times, failed = {}, []
            for n, b in self.candidates.items():
                try:
                    times[n] = _time_ms(lambda b=b: b.run(layout, q, k, v, **kw))
                except Exception as e:  # noqa: BLE001 - a backend that fails here is not a candidate; say why
                    failed.append(f"{n} failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            if not times:
                raise RuntimeError(f"no backend could run {type(layout).__name__}: {'; '.join(failed)}")
            name = min(times, key=times.get)
            self.notes.update(failed)
            _WINNERS[key] = name
            timed = ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(times.items(), key=lambda x: x[1]))
            self.notes.add(f"timed {type(layout).__name__} at q {q.shape[2]} / kv {k.shape[2]}: {timed}; "
                           f"chose {name}")
        self.name = name
        return self.candidates[name].run(layout, q, k, v, **kw)


_CONFIGS: dict[tuple, dict] = {}


def fastest_config(key: tuple, candidates: list[dict], run) -> dict:
    """Tile configs of a kernel whose best choice depends on the GPU: the first call of each ``key`` times
    ``run(config)`` for every candidate (warm-up, then the median of a few runs) and keeps the fastest; candidates
    that fail to compile or launch (e.g. out of shared memory on a smaller GPU) are skipped."""
    best = _CONFIGS.get(key)
    if best is None:
        times = {}
        for i, cfg in enumerate(candidates):
            try:
                times[i] = _time_ms(lambda c=cfg: run(c))
            except Exception:  # noqa: BLE001 - a config this GPU cannot run is simply not a candidate
                continue
        if not times:
            raise RuntimeError(f"no tile config could run for {key}")
        best = candidates[min(times, key=times.get)]
        _CONFIGS[key] = best
    return best


def clear() -> None:
    """Forget the measured choices (tests, or after changing GPU clocks)."""
    _WINNERS.clear()
    _CONFIGS.clear()
