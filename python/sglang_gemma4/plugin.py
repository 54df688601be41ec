"""SGLang entry point (``sglang.srt.plugins``: ``gemma4 = sglang_gemma4.plugin:load``).

SGLang calls :func:`load` in every process (launcher, scheduler, detokenizer)
before building ``ServerArgs`` and then applies the registered hooks. The patch
table is logged once per server, by the first process; the processes it spawns
log a one-line summary (errors are logged everywhere).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections import Counter
from typing import List, Optional

from sglang_gemma4 import registry

logger = logging.getLogger("sglang_gemma4")

SERVER_ARGS_INIT = "sglang.srt.server_args.ServerArgs.__post_init__"
SERVER_ARGS_CHECK = "sglang.srt.server_args.ServerArgs.check_server_args"

# The entry point SGLang's load_plugins() looks for (pyproject.toml declares it).
ENTRY_POINT_GROUP = "sglang.srt.plugins"
ENTRY_POINT_NAME = "gemma4"
ENTRY_POINT_VALUE = "sglang_gemma4.plugin:load"

# "<pid>:<digest of its decisions>" of the process that logged the patch table;
# set before SGLang spawns its children, which inherit os.environ.
TABLE_OWNER_ENV = "SGLANG_GEMMA4_TABLE_LOGGED_BY"

_STATUSES: Optional[List[registry.PatchStatus]] = None


def _ensure_log_handler() -> None:
    # SGLang configures its own loggers late (after load_plugins); without a
    # handler our one-line-per-patch INFO report would be lost.
    if not logger.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[sglang-gemma4] %(levelname)s %(message)s"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _stop_startup(error: ValueError) -> None:
    """Make ServerArgs construction/validation raise.

    ``load_plugins()`` catches and only logs exceptions from a plugin entry, so
    raising in :func:`load` alone would let the server start with a knob the
    user believes is set. Both hook points are needed: ``Engine(server_args=...)``
    skips ``__post_init__`` but always calls ``check_server_args``.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    def refuse(*args, **kwargs):
        raise error

    HookRegistry.register(SERVER_ARGS_INIT, refuse, HookType.BEFORE)
    HookRegistry.register(SERVER_ARGS_CHECK, refuse, HookType.BEFORE)


def _error_of(patches, status: registry.PatchStatus) -> ValueError:
    """Re-create the exception behind an ``error`` status (evaluate keeps only text)."""
    patch = next(p for p in patches if p.name == status.name)
    try:
        patch.knob_value()
        patch.validate(os.environ)
    except ValueError as e:
        return e
    return ValueError(status.reason)


def _digest(result: List[registry.PatchStatus]) -> str:
    text = "|".join(f"{s.name},{s.state},{s.knob}={s.value}" for s in result)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _ancestors() -> List[int]:
    out, pid = [], os.getppid()
    for _ in range(64):
        if pid <= 1:
            break
        out.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # no /proc: direct parent only
            break
    return out


def _table_owner(result: List[registry.PatchStatus]) -> Optional[int]:
    """Pid of the ancestor that already logged this very table, else None.

    Only multiprocessing children qualify (SGLang's scheduler/detokenizer): a
    server started by ``subprocess`` from a process that loaded the plugin is a
    server of its own and logs its table; so does a child that decided differently.
    """
    raw = os.environ.get(TABLE_OWNER_ENV, "")
    pid, _, digest = raw.partition(":")
    if multiprocessing.parent_process() is None or digest != _digest(result):
        return None
    try:
        owner = int(pid)
    except ValueError:
        return None
    return owner if owner in _ancestors() else None


def _log_result(result: List[registry.PatchStatus]) -> None:
    owner = _table_owner(result)
    if owner is None:
        for s in result:
            logger.info("patch %-22s %-11s %s=%s: %s", s.name, s.state, s.knob, s.value, s.reason)
        os.environ[TABLE_OWNER_ENV] = f"{os.getpid()}:{_digest(result)}"
        return
    counts = Counter(s.state for s in result)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    logger.info("sglang-gemma4: %s (patch table logged by pid %d)", summary, owner)


def statuses() -> Optional[List[registry.PatchStatus]]:
    """Statuses decided by the last :func:`load` in this process (None before)."""
    return _STATUSES


def load() -> List[registry.PatchStatus]:
    global _STATUSES
    if _STATUSES is not None:  # SGLang may call us more than once per process
        return _STATUSES
    _ensure_log_handler()
    patches = registry.all_patches()
    result = [registry.evaluate(p) for p in patches]
    errors = [s for s in result if s.state == registry.ERROR]
    if errors:
        for s in errors:
            logger.error("sglang-gemma4: %s -- refusing to start", s.reason)
        first = _error_of(patches, errors[0])
        _stop_startup(first)
        _STATUSES = result
        raise first
    result = [registry.apply(p, s) for p, s in zip(patches, result)]
    _log_result(result)
    _STATUSES = result
    return result
