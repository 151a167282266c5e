"""The attention function registered with transformers as ``"accel"``: policy.plan -> backend.run.

Each patched attention module carries a ``LayerState`` (``module._accel``) with its policies, backend choice
and counters."""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import StaticLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .autopick import Fastest
from .kernels.static_decode import dense_static_decode
from .kernels import BackendUnavailable, get_backend
from .layouts import BlockLayout, HeadSplitLayout, PageSelection, SplitPageSelection, VerticalSlashLayout
from .policies import AttentionContext
from .policies.duo import DuoPolicy, split_chunk
from .spec import PolicySpec

IMPL_NAME = "accel"


@dataclass
class LayerState:
    layer_idx: int
    spec: PolicySpec
    backend: str  # requested: auto | reference | triton | flash
    sliding_window: int | None
    calls: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    backends_used: dict[str, int] = field(default_factory=dict)
    collect: bool = False  # opt-in stats that need a device sync (block-sparse density)
    # per phase: [sum of known densities, calls with one, calls without one (then the phase's mean is unknown)]
    density: dict[str, list] = field(default_factory=lambda: {"prefill": [0.0, 0, 0], "decode": [0.0, 0, 0]})
    fallbacks: set[str] = field(default_factory=set)  # auto: why a faster backend was skipped
    past_len: int = 0  # tokens in the cache before this call (set by the pre-forward hook; a compacted cache holds fewer)
    recall: list[float] = field(default_factory=lambda: [0.0, 0])  # opt-in: prefill attention recall (accel.recall)
    # this call's cache and cache layer (set by the pre-forward hook, weakly held: a finished generate frees them)
    _cache_ref: Any = None
    _layer_ref: Any = None
    # a StaticCache layer the decode policy selects from (Quest's PagedStaticLayer), set at the uncompiled prefill;
    # held strongly because compiled decode steps read it without running the pre-forward hook
    static_layer: Any = None
    static_padded: bool = False  # the static-cache prefill saw left padding (decode then derives per-row starts)
    static_cache: bool = False  # the last forward ran over a transformers StaticCache (compiled steps go uncounted)
    active: bool = True  # False once unpatched / re-patched: cache layers it installed then refuse updates

    def set_cache(self, cache, layer) -> None:
        self._cache_ref = None if cache is None else weakref.ref(cache)
        self._layer_ref = None if layer is None else weakref.ref(layer)

    def cache_and_layer(self):
        return (None if self._cache_ref is None else self._cache_ref(),
                None if self._layer_ref is None else self._layer_ref())

    def as_dict(self) -> dict:
        return {
            "layer": self.layer_idx,
            "prefill_policy": self.spec.prefill.name,
            "decode_policy": self.spec.decode.name,
            "sliding_window": self.sliding_window,
            "calls": dict(self.calls),
            "backends": dict(self.backends_used),
            "prefill_density": _mean(self.density["prefill"]),
            "decode_density": _mean(self.density["decode"]),
            "density": _mean([sum(v[i] for v in self.density.values()) for i in range(3)]),
            "auto_notes": sorted(self.fallbacks),
            "prefill_recall": _mean(self.recall),
            "static_cache": self.static_cache,
        }


def _mean(acc: list) -> float | None:
    """Mean of an accumulator [sum, count(, calls left out)]; None when empty or when some call's value is unknown
    (a mean over the others would pass for the whole)."""
    if not acc[1] or (len(acc) > 2 and acc[2]):
        return None
    total = acc[0]
    return (float(total) if isinstance(total, torch.Tensor) else total) / acc[1]  # a device sum: one sync, here


@functools.lru_cache(maxsize=64)
def causal_block_count(q_len: int, kv_len: int, block_q: int, block_k: int) -> int:
    """Key blocks with a key visible to some query of their query block, summed over the query blocks (what
    ``kernels.reference_sparse.causal_block_mask`` marks), on the host; cached, as every layer of a forward call
    asks the same (1024 query blocks at 128K)."""
    off = kv_len - q_len
    return sum((off + min((m + 1) * block_q, q_len) - 1) // block_k + 1 for m in range(-(-q_len // block_q)))


def _density(layout, q_len: int, total: int, collect: bool) -> float | torch.Tensor | None:
    """Share of causal (query, key) pairs the layout computes; host arithmetic where possible. A block layout's
    share is a device scalar (its listed blocks over the causal ones, no sync: read when ``stats`` is called), or
    with ``collect`` the exact share of causal blocks kept (a block mask and one sync per call)."""
    if hasattr(layout, "density"):
        return layout.density(q_len, total)
    if isinstance(layout, BlockLayout):
        if collect:
            from .kernels.reference_sparse import block_layout_density

            return block_layout_density(layout, q_len, total)
        B, H, _ = layout.counts.shape
        causal = causal_block_count(q_len, total, layout.block_q, layout.block_k)
        wide = torch.float32 if layout.counts.device.type == "mps" else torch.float64  # MPS has no float64
        return layout.counts.sum(dtype=wide) / float(causal * B * H)
    if collect and isinstance(layout, VerticalSlashLayout):
        from .recall import vertical_slash_density

        return vertical_slash_density(layout, q_len, total)
    return None


def _recall(state: LayerState, layout, q, k, scale, softcap) -> None:
    """Opt-in (collect_stats): share of dense softmax mass the layout keeps on 64 sampled query rows."""
    from .recall import layout_recall

    r = layout_recall(layout, q, k, scale=scale, softcap=softcap, rows=64, seed=state.layer_idx)
    if r is not None:
        state.recall[0] += r
        state.recall[1] += 1


_AUTO_ORDER = ("flash", "triton", "reference")
# One-token queries: torch SDPA (the reference backend's path for dense/streaming layouts) reads the KV cache at
# ~3.9 TB/s, while FA4 and our prefill kernel leave most SMs idle (results/bench_kernels_dense.md, decode rows).
_AUTO_ORDER_DECODE = ("reference", "flash", "triton")


def _resolve(state: LayerState, layout, q: torch.Tensor, kv_start):
    """Pick the backend. Explicit choices raise when they cannot run; ``auto`` takes the first that can (prefill:
    flash, triton, reference; one-token decode: reference's SDPA first) and records why the others were skipped.
    Block-sparse layouts on the GPU are the exception: when both FA4 and our Triton kernel can run them, the faster
    one, measured on the first call of each shape bucket, runs (accel.autopick)."""
    if state.backend != "auto":
        names = (state.backend,)
    else:
        # page selections go to our decode kernel first (SDPA cannot gather pages)
        paged = isinstance(layout, (PageSelection, SplitPageSelection))
        names = _AUTO_ORDER_DECODE if q.shape[2] == 1 and not paged else _AUTO_ORDER
    measured = state.backend == "auto" and isinstance(layout, BlockLayout) and q.device.type == "cuda"
    capable = []  # auto on block-sparse layouts: every capable GPU backend, raced by accel.autopick
    for name in names:
        backend = get_backend(name)
        ok, reason = backend.available()
        if ok and name in ("flash", "triton") and q.device.type != "cuda" and state.backend == "auto":
            ok, reason = False, "tensors are on the CPU"
        if ok:
            reason = backend.supports(layout, q)
            if reason is None and kv_start is not None and name == "flash":
                reason = "left-padded batches"
            ok = reason is None
        if ok and measured and name in ("flash", "triton"):
            capable.append(backend)
            continue
        if capable:
            break
        if ok:
            return backend
        if state.backend != "auto":
            raise BackendUnavailable(
                f"backend {name!r} cannot run layer {state.layer_idx}: {reason}. Use backend='auto' to pick one "
                "that can, or backend='reference'."
            )
        state.fallbacks.add(f"{name}: {reason}")
    if len(capable) == 1:
        return capable[0]
    if capable:
        return Fastest(capable, state.fallbacks)
    raise BackendUnavailable(f"no backend can run {type(layout).__name__} on layer {state.layer_idx}")


def _run_head_split(state: LayerState, layout, q, k, v, scale, softcap, kv_start):
    """Each part of a HeadSplitLayout on its own backend; outputs scattered back to their query heads. Returns the
    output and the backend of each part."""
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    backends = []
    for part in layout.parts:
        qq = q.index_select(1, part.q_heads)
        if part.k is not None:
            kk, vv = part.k, part.v
        elif part.kv_heads is not None:
            kk, vv = k.index_select(1, part.kv_heads), v.index_select(1, part.kv_heads)
        else:
            kk, vv = k, v
        backend = _resolve(state, part.layout, qq, kv_start)
        out[:, part.q_heads] = backend.run(part.layout, qq, kk, vv, scale=scale, softcap=softcap, kv_start=kv_start)
        backends.append(backend)
    return out, backends


def _left_padding(mask: torch.Tensor, kv_len: int) -> torch.Tensor | None:
    """Per-row index of the first real key for a left-padded 2D mask; None when nothing is padded.

    Checking the mask costs two host syncs; every layer of a forward gets the same mask object from ``accel_mask``,
    so the answer is kept on that tensor and the other layers reuse it (one check per forward, not per layer)."""
    memo = getattr(mask, "_accel_left_padding", None)
    if memo is not None and memo[0] == kv_len:
        return memo[1]
    start = _check_left_padding(mask, kv_len)
    try:
        mask._accel_left_padding = (kv_len, start)
    except (AttributeError, RuntimeError):  # a tensor subclass that refuses attributes: just recompute next time
        pass
    return start


def _check_left_padding(mask: torch.Tensor, kv_len: int) -> torch.Tensor | None:
    if mask.dim() != 2:
        raise ValueError(
            f"accel received a {mask.dim()}D attention mask; only 2D padding masks (or none) are supported. "
            "Pass attention_mask as [batch, seq] with 1 for tokens and 0 for left padding."
        )
    mask = mask[:, -kv_len:].bool()
    if mask.shape[1] != kv_len:
        raise ValueError(f"attention mask covers {mask.shape[1]} keys but the cache holds {kv_len}")
    start = (~mask).sum(-1)
    expected = torch.arange(kv_len, device=mask.device)[None, :] >= start[:, None]
    if not torch.equal(expected, mask):
        raise ValueError(
            "accel supports left padding only (and the default dynamic cache): got a mask with padding on the "
            "right or holes. Use tokenizer.padding_side='left' and do not pass cache_implementation='static'."
        )
    return start.to(torch.int32) if bool(start.any()) else None


def accel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                    softcap=None, **kwargs):
    if query.is_cuda and not torch.compiler.is_compiling() and query.device.index != torch.cuda.current_device():
        # a model spread over GPUs (device_map="auto"): Triton launches on the current device, so make it this
        # layer's (as flash-attn does), or its kernels would read another GPU's pointers
        with torch.cuda.device(query.device):
            return _attention(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap)
    return _attention(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap)


def _attention(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap):
    state: LayerState | None = getattr(module, "_accel", None)
    if state is None:
        raise RuntimeError(
            "attn_implementation='accel' is set on a model that accel.patch did not prepare; call accel.patch(model) "
            "or model.set_attn_implementation('sdpa')"
        )
    if module.training and dropout > 0:
        raise RuntimeError("accel is an inference accelerator: call model.eval() (attention dropout is not supported)")
    if attention_mask is not None and attention_mask.dim() == 4:
        return _static_decode(state, query, key, value, attention_mask, scaling, softcap)
    q_len = query.shape[2]
    cache, cache_layer = state.cache_and_layer()
    if isinstance(cache_layer, StaticLayer) and key.shape[2] > state.past_len + q_len:
        # a static cache hands over its whole preallocated buffer: attend to the filled part only
        key, value = key[:, :, : state.past_len + q_len], value[:, :, : state.past_len + q_len]
    if (q_len > 1 and attention_mask is not None and split_chunk(cache_layer)
            and _left_padding(attention_mask, state.past_len + q_len) is not None):
        raise ValueError("a chunk (or a prompt on top of a filled cache) over DuoAttention's or StreamingLLM's split "
                         "cache does not take left-padded batches (the streaming heads' sink tokens would be "
                         "padding); run prompts one at a time or with equal lengths")
    kv_len = key.shape[2]
    phase = "prefill" if q_len > 1 else "decode"
    policy = state.spec.prefill if phase == "prefill" else state.spec.decode
    kv_start = None if attention_mask is None else _left_padding(attention_mask, kv_len)
    if isinstance(cache_layer, StaticLayer):
        state.static_padded = kv_start is not None
    if kv_start is not None and policy.cache_limit(state.sliding_window) is not None:
        raise ValueError(
            f"policy {policy.name!r} does not support left-padded batches (its sink tokens would be padding); "
            "run prompts one at a time or with equal lengths"
        )
    window = sliding_window if sliding_window is not None else state.sliding_window
    ctx = AttentionContext(layer_idx=state.layer_idx, phase=phase, sliding_window=window, cache_layer=cache_layer,
                           cache=cache, kv_start=kv_start, scale=scaling, softcap=softcap)
    decode = state.spec.decode
    if (phase == "prefill" and isinstance(decode, DuoPolicy) and not isinstance(policy, DuoPolicy)
            and split_chunk(cache_layer)):
        # a composition's chunk on top of DuoAttention's split cache (dynamic or static): the cache returned the
        # retrieval heads only; the decode policy splits the heads and the prefill policy plans the retrieval ones
        layout = decode.chunk_plan(query, key, ctx, policy)
    else:
        layout = policy.plan(query, key, ctx)
    if isinstance(layout, HeadSplitLayout):  # heads under different layouts / K/V stores (DuoAttention)
        out, backends = _run_head_split(state, layout, query, key, value, scaling, softcap, kv_start)
    else:
        backend = _resolve(state, layout, query, kv_start)
        out = backend.run(layout, query, key, value, scale=scaling, softcap=softcap, kv_start=kv_start)
        backends = [backend]

    state.calls[phase] += 1
    for backend in backends:  # every part of a head split counts: its backends may differ
        state.backends_used[backend.name] = state.backends_used.get(backend.name, 0) + 1
    total = max(kv_len, state.past_len + q_len)
    # density against the full causal context (a compacted cache holds fewer keys than were seen)
    d = _density(layout, q_len, total, state.collect)
    acc = state.density[phase]
    if d is None:
        acc[2] += 1
    else:
        acc[0] += d
        acc[1] += 1
    if state.collect and phase == "prefill" and kv_start is None:
        _recall(state, layout, query, key, scaling, softcap)
    return out.transpose(1, 2).contiguous(), None


def _decode_kernels_take(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton decode kernels (kernels/triton/decode_*.py) run these heads: power-of-two head dims from
    16 to 256, float16/bfloat16/float32."""
    dims_ok = all(16 <= d <= 256 and not d & (d - 1) for d in (q.shape[-1], v.shape[-1]))
    return dims_ok and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _static_decode(state: LayerState, q, k, v, mask, scale, softcap):
    """One-token decode over a static cache (transformers' StaticCache, usually under torch.compile), with no host
    sync and no per-step Python state, so the compiled step captures as one CUDA graph. Layers with a handle from
    their decode policy's ``static_prepare`` (Quest's PagedStaticLayer, TidalDecode's shared positions, the
    sink + recent rings of DuoAttention and StreamingLLM) run its device-side ``static_decode``; the others attend
    densely over the preallocated buffer with transformers' own boolean mask (filled slots, padding, sliding
    window). Decode policies without a static form are refused at the prefill (accel.patching)."""
    policy = state.spec.decode
    handle = state.static_layer
    if policy.name != "dense" and getattr(policy, "static_decode", None) is None:
        raise TypeError(f"decode policy {policy.name!r} does not run over a static cache; see accel.patch")
    out, name = None, "static-sdpa"
    if handle is not None:
        # left padding (known from the prefill): each row's first real slot = its masked slots less the unfilled
        # tail (a sum over the mask row, no host sync); skipped for unpadded batches, where it would be one more
        # pass over the context per layer
        kv_start = None
        if state.static_padded:
            row = mask[:, 0, 0]
            kv_start = ((~row).sum(-1) - (row.shape[-1] - handle.cumulative_length)).to(torch.int32)
        # the Triton decode kernels: asked for (on the CPU that means the interpreter: patch refuses triton there
        # otherwise), or auto on the GPU when they take the head dims and dtype (else the torch path runs)
        use_triton = state.backend == "triton" or (state.backend == "auto" and q.device.type == "cuda"
                                                   and _decode_kernels_take(q, v))
        # None back: the policy only took what it needed (TidalDecode's selection layer) and the layer is dense
        out = policy.static_decode(q, k, v, handle, mask=mask, kv_start=kv_start, scale=scale, softcap=softcap,
                                   use_triton=use_triton)
        if out is not None:
            name = "static-paged"
    if out is None:
        out = dense_static_decode(q, k, v, mask, scale, softcap)
    if not torch.compiler.is_compiling():  # a Python counter in a compiled step would recompile it every step
        # (a CUDA-graph capture counts its one eager pass; replays are not counted)
        state.calls["decode"] += 1
        state.backends_used[name] = state.backends_used.get(name, 0) + 1
    return out.transpose(1, 2).contiguous(), None


def accel_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
               **kwargs):
    """No O(n²) mask: None for unpadded batches (causality and windows live in the layout), else the 2D padding
    mask, from which the attention function derives per-row start offsets. One-token steps over a compileable
    (static) cache are the exception: transformers marks them with ``allow_is_causal_skip=False``, and they get its
    own [batch, 1, 1, kv] boolean mask, which covers the buffer's unfilled slots without a host sync."""
    if q_length == 1 and not kwargs.get("allow_is_causal_skip", True):
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         **kwargs)  # device, allow_is_causal_skip=False, ...
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register() -> None:
    AttentionInterface.register(IMPL_NAME, accel_attention)
    AttentionMaskInterface.register(IMPL_NAME, accel_mask)
