"""Patch registry: one :class:`Patch` per module under ``sglang_gemma4.patches``.

Every patch declares its knob, an upstream check and the SGLang targets it
hooks. ``evaluate`` decides a patch's state without touching SGLang's hook
table; ``apply`` registers the hooks of the active ones through SGLang's
``HookRegistry`` (the only way this plugin changes SGLang code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import inspect
import logging
import os
import pkgutil
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from sglang_gemma4 import SUPPORTED_SGLANG_VERSIONS
from sglang_gemma4.knobs import parse_bool

logger = logging.getLogger("sglang_gemma4")

ACTIVE = "active"  # hooks registered
DISABLED = "disabled"  # knob off (or unset for tri-state knobs)
UPSTREAM = "upstream"  # installed SGLang already does it; we stand down
UNAVAILABLE = "unavailable"  # target missing / SGLang version unsupported
ERROR = "error"  # knob value invalid: start-up is stopped
EXCLUDED = "excluded"  # SGLang would not load the plugin at all (status only)


class SettingError(ValueError):
    """A patch's extra setting (beyond its on/off knob) holds a bad value.

    Same ``name``/``value`` attributes as :class:`~sglang_gemma4.knobs.KnobError`,
    so an ``error`` status shows the variable that is wrong, not the patch's knob.
    """

    def __init__(self, name: str, value: Optional[str], message: str):
        self.name = name
        self.value = value
        super().__init__(message)


@dataclasses.dataclass
class PatchStatus:
    name: str
    summary: str
    knob: str
    value: str  # what the knob resolved to, e.g. "1 (default)" or "0"
    state: str
    reason: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Patch:
    """Base class. Subclasses set the class attributes and implement ``register``.

    ``default`` is the knob's value when unset; ``None`` makes a tri-state knob
    (unset means "leave SGLang's own behaviour alone").
    """

    name: str = ""
    summary: str = ""
    knob: str = ""
    default: Optional[bool] = True
    seed: str = ""  # seed commit this patch comes from
    targets: Tuple[str, ...] = ()  # dotted SGLang paths the hooks need

    def __init__(self) -> None:
        self._pending: List[Tuple[str, Callable, object]] = []

    # -- overridable -------------------------------------------------------
    def upstream(self) -> Optional[str]:
        """Reason string when the installed SGLang already does this patch."""
        return None

    def unavailable(self) -> Optional[str]:
        """Reason the patch cannot apply although its targets exist (e.g. the
        code it re-states changed), else None."""
        return None

    def validate(self, environ: Mapping[str, str]) -> None:
        """Check the patch's extra settings (beyond its on/off knob).

        Raise :class:`SettingError` (or a ``ValueError`` naming the variable, the
        value and what is allowed); the patch then reports ``error`` and start-up
        is refused, like a bad knob.
        """

    def register(self, value: Optional[bool]) -> None:  # pragma: no cover - abstract
        """Declare hooks with :meth:`hook` (and SGLang registries if needed)."""
        raise TypeError(f"patch {self.name} does not implement register()")

    def detail(self, value: Optional[bool]) -> str:
        """Extra words for the status line of an active/disabled patch."""
        return ""

    # -- helpers -----------------------------------------------------------
    def hook(self, target: str, fn: Callable, hook_type) -> None:
        if target not in self.targets:
            raise ValueError(f"{self.name}: hook target {target} not declared in targets")
        self._pending.append((target, fn, hook_type))

    def knob_value(self, environ: Optional[Mapping[str, str]] = None) -> Optional[bool]:
        env = os.environ if environ is None else environ
        v = parse_bool(self.knob, env.get(self.knob))
        return self.default if v is None else v


class _ImportFailed(Patch):
    knob = "-"
    summary = "(patch module failed to import)"
    seed = "-"

    def __init__(self, name: str, error: str) -> None:
        super().__init__()
        self.name = name
        self.import_error = error

    def knob_value(self, environ=None):
        return True


def resolve_target(path: str):
    """Resolve a dotted path the way ``HookRegistry`` will (module.attr...)."""
    obj_path, attr = path.rsplit(".", 1)
    obj = pkgutil.resolve_name(obj_path)
    return getattr(obj, attr)


def missing_targets(targets: Sequence[str]) -> List[str]:
    out = []
    for t in targets:
        try:
            resolve_target(t)
        except Exception as e:  # ImportError, AttributeError, anything a module raises
            out.append(f"{t} ({type(e).__name__}: {e})")
    return out


def source_of(fn) -> str:
    return inspect.getsource(inspect.unwrap(fn))


def source_pin_reason(src: str, expected_sha256: str, label: str, relies: str) -> Optional[str]:
    """Why a patch that re-states or relies on SGLang code must stand down: ``src`` (the code as
    installed) is not the 0.5.17 source the patch was written against. None when it is."""
    got = hashlib.sha256(src.encode()).hexdigest()
    if got == expected_sha256:
        return None
    return f"{label} is not SGLang 0.5.17's (source sha256 {got[:12]}... != {expected_sha256[:12]}...); {relies}"


def sglang_version() -> Optional[str]:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def all_patches() -> List[Patch]:
    import sglang_gemma4.patches as pkg

    patches = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        modname = f"{pkg.__name__}.{info.name}"
        try:
            patch = getattr(importlib.import_module(modname), "PATCH", None)
            if not isinstance(patch, Patch):
                raise TypeError(f"{modname} must define PATCH = <Patch subclass>()")
        except Exception as e:  # one broken module must not take the others down
            patch = _ImportFailed(info.name, f"{type(e).__name__}: {e}")
        patches.append(patch)
    return patches


def _fmt_value(patch: Patch, environ: Mapping[str, str]) -> str:
    raw = environ.get(patch.knob)
    if raw is None or raw.strip() == "":
        d = "unset" if patch.default is None else ("1" if patch.default else "0")
        return f"{d} (default)"
    return raw


def evaluate(
    patch: Patch,
    environ: Optional[Mapping[str, str]] = None,
    version: Optional[str] = None,
    check_targets: bool = True,
) -> PatchStatus:
    env = os.environ if environ is None else environ
    version = sglang_version() if version is None else version

    def st(state: str, reason: str) -> PatchStatus:
        return PatchStatus(patch.name, patch.summary, patch.knob, _fmt_value(patch, env), state, reason)

    if isinstance(patch, _ImportFailed):
        return st(UNAVAILABLE, f"patch module failed to import: {patch.import_error}")
    try:
        value = patch.knob_value(env)
        if value is not None and (value or patch.default is None):
            patch.validate(env)
    except ValueError as e:  # KnobError included
        bad = st(ERROR, str(e))
        var = getattr(e, "name", None)
        if isinstance(var, str) and var:  # KnobError / SettingError say which variable
            raw = getattr(e, "value", None)
            bad.knob, bad.value = var, "unset" if raw is None else str(raw)
        return bad
    if version not in SUPPORTED_SGLANG_VERSIONS:
        return st(
            UNAVAILABLE,
            f"SGLang {version} is not supported (supported: {', '.join(SUPPORTED_SGLANG_VERSIONS)})",
        )
    # tri-state knobs (default None): 0 is a mode of its own, only unset stands down
    if value is None or (value is False and patch.default is not None):
        why = "knob unset: SGLang's own behaviour" if value is None else "turned off by knob"
        extra = patch.detail(value)
        return st(DISABLED, f"{why}; {extra}" if extra else why)
    if check_targets:
        missing = missing_targets(patch.targets)
        if missing:
            return st(UNAVAILABLE, "hook target missing: " + "; ".join(missing))
    try:
        why = patch.unavailable()
    except Exception as e:
        why = f"availability check failed: {type(e).__name__}: {e}"
    if why:
        return st(UNAVAILABLE, why)
    try:
        up = patch.upstream()
    except Exception as e:
        return st(UNAVAILABLE, f"upstream check failed: {type(e).__name__}: {e}")
    if up:
        return st(UPSTREAM, up)
    return st(ACTIVE, patch.detail(value) or patch.summary)


def apply(patch: Patch, status: PatchStatus, environ: Optional[Mapping[str, str]] = None) -> PatchStatus:
    """Register an active patch's hooks; a failure marks only this patch unavailable."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    if status.state != ACTIVE:
        return status
    patch._pending = []
    try:
        patch.register(patch.knob_value(environ))
    except Exception as e:
        patch._pending = []
        return dataclasses.replace(
            status, state=UNAVAILABLE, reason=f"register failed: {type(e).__name__}: {e}"
        )
    for target, fn, hook_type in patch._pending:
        HookRegistry.register(target, fn, hook_type)
    patch._pending = []
    return status
