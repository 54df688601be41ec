"""Scheduler guards: merge/filter a ScheduleBatch whose spec_info is verify-stage.

Seed PR #22 (FROZEN_KV_MTP zero-accept fix): the v1 worker could leave a
``FrozenKVMTPVerifyInput`` on ``batch.spec_info``; the next
``ScheduleBatch.merge_batch`` then died with ``AttributeError:
'FrozenKVMTPVerifyInput' object has no attribute 'merge_batch'`` (verify
inputs implement neither ``merge_batch`` nor ``filter_batch``).

SGLang 0.5.17 (checked): the normal paths can no longer reach that state.
Every spec algorithm runs a V2 worker inside ``Scheduler._forward_isolation``,
which snapshots all ScheduleBatch fields and restores them in a ``finally``,
after which the scheduler installs ``batch_result.next_draft_input`` (a
draft-stage input: ``FrozenKVMTPWorkerV2`` always builds it via
``_build_seed_draft_input`` / ``_idle_seed``). The guard stays as cheap
insurance for plugin/custom spec workers and future regressions; it logs once
when it fires.

What the guard does (a verify-stage input is consumed state: it carries no
per-request draft seed for the next iteration):

* ``filter_batch``: filter everything else, leave the stale object untouched
  (it has nothing row-aligned to filter).
* ``merge_batch``: merge everything else; the merged ``spec_info`` is
  - in overlap mode (the surviving draft input relays through the FutureMap,
    ``future_indices`` set), that draft input with ``future_indices`` = the
    merged ``req_pool_indices``. The scheduler sets ``future_indices =
    batch.req_pool_indices`` and the FutureMap holds every request's seed
    under its pool index, so this is what an unpatched merge of two draft
    inputs yields;
  - when every request on the stale side has finished (the seed's case: "no
    request survives to the next draft"), the other side's draft input with
    placeholder rows for those requests (built with SGLang's own
    ``filter_batch``/``merge_batch``) so rows stay aligned; the scheduler's
    next ``filter_batch`` drops the finished requests, and their rows, before
    any forward reads them;
  - otherwise ``None`` with a warning: live requests whose draft seed exists
    nowhere (synchronous mode) cannot be given a correct one, and a
    misaligned spec_info would be worse than SGLang's explicit "no draft
    state".
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from sglang_gemma4.registry import Patch

logger = logging.getLogger("sglang_gemma4")

MERGE_BATCH = "sglang.srt.managers.schedule_batch.ScheduleBatch.merge_batch"
FILTER_BATCH = "sglang.srt.managers.schedule_batch.ScheduleBatch.filter_batch"

_warned = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key in _warned:
        return
    _warned.add(key)
    logger.warning(msg, *args)


def _stale(spec_info: Any, method: str) -> bool:
    return spec_info is not None and not callable(getattr(spec_info, method, None))


def guarded_filter_batch(original, batch, *args, **kwargs):
    stale = batch.spec_info
    if not _stale(stale, "filter_batch"):
        return original(batch, *args, **kwargs)
    _warn_once(
        "filter",
        "ScheduleBatch.filter_batch: spec_info is a %s (verify stage, no filter_batch); "
        "filtering the batch and leaving it untouched (sglang-gemma4 scheduler guard)",
        type(stale).__name__,
    )
    batch.spec_info = None
    try:
        return original(batch, *args, **kwargs)
    finally:
        batch.spec_info = stale


def _placeholder_rows(valid: Any, n: int) -> Any:
    """``n`` rows shaped like ``valid``'s (copies of its row 0), via SGLang's filter_batch."""
    import copy

    import torch

    pad = copy.copy(valid)
    pad.filter_batch(new_indices=torch.zeros(n, dtype=torch.int64, device=valid.topk_index.device))
    return pad


def _merged_spec_info(batch, mine, theirs, mine_reqs, theirs_reqs) -> Optional[Any]:
    mine_stale = _stale(mine, "merge_batch")
    theirs_stale = _stale(theirs, "merge_batch")
    if mine_stale and theirs_stale:
        valid, stale_reqs = None, mine_reqs + theirs_reqs
    elif mine_stale:
        valid, stale_reqs = theirs, mine_reqs
    else:
        valid, stale_reqs = mine, theirs_reqs
    if not stale_reqs:
        return valid
    if valid is not None and getattr(valid, "future_indices", None) is not None:
        valid.future_indices = batch.req_pool_indices
        # the stale side's DSA top-k seeds are unknown: SGLang's "unavailable" path
        valid.future_dsa_topk_indices_available = False
        return valid
    rows = getattr(valid, "topk_index", None)
    if all(r.finished() for r in stale_reqs) and rows is not None and len(rows) > 0:
        pad = _placeholder_rows(valid, len(stale_reqs))
        if mine_stale:
            pad.merge_batch(valid)
            return pad
        valid.merge_batch(pad)
        return valid
    _warn_once(
        "merge-drop",
        "ScheduleBatch.merge_batch: %d live request(s) carry a verify-stage spec_info and "
        "no draft seed; merged spec_info set to None (sglang-gemma4 scheduler guard)",
        len(stale_reqs),
    )
    return None


def guarded_merge_batch(original, batch, other, *args, **kwargs):
    mine, theirs = batch.spec_info, getattr(other, "spec_info", None)
    if not (_stale(mine, "merge_batch") or _stale(theirs, "merge_batch")):
        return original(batch, other, *args, **kwargs)
    _warn_once(
        "merge",
        "ScheduleBatch.merge_batch: spec_info %s + %s includes a verify-stage input "
        "without merge_batch; merging without it (sglang-gemma4 scheduler guard)",
        type(mine).__name__,
        type(theirs).__name__,
    )
    mine_reqs, theirs_reqs = list(batch.reqs), list(other.reqs)
    batch.spec_info = None  # the original then skips its spec_info merge
    try:
        result = original(batch, other, *args, **kwargs)
    except BaseException:
        batch.spec_info = mine
        raise
    batch.spec_info = _merged_spec_info(batch, mine, theirs, mine_reqs, theirs_reqs)
    return result


class SchedulerGuards(Patch):
    name = "scheduler_guards"
    summary = (
        "ScheduleBatch.merge_batch/filter_batch tolerate a stale verify-stage spec_info "
        "(seed crash: 'FrozenKVMTPVerifyInput' has no 'merge_batch'); logs once when it fires"
    )
    knob = "SGLANG_GEMMA4_SCHEDULER_GUARDS"
    default = True
    seed = "PR #22 FROZEN_KV_MTP zero-accept fix, part 2 (merge/filter hasattr guards)"
    targets = (MERGE_BATCH, FILTER_BATCH)

    def detail(self, value: Optional[bool]) -> str:
        if value:
            return "guards armed (0.5.17's _forward_isolation normally keeps verify inputs off ScheduleBatch)"
        return ""

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        # AROUND: the spec_info must be detached before the original touches it.
        self.hook(MERGE_BATCH, guarded_merge_batch, HookType.AROUND)
        self.hook(FILTER_BATCH, guarded_filter_batch, HookType.AROUND)


PATCH = SchedulerGuards()
