"""FP8 (e4m3) quantisation of queries or keys for the estimation GEMMs (XAttention's strided scoring), one scale per
group of ``group`` consecutive tokens.

Hopper's FP8 tensor cores run at twice the bf16 rate, and FP8 tiles halve the L2 traffic of a kernel that re-reads
its operand tiles; the estimate only ranks blocks, so 3 mantissa bits per element are enough when each group is
scaled to the e4m3 range (max 448). The group is the estimate's stride: a strided row (or column) of XAttention's
GEMM is the ``stride`` tokens of one group, so its dot product is ``s_q[r] * s_k[c] * (q8 . k8)`` and the scales
multiply each logit once, after the accumulation. A scale per group instead of per head means no separate pass over
x for a global max (the quantiser finds each group's max in the tile it loaded), and a finer grid for the groups of
small values.

Keys are first centred (``center``) on ``center_vector``, the mean of a fixed subsample of the sequence's tokens:
subtracting any one vector shifts every logit of a query row by the same constant (q . c), which the row softmax
cancels exactly, and removing the component all keys share makes the rounding error relative to what tells keys
apart. A subsample (every ``S // 256``-th token) finds that component as well as the full mean, without a pass over k.

One read of x, one write of the FP8 copy and of the scales. Twin: ``quantize_fp8_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import interpreting

FP8_MAX = 448.0  # largest finite float8_e4m3fn
CENTER_SAMPLES = 256  # tokens of the subsample ``center_vector`` averages
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _quant_fp8_kernel(X, OUT, SCALE, MEAN, stride_xb, stride_xh, stride_xs, stride_xd, H, S, SP, NG,
                      CENTER: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                      GRID_ROUND: tl.constexpr):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_s * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    ok = rows[:, None] < S
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None].to(tl.int64) * stride_xs + offs_d[None, :] * stride_xd,
                mask=ok, other=0.0).to(tl.float32)
    if CENTER:  # rows past S stay 0: they must not raise their group's max
        x = tl.where(ok, x - tl.load(MEAN + bh.to(tl.int64) * BLOCK_D + offs_d)[None, :], 0.0)
    g = tl.reshape(x, (ROWS // GROUP, GROUP * BLOCK_D))  # one group of tokens per row
    scale = tl.maximum(tl.max(tl.abs(g), axis=1) / _FP8_MAX, 1e-30)
    y = g / scale[:, None]
    if GRID_ROUND:  # interpreter: its float -> e4m3 cast drops the carry when rounding up across a power of two
        e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(y), 1e-30))), -6.0)  # subnormals share 2^-6's step
        step = tl.exp2(e - 3.0)  # 3 mantissa bits
        y = tl.floor(y / step + 0.5) * step  # on the e4m3 grid: the cast below is exact
    y = tl.reshape(y, (ROWS, BLOCK_D)).to(tl.float8e4nv)
    # rows S..SP (the last group's padding) are stored as zeros: the copy is whole groups
    tl.store(OUT + (bh.to(tl.int64) * SP + rows[:, None]) * BLOCK_D + offs_d[None, :], y, mask=rows[:, None] < SP)
    groups = pid_s * (ROWS // GROUP) + tl.arange(0, ROWS // GROUP)
    tl.store(SCALE + bh.to(tl.int64) * NG + groups, scale, mask=groups < NG)


def center_vector(x: torch.Tensor) -> torch.Tensor:
    """float32 [B, H, D]: the mean of every ``max(1, S // CENTER_SAMPLES)``-th token of x [B, H, S, D] (the
    vector the keys are centred on; any vector keeps the estimate exact, this one removes their shared part)."""
    step = max(1, x.shape[2] // CENTER_SAMPLES)
    return x[:, :, ::step].mean(dim=2, dtype=torch.float32)


def _check_group(group: int) -> None:
    if group < 1 or group & (group - 1) or group > 64:
        raise ValueError(f"quantize_fp8: group must be a power of two in [1, 64], got {group}")


def quantize_fp8(x: torch.Tensor, *, group: int, center: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, S, D] (any strides; bf16/fp16/fp32; D a power of two) -> (x8, scale): x8 float8_e4m3fn
    [B, H, S, D] and scale float32 [B, H, ceil(S / group)] with ``x8 * scale ~= x - c`` for each group of
    ``group`` tokens (``c = center_vector(x)`` when ``center``, else 0). Each group's max maps to the e4m3 range,
    so nothing saturates. x8 is the first S tokens of a contiguous [B, H, ceil(S / group) * group, D] buffer whose
    padding tokens are zeros, so ``grouped_view(x8, group)`` sees whole groups (the TMA path of the estimate)."""
    _check_group(group)
    B, H, S, D = x.shape
    ng = -(-S // group)
    buf = torch.empty(B, H, ng * group, D, dtype=torch.float8_e4m3fn, device=x.device)
    out = buf[:, :, :S]
    scale = torch.empty(B, H, ng, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out, scale
    mean = center_vector(x).contiguous() if center else scale
    rows = max(64, group)
    _quant_fp8_kernel[(triton.cdiv(S, rows), B * H)](x, buf, scale, mean, *x.stride(), H, S, ng * group, ng,
                                                      CENTER=center,
                                                      GROUP=group, ROWS=rows, BLOCK_D=D, GRID_ROUND=interpreting(),
                                                      num_warps=4)
    return out, scale


def grouped_view(x8: torch.Tensor, group: int) -> torch.Tensor:
    """[B * H, ceil(S / group), group * D] view of ``quantize_fp8``'s copy: one row per group of tokens (a strided row
    or column of XAttention's GEMM), the padding of the last group included."""
    B, H, S, D = x8.shape
    ng = -(-S // group)
    whole = B * H * ng * group * D
    if (x8.stride() != (H * ng * group * D, ng * group * D, D, 1) or x8.storage_offset() != 0
            or x8.untyped_storage().nbytes() < whole * x8.element_size()):
        raise ValueError("grouped_view: x8 must be quantize_fp8's output (whole groups, contiguous)")
    return x8.as_strided((B * H, ng, group * D), (ng * group * D, group * D, 1))


def quantize_fp8_reference(x: torch.Tensor, *, group: int, center: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8`` in torch ops (any device)."""
    _check_group(group)
    B, H, S, D = x.shape
    xf = x.float() - (center_vector(x)[:, :, None, :] if center else 0.0)
    pad = (-S) % group
    g = torch.nn.functional.pad(xf, (0, 0, 0, pad)).reshape(B, H, -1, group * D)
    scale = (g.abs().amax(-1) / FP8_MAX).clamp_min(1e-30)
    return (xf / _per_token(scale, group, S)).to(torch.float8_e4m3fn), scale


def _per_token(scale: torch.Tensor, group: int, S: int) -> torch.Tensor:
    """[B, H, ceil(S / group)] group scales -> [B, H, S, 1]."""
    return scale.repeat_interleave(group, dim=2)[:, :, :S, None]


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """float32 ``x8 * scale`` per group (what the FP8 estimate sees, for the torch twin of a policy)."""
    return x8.float() * _per_token(scale, group, x8.shape[2])


__all__ = ["quantize_fp8", "grouped_view", "quantize_fp8_reference", "dequantize_fp8", "center_vector", "FP8_MAX"]
