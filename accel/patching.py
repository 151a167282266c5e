"""patch / unpatch: validate everything first, then swap the attention implementation and attach per-layer
state; on any failure the model is left exactly as it was."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticLayer

from . import attention
from .attention import IMPL_NAME, LayerState
from .cache import PatchOwned, SinkWindowLayer
from .kernels import BACKEND_NAMES, BackendUnavailable, get_backend
from .patches import find_adapter
from .spec import PolicySpec, parse_policy

_ATTR = "_accel_patch"


def cache_argument(kwargs: Mapping[str, Any]):
    """The KV cache handed to an attention or model call: ``cache=`` since transformers 5.24 (renamed from
    ``past_key_values``, kept as a deprecated alias), ``past_key_values=`` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


class _PatchRecord:
    def __init__(self, original_impl: str | None, spec: PolicySpec, backend: str, collect: bool = False):
        self.original_impl = original_impl
        self.spec = spec
        self.backend = backend
        self.collect = collect
        self.handles: list = []
        self.modules: list[nn.Module] = []


def _check_backend(backend: str, model: nn.Module) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if backend == "auto":
        return
    ok, reason = get_backend(backend).available()
    if not ok:
        raise BackendUnavailable(f"backend {backend!r} is not available: {reason}")
    param = next(model.parameters(), None)
    if backend == "triton" and param is not None and param.device.type != "cuda":
        from .kernels.triton.checks import interpreter_problem

        problem = interpreter_problem()
        if problem is not None:
            raise BackendUnavailable(
                f"backend 'triton' needs the model on a CUDA device (it is on {param.device}); move it with "
                f"model.to('cuda'); to run them on the CPU instead, {problem}")
    if backend == "flash" and param is not None and param.device.type != "cuda":
        raise BackendUnavailable(f"backend 'flash' needs a CUDA device; the model is on {param.device}")


def _tracing() -> bool:
    """Inside torch.compile or a CUDA-graph capture: the hooks' host-side checks (which read lengths, a sync) are
    skipped there; they ran at the eager step before (prefill or warm-up)."""
    # (a capture needs an initialised CUDA context: checking that is cheaper than is_available on every call)
    return torch.compiler.is_compiling() or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def _position_guard(model: nn.Module):
    limit = getattr(model.config, "max_position_embeddings", None)

    def hook(mod, args, kwargs):
        # compiled decode steps (static cache + torch.compile) skip the check: it would read the cache length on the
        # host every step; the prefill before them is checked, and generate stops at max_length
        if limit is None or _tracing():
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return None
        cache = cache_argument(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        total = int(past) + ids.shape[1]  # a static cache's length is a tensor
        if total > limit:
            raise ValueError(
                f"context of {total} tokens exceeds the model's position limit ({limit}, "
                "config.max_position_embeddings); shorten the prompt, or raise the limit if the model's RoPE "
                "scaling supports longer contexts"
            )
        return None

    return hook


def _layer_key(limit: tuple[int, int] | None, kind: tuple[type, dict] | None):
    """What a dynamic cache layer installed for this decode policy is made of (class and arguments; None: the
    default DynamicLayer), comparable across patches, and its description for error messages."""
    if limit is not None:
        return ("SinkWindowLayer", ("sink", limit[0]), ("window", limit[1])), f"sink={limit[0]}, window={limit[1]}"
    if kind is None:
        return None, "the default DynamicLayer"
    args = tuple(sorted((k, tuple(v.flatten().tolist()) if isinstance(v, torch.Tensor) else v)
                        for k, v in kind[1].items()))
    shown = ", ".join(f"{k}={v}" for k, v in kind[1].items() if not isinstance(v, torch.Tensor))
    return (kind[0].__name__, *args), shown


def _adopt(state: LayerState, layer, key, shown: str):
    """Claim an accel cache layer for this patch, or refuse one made for another decode policy or options: its
    stored keys (a dropped middle, split heads, pages of another size) are not what this policy reads. A layer that
    keeps every token (Quest's pages) may go on under a policy that needs no layer of its own."""
    if layer.made_key != key and not (key is None and layer.keeps_all):
        want = f"{state.spec.decode.name!r}" + (f" ({shown})" if key is not None else "")
        raise RuntimeError(
            f"layer {state.layer_idx} of this KV cache was filled under accel's {layer.made_for}; the model is now "
            f"patched with decode policy {want}, which cannot continue it. Start a new cache after re-patching "
            "(drop past_key_values, or pass a fresh DynamicCache)")
    layer.owner = state
    return layer


def _install(state: LayerState, layers, layer, key, shown: str):
    layer.owner, layer.made_key = state, key
    layer.made_for = f"decode policy {state.spec.decode.name!r} ({type(layer).__name__}, {shown})"
    layers[state.layer_idx] = layer
    return layer


def _cache_hook(state: LayerState, limit: tuple[int, int] | None, kind: tuple[type, dict] | None = None):
    """Before each attention call: note the cache length, and swap in a bounded layer for streaming layers.
    ``kind`` (from the decode policy's ``cache_kind``): the cache layer class the policy needs (e.g. PagedKVLayer
    for Quest), installed in place of the default DynamicLayer; the layer is handed to the policy's plan. An accel
    layer from an earlier patch is continued only when it is what this policy would install (``_adopt``)."""
    key, shown = _layer_key(limit, kind)
    decode = state.spec.decode  # a static cache's layers are keyed by the decode policy and all its options
    static_key = (decode.name, *((n, getattr(decode, n)) for n in decode.option_names()))

    def hook(mod, args, kwargs):
        if _tracing():
            # compiled / graph-captured decode over a static cache: nothing to swap (done at the eager prefill or
            # warm-up step), and the attention function takes what it needs from transformers' mask
            return None
        cache = cache_argument(kwargs)
        state.set_cache(cache, None)
        if cache is None:
            state.past_len, state.static_cache = 0, False
            return None
        layers = getattr(cache, "layers", None)
        if layers is None or state.layer_idx >= len(layers):
            state.past_len = cache.get_seq_length(state.layer_idx) if hasattr(cache, "get_seq_length") else 0
            return None
        layer = layers[state.layer_idx]
        state.static_cache = isinstance(layer, StaticLayer)
        if state.static_cache:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            layer = _static_layer(state, cache, layers, kind, mod, hidden, static_key)
        elif isinstance(layer, PatchOwned) and layer.owner is not None:
            layer = _adopt(state, layer, key, shown)
        elif limit is not None and type(layer) is DynamicLayer:
            layer = _install(state, layers, SinkWindowLayer.from_layer(layer, *limit), key, shown)
        elif limit is not None and not isinstance(layer, SinkWindowLayer) and not getattr(layer, "is_sliding", False):
            raise TypeError(
                f"policy {state.spec.decode.name!r} bounds the KV cache and needs the default dynamic cache, got "
                f"{type(cache).__name__} with {type(layer).__name__} layers; drop cache_implementation / "
                "past_key_values=StaticCache(...) from generate"
            )
        elif kind is not None:  # decode policies with their own cache layer (accel.cache)
            if type(layer) is DynamicLayer:
                layer = _install(state, layers, kind[0].from_layer(layer, **kind[1]), key, shown)
            elif not isinstance(layer, kind[0]) and not getattr(layer, "is_sliding", False):
                raise TypeError(
                    f"policy {state.spec.decode.name!r} needs its own cache layer ({kind[0].__name__}) and the default "
                    f"dynamic cache, got {type(cache).__name__} with {type(layer).__name__} layers; drop "
                    "cache_implementation / past_key_values=StaticCache(...) from generate")
        state.set_cache(cache, layer)
        state.past_len = int(layer.get_seq_length())  # a static layer's length is a tensor
        return None

    return hook


def _static_layer(state: LayerState, cache, layers, kind, mod, hidden, key: tuple):
    """A transformers StaticCache (generate's static / torch.compile path): dense decode runs over it as is; a decode
    policy with a static form (``static_prepare``: Quest, TidalDecode, Duo, LServe, streaming) sets up what its device-side decode needs
    (a cache layer with page bounds, a shared selection buffer); the others are refused. ``key``: what the layers
    set up here are made for (the decode policy and its options), compared when a cache comes back."""
    decode = state.spec.decode
    layer = layers[state.layer_idx]
    state.static_layer = None
    # a static cache passed again after a re-patch: its layers were set up for the policy and options they were
    # filled under (a ring per streaming head, page bounds of one size)
    if isinstance(layer, PatchOwned) and layer.made_key not in (None, key) and not (
            decode.name == "dense" and layer.keeps_all):
        raise RuntimeError(
            f"layer {state.layer_idx} of this static cache was filled under accel's {layer.made_for}; the model is "
            f"now patched with decode policy {decode.name!r} (or other options), which cannot continue it. "
            "Start a new cache after re-patching (a fresh StaticCache, or let generate make one)")
    if decode.name == "dense":
        return layer
    if getattr(decode, "static_prepare", None) is None:
        needs = f"its own cache layer ({kind[0].__name__})" if kind is not None else "its cache handling"
        raise TypeError(
            f"decode policy {decode.name!r} needs {needs} and the default dynamic cache, got {type(cache).__name__}; "
            "drop cache_implementation='static' / past_key_values=StaticCache(...) from generate, or decode with "
            "another decode policy (policy={'prefill': ..., 'decode': 'dense'}): every other one works with the "
            "static cache and torch.compile")
    # None: this layer decodes dense (a sliding-window layer, one of the first dense layers)
    batch = hidden.shape[0]
    param = next(mod.parameters())
    state.static_layer = decode.static_prepare(cache, layers, state.layer_idx, state.sliding_window, batch=batch,
                                               kv_heads=mod.config.num_key_value_heads, device=param.device,
                                               tokens=hidden.shape[1])
    layer = layers[state.layer_idx]
    if isinstance(layer, PatchOwned) and layer.made_key != key:
        layer.made_key, layer.made_for = key, f"decode policy {decode.name!r} ({type(layer).__name__})"
    if hasattr(layer, "triton_append"):  # decode tokens into the cache in one Triton launch, as the attention runs
        layer.triton_append = state.backend == "triton" or (state.backend == "auto" and param.device.type == "cuda")
    return layer


def is_patched(model: nn.Module) -> bool:
    """Whether ``accel.patch`` has replaced this model's attention (and ``unpatch`` has not undone it)."""
    return getattr(model, _ATTR, None) is not None


def patch(
    model: nn.Module,
    policy: str | Mapping[str, Any] = "dense",
    backend: str = "auto",
    *,
    collect_stats: bool = False,
    **options: Any,
) -> nn.Module:
    """Replace the attention of a loaded transformers causal LM with ``policy`` (in place; returns the model).

    ``policy``: a name (``"streaming"``), a composition (``"xattention+quest"``, ``{"prefill": .., "decode": ..}``),
    a preset from configs/ or a YAML path. ``options`` override the policy's defaults (``window=2048``).
    ``backend``: ``auto`` (fastest that can run, recorded in ``accel.stats``), ``triton``, ``flash`` or
    ``reference``. ``collect_stats`` adds statistics that cost a device sync (block-sparse density).
    Patching a patched model switches policy; nothing changes if validation fails."""
    spec = parse_policy(policy, **options)
    adapter = find_adapter(model)
    adapter.check(model)
    for pol in (spec.prefill, spec.decode):
        if hasattr(pol, "check_model"):  # e.g. a per-model head map (vertical_slash)
            pol.check_model(model)
    _check_backend(backend, model)
    # every per-layer decision that can fail (a head map's layer, a cache kind) before the model is touched: a
    # failing re-patch keeps the previous policy
    layers = _layer_states(model, adapter, spec, backend, collect_stats)
    previous = getattr(model, _ATTR, None)
    if previous is not None:
        unpatch(model)
    try:
        _apply(model, spec, backend, collect_stats, layers)
    except Exception:
        if previous is not None:  # put the previous policy back (it validated when it was patched)
            _apply(model, previous.spec, previous.backend, previous.collect,
                   _layer_states(model, adapter, previous.spec, previous.backend, previous.collect))
        raise
    return model


def _layer_states(model: nn.Module, adapter, spec: PolicySpec, backend: str, collect: bool) -> list:
    """(attention module, its LayerState, cache limit, cache kind) per layer; touches nothing."""
    layers = []
    for mod in adapter.attention_modules(model):
        window = adapter.layer_window(mod)
        state = LayerState(layer_idx=mod.layer_idx, spec=spec, backend=backend, sliding_window=window,
                           collect=collect)
        layers.append((mod, state, spec.decode.cache_limit(window), spec.decode.cache_kind(window, mod.layer_idx)))
    return layers


def _apply(model: nn.Module, spec: PolicySpec, backend: str, collect: bool, layers: list) -> None:
    """Install the hooks and the attention implementation on an unpatched model; undone on any error."""
    attention.register()
    record = _PatchRecord(model.config._attn_implementation, spec, backend, collect)
    try:
        for mod, state, limit, kind in layers:
            mod._accel = state
            record.modules.append(mod)
            record.handles.append(mod.register_forward_pre_hook(_cache_hook(state, limit, kind), with_kwargs=True))
        record.handles.append(model.register_forward_pre_hook(_position_guard(model), with_kwargs=True))
        if callable(getattr(type(model), "get_compiled_call", None)):
            model.get_compiled_call = _eager_prefill_chunks(model)
        model.set_attn_implementation(IMPL_NAME)
        setattr(model, _ATTR, record)
    except Exception:
        _undo(model, record)
        raise


def _eager_prefill_chunks(model: nn.Module):
    """``get_compiled_call`` for the patched model: transformers' generate compiles the forward of the prefill
    chunks (``prefill_chunk_size``) over a static cache, not only the one-token decode steps. accel's prefill runs
    eagerly (its hooks read cache lengths on the host and skip compiled calls), so the compiled forward it returns
    sends calls of several tokens to the eager forward and compiles the one-token steps as before."""
    original = type(model).get_compiled_call

    def get_compiled_call(compile_config=None):
        compiled = original(model, compile_config)

        def call(*args, **kwargs):
            ids = kwargs.get("input_ids")
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            if ids is None and args:
                ids = args[0]
            if isinstance(ids, torch.Tensor) and ids.dim() > 1 and ids.shape[1] > 1:
                return model(*args, **kwargs)
            return compiled(*args, **kwargs)

        return call

    return get_compiled_call


def _undo(model: nn.Module, record: _PatchRecord) -> None:
    model.__dict__.pop("get_compiled_call", None)
    for h in record.handles:
        h.remove()
    for mod in record.modules:
        if hasattr(mod, "_accel"):
            mod._accel.active = False  # the cache layers it installed refuse further updates (cache.PatchOwned)
            del mod._accel
    if model.config._attn_implementation == IMPL_NAME:
        model.set_attn_implementation(record.original_impl)
    if hasattr(model, _ATTR):
        delattr(model, _ATTR)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original attention exactly. Returns the model; a no-op on an unpatched model."""
    record = getattr(model, _ATTR, None)
    if record is not None:
        _undo(model, record)
    return model


def stats(model: nn.Module) -> dict[str, Any]:
    """Per-layer policy, backend(s) used, call counts and density (share of causal pairs computed).

    ``backends_used`` counts kernel runs per backend: a call whose heads are split (DuoAttention, LServe) counts once
    per part, so a part on another backend shows."""
    record = getattr(model, _ATTR, None)
    if record is None:
        raise ValueError("model is not patched; call accel.patch(model, ...) first")
    layers = [mod._accel.as_dict() for mod in record.modules]

    def mean_over(key, phases=("prefill", "decode")):
        """Mean over the layers that ran ``phases``; None when none did or when one of them cannot tell (a mean of
        the others would pass for the whole)."""
        vals = [layer[key] for layer in layers if any(layer["calls"][p] for p in phases)]
        return sum(vals) / len(vals) if vals and None not in vals else None
    recalls = [layer["prefill_recall"] for layer in layers if layer["prefill_recall"] is not None]
    used: dict[str, int] = {}
    for layer in layers:
        for k, v in layer["backends"].items():
            used[k] = used.get(k, 0) + v
    parts = [record.spec.prefill] + ([record.spec.decode] if record.spec.decode is not record.spec.prefill else [])
    calibration = {p.name: src for p in parts if (src := getattr(p, "calibration_source", None))}
    return {
        "policy": record.spec.describe(),
        # every option each policy runs with, defaults included (Quest's page_bounds, XAttention's threshold ...)
        "options": {p.name: {name: getattr(p, name) for name in p.option_names()} for p in parts},
        "calibration": calibration,  # per-model files a policy read (head maps, per-layer thresholds), by policy
        "backend_requested": record.backend,
        "backends_used": used,
        "mean_density": mean_over("density"),  # over every call, prefill and decode alike
        "mean_prefill_density": mean_over("prefill_density", ("prefill",)),
        "mean_decode_density": mean_over("decode_density", ("decode",)),
        "mean_recall": sum(recalls) / len(recalls) if recalls else None,  # collect_stats=True only
        "layers": layers,
    }


def reset_stats(model: nn.Module) -> None:
    """Zero the counters ``accel.stats`` reads (calls, backends, densities, recall), e.g. between a warm-up and a
    measured run; the policy and its caches are untouched."""
    record = getattr(model, _ATTR, None)
    if record is None:
        raise ValueError("model is not patched")
    for mod in record.modules:
        s = mod._accel
        s.calls = {"prefill": 0, "decode": 0}
        s.backends_used, s.fallbacks = {}, set()
        s.density = {"prefill": [0.0, 0, 0], "decode": [0.0, 0, 0]}
        s.recall = [0.0, 0]


def new_cache(model: nn.Module) -> DynamicCache:
    """A cache prepared for the patched model (streaming layers are bounded on first use)."""
    return DynamicCache(config=model.config)


