"""Triton reads TRITON_INTERPRET when it is imported: a variable set later in the process must not pass for the
interpreter (the kernels would mix interpreted and compiled functions and fail at their first call)."""

import pytest

import accel
from accel.kernels.triton import checks
from conftest import tiny_model


def test_interpreter_set_after_triton_import_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(checks, "_TRITON_MODE", [False])  # triton loaded in compiled mode
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # ... and the variable set afterwards
    assert not checks.interpreting()
    model = tiny_model("llama")
    with pytest.raises(accel.BackendUnavailable, match="set after triton was imported.*before Python starts"):
        accel.patch(model, "xattention", backend="triton")
    assert not accel.is_patched(model)


def test_interpreter_follows_the_variable_when_triton_interprets(monkeypatch):
    monkeypatch.setattr(checks, "_TRITON_MODE", [True])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert checks.interpreting() and checks.interpreter_problem() is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tests' way of asking for the GPU path's checks
    assert not checks.interpreting()
    assert "before Python starts" in checks.interpreter_problem()
