"""Strict environment knobs.

A typo in a knob must not silently fall back to a default: a user who writes
``SGLANG_GEMMA4_YOCO=flase`` wants to know at start-up, not after a benchmark.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

TRUE_VALUES = ("1", "true", "on")
FALSE_VALUES = ("0", "false", "off")
ALLOWED = TRUE_VALUES + FALSE_VALUES


class KnobError(ValueError):
    """An environment knob holds a value outside the allowed set."""

    def __init__(self, name: str, value: str):
        self.name = name
        self.value = value
        super().__init__(
            f"invalid value {value!r} for environment variable {name}; "
            f"allowed values (case-insensitive): {', '.join(ALLOWED)}"
        )


def parse_bool(name: str, raw: Optional[str]) -> Optional[bool]:
    """``None`` when unset or empty, else True/False; raises :class:`KnobError`."""
    if raw is None or raw.strip() == "":
        return None
    v = raw.strip().lower()
    if v in TRUE_VALUES:
        return True
    if v in FALSE_VALUES:
        return False
    raise KnobError(name, raw)


def read_bool(name: str, environ: Optional[Mapping[str, str]] = None) -> Optional[bool]:
    env = os.environ if environ is None else environ
    return parse_bool(name, env.get(name))
