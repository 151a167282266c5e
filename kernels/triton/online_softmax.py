"""The online-softmax updates shared by the attention and estimation kernels (jit helpers, inlined by Triton)."""

import triton
import triton.language as tl


@triton.jit
def softmax_step(acc, l_i, m_i, qk, v, keep, qk_scale, softcap, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one tile of scores ``qk`` [M, N] and values ``v`` [N, D] into the running (acc, l_i, m_i), in base 2.

    ``keep`` (bool [M, N]) is applied only when MASK; soft-capping is softcap * tanh(x / softcap), with tanh through
    the sigmoid (portable across backends and the interpreter). UPCAST: the interpreter's dot mishandles bfloat16,
    so P·V is computed in float32 there."""
    if SOFTCAP:
        x = qk * (qk_scale / softcap)
        s = (softcap * 1.4426950408889634) * (2.0 * tl.sigmoid(2.0 * x) - 1.0)
    else:
        s = qk * (qk_scale * 1.4426950408889634)
    if MASK:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        pv = tl.dot(p.to(tl.bfloat16).to(tl.float32), v.to(tl.float32), input_precision=PREC)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=PREC)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def row_stats_step(m_i, l_i, s, GUARD: tl.constexpr):
    """Fold a tile of base-2 logits ``s`` [M, N] into the running row max ``m_i`` and sum of exp2 ``l_i`` (no values).
    GUARD: rows may have seen only -inf so far (masked tiles); without it the max must be finite after the tile."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if GUARD:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    return m_new, l_i * tl.math.exp2(m_i - m_ref) + tl.sum(tl.math.exp2(s - m_ref[:, None]), 1)
