"""Helpers shared by the GPU benchmark scripts."""

from __future__ import annotations


def err(e: BaseException) -> str:
    """One line describing an exception, for a results table cell."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def bench(fn, rep: int = 100, warmup: int = 25) -> float:
    """Median milliseconds of ``triton.testing.do_bench``."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def parse_spec(text: str) -> tuple[str, dict]:
    """``"quest:budget=2048,page_size=16"`` -> ("quest", {"budget": 2048, "page_size": 16}) (ints, floats, strings)."""
    name, _, opts = text.partition(":")
    kw = {}
    for item in filter(None, opts.split(",")):
        key, _, val = item.partition("=")
        for cast in (int, float):
            try:
                val = cast(val)
                break
            except ValueError:
                continue
        kw[key] = val
    return name, kw
