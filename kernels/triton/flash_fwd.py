"""Flash-attention forward in Triton: dense / causal / sink+window masks, soft-capping, left padding, GQA, LSE.

Same function as ``kernels.reference.attention`` (the ground truth): q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D],
query i sits at key index ``Sk - Sq + i``; key j is visible to query position p iff ``j >= kv_start[b]`` and
(causal) ``j <= p`` and (window) ``p - j < window or j - kv_start[b] < sink``. Rows that see no key give 0 output
and -inf LSE.

One program computes BLOCK_M queries of one (batch, query head) and reads the KV head ``h // group`` in place
(repeated K/V are never materialised). Key blocks that no query of the program sees are never visited: the key
range is split into sink blocks, then the window/causal band; inside the band, blocks every query fully sees run
without any mask (the off-diagonal bulk), only edge blocks (window start, causal diagonal, padding, sequence end)
pay for the mask. The softmax runs in base 2 with log2(e) folded into the scale.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .checks import gpu_path

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tanh(x):
    # tanh through exp2 (libdevice is not reachable from the interpreter); saturates cleanly at +-1
    return 2.0 / (1.0 + tl.exp2(x * (-2.0 * 1.4426950408889634))) - 1.0


PREC = tl.constexpr("tf32x3")  # float32 inputs: three tf32 products per dot, float32-level accuracy on tensor cores


@triton.jit
def _block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                 blk_lo, blk_hi, qpos, start, Sk, sink, window, qk_scale, cap_in, cap_out,
                 MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                 TF32X3: tl.constexpr, LARGE: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EDGE_STAGES: tl.constexpr):
    """Online softmax over key blocks [blk_lo, blk_hi). MASK=False: every key of these blocks is visible to every
    query of the program (no bounds checks, no mask)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_nb = tl.arange(0, BLOCK_N)
    for blk in tl.range(blk_lo, blk_hi, num_stages=EDGE_STAGES if MASK else None):
        offs_n = blk * BLOCK_N + offs_nb
        if LARGE:
            offs_n = offs_n.to(tl.int64)
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        if MASK:
            kt = tl.load(k_ptrs, mask=offs_n[None, :] < Sk, other=0.0)
        else:
            kt = tl.load(k_ptrs)
        if DOT_F32:
            kt = kt.to(tl.float32)
        if TF32X3:
            qk = tl.dot(q, kt, input_precision=PREC)
        else:
            qk = tl.dot(q, kt)
        if MASK:
            if SOFTCAP:
                s = _tanh(qk * cap_in) * cap_out
            else:
                s = qk * qk_scale
            kpos = offs_n[None, :]
            vis = (kpos < Sk) & (kpos >= start)
            if CAUSAL:
                vis = vis & (kpos <= qpos[:, None])
            if HAS_WINDOW:
                vis = vis & (((qpos[:, None] - kpos) < window) | ((kpos - start) < sink))
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
        elif SOFTCAP:
            s = _tanh(qk * cap_in) * cap_out
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
            p = tl.exp2(s - m_use[:, None])
        else:  # scale after the max (scale > 0), then one fused multiply-add per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < Sk, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        pv = p.to(v.dtype)
        if DOT_F32:
            pv = pv.to(tl.float32)
            v = v.to(tl.float32)
        if TF32X3:
            acc = tl.dot(pv, v, acc, input_precision=PREC)
        else:
            acc = tl.dot(pv, v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Sq", "Sk", "sink", "window"])
def _flash_fwd_kernel(
    Q, K, V, O, LSE, KV_START,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, group, Sq, Sk, sink, window, qk_scale, cap_in, cap_out,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KV_START: tl.constexpr,
    RETURN_LSE: tl.constexpr, TF32X3: tl.constexpr, REVERSE: tl.constexpr, LARGE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EDGE_STAGES: tl.constexpr,
):
    n_m = tl.num_programs(0)
    pid_m = tl.program_id(0)
    if REVERSE:  # causal: the heaviest query blocks (the last) start first
        pid_m = n_m - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    if LARGE:
        offs_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    off = Sk - Sq
    qpos = off + offs_m  # key index of each query
    p_lo = off + m0  # first and last (real) query position of this program
    p_hi = off + tl.minimum(m0 + BLOCK_M, Sq) - 1
    if HAS_KV_START:
        start = tl.maximum(tl.load(KV_START + b), 0)
    else:
        start = 0

    # key range [.., hi) seen by some query of this program
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Sk, p_hi + 1), 0)
    else:
        hi = Sk
    main_hi = (hi + BLOCK_N - 1) // BLOCK_N
    if HAS_WINDOW:
        sink_lo = start // BLOCK_N
        sink_end = tl.minimum(start + sink, hi)
        # (with sink == 0 this still visits the one block holding kv_start when it is unaligned: harmless, masked)
        sink_hi = tl.maximum((sink_end + BLOCK_N - 1) // BLOCK_N, sink_lo)
        w_lo = tl.maximum(tl.maximum(p_lo - window + 1, start), 0)  # lowest key the first query sees in-window
        main_lo = tl.maximum(w_lo // BLOCK_N, sink_hi)
        full_key = tl.maximum(tl.maximum(p_hi - window + 1, start), 0)  # from here every query sees in-window
    else:
        sink_lo = 0
        sink_hi = 0
        main_lo = start // BLOCK_N
        full_key = start
    if CAUSAL:
        full_hi = tl.maximum(tl.minimum(p_lo + 1, Sk), 0) // BLOCK_N  # blocks entirely at or before the first query
    else:
        full_hi = Sk // BLOCK_N
    a = main_lo
    d = tl.maximum(main_hi, a)
    bb = tl.minimum(tl.maximum((full_key + BLOCK_N - 1) // BLOCK_N, a), d)
    c = tl.minimum(tl.maximum(full_hi, bb), d)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # sink blocks (masked), window lower edge (masked), bulk (unmasked), causal diagonal / tail (masked)
    if HAS_WINDOW:
        acc, l_i, m_i = _block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                     sink_lo, sink_hi, qpos, start, Sk, sink, window, qk_scale, cap_in, cap_out,
                                     True, CAUSAL, HAS_WINDOW, SOFTCAP, TF32X3, LARGE, DOT_F32, BLOCK_N,
                                 BLOCK_D, BLOCK_DV, EDGE_STAGES)
    acc, l_i, m_i = _block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                 a, bb, qpos, start, Sk, sink, window, qk_scale, cap_in, cap_out,
                                 True, CAUSAL, HAS_WINDOW, SOFTCAP, TF32X3, LARGE, DOT_F32, BLOCK_N,
                                 BLOCK_D, BLOCK_DV, EDGE_STAGES)
    acc, l_i, m_i = _block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                 bb, c, qpos, start, Sk, sink, window, qk_scale, cap_in, cap_out,
                                 False, CAUSAL, HAS_WINDOW, SOFTCAP, TF32X3, LARGE, DOT_F32, BLOCK_N,
                                 BLOCK_D, BLOCK_DV, EDGE_STAGES)
    acc, l_i, m_i = _block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                 c, d, qpos, start, Sk, sink, window, qk_scale, cap_in, cap_out,
                                 True, CAUSAL, HAS_WINDOW, SOFTCAP, TF32X3, LARGE, DOT_F32, BLOCK_N,
                                 BLOCK_D, BLOCK_DV, EDGE_STAGES)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    out = tl.where(seen[:, None], out, 0.0)
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    if RETURN_LSE:
        lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=row_ok)


# decided once, when Triton wrapped the kernel: ``type()`` of a kernel inside torch.compile's trace is an error
# ("TritonKernelVariable() has no type"), which broke TidalDecode's compiled static decode
_INTERPRETED = type(_flash_fwd_kernel).__name__ == "InterpretedFunction"


def _interpreting() -> bool:
    return _INTERPRETED


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, edge_stages]) per head_dim for Sq > 64, 16 < Sq <= 64 and
# Sq <= 16 (decode),
# from a sweep on an H100 (kernels/triton/NOTES.md); register and shared-memory use checked with an ahead-of-time
# sm_90 build (no spills except where noted).
_CONFIGS = {
    16: ((128, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 3)),
    32: ((128, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 3)),
    64: ((128, 64, 8, 3), (64, 64, 4, 3), (16, 64, 4, 3)),
    128: ((128, 128, 8, 3), (64, 64, 4, 3), (16, 64, 4, 3)),  # 128x128: 224 KB shared memory, at the limit
    256: ((128, 64, 8, 2), (64, 32, 4, 2), (16, 64, 4, 2)),
}
# sink+window masks add a masked loop: 128x128 tiles spill there, 128x64 do not
_CONFIGS_WINDOW = {128: (128, 64, 8, 3)}
# float32 (tf32x3 products): 4-byte tiles, smaller blocks to stay within shared memory and registers
_CONFIGS_F32 = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 4, 2), 256: (32, 32, 4, 2)}
_INTERPRET_CONFIG = (32, 32, 4, 1)


def _config(head_dim: int, q_len: int, dtype: torch.dtype, windowed: bool = False):
    if _interpreting():
        return _INTERPRET_CONFIG
    if dtype == torch.float32:
        cfg = _CONFIGS_F32[head_dim]
        return (16,) + cfg[1:] if q_len <= 16 else cfg
    long_cfg, mid_cfg, short_cfg = _CONFIGS[head_dim]
    if windowed:
        long_cfg = _CONFIGS_WINDOW.get(head_dim, long_cfg)
    return long_cfg if q_len > 64 else mid_cfg if q_len > 16 else short_cfg


def _check(q, k, v, scale, sink, window, softcap, kv_start):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be a 4D tensor [batch, heads, seq, head_dim], "
                             f"got {getattr(t, 'shape', type(t))}")
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in batch/heads/seq")
    if Bk != B:
        raise ValueError(f"flash_attention: q has batch {B} but k/v have batch {Bk}")
    if Dk != D:
        raise ValueError(f"flash_attention: q head_dim {D} != k head_dim {Dk}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"flash_attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    for name, d in (("head_dim", D), ("value head_dim", v.shape[-1])):
        if d not in HEAD_DIMS:
            raise ValueError(f"flash_attention: {name} {d} is not supported by the Triton kernel: it takes a power "
                             f"of two from 16 to 256 ({', '.join(map(str, HEAD_DIMS))}); use backend='reference'")
    if q.dtype not in DTYPES:
        raise TypeError(f"flash_attention: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"flash_attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if not gpu_path(q) and not _interpreting():
        raise RuntimeError(
            f"flash_attention: the Triton kernel needs CUDA tensors, got {q.device.type} tensors. Move the model to "
            "a CUDA device, or set TRITON_INTERPRET=1 before importing triton to run it (slowly) on the CPU.")
    if sink < 0:
        raise ValueError(f"flash_attention: sink must be >= 0, got {sink}")
    if window is not None and window < 1:
        raise ValueError(f"flash_attention: window must be >= 1 (or None for no window), got {window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"flash_attention: softcap must be > 0 (or None), got {softcap}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"flash_attention: scale must be a finite positive number, got {scale}")
    if kv_start is not None:
        if not isinstance(kv_start, torch.Tensor) or kv_start.shape != (B,) or kv_start.is_floating_point():
            raise ValueError(f"flash_attention: kv_start must be an integer tensor of shape [{B}] (first real key "
                             f"per batch row), got {getattr(kv_start, 'shape', kv_start)}")


def _needs_int64(*ts) -> bool:
    # offsets inside one (batch, head) slice are int32 unless some slice spans 2**31 elements
    return any(t.shape[2] * t.stride(2) + t.shape[3] * t.stride(3) >= 2**31 for t in ts)


def _check_out(t, name, shape, dtype, device):
    if t.shape != shape or t.dtype != dtype or t.device != device:
        raise ValueError(f"flash_attention: {name} must be {dtype} {tuple(shape)} on {device}, got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device}")


def flash_attention(q, k, v, *, scale=None, causal=True, sink=0, window=None, softcap=None, kv_start=None,
                    return_lse=False, out=None, lse_out=None, _config_override=None):
    """Exact attention; same arguments and result as ``kernels.reference.attention``.

    Returns ``out`` [B, Hq, Sq, Dv] in q's dtype, or ``(out, lse)`` with ``lse`` float32 [B, Hq, Sq] (natural
    log-sum-exp of the scaled, soft-capped scores; -inf for rows that see no key) when ``return_lse``.
    ``out`` (any strides) and ``lse_out`` (contiguous) may be given to write into existing buffers."""
    sink = int(sink or 0)
    window = None if window is None else int(window)
    _check(q, k, v, scale, sink, window, softcap, kv_start)
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty(B, Hq, Sq, Dv, dtype=q.dtype, device=q.device)
    else:
        _check_out(out, "out", (B, Hq, Sq, Dv), q.dtype, q.device)
    if not return_lse:
        lse = out  # placeholder pointer, never written
    elif lse_out is None:
        lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    else:
        _check_out(lse_out, "lse_out", (B, Hq, Sq), torch.float32, q.device)
        if not lse_out.is_contiguous():
            raise ValueError("flash_attention: lse_out must be contiguous")
        lse = lse_out
    if B * Hq * Sq == 0:
        return (out, lse) if return_lse else out
    if Sk == 0:
        out.zero_()
        if return_lse:
            lse.fill_(-math.inf)
        return (out, lse) if return_lse else out
    if window is not None and window >= Sk:
        window = None  # every query position is < Sk: the window covers every key, no band bookkeeping
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    cfg = tuple(_config_override or _config(D, Sq, q.dtype, windowed=window is not None))
    BLOCK_M, BLOCK_N, num_warps, num_stages = cfg[:4]
    edge_stages = cfg[4] if len(cfg) > 4 else 1  # masked edge loops run 1-3 blocks: no software pipelining
    if softcap is not None:
        cap_in, cap_out, qk_scale = scale / softcap, softcap * LOG2E, 0.0
    else:
        cap_in, cap_out, qk_scale = 0.0, 0.0, scale * LOG2E
    grid = (triton.cdiv(Sq, BLOCK_M), B * Hq)
    launch = dict(num_warps=num_warps, num_stages=num_stages) if not _interpreting() else {}
    _flash_fwd_kernel[grid](
        q, k, v, out, lse, kv_start if kv_start is not None else out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hq, Hq // Hkv, Sq, Sk, sink, window if window is not None else 0, qk_scale, cap_in, cap_out,
        CAUSAL=bool(causal), HAS_WINDOW=window is not None, SOFTCAP=softcap is not None,
        HAS_KV_START=kv_start is not None, RETURN_LSE=bool(return_lse),
        TF32X3=q.dtype == torch.float32 and not _interpreting(),
        REVERSE=bool(causal), LARGE=_needs_int64(q, k, v, out),
        # triton's interpreter multiplies bfloat16 tiles as raw uint16 bits: upcast them there (dot of exact values)
        DOT_F32=_interpreting() and q.dtype == torch.bfloat16,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=D, BLOCK_DV=Dv, EDGE_STAGES=edge_stages, **launch,
    )
    return (out, lse) if return_lse else out


__all__ = ["flash_attention", "HEAD_DIMS", "DTYPES"]
