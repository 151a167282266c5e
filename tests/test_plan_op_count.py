"""How many torch ops and Triton launches a plan issues (on the Triton path, run by the interpreter): at short and
medium contexts the plans are bound by the CPU issuing them, so a regression in their number is a slowdown.

Counts: every aten op that reaches the dispatcher (views and allocations included) and every Triton launch. The
interpreter's own torch calls inside a launch are not counted. Host syncs show up as ops (nonzero, item).
FlexPrefill at 12 key blocks with the interpreter's single last-query launch (on the H200 the last queries run in
two launches: 3 more launches, 3 more ops): 37 ops + 16 launches; before the fused estimate 111-164 ops + 17-27
launches (no / some query-aware heads)."""

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from accel.policies import AttentionContext

SYNC_OPS = {"aten.nonzero", "aten._local_scalar_dense", "aten.is_nonzero", "aten.masked_select", "aten.equal"}
CTX = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None)


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.launches = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting(monkeypatch):
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    counter = _Counter()
    run = interpreter.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        counter.launches[self.fn.__name__] += 1
        with _disable_current_modes():  # the interpreter's own tensor work is not the plan's
            return run(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(interpreter.InterpretedFunction, "run", counted_run)
        with counter:
            yield counter


from test_kernel_flex_layout import _qk  # noqa: E402  (inputs with query-aware and vertical-slash heads)


@pytest.mark.parametrize("tau", [0.0, 0.4, 1.0])  # no head / two of four heads / every head query-aware
def test_flexprefill_plan_op_count(tau, monkeypatch):
    from accel.policies import flexprefill as fp_mod
    from accel.policies import vertical_slash as vs_mod

    monkeypatch.setattr(fp_mod, "_use_triton", lambda x: True)  # the CUDA path, in the interpreter
    monkeypatch.setattr(vs_mod, "_use_triton", lambda x: True)
    q, k = _qk()
    pol = fp_mod.FlexPrefillPolicy.from_options(block_size=64, min_budget=64, gamma=0.9, tau=tau)
    pol.plan(q, k, CTX)  # first call builds the kept causal block mask
    with counting(monkeypatch) as c:
        layout = pol.plan(q, k, CTX)
    n_ops, n_launches = sum(c.ops.values()), sum(c.launches.values())
    assert layout.indices.shape[-1] == 12
    assert not SYNC_OPS & set(c.ops), f"host syncs: {SYNC_OPS & set(c.ops)}"
    assert n_launches <= 16, dict(c.launches)  # lastq 3, mean_pool 2, mass search 9, estimate 1, layout 1
    assert n_ops <= 45, dict(c.ops)  # 37 with torch 2.13 (allocations 11, views 8, unbinds 3, a grouped matmul...)
