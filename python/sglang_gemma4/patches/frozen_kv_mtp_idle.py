"""FROZEN_KV_MTP idle draft: build the empty verify input SGLang 0.5.17 means to build, instead of a TypeError.

Not from the seed series: found reading 0.5.17 for issue #19 (session 11). ``FrozenKVMTPDraftWorker.draft``
answers an idle batch with ``FrozenKVMTPVerifyInput.create_idle_input(topk, steps, num_draft_tokens)``.
``EagleVerifyInput.create_idle_input`` also requires ``device``, so the call raises
``TypeError: ... missing 1 required positional argument: 'device'``. That takes the scheduler down on the first
idle batch. Idle batches are what a data-parallel-attention rank without requests runs
(``--enable-dp-attention``). EAGLE v2's own idle path (``eagle_worker_v2._build_trivial_verify_input``) passes
``device=self.device``.

Hook: AROUND ``FrozenKVMTPDraftWorker.draft``. An idle batch gets the same call with ``device=self.device``.
Every other batch goes to SGLang's draft, or to the ``mtp_draft_no_sync`` hook when that is on. The upstream
check reads the idle branch's source: once it passes ``device``, the patch stands down.

Default on: the branch it replaces can only raise. Only CPU-tested: the engine path through an idle rank needs
DP attention, i.e. two GPUs (issue #22, blocked here).
"""

from __future__ import annotations

import logging
from typing import Optional

from sglang_gemma4.registry import Patch, source_of

logger = logging.getLogger("sglang_gemma4")

MODULE = "sglang.srt.speculative.frozen_kv_mtp_worker_v2"
TARGET = MODULE + ".FrozenKVMTPDraftWorker.draft"
FIRED = "FROZEN_KV_MTP idle draft: empty verify input built with the worker's device (sglang-gemma4)"
_announced = [False]


def draft(original, worker, batch):
    """AROUND hook: only the idle branch changes."""
    if not batch.forward_mode.is_idle():
        return original(worker, batch)
    from sglang.srt.speculative import frozen_kv_mtp_worker_v2 as m  # the class the original names

    if not _announced[0]:
        _announced[0] = True
        logger.info(FIRED)
    return m.FrozenKVMTPVerifyInput.create_idle_input(
        worker.topk, worker.speculative_num_steps, worker.speculative_num_draft_tokens, device=worker.device)


def _idle_branch() -> str:
    from sglang.srt.speculative.frozen_kv_mtp_worker_v2 import FrozenKVMTPDraftWorker

    src = source_of(FrozenKVMTPDraftWorker.draft)
    start = src.find("is_idle()")
    return src[start:src.find("spec_info = batch.spec_info", start)] if start >= 0 else ""


class FrozenKvMtpIdle(Patch):
    name = "frozen_kv_mtp_idle"
    summary = ("FROZEN_KV_MTP draft of an idle batch (DP-attention ranks) builds its empty verify input "
               "(SGLang 0.5.17 omits the device argument and raises TypeError)")
    knob = "SGLANG_GEMMA4_FROZEN_KV_MTP_IDLE"
    default = True
    seed = "- (found reading 0.5.17 for issue #19; not in the seed)"
    targets = (TARGET,)

    def unavailable(self) -> Optional[str]:
        branch = _idle_branch()
        if "FrozenKVMTPVerifyInput.create_idle_input(" not in branch:
            return "FrozenKVMTPDraftWorker.draft no longer answers idle batches with create_idle_input"
        return None

    def upstream(self) -> Optional[str]:
        if "device" in _idle_branch():
            return "FrozenKVMTPDraftWorker.draft passes device to create_idle_input"
        return None

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(TARGET, draft, HookType.AROUND)


PATCH = FrozenKvMtpIdle()
