"""One decode token's keys and values written into a static cache layer in one launch.

A decode step over transformers' StaticCache appends one token per layer. Written in torch, that is an index_copy
per buffer: keys, values, the streaming heads' ring keys and values (DuoAttention / LServe), and a read-modify-write
of the page's key min and max (Quest / LServe). Under torch.compile each became its own small kernel (RoPE folded
into several of them; 4-6 launches per layer, about 0.3 ms of a 6.4 ms LServe step at 128K on the H200, gaps
included). Here one program per (batch row, KV head) reads the token once and writes every place it goes.

Head map (``kv_map`` int32 [H]): ``r >= 0`` sends head ``h`` to row ``r`` of ``keys``/``values`` (and of the
bounds), ``r < 0`` to row ``-r - 1`` of the ring. Without it head ``h`` is row ``h``. The position is the cache's
device-side length (read, not written: the caller adds the token to it). The ring slot of position ``p`` is ``p``
below ``sink``, else ``sink + (p - sink) % recent``. A position at or past the buffer's capacity writes nothing
(torch's index_copy would raise on the device). Float8 bounds (``reference_decode.BOUNDS_FP8``) are folded in
float32 and rounded outward, as ``reference_decode.fp8_outward`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference_decode import _E5M2_INF, _E5M2_NEG_INF, BOUNDS_FP8, FP8_BOUND_MAX
from .checks import device_ints, interpreting

_FP8_MAX = tl.constexpr(FP8_BOUND_MAX)
_INF8 = tl.constexpr(_E5M2_INF)
_NEG_INF8 = tl.constexpr(_E5M2_NEG_INF)


@triton.jit
def fp8_outward(x, UP: tl.constexpr):
    """float32 x -> float8e5: the nearest value at or above x (UP) or at or below it (``fp8_outward`` of
    kernels/reference_decode.py, the same arithmetic). The binade's step comes from x's exponent bits (exact; log2
    is not), so the ceil / floor lands on the e5m2 grid and the cast is exact; past the finite range the outward
    direction gives +-inf, the inward one the largest finite value."""
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2|x|)
    e = tl.minimum(tl.maximum(e, -14), 127)  # subnormals (and 0) share 2^-14's step
    step = ((e - 2 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-2): 2 mantissa bits
    inv = ((127 - (e - 2)) << 23).to(tl.float32, bitcast=True)
    if UP:
        y = tl.maximum(tl.ceil(x * inv) * step, -_FP8_MAX)
        over = x > _FP8_MAX
        y8 = tl.minimum(y, _FP8_MAX).to(tl.float8e5).to(tl.uint8, bitcast=True)
        y8 = tl.where(over, _INF8, tl.where(x == float("-inf"), _NEG_INF8, y8))
    else:
        y = tl.minimum(tl.floor(x * inv) * step, _FP8_MAX)
        over = x < -_FP8_MAX
        y8 = tl.maximum(y, -_FP8_MAX).to(tl.float8e5).to(tl.uint8, bitcast=True)
        y8 = tl.where(over, _NEG_INF8, tl.where(x == float("inf"), _INF8, y8))
    return y8.to(tl.uint8).to(tl.float8e5, bitcast=True)


@triton.jit
def _append_kernel(K_NEW, V_NEW, LEN, MAP, KEYS, VALUES, SK, SV, KMIN, KMAX,
                   snb, snh, snd, svnb, svnh, svnd,
                   skb, skh, skn, skd, svb, svh, svn, svd,
                   s2kb, s2kh, s2kn, s2kd, s2vb, s2vh, s2vn, s2vd,
                   smb, smh, smp, smd, sxb, sxh, sxp, sxd,
                   H, S, SINK, RECENT, PAGE, D, DV,
                   HAS_MAP: tl.constexpr, HAS_RING: tl.constexpr, HAS_BOUNDS: tl.constexpr,
                   FP8_BOUNDS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    pos = tl.load(LEN).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    k = tl.load(K_NEW + b * snb + h * snh + offs_d * snd, mask=d_ok)
    v = tl.load(V_NEW + b * svnb + h * svnh + offs_dv * svnd, mask=dv_ok)
    r = h
    if HAS_MAP:
        r = tl.load(MAP + h)
    if (r >= 0) & (pos < S):
        kc = k.to(KEYS.dtype.element_ty)
        tl.store(KEYS + b * skb + r * skh + pos * skn + offs_d * skd, kc, mask=d_ok)
        tl.store(VALUES + b * svb + r * svh + pos * svn + offs_dv * svd, v.to(VALUES.dtype.element_ty), mask=dv_ok)
        if HAS_BOUNDS:  # the page's bounds folded with the stored key (min/max in float32: exact, and the
            # interpreter compares bf16 by raw bits)
            page = pos // PAGE
            lo_p = KMIN + b * smb + r * smh + page * smp + offs_d * smd
            hi_p = KMAX + b * sxb + r * sxh + page * sxp + offs_d * sxd
            kf = kc.to(tl.float32)
            lo = tl.minimum(tl.load(lo_p, mask=d_ok).to(tl.float32), kf)
            hi = tl.maximum(tl.load(hi_p, mask=d_ok).to(tl.float32), kf)
            if FP8_BOUNDS:
                tl.store(lo_p, fp8_outward(lo, False), mask=d_ok)
                tl.store(hi_p, fp8_outward(hi, True), mask=d_ok)
            else:
                tl.store(lo_p, lo.to(KMIN.dtype.element_ty), mask=d_ok)
                tl.store(hi_p, hi.to(KMAX.dtype.element_ty), mask=d_ok)
    if HAS_RING:
        if r < 0:
            s = -r - 1
            slot = tl.where(pos < SINK, pos, SINK + (pos - SINK) % RECENT)
            tl.store(SK + b * s2kb + s * s2kh + slot * s2kn + offs_d * s2kd, k.to(SK.dtype.element_ty), mask=d_ok)
            tl.store(SV + b * s2vb + s * s2vh + slot * s2vn + offs_dv * s2vd, v.to(SV.dtype.element_ty),
                     mask=dv_ok)


def traceable() -> bool:
    """Whether the launch can run here: torch.compile traces a GPU Triton launch (a user-defined kernel in its
    graph) but not the CPU interpreter's, so an interpreted compiled step (CPU tests) keeps the torch writes."""
    return not (interpreting() and torch.compiler.is_compiling())


def append_map(retrieval_idx: torch.Tensor, stream_idx: torch.Tensor, heads: int) -> torch.Tensor:
    """The kernel's head map for a layer split into retrieval heads (buffer rows) and streaming heads (ring rows):
    int32 [heads], ``r`` for the head in row ``r`` of the buffer, ``-s - 1`` for row ``s`` of the ring."""
    m = torch.empty(heads, dtype=torch.int32, device=retrieval_idx.device)
    m[retrieval_idx] = torch.arange(retrieval_idx.numel(), dtype=torch.int32, device=m.device)
    m[stream_idx] = -1 - torch.arange(stream_idx.numel(), dtype=torch.int32, device=m.device)
    return m


def append_token(k_new: torch.Tensor, v_new: torch.Tensor, length: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, *, kv_map: torch.Tensor | None = None,
                 ring: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
                 bounds: tuple[torch.Tensor, torch.Tensor] | None = None, page_size: int = 16) -> None:
    """Write one token ``k_new`` / ``v_new`` [B, H, 1, D] (any strides) at position ``length`` (a 0-d device int,
    not changed) of ``keys`` / ``values`` [B, H_r, S, D]; with ``kv_map`` (see the module) streaming heads go to
    ``ring = (skeys, svalues, sink, recent)``; ``bounds = (kmin, kmax)`` [B, H_r, ceil(S / page_size), D] fold the
    key into its page. In place, no host sync."""
    B, H, n, D = k_new.shape
    Dv = v_new.shape[-1]
    if n != 1 or tuple(v_new.shape[:3]) != (B, H, 1):
        raise ValueError(f"append_token writes one token per row: k/v [B, H, 1, D], got {tuple(k_new.shape)}, "
                         f"{tuple(v_new.shape)}")
    if (ring is None) != (kv_map is None):
        raise ValueError("append_token: a ring needs a head map (kv_map) and a head map a ring")
    if kv_map is not None and (kv_map.dtype != torch.int32 or kv_map.numel() != H):
        raise ValueError(f"append_token: kv_map must be int32 [{H}], got {kv_map.dtype} {tuple(kv_map.shape)}")
    if B * H == 0:
        return
    length = device_ints(length, k_new.device)
    dummy = keys
    sk, sv, sink, recent = ring if ring is not None else (dummy, dummy, 0, 1)
    kmin, kmax = bounds if bounds is not None else (dummy, dummy)
    _append_kernel[(B * H,)](
        k_new, v_new, length, kv_map if kv_map is not None else length, keys, values, sk, sv, kmin, kmax,
        k_new.stride(0), k_new.stride(1), k_new.stride(3), v_new.stride(0), v_new.stride(1), v_new.stride(3),
        *keys.stride(), *values.stride(), *sk.stride(), *sv.stride(), *kmin.stride(), *kmax.stride(),
        H, keys.shape[2], sink, recent, page_size, D, Dv,
        HAS_MAP=kv_map is not None, HAS_RING=ring is not None, HAS_BOUNDS=bounds is not None,
        FP8_BOUNDS=bounds is not None and kmin.dtype == BOUNDS_FP8, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(Dv), num_warps=1,
    )


__all__ = ["append_token", "append_map", "traceable"]
