"""Shared engine results for the engine-level GPU tests.

Engines are expensive (30-50 s each, ~80 s of JIT on a fresh host), so the
session fixture runs every configuration of
:mod:`sglang_gemma4.testing.suite` once and the tests assert on the stored
results. Output (``gpu-suite.json`` and one log per engine) goes to ``$OUT``
(default ``./gpu-out``); ``GPU_SUITE_REUSE=1`` re-asserts a previous run.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def engine_suite():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sglang_gemma4.testing import suite

    return suite.load_or_run()
