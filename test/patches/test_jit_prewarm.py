"""jit_prewarm: the hook target, its never-raise contract, and (GPU) the real warm-up."""

from __future__ import annotations

import logging

import pytest
import torch

from sglang_gemma4 import registry
from sglang_gemma4.patches import jit_prewarm
from sglang_gemma4.patches.jit_prewarm import PATCH


def test_status_knob_upstream_and_target(clean_env):
    assert registry.evaluate(PATCH, {}).state == "active"
    assert registry.evaluate(PATCH, {PATCH.knob: "0"}).state == "disabled"
    assert PATCH.upstream() is None  # 0.5.17's warm-up request is greedy
    # the premise: SGLang's warm-up never samples, so it never builds the module
    import inspect

    from sglang.srt.entrypoints import http_server

    src = inspect.getsource(http_server._execute_server_warmup)
    assert '"temperature": 0' in src and "top_p" not in src


def test_failed_warm_up_is_logged_not_raised(monkeypatch, caplog):
    def boom(device):
        raise RuntimeError("ninja: build stopped")

    monkeypatch.setattr(jit_prewarm, "warm_sampling_kernels", boom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with caplog.at_level(logging.WARNING, logger="sglang_gemma4"):
        assert jit_prewarm.prewarm_after_init(None, object()) is None
    assert "ninja: build stopped" in caplog.text and "first sampled request" in caplog.text


def test_no_cuda_no_work(monkeypatch):
    called = []
    monkeypatch.setattr(jit_prewarm, "warm_sampling_kernels", lambda d: called.append(d))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    jit_prewarm.prewarm_after_init(None, object())
    assert called == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_warm_up_builds_the_module_sglang_samples_with():
    import flashinfer.sampling as fs

    dt = jit_prewarm.warm_sampling_kernels(torch.device("cuda", 0))
    assert dt >= 0
    # the module is cached now: SGLang's own call path returns at once and samples validly
    probs = torch.softmax(torch.randn(4, 1000, device="cuda"), -1)
    out = fs.top_k_renorm_probs(probs, 5)
    assert torch.allclose(out.sum(-1), torch.ones(4, device="cuda"), atol=1e-4)
    assert int((out > 0).sum(-1).max()) <= 5
