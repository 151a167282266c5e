"""MInference 1.0 vertical-slash policy, and its estimation helpers (last-query attention, column and diagonal
mass) that FlexPrefill shares."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F

from accel.layouts import DenseLayout, VerticalSlashLayout

from .base import Policy, require_positive


def last_query_attention(q: torch.Tensor, k: torch.Tensor, n_last: int, scale: float | None = None) -> torch.Tensor:
    """Exact softmax attention of the last ``n_last`` queries over every causal key, float32 [B, Hq, n, Sk].

    Query i of the n sits at key position ``Sk - n + i`` (accel.layouts convention); GQA keys are not repeated."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    n = min(n_last, Sq)
    g = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    ql = q[:, :, Sq - n:].float().reshape(B, Hkv, g, n, D)
    logits = torch.matmul(ql, k.float()[:, :, None].transpose(-1, -2)).reshape(B, Hq, n, Sk) * scale
    pos = torch.arange(Sk - n, Sk, device=q.device)[:, None]
    logits = logits.masked_fill(torch.arange(Sk, device=q.device)[None, :] > pos, float("-inf"))
    return torch.softmax(logits, dim=-1)


def diagonal_sums(attn: torch.Tensor) -> torch.Tensor:
    """Mass per diagonal offset ``o = query position - key`` of last-query attention [B, H, n, Sk] -> [B, H, Sk]."""
    n, Sk = attn.shape[-2:]
    pos = torch.arange(Sk - n, Sk, device=attn.device)[:, None]
    idx = pos - torch.arange(Sk, device=attn.device)[None, :]  # [n, Sk]: key index of offset o for row i
    valid = idx >= 0
    vals = torch.gather(attn, -1, idx.clamp_min(0).expand(*attn.shape[:-2], n, Sk))
    return (vals * valid).sum(-2)


def block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """Sum-pool the last dimension in blocks of ``block`` (zero-padded at the end)."""
    pad = (-x.shape[-1]) % block
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, block).sum(-1)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean-pool [..., S, D] over the sequence in blocks (the last partial block averages its real rows)."""
    S = x.shape[-2]
    pad = (-S) % block
    xs = F.pad(x.float(), (0, 0, 0, pad)) if pad else x.float()
    sums = xs.reshape(*x.shape[:-2], -1, block, x.shape[-1]).sum(-2)
    counts = torch.full((sums.shape[-2],), float(block), device=x.device)
    counts[-1] = block - pad
    return sums / counts[:, None]


# ------------------------------------------------------------------------------------------------ the policy

PATTERNS = ("vertical_slash", "a_shape", "block_sparse")
SINK_COLUMNS = 30  # MInference always keeps the first 30 columns ...
LOCAL_DIAGONALS = 100  # ... and the 100 diagonals nearest the main one (both count within the budgets)
BS_BLOCK = 64  # MInference's block-sparse pattern works on 64-token blocks


def _read_head_map(path: str) -> dict:
    return _read_head_map_cached(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_head_map_cached(path: str, mtime: int) -> dict:
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("patterns"), list):
        raise ValueError(f"head map {path} must be a JSON object with a 'patterns' list (one row per layer); "
                         "make one with scripts/search_patterns.py MODEL")
    for i, row in enumerate(data["patterns"]):
        if row is None:
            continue
        bad = [p for p in row if p not in PATTERNS]
        if bad:
            raise ValueError(f"head map {path}, layer {i}: unknown pattern(s) {bad}; valid: {PATTERNS}")
    return data


def resolve_head_map(name: str) -> str:
    """A head map path: an existing .json file, or the name of one shipped in configs/ (without .json)."""
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"head map file {name!r} does not exist; make one with "
                                    "scripts/search_patterns.py MODEL --out FILE")
        return name
    res = resources.files("accel.configs").joinpath(f"{name}.json")
    if not res.is_file():
        shipped = sorted(p.name[:-5] for p in resources.files("accel.configs").iterdir() if p.name.endswith(".json"))
        raise ValueError(f"unknown head map {name!r}; shipped head maps: {', '.join(shipped) or '(none)'} "
                         "(or a path to a .json file from scripts/search_patterns.py)")
    return str(res)


def _pad_rows(rows: list[torch.Tensor], device) -> torch.Tensor:
    width = max(1, max(r.numel() for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.int64, device=device)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


@dataclass
class VerticalSlashPolicy(Policy):
    """MInference 1.0 (Jiang et al. 2024, arXiv 2407.02490): the last ``last_q`` queries' exact attention picks,
    per head, the top ``vertical_size`` key columns and top ``slash_size`` diagonals (the first 30 columns and the
    100 nearest diagonals always, as in MInference). A per-head pattern can come from an offline search
    (``head_map``: a JSON from scripts/search_patterns.py, shipped for the demo models as
    ``vertical_slash_smollm2`` / ``vertical_slash_gemma3``):

    - ``vertical_slash``: as above;
    - ``a_shape``: the first ``a_shape_sink`` columns and the ``a_shape_window`` nearest diagonals (StreamingLLM);
    - ``block_sparse``: MInference ranks 64-token key blocks per 64-query block with pooled q/k. One layout type
      serves a whole layer here, so a mixed layer is one ``VerticalSlashLayout`` and this pattern is approximated
      in it: the ``block_count`` key blocks with the most last-query attention become full columns, plus one
      block's width of local diagonals.

    Budgets at or above the context length keep everything (dense). Contexts no longer than ``last_q`` run dense
    (density 1.0 in stats)."""

    name = "vertical_slash"
    phases = ("prefill",)
    description = "per-head vertical columns + slash diagonals from the last queries (A-shape / block-sparse heads)"
    paper = "MInference 1.0 (arXiv 2407.02490)"

    vertical_size: int = 1000
    slash_size: int = 6096
    last_q: int = 64
    head_map: str = ""
    a_shape_sink: int = 128
    a_shape_window: int = 1024
    block_count: int = 100

    def validate(self) -> None:
        require_positive(self, "vertical_size", "slash_size", "last_q", "a_shape_window", "block_count")
        if self.a_shape_sink < 0:
            raise ValueError(f"option 'a_shape_sink' of policy 'vertical_slash' must be >= 0, got {self.a_shape_sink}")
        if self.head_map:
            _read_head_map(resolve_head_map(self.head_map))

    def head_patterns(self, layer_idx: int, n_heads: int) -> list[str]:
        if not self.head_map:
            return ["vertical_slash"] * n_heads
        path = resolve_head_map(self.head_map)
        rows = _read_head_map(path)["patterns"]
        if layer_idx >= len(rows) or (rows[layer_idx] is not None and len(rows[layer_idx]) != n_heads):
            have = len(rows[layer_idx]) if layer_idx < len(rows) and rows[layer_idx] is not None else None
            raise ValueError(f"head map {self.head_map!r} was made for another model: it has {len(rows)} layers "
                             f"({have} heads at layer {layer_idx}), this call is layer {layer_idx} with {n_heads} "
                             "query heads; run scripts/search_patterns.py for this model")
        return rows[layer_idx] or ["vertical_slash"] * n_heads

    def check_model(self, model) -> None:
        """Called by accel.patch: a head map must match the model's layer and head counts."""
        if not self.head_map:
            return
        data = _read_head_map(resolve_head_map(self.head_map))
        cfg = getattr(model.config, "text_config", None) or model.config
        layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
        rows = data["patterns"]
        widths = {len(r) for r in rows if r is not None}
        if len(rows) != layers or widths - {heads}:
            raise ValueError(f"head map {self.head_map!r} was made for {data.get('model', 'another model')} "
                             f"({len(rows)} layers x {sorted(widths)} heads); this model has {layers} layers x "
                             f"{heads} heads. Run scripts/search_patterns.py for this model, or drop head_map")

    def plan(self, q, k, ctx):
        if ctx.sliding_window is not None:
            return DenseLayout(window=ctx.sliding_window)
        kv_len = k.shape[2]
        patterns = self.head_patterns(ctx.layer_idx, q.shape[1])
        covers = {"vertical_slash": self.slash_size >= kv_len, "a_shape": self.a_shape_window >= kv_len,
                  "block_sparse": self.block_count * BS_BLOCK >= kv_len}
        if kv_len <= self.last_q or all(covers[p] for p in patterns):
            return DenseLayout()  # every head keeps everything: recorded as density 1.0
        return self.build(q, k, patterns, self.vertical_size, self.slash_size)

    def build(self, q, k, patterns, vertical_size, slash_size) -> VerticalSlashLayout:
        """The layout for per-head ``patterns`` (also used by scripts/search_patterns.py with search budgets)."""
        B, H = q.shape[:2]
        Sk, dev = k.shape[2], q.device
        attn = None
        if any(p != "a_shape" for p in patterns):
            attn = last_query_attention(q, k, self.last_q)
            vertical = attn.sum(-2)
        cols, offs = [], []
        for b in range(B):
            for h, pat in enumerate(patterns):
                if pat == "a_shape":
                    c = torch.arange(min(self.a_shape_sink, Sk), device=dev)
                    o = torch.arange(min(self.a_shape_window, Sk), device=dev)
                elif pat == "vertical_slash":
                    v = vertical[b, h].clone()
                    v[:SINK_COLUMNS] = float("inf")
                    c = v.topk(min(vertical_size, Sk)).indices.sort().values
                    s = diagonal_sums(attn[b: b + 1, h: h + 1])[0, 0]
                    s[:LOCAL_DIAGONALS] = float("inf")
                    o = s.topk(min(slash_size, Sk)).indices.sort().values
                else:  # block_sparse, approximated by whole-block columns + one block of local diagonals
                    blk = block_sums(vertical[b, h], BS_BLOCK)
                    blk[0] = float("inf")
                    top = blk.topk(min(self.block_count, blk.numel())).indices
                    c = (top[:, None] * BS_BLOCK + torch.arange(BS_BLOCK, device=dev)).flatten()
                    c = c[c < Sk].sort().values
                    o = torch.arange(min(BS_BLOCK, Sk), device=dev)
                cols.append(c)
                offs.append(o)
        return VerticalSlashLayout(columns=_pad_rows(cols, dev).reshape(B, H, -1),
                                   offsets=_pad_rows(offs, dev).reshape(B, H, -1))
