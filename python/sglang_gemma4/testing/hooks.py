"""Apply one patch's hooks for the duration of a test, then restore SGLang.

``HookRegistry.apply_hooks`` patches process-wide and has no undo; tests that
compare patched against unpatched SGLang in one process need both states.
"""

from __future__ import annotations

import contextlib
import pkgutil
from typing import Iterator, Mapping, Optional

from sglang_gemma4 import registry

_MISSING = object()


@contextlib.contextmanager
def patch_applied(patch: registry.Patch, environ: Optional[Mapping[str, str]] = None) -> Iterator[registry.PatchStatus]:
    """Register + apply ``patch``'s hooks (if it evaluates active), restore on exit.

    Yields the patch's status; when it is not active nothing is applied.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry

    env = {} if environ is None else environ
    status = registry.evaluate(patch, env)
    saved = []
    before = {t: list(h) for t, h in HookRegistry._hooks.items()}
    patched_before = set(HookRegistry._patched)
    try:
        status = registry.apply(patch, status, env)
        targets = [t for t in HookRegistry._hooks if len(HookRegistry._hooks[t]) != len(before.get(t, []))]
        for t in targets:
            obj_path, attr = t.rsplit(".", 1)
            obj = pkgutil.resolve_name(obj_path)
            raw = obj.__dict__.get(attr, _MISSING) if isinstance(obj, type) else getattr(obj, attr, _MISSING)
            saved.append((obj, attr, raw))
            # only this patch's hooks: apply on a fresh slate for the target
            HookRegistry._patched.discard(t)
            others = before.get(t, [])
            mine = HookRegistry._hooks[t][len(others):]
            HookRegistry._hooks[t] = mine
            HookRegistry._apply_target(t, mine)
            HookRegistry._hooks[t] = others + mine
        yield status
    finally:
        for obj, attr, raw in reversed(saved):
            if raw is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, raw)
        HookRegistry._hooks.clear()
        HookRegistry._hooks.update(before)
        HookRegistry._patched.clear()
        HookRegistry._patched.update(patched_before)
