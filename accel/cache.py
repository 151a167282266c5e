"""Cache layers that make decode-policy memory savings real.

``SinkWindowLayer`` stores only the first ``sink`` tokens and the last ``window - 1`` (what the next query can
see), so a streaming layer's KV memory is constant in the context length. Compacted keys stay in the index-space
convention of accel.layouts: sinks first, then a contiguous run of recent tokens ending at the newest one."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from .kernels.reference_decode import BOUNDS_FP8, cast_bounds


class PatchOwned:
    """A cache layer accel.patching installed for a decode policy. It remembers what it was made for (``made_key``,
    compared by the patch's pre-forward hook: a re-patched model whose decode policy needs another layer is refused)
    and the patched layer's state (``owner``): a dynamic layer that keeps only some tokens or heads (streaming,
    DuoAttention) refuses updates once that patch is gone, where plain attention would read its dropped or split
    keys as the full cache and answer wrong without a sign. (Static layers are checked by the hook only: their
    update runs inside compiled decode steps.)"""

    owner = None  # the LayerState of the patch that installed or last used the layer (None: made by hand)
    keeps_all = False  # every token of every head is stored (plain attention over it is exact)
    made_key = None
    made_for = ""

    def check_owner(self) -> None:
        if self.owner is not None and not self.owner.active:
            raise RuntimeError(
                f"this KV cache layer was filled under accel's {self.made_for} and keeps only part of the context; "
                "the model is no longer patched with that policy. Start a new cache (drop past_key_values, or pass "
                "a fresh DynamicCache), or patch the model with that policy again to continue it")


class SinkWindowLayer(PatchOwned, DynamicLayer):
    is_sliding = False
    is_croppable = False

    def __init__(self, sink: int, window: int):
        super().__init__()
        self.sink, self.window = sink, window
        self.cumulative_length = 0

    @classmethod
    def from_layer(cls, layer: DynamicLayer, sink: int, window: int) -> "SinkWindowLayer":
        """Take over a plain DynamicLayer (possibly already filled, e.g. a prompt cache built before patching)."""
        new = cls(sink, window)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
            new.lazy_initialization(layer.keys, layer.values)
            new.cumulative_length = layer.keys.shape[-2]
            new.keys, new.values = new._compact(layer.keys), new._compact(layer.values)
        return new

    def _compact(self, x: torch.Tensor) -> torch.Tensor:
        keep_recent = self.window - 1
        if x.shape[-2] <= self.sink + keep_recent:
            return x
        recent = x[..., x.shape[-2] - keep_recent :, :] if keep_recent > 0 else x[..., :0, :]
        # clone: slices of the full tensor would keep the whole context alive
        return torch.cat([x[..., : self.sink, :], recent], dim=-2).clone()

    def update(self, key_states, value_states, *args, **kwargs):
        self.check_owner()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        full_k = torch.cat([self.keys, key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = self._compact(full_k), self._compact(full_v)
        return full_k, full_v

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if self.keys is None else self.keys.shape[-2]
        return stored + query_length, max(self.cumulative_length - stored, 0)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(
            "a streaming (sink + window) cache layer has dropped old tokens and cannot be cropped; assisted or "
            "speculative decoding needs policy='dense' for decode"
        )


def cache_bytes(cache: Cache | None) -> int:
    """Bytes held by the key/value tensors of a transformers cache (what the cache really stores)."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        extra = layer.extra_tensors() if hasattr(layer, "extra_tensors") else ()  # accel layers: bounds, stores
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None), *extra):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class _BatchOps:
    """Batch reshuffles (beam search, num_return_sequences, batch selection) for layers whose storage is several
    tensors: each layer implements ``_batch(fn)``, applying ``fn`` to every per-batch tensor it holds."""

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)))


class PagedKVLayer(PatchOwned, _BatchOps, DynamicLayer):
    """Full KV plus per-page key bounds for query-aware page selection (Quest and its relatives).

    Keys and values live in capacity buffers that grow geometrically, so appending a token writes one row instead
    of copying the whole cache (``keys``/``values`` are views of the filled part). ``kmin``/``kmax``
    ([B, H, n_pages, D], ``bounds_dtype``: the keys' dtype by default, or ``reference_decode.BOUNDS_FP8``, rounded
    outward) hold the elementwise min/max of each page of ``page_size`` keys; an append recomputes only the last
    partial page and the new pages. ``plan_cache`` lets a policy keep a plan across decode
    steps (LServe's reuse); batch edits (beam reorder, select, repeat) clear it."""

    is_sliding = False
    is_croppable = True
    keeps_all = True
    GROW = 256  # capacity granularity in tokens

    def __init__(self, page_size: int = 16, bounds_dtype: torch.dtype | None = None):
        super().__init__()
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.bounds_dtype = bounds_dtype
        self.length = 0
        self._k = self._v = self._kmin = self._kmax = None
        self.kmin = self.kmax = None
        self.plan_cache: dict = {}

    @classmethod
    def from_layer(cls, layer: DynamicLayer, page_size: int = 16,
                   bounds_dtype: torch.dtype | None = None) -> "PagedKVLayer":
        """Take over a plain DynamicLayer, possibly already filled (a prompt cache built before patching)."""
        new = cls(page_size, bounds_dtype)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
            new.update(layer.keys, layer.values)
        return new

    # ---------------------------------------------------------------------------------------------- storage
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self._k = key_states.new_empty(B, H, 0, D)
        self._v = value_states.new_empty(B, H, 0, value_states.shape[-1])
        self._kmin = key_states.new_empty(B, H, 0, D, dtype=self.bounds_dtype or key_states.dtype)
        self._kmax = torch.empty_like(self._kmin)
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        n, P = self.length, self.page_size
        self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]
        self.kmin, self.kmax = self._kmin[..., : -(-n // P), :], self._kmax[..., : -(-n // P), :]

    def _reserve(self, n: int) -> None:
        cap = self._k.shape[-2]
        if n <= cap:
            return
        new_cap = _capacity(n, cap, self.GROW)
        self._k = _grow(self._k, new_cap, self.length)
        self._v = _grow(self._v, new_cap, self.length)
        pages = -(-new_cap // self.page_size)
        used = -(-self.length // self.page_size)
        self._kmin = _grow(self._kmin, pages, used)
        self._kmax = _grow(self._kmax, pages, used)

    def _refresh(self, first_page: int) -> None:
        """Recompute the bounds of pages ``first_page ..`` (the pages the last write touched)."""
        if first_page * self.page_size < self.length:
            _recompute_pages(self._kmin, self._kmax, self._k, first_page * self.page_size, self.length, self.page_size)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old, n = self.length, key_states.shape[-2]
        self._reserve(old + n)
        self._k[..., old : old + n, :] = key_states
        self._v[..., old : old + n, :] = value_states
        self.length = old + n
        self._refresh(old // self.page_size)
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def extra_tensors(self) -> tuple:
        return (self.kmin, self.kmax)

    def storage_bytes(self) -> int:
        """Bytes allocated (capacity included), key/value buffers plus page bounds."""
        ts = (self._k, self._v, self._kmin, self._kmax)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # ----------------------------------------------------------------------------------- generate's hooks
    def reset(self) -> None:
        self.keys = self.values = None
        self._k = self._v = self._kmin = self._kmax = self.kmin = self.kmax = None
        self.length = 0
        self.is_initialized = False
        self.plan_cache.clear()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.length = max(0, self.length + tokens_to_remove)
        self._refresh(self.length // self.page_size)
        self._views()
        self.plan_cache.clear()

    def _batch(self, fn) -> None:
        if self.is_initialized:
            self._k, self._v, self._kmin, self._kmax = (fn(t) for t in (self._k, self._v, self._kmin, self._kmax))
            self._views()
        self.plan_cache.clear()

    def offload(self):
        raise NotImplementedError("PagedKVLayer does not support offloading; use the default cache without accel")

    def prefetch(self):
        return None


def _appends(layer, n: int) -> bool:
    """Whether this update (``n`` tokens) goes through the one-launch append kernel: a decode token, the Triton
    backend (``layer.triton_append``, set at patching) and a launch the current trace can take."""
    if n != 1 or not layer.triton_append:
        return False
    from accel.kernels.triton.decode_append import traceable

    return traceable()


def _fold_decode_key(kmin: torch.Tensor, kmax: torch.Tensor, page: torch.Tensor, keys: torch.Tensor) -> None:
    """One decode token's keys [B, H, 1, D] folded into page ``page`` (a 1-element device tensor) of the bounds:
    read-modify-write on the device, no sync."""
    lo = torch.minimum(kmin.index_select(2, page).to(keys.dtype), keys)
    hi = torch.maximum(kmax.index_select(2, page).to(keys.dtype), keys)
    lo, hi = cast_bounds(lo, hi, kmin.dtype)
    if kmin.dtype == BOUNDS_FP8:  # index_copy_ has no float8 kernel on the CPU: copy the bytes
        kmin, kmax, lo, hi = (t.view(torch.uint8) for t in (kmin, kmax, lo, hi))
    kmin.index_copy_(2, page, lo)
    kmax.index_copy_(2, page, hi)


def _empty_bounds(layer, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """+inf / -inf page bounds [B, heads, ceil(max_cache_len / page_size), D] at static addresses (CUDA graphs), in
    the layer's ``bounds_dtype`` (default its keys' dtype)."""
    shape = (layer.batch_size, heads, -(-layer.max_cache_len // layer.page_size), layer.k_head_dim)
    dtype = layer.bounds_dtype or layer.dtype
    kmin = torch.full(shape, float("inf"), dtype=dtype, device=layer.device)
    kmax = torch.full(shape, float("-inf"), dtype=dtype, device=layer.device)
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(kmin)
        torch._dynamo.mark_static_address(kmax)
    return kmin, kmax


def _recompute_pages(kmin: torch.Tensor, kmax: torch.Tensor, buffer: torch.Tensor, start: int, end: int,
                     page_size: int) -> None:
    """Bounds of every page that positions [start, end) of ``buffer`` [B, H, S, D] touch, recomputed from it."""
    P, first = page_size, start // page_size
    seg = buffer[:, :, first * P : end]
    pad = (-seg.shape[2]) % P
    lo = torch.nn.functional.pad(seg, (0, 0, 0, pad), value=float("inf")).unflatten(2, (-1, P)).amin(3)
    hi = torch.nn.functional.pad(seg, (0, 0, 0, pad), value=float("-inf")).unflatten(2, (-1, P)).amax(3)
    lo, hi = cast_bounds(lo, hi, kmin.dtype)
    kmin[:, :, first : first + lo.shape[2]] = lo
    kmax[:, :, first : first + hi.shape[2]] = hi


class PagedStaticLayer(PatchOwned, StaticLayer):
    """transformers' StaticLayer (preallocated K/V, compile-friendly) plus per-page key bounds for Quest.

    ``kmin``/``kmax`` ([B, H, ceil(max_cache_len / page_size), D], ``bounds_dtype``: the keys' dtype by default,
    or ``BOUNDS_FP8`` rounded outward) start at +inf / -inf and every
    update folds the new keys into their pages (a decode step: one page read and written back): no host sync, no shape that depends
    on the length, static addresses, so a compiled decode step over it captures as a CUDA graph. Pages past the
    filled length keep their +-inf bounds; the policy masks them with the device-side ``cumulative_length``."""

    triton_append = False  # decode steps through kernels/triton/decode_append.py (set at patching, backend)
    keeps_all = True

    def __init__(self, max_cache_len: int, page_size: int = 16, bounds_dtype: torch.dtype | None = None):
        super().__init__(max_cache_len=max_cache_len)
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.bounds_dtype = bounds_dtype
        self.kmin = self.kmax = None

    @classmethod
    def from_layer(cls, layer: StaticLayer, page_size: int = 16,
                   bounds_dtype: torch.dtype | None = None) -> "PagedStaticLayer":
        """Take over an empty StaticLayer of a StaticCache (the first prefill installs it)."""
        if layer.is_initialized and int(layer.get_seq_length()) > 0:
            raise RuntimeError("a static cache that already holds tokens cannot take page bounds; start a new cache "
                               "after accel.patch")
        return cls(layer.max_cache_len, page_size, bounds_dtype)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype  # transformers >= 5.24's StaticLayer no longer records it
        self.kmin, self.kmax = _empty_bounds(self, self.num_heads)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if _appends(self, n):  # one launch: keys, values, the page's bounds
            from accel.kernels.triton.decode_append import append_token

            append_token(key_states, value_states, self.cumulative_length, self.keys, self.values,
                         bounds=(self.kmin, self.kmax), page_size=self.page_size)
            self.cumulative_length.add_(1)
            return self.keys, self.values
        if n == 1:  # a decode step: read-modify-write the one page it touches, on the device
            page = self.cumulative_length.reshape(1) // self.page_size
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            _fold_decode_key(self.kmin, self.kmax, page, key_states.to(self.dtype))
            return keys, values
        # prefill / chunks (eager): recompute the bounds of every page the new keys touch from the buffer
        start = int(self.cumulative_length)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        _recompute_pages(self.kmin, self.kmax, self.keys, start, start + n, self.page_size)
        return keys, values

    def extra_tensors(self) -> tuple:
        return (self.kmin, self.kmax)

    def reset(self) -> None:
        super().reset()
        if self.kmin is not None:
            self.kmin.fill_(float("inf"))
            self.kmax.fill_(float("-inf"))


class DuoStaticLayer(PatchOwned, StaticLayer):
    """DuoAttention over a transformers StaticCache: retrieval KV heads in a preallocated buffer of every position
    (``keys``/``values`` [B, H_r, max_cache_len, D]); streaming KV heads in a ring of ``sink + recent`` slots
    (``skeys``/``svalues``): positions below ``sink`` keep their slot, later ones cycle through the other ``recent``
    slots. So the streaming heads' memory is constant here too, and a decode step writes one slot, chosen on the
    device from ``cumulative_length`` (no sync, compiles into a CUDA graph). Attention is order-free once RoPE is
    applied, so the ring needs no reordering.

    A multi-token update on an empty layer (the first fill) returns that call's K/V of every head, for the prefill
    policy. On a filled layer (chunked prefill, a prompt on top of a filled cache; eager, one host read of the
    length) it presents what the dynamic twin ``DuoSplitLayer`` presents: the retrieval heads' K/V up to the new
    length, and in ``stream_kv`` the streaming heads' past as that layer would hold it (the sink positions and the
    last ``recent - 1``, read back from their ring slots in position order) followed by the chunk, in the index
    space of accel.layouts; ``full_call`` tells the two apart. A layer whose heads all stream (policy
    ``streaming``) returns ``stream_kv`` itself, as ``SinkWindowLayer`` does. The chunk is then written into the
    buffer and the ring as a first fill's tokens are."""

    triton_append = False  # decode steps through kernels/triton/decode_append.py (set at patching, backend)

    def __init__(self, max_cache_len: int, stream_heads, sink: int, recent: int):
        super().__init__(max_cache_len=max_cache_len)
        mask = torch.as_tensor(stream_heads, dtype=torch.bool)
        self.stream_idx = mask.nonzero()[:, 0]
        self.retrieval_idx = (~mask).nonzero()[:, 0]
        self.sink, self.recent = sink, recent
        self.skeys = self.svalues = None
        self.stream_kv = None  # a chunk's streaming heads' visible K/V (compacted past + the chunk), else None
        self.full_call = True  # the last multi-token update was a first fill (every head's K/V returned)

    @classmethod
    def from_layer(cls, layer: StaticLayer, stream_heads, sink: int, recent: int) -> "DuoStaticLayer":
        if layer.is_initialized and int(layer.get_seq_length()) > 0:
            raise RuntimeError("a static cache that already holds tokens cannot split its heads for DuoAttention; "
                               "start a new cache after accel.patch")
        return cls(layer.max_cache_len, stream_heads, sink, recent)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        self.stream_idx, self.retrieval_idx = self.stream_idx.to(self.device), self.retrieval_idx.to(self.device)
        from accel.kernels.triton.decode_append import append_map

        self.append_map = append_map(self.retrieval_idx, self.stream_idx, self.num_heads)  # for triton_append
        B, hr, hs = self.batch_size, self.retrieval_idx.numel(), self.stream_idx.numel()
        new = key_states.new_zeros
        self.keys = new(B, hr, self.max_cache_len, self.k_head_dim)
        self.values = new(B, hr, self.max_cache_len, self.v_head_dim)
        self.skeys = new(B, hs, self.sink + self.recent, self.k_head_dim)
        self.svalues = new(B, hs, self.sink + self.recent, self.v_head_dim)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.values, self.skeys, self.svalues, self.cumulative_length, self.append_map):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos < self.sink, pos, self.sink + (pos - self.sink) % self.recent)

    def past_positions(self, length: int) -> torch.Tensor:
        """Positions (ascending) of the streaming heads' past that the dynamic ``DuoSplitLayer`` keeps after
        ``length`` tokens: all of them up to ``sink + recent - 1``, else the sink positions and the last
        ``recent - 1``. The ring holds each of them (in ``_slots(pos)``)."""
        keep = self.recent - 1
        if length <= self.sink + keep:
            return torch.arange(length, device=self.device)
        return torch.cat([torch.arange(self.sink, device=self.device),
                          torch.arange(length - keep, length, device=self.device)])

    def _append(self, key_states, value_states, bounds=None) -> None:
        """A decode token in one launch (buffer, ring and ``bounds``); the length moves on after it."""
        from accel.kernels.triton.decode_append import append_token

        append_token(key_states, value_states, self.cumulative_length, self.keys, self.values, kv_map=self.append_map,
                     ring=(self.skeys, self.svalues, self.sink, self.recent), bounds=bounds,
                     page_size=getattr(self, "page_size", 16))
        self.cumulative_length.add_(1)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if _appends(self, n):
            self._append(key_states, value_states)
            return self.keys, self.values
        ks, vs = key_states.index_select(1, self.stream_idx), value_states.index_select(1, self.stream_idx)
        past = 0
        if n > 1:  # eager (a prefill or a chunk): the length on the host
            past = int(self.cumulative_length)
            self.full_call = past == 0
            self.stream_kv = None
            if past:  # the ring's past as the dynamic layer holds it, read before the chunk overwrites its slots
                slots = self._slots(self.past_positions(past))
                self.stream_kv = (torch.cat([self.skeys.index_select(2, slots), ks], dim=-2),
                                  torch.cat([self.svalues.index_select(2, slots), vs], dim=-2))
        pos = torch.arange(n, device=self.device) + self.cumulative_length
        self.keys.index_copy_(2, pos, key_states.index_select(1, self.retrieval_idx))
        self.values.index_copy_(2, pos, value_states.index_select(1, self.retrieval_idx))
        if n > 1:  # several tokens (eager): the sink positions and the last `recent` ones, distinct ring slots
            keep = (pos < self.sink) | (torch.arange(n, device=self.device) >= n - self.recent)
            pos, ks, vs = pos[keep], ks[:, :, keep], vs[:, :, keep]
        self.skeys.index_copy_(2, self._slots(pos), ks)
        self.svalues.index_copy_(2, self._slots(pos), vs)
        self.cumulative_length.add_(n)
        if n == 1:
            return self.keys, self.values
        if self.full_call:
            return key_states, value_states  # every head, for the prefill policy
        if self.retrieval_idx.numel() == 0:
            return self.stream_kv  # every head streams: what SinkWindowLayer returns
        return self.keys[:, :, : past + n], self.values[:, :, : past + n]

    is_croppable = False

    def crop(self, *args, **kwargs) -> None:
        # the ring has overwritten the streaming heads' older tokens: rolling the length back (assisted generation)
        # would attend to tokens that were removed
        raise RuntimeError("a DuoAttention static cache layer (policies duo / lserve / streaming) cannot be cropped: "
                           "its streaming heads keep only sink + recent tokens. Use the default dynamic cache for "
                           "assisted generation")

    def extra_tensors(self) -> tuple:
        return (self.skeys, self.svalues)

    def reset(self) -> None:
        super().reset()
        self.stream_kv, self.full_call = None, True
        if self.skeys is not None:
            self.skeys.zero_()
            self.svalues.zero_()


class LServeStaticLayer(DuoStaticLayer):
    """LServe over a transformers StaticCache: a DuoStaticLayer (retrieval heads' full buffer, streaming heads'
    sink + recent ring) whose retrieval heads also keep per-page key bounds (``kmin``/``kmax`` [B, H_r,
    ceil(max_cache_len / page_size), D], +inf / -inf where unfilled), updated as PagedStaticLayer's are: a decode step
    reads and writes back the one page it touches, on the device; a multi-token update recomputes the touched
    pages from the buffer. ``bounds_dtype`` as PagedStaticLayer's."""

    def __init__(self, max_cache_len: int, stream_heads, sink: int, recent: int, page_size: int = 16,
                 bounds_dtype: torch.dtype | None = None):
        super().__init__(max_cache_len, stream_heads, sink, recent)
        self.page_size = page_size
        self.bounds_dtype = bounds_dtype
        self.kmin = self.kmax = None

    @classmethod
    def from_layer(cls, layer: StaticLayer, stream_heads, sink: int, recent: int,
                   page_size: int = 16, bounds_dtype: torch.dtype | None = None) -> "LServeStaticLayer":
        if layer.is_initialized and int(layer.get_seq_length()) > 0:
            raise RuntimeError("a static cache that already holds tokens cannot split its heads for LServe; start a "
                               "new cache after accel.patch")
        return cls(layer.max_cache_len, stream_heads, sink, recent, page_size, bounds_dtype)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.kmin, self.kmax = _empty_bounds(self, self.retrieval_idx.numel())  # the retrieval heads only

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if _appends(self, n):
            self._append(key_states, value_states, bounds=(self.kmin, self.kmax))
            return self.keys, self.values
        if n == 1:  # a decode step: fold the new retrieval keys into their page, on the device
            page = self.cumulative_length.reshape(1) // self.page_size
            out = super().update(key_states, value_states, *args, **kwargs)
            _fold_decode_key(self.kmin, self.kmax, page, key_states.index_select(1, self.retrieval_idx).to(self.dtype))
            return out
        start = int(self.cumulative_length)  # eager prefill / chunk
        out = super().update(key_states, value_states, *args, **kwargs)
        _recompute_pages(self.kmin, self.kmax, self.keys, start, start + n, self.page_size)  # the retrieval buffer
        return out

    def extra_tensors(self) -> tuple:
        return (self.skeys, self.svalues, self.kmin, self.kmax)

    def reset(self) -> None:
        super().reset()
        if self.kmin is not None:
            self.kmin.fill_(float("inf"))
            self.kmax.fill_(float("-inf"))


def _capacity(needed: int, cap: int, grain: int) -> int:
    """A buffer's next capacity: at least ``needed`` and 1.25x the current one, rounded up to ``grain`` tokens."""
    return -(-max(needed, cap + cap // 4) // grain) * grain


def _grow(t: torch.Tensor, cap: int, used: int) -> torch.Tensor:
    new = t.new_empty(*t.shape[:-2], cap, t.shape[-1])
    if used:
        new[..., :used, :] = t[..., :used, :]
    return new


class DuoSplitLayer(PatchOwned, _BatchOps, DynamicLayer):
    """DuoAttention cache layer: retrieval KV heads keep every token, streaming KV heads keep only ``sink`` +
    ``recent - 1`` tokens (constant memory; the next query makes ``recent``).

    ``keys``/``values`` hold the retrieval heads [B, H_r, L, D]. The first fill (prefill on an empty layer) returns
    every head's K/V so any prefill policy can run; later calls return the retrieval heads only and leave the
    streaming heads' visible K/V of this call in ``stream_kv`` (compacted past + the new tokens, index space of
    accel.layouts) for the policy's plan."""

    is_sliding = False
    is_croppable = False

    def __init__(self, stream_heads, sink: int, recent: int):
        super().__init__()
        mask = torch.as_tensor(stream_heads, dtype=torch.bool)
        self.stream_idx = mask.nonzero()[:, 0]
        self.retrieval_idx = (~mask).nonzero()[:, 0]
        self.sink, self.recent = sink, recent
        self.cumulative_length = 0
        self.skeys = self.svalues = None
        self.stream_kv = None
        self.full_call = False

    @classmethod
    def from_layer(cls, layer: DynamicLayer, stream_heads, sink: int, recent: int) -> "DuoSplitLayer":
        new = cls(stream_heads, sink, recent)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
            new.update(layer.keys, layer.values)
        return new

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        dev = key_states.device
        self.stream_idx, self.retrieval_idx = self.stream_idx.to(dev), self.retrieval_idx.to(dev)
        B, _, _, D = key_states.shape
        self._rk = key_states.new_empty(B, self.retrieval_idx.numel(), 0, D)
        self._rv = value_states.new_empty(B, self.retrieval_idx.numel(), 0, value_states.shape[-1])
        self.keys, self.values = self._rk, self._rv
        self.skeys = key_states.new_empty(B, self.stream_idx.numel(), 0, D)
        self.svalues = value_states.new_empty(B, self.stream_idx.numel(), 0, value_states.shape[-1])

    def _compact(self, x):
        keep = self.recent - 1
        if x.shape[-2] <= self.sink + keep:
            return x
        recent = x[..., x.shape[-2] - keep:, :] if keep > 0 else x[..., :0, :]
        return torch.cat([x[..., : self.sink, :], recent], dim=-2).clone()

    def update(self, key_states, value_states, *args, **kwargs):
        self.check_owner()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.full_call = self.cumulative_length == 0
        self.cumulative_length += key_states.shape[-2]
        kr, vr = key_states.index_select(1, self.retrieval_idx), value_states.index_select(1, self.retrieval_idx)
        ks, vs = key_states.index_select(1, self.stream_idx), value_states.index_select(1, self.stream_idx)
        self._append_retrieval(kr, vr)
        full_sk, full_sv = torch.cat([self.skeys, ks], dim=-2), torch.cat([self.svalues, vs], dim=-2)
        self.stream_kv = (full_sk, full_sv)
        self.skeys, self.svalues = self._compact(full_sk), self._compact(full_sv)
        if self.full_call:
            return key_states, value_states
        return self.keys, self.values

    def _append_retrieval(self, kr, vr) -> None:
        # capacity buffers that grow geometrically (as PagedKVLayer's): a torch.cat per step copied the whole
        # retrieval cache at every decode step of every layer
        used, n = self.keys.shape[-2], kr.shape[-2]
        cap = self._rk.shape[-2]
        if used + n > cap:
            cap = _capacity(used + n, cap, PagedKVLayer.GROW)
            self._rk, self._rv = _grow(self._rk, cap, used), _grow(self._rv, cap, used)
        self._rk[..., used : used + n, :] = kr
        self._rv[..., used : used + n, :] = vr
        self.keys, self.values = self._rk[..., : used + n, :], self._rv[..., : used + n, :]

    def extra_tensors(self) -> tuple:
        return (self.skeys, self.svalues)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.skeys = self.svalues = self.stream_kv = None
        self._rk = self._rv = None
        self.is_initialized = False
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a DuoAttention cache layer has dropped old tokens of its streaming heads and cannot be "
                           "cropped; assisted or speculative decoding needs another decode policy")

    def _batch(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values, self.skeys, self.svalues = (
                fn(t) for t in (self.keys, self.values, self.skeys, self.svalues))
            self._rk, self._rv = self.keys, self.values  # the filled part only; the next append regrows
        self.stream_kv = None

    def offload(self):
        raise NotImplementedError("DuoSplitLayer does not support offloading")

    def prefetch(self):
        return None


class PagedSplitLayer(DuoSplitLayer):
    """LServe cache layer: a DuoSplitLayer whose retrieval heads live in a PagedKVLayer (``paged``: one-row appends
    and per-page key min/max over ``page_size``-token logical pages), streaming heads as in DuoSplitLayer (sink +
    recent, constant memory). ``plan_cache`` keeps a page selection across decode steps (LServe's reuse); batch
    edits and resets clear it."""

    def __init__(self, stream_heads, sink: int, recent: int, page_size: int = 16,
                 bounds_dtype: torch.dtype | None = None):
        super().__init__(stream_heads, sink, recent)
        self.paged = PagedKVLayer(page_size, bounds_dtype)
        self.page_size = page_size
        self.plan_cache: dict = {}

    @classmethod
    def from_layer(cls, layer: DynamicLayer, stream_heads, sink: int, recent: int,
                   page_size: int = 16, bounds_dtype: torch.dtype | None = None) -> "PagedSplitLayer":
        new = cls(stream_heads, sink, recent, page_size, bounds_dtype)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
            new.update(layer.keys, layer.values)
        return new

    def _append_retrieval(self, kr, vr) -> None:
        self.keys, self.values = self.paged.update(kr, vr)

    @property
    def kmin(self):
        return self.paged.kmin

    @property
    def kmax(self):
        return self.paged.kmax

    def extra_tensors(self) -> tuple:
        return (self.skeys, self.svalues, self.paged.kmin, self.paged.kmax)

    def reset(self) -> None:
        super().reset()
        self.paged.reset()
        self.plan_cache.clear()

    def _batch(self, fn) -> None:
        if self.is_initialized:
            self.paged._batch(fn)
            self.keys, self.values = self.paged.keys, self.paged.values
            self.skeys, self.svalues = fn(self.skeys), fn(self.svalues)
        self.stream_kv = None
        self.plan_cache.clear()
