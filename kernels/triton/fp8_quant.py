"""Per-head FP8 (e4m3) quantisation of queries or keys for the estimation GEMMs (XAttention's strided scoring).

Hopper's FP8 tensor cores run at twice the bf16 rate, and FP8 tiles halve the L2 traffic of a kernel that re-reads
its operand tiles; the estimate only ranks blocks, so 3 mantissa bits per element are enough when each head is
scaled to the e4m3 range (max 448). Keys are first centred on their mean over the sequence (``center``): that
shifts every logit of a query row by the same constant (q . mean), which the row softmax cancels exactly, and it
removes the component all keys share, so the rounding error is relative to what tells keys apart.

One read of x and one write of the FP8 copy (a torch ``(x / scale).to(float8)`` would materialise a bf16
temporary of x's size first). Twin: ``quantize_fp8_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import interpreting

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@triton.jit
def _quant_fp8_kernel(X, OUT, MEAN, INV, stride_xb, stride_xh, stride_xs, stride_xd, H, S,
                      CENTER: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, GRID_ROUND: tl.constexpr):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_s * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    ok = rows[:, None] < S
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None].to(tl.int64) * stride_xs + offs_d[None, :] * stride_xd,
                mask=ok, other=0.0).to(tl.float32)
    if CENTER:
        x = x - tl.load(MEAN + bh.to(tl.int64) * BLOCK_D + offs_d)[None, :]
    y = x * tl.load(INV + bh)
    if GRID_ROUND:  # interpreter: its float -> e4m3 cast drops the carry when rounding up across a power of two
        e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(y), 1e-30))), -6.0)  # subnormals share 2^-6's step
        step = tl.exp2(e - 3.0)  # 3 mantissa bits
        y = tl.floor(y / step + 0.5) * step  # on the e4m3 grid: the cast below is exact
    y = y.to(tl.float8e4nv)
    tl.store(OUT + (bh.to(tl.int64) * S + rows[:, None]) * BLOCK_D + offs_d[None, :], y, mask=ok)


def _scales(x: torch.Tensor, center: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(mean [B, H, D] float32 or None, scale [B, H] float32) with |x - mean| / scale <= FP8_MAX."""
    # the max |x| is exact in x's own dtype: no float32 copy of x
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=(2, 3)).float()
    mean = None
    if center:
        mean = x.mean(dim=2, dtype=torch.float32)
        amax = amax + torch.linalg.vector_norm(mean, ord=float("inf"), dim=-1)  # bound on |x - mean|
    return mean, (amax / FP8_MAX).clamp_min(1e-30)


def quantize_fp8(x: torch.Tensor, *, center: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, S, D] (any strides; bf16/fp16/fp32) -> (x8, scale): x8 float8_e4m3fn [B, H, S, D] contiguous and
    scale float32 [B, H] with ``x8 * scale ~= x - mean`` (``mean`` the per-head mean over S when ``center``, else
    0). The scale bounds every head by the e4m3 range, so nothing saturates."""
    B, H, S, D = x.shape
    mean, scale = _scales(x, center)
    out = torch.empty(B, H, S, D, dtype=torch.float8_e4m3fn, device=x.device)
    if out.numel() == 0:
        return out, scale
    inv = (1.0 / scale).contiguous()
    mean_arg = mean.contiguous() if center else inv
    rows = 64
    _quant_fp8_kernel[(triton.cdiv(S, rows), B * H)](x, out, mean_arg, inv, *x.stride(), H, S, CENTER=center,
                                                      ROWS=rows, BLOCK_D=D, GRID_ROUND=interpreting(), num_warps=4)
    return out, scale


def quantize_fp8_reference(x: torch.Tensor, *, center: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8`` in torch ops (any device)."""
    mean, scale = _scales(x, center)
    xf = x.float() - (mean[:, :, None, :] if center else 0.0)
    return (xf / scale[:, :, None, None]).to(torch.float8_e4m3fn), scale


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``x8 * scale`` (what the FP8 estimate sees, for the torch twin of a policy)."""
    return x8.float() * scale[:, :, None, None]


__all__ = ["quantize_fp8", "quantize_fp8_reference", "dequantize_fp8", "FP8_MAX"]
