"""Build flashinfer's JIT sampling module during start-up, not on the first sampled request.

Found by the serving robustness run (issue #18): on a fresh host, with
FROZEN_KV_MTP, the first requests with temperature > 0 stalled the server for
over two minutes while ninja built flashinfer's sampling module. SGLang 0.5.17's
own warm-up request is greedy (``temperature: 0``), so nothing before the first
sampled request touches that module, yet both sampled paths need it:
speculative verify (``sgl_kernel.top_k/top_p_renorm_probs`` -> flashinfer) and
the ``flashinfer`` sampling backend (``top_k_top_p_sampling_from_probs``,
``min_p_sampling_from_probs``).

Hook: AFTER ``Scheduler.__init__`` (scheduler process, model loaded, CUDA
graphs captured, before it reports ready), so ``/health`` turns 200 only once
the module is built. Each kernel family runs once on a tiny tensor; on a warm
host (module cached on disk) this costs milliseconds. A failure is logged and
start-up goes on: the first sampled request would then build it as before.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Optional

from sglang_gemma4.registry import Patch

logger = logging.getLogger("sglang_gemma4")

TARGET = "sglang.srt.managers.scheduler.Scheduler.__init__"


def warm_sampling_kernels(device) -> float:
    """Run flashinfer's sampling kernels once on ``device``; returns seconds spent."""
    import torch
    import flashinfer.sampling as fs

    t0 = time.perf_counter()
    probs = torch.softmax(torch.randn(2, 256, device=device, dtype=torch.float32), dim=-1)
    fs.top_k_renorm_probs(probs, 8)
    fs.top_p_renorm_probs(probs, 0.9)
    fs.top_k_top_p_sampling_from_probs(probs, 8, 0.9)
    fs.min_p_sampling_from_probs(probs, 0.05)
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def prewarm_after_init(result, self, *args, **kwargs):
    """AFTER hook: never raises (a missed warm-up must not stop the server)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
        dt = warm_sampling_kernels(device)
        logger.info("flashinfer sampling module ready in %.1f s (built before /health; sglang-gemma4)", dt)
    except Exception as e:
        logger.warning(
            "sglang-gemma4 jit_prewarm: flashinfer sampling warm-up failed (%s: %s); "
            "the first sampled request will build it", type(e).__name__, e,
        )
    return None


class JitPrewarm(Patch):
    name = "jit_prewarm"
    summary = "flashinfer's JIT sampling module is built during start-up (before /health), not by the first sampled request"
    knob = "SGLANG_GEMMA4_JIT_PREWARM"
    default = True
    seed = "- (serving robustness run, issue #18; not in the seed)"
    targets = (TARGET,)

    def upstream(self) -> Optional[str]:
        from sglang.srt.entrypoints import http_server
        from sglang.srt.managers import scheduler

        for mod in (scheduler, http_server):
            if "get_sampling_module" in inspect.getsource(mod):
                return f"{mod.__name__} already builds flashinfer's sampling module at start-up"
        return None

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(TARGET, prewarm_after_init, HookType.AFTER)


PATCH = JitPrewarm()
