"""FROZEN_KV_MTP scheduling mode: overlap (spec v2) or synchronous.

Seed PR #24 ("FROZEN_KV_MTP spec-v2 scaffolding") added SGLANG_FROZEN_KV_MTP_V2
because its SGLang forced ``disable_overlap_schedule=True`` for FROZEN_KV_MTP
and had no spec-v2 worker (the seed's v2 class was a scaffold that refused to start).

SGLang 0.5.17 changed the ground: ``SpeculativeAlgorithm.create_worker``
always returns ``FrozenKVMTPWorkerV2`` ("V2 worker drives both overlap and
non-overlap"), ``_handle_frozen_kv_mtp`` no longer touches
``disable_overlap_schedule`` (nor applies the CPU overlap rule the EAGLE family
gets), and the scheduler picks ``event_loop_overlap`` vs ``event_loop_normal``
from ``disable_overlap_schedule`` alone. So overlap is already SGLang's default
for FROZEN_KV_MTP and the knob only chooses the mode explicitly:

* unset: SGLang's decision, untouched.
* ``1``: FROZEN_KV_MTP must run the overlap schedule; when this configuration
  disables overlap (``--disable-overlap-schedule``, pp_size > 1, ...) start-up
  stops with an error instead of silently running synchronously.
* ``0``: declare ``disable_overlap_schedule=True`` for FROZEN_KV_MTP, the
  synchronous V2 path (the seed's conservative default).

Mechanism: an AFTER hook on ``_handle_frozen_kv_mtp`` (SGLang's per-algorithm
server-args hook) declares the field through SGLang's own post-process pass
machinery (``run_post_process_pass``), and a BEFORE hook on
``ServerArgs.check_server_args`` re-checks the materialized result (rules that
run after the speculative hook, or ``ServerArgs`` built before plugins loaded)
and logs the effective mode once.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from sglang_gemma4.registry import Patch

logger = logging.getLogger("sglang_gemma4")

HANDLE_FROZEN_KV_MTP = "sglang.srt.arg_groups.speculative_hook._handle_frozen_kv_mtp"
CHECK_SERVER_ARGS = "sglang.srt.server_args.ServerArgs.check_server_args"

KNOB = "SGLANG_FROZEN_KV_MTP_V2"
OVERLAP = "overlap"
SYNC = "sync"
ALGORITHM = "FROZEN_KV_MTP"

_logged = False


class OverlapUnavailableError(ValueError):
    """SGLANG_FROZEN_KV_MTP_V2=1 but this configuration disables overlap."""


def _overlap_error() -> OverlapUnavailableError:
    return OverlapUnavailableError(
        f"{KNOB}=1 asks FROZEN_KV_MTP to run the spec-v2 overlap schedule, but "
        "overlap is disabled in this configuration (disable_overlap_schedule=True: "
        "--disable-overlap-schedule was given, or an SGLang rule turned overlap off, "
        "e.g. pp_size > 1). Drop --disable-overlap-schedule / the conflicting option, "
        f"or set {KNOB}=0 (synchronous) or unset it (SGLang's default)."
    )


def _mode_pass(mode: str):
    def frozen_kv_mtp_overlap_mode(view: Any) -> dict:
        if mode == SYNC and not view.disable_overlap_schedule:
            return {"disable_overlap_schedule": True}
        if mode == OVERLAP and view.disable_overlap_schedule:
            raise _overlap_error()
        return {}

    return frozen_kv_mtp_overlap_mode


def apply_mode(server_args: Any, mode: Optional[str]) -> None:
    """Declare/verify the FROZEN_KV_MTP overlap mode on ``server_args``.

    Goes through ``run_post_process_pass``: mid-resolution it stashes the
    declaration (materialized at the end of ``__post_init__``), afterwards it
    writes through -- SGLang's own path for resolved fields.
    """
    from sglang.srt.arg_groups.overrides import run_post_process_pass

    if mode is None or server_args.speculative_algorithm != ALGORITHM:
        return
    run_post_process_pass(server_args, _mode_pass(mode))


def _log_effective(server_args: Any, mode: Optional[str]) -> None:
    global _logged
    if _logged or server_args.speculative_algorithm != ALGORITHM:
        return
    _logged = True
    overlap = not server_args.disable_overlap_schedule
    logger.info(
        "FROZEN_KV_MTP runs %s (%s=%s)",
        "the spec-v2 overlap schedule" if overlap else "synchronously (no overlap)",
        KNOB,
        {None: "unset: SGLang's default", OVERLAP: "1", SYNC: "0"}[mode],
    )


def _mode(value):
    return None if value is None else (OVERLAP if value else SYNC)


class FrozenKvMtpV2(Patch):
    name = "frozen_kv_mtp_v2"
    summary = (
        "FROZEN_KV_MTP scheduling: unset = SGLang's default (overlap unless "
        "--disable-overlap-schedule); 1 = require the spec-v2 overlap schedule "
        "(start-up error if overlap is disabled); 0 = synchronous (disable_overlap_schedule=True)"
    )
    knob = KNOB
    default = None
    seed = "PR #24 FROZEN_KV_MTP spec-v2 scaffolding (env knob + dispatch)"
    targets = (HANDLE_FROZEN_KV_MTP, CHECK_SERVER_ARGS)

    def detail(self, value) -> str:
        value = _mode(value)
        if value == OVERLAP:
            return "FROZEN_KV_MTP must run the spec-v2 overlap schedule (start-up error if overlap is disabled)"
        if value == SYNC:
            return "FROZEN_KV_MTP runs synchronously (disable_overlap_schedule=True)"
        return "FROZEN_KV_MTP: SGLang 0.5.17's default, spec-v2 overlap unless --disable-overlap-schedule"

    def register(self, value) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        mode = _mode(value)

        def after_handle_frozen_kv_mtp(result, server_args, *args, **kwargs):
            apply_mode(server_args, mode)
            return result

        def before_check_server_args(server_args, *args, **kwargs):
            apply_mode(server_args, mode)
            _log_effective(server_args, mode)
            return None

        self.hook(HANDLE_FROZEN_KV_MTP, after_handle_frozen_kv_mtp, HookType.AFTER)
        self.hook(CHECK_SERVER_ARGS, before_check_server_args, HookType.BEFORE)


PATCH = FrozenKvMtpV2()
