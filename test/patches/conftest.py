"""Fixtures shared by the fused-layer patch tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def allow_cpu(monkeypatch):
    """Let the fused layer paths run on CPU (Triton interpreter)."""
    from sglang_gemma4.patches import fused_ple

    monkeypatch.setattr(fused_ple, "_TEST_ALLOW_CPU", True)


@pytest.fixture
def spy(monkeypatch):
    """``spy(module, name, record)``: wrap ``module.name`` so each call first runs ``record(args)``.

    The fusions import our kernels at call time, so patching the module attribute sees every call.
    """

    def install(mod, name, record):
        fn = getattr(mod, name)

        def wrapper(*a, **k):
            record(a)
            return fn(*a, **k)

        monkeypatch.setattr(mod, name, wrapper)

    return install
