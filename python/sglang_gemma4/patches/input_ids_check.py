"""Reject out-of-vocabulary and malformed ``input_ids`` with HTTP 400, before scheduling.

Found by the serving robustness run (issue #18): SGLang 0.5.17 lets token ids
outside ``[0, vocab_size)`` reach the embedding kernel, and one request with
``"input_ids": [2, 99999999]`` kills the server with a device-side assert (the
CUDA context is lost, every other request with it). 0.5.17 even has a checker,
``TokenizerManager._validate_input_ids_in_vocab``, but nothing calls it, and it
would miss negative ids.

Hook: BEFORE ``TokenizerManager._validate_one_request`` -- the per-request
check every ``/generate``, OpenAI and ``Engine.generate`` request passes
(single and batch), where a ``ValueError`` already becomes a 400 naming the
problem. Requests with ``input_embeds`` carry no ids to check.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Optional, Sequence

from sglang_gemma4.registry import Patch

TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"

_SHOW = 3  # offending positions named in the message


class InvalidInputIdsError(ValueError):
    """A request's ``input_ids`` cannot be embedded (the HTTP layer answers 400)."""


def check_input_ids(input_ids: Optional[Sequence[Any]], vocab_size: int) -> None:
    """Raise :class:`InvalidInputIdsError` unless every id is an int in ``[0, vocab_size)``."""
    if input_ids is None:
        return
    if len(input_ids) == 0:
        raise InvalidInputIdsError("input_ids is empty: a request needs at least one token")
    bad = []
    for i, t in enumerate(input_ids):
        # numpy ints are Integral (Engine callers); bool is too, but JSON true/false as a token is a client bug
        ok = isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab_size
        if not ok:
            bad.append((i, t))
            if len(bad) > _SHOW:
                break
    if not bad:
        return
    shown = ", ".join(f"input_ids[{i}]={t!r}" for i, t in bad[:_SHOW])
    more = " (and more)" if len(bad) > _SHOW else ""
    raise InvalidInputIdsError(
        f"invalid token id: {shown}{more}; token ids must be integers in [0, {vocab_size}) "
        f"(the model's vocab_size)"
    )


def validate_before(self, obj, input_ids=None, *args, **kwargs):
    """BEFORE hook: SGLang's own length checks run only if the ids are valid."""
    if getattr(obj, "input_embeds", None) is None:
        check_input_ids(input_ids, self.model_config.vocab_size)
    return None


class InputIdsCheck(Patch):
    name = "input_ids_check"
    summary = "requests with out-of-vocab, negative, non-integer or empty input_ids get HTTP 400 (SGLang 0.5.17 passes them to the embedding kernel, whose assert takes the server down)"
    knob = "SGLANG_GEMMA4_INPUT_IDS_CHECK"
    default = True
    seed = "- (serving robustness run, issue #18; not in the seed)"
    targets = (TARGET,)

    def upstream(self) -> Optional[str]:
        from sglang.srt.managers.tokenizer_manager import TokenizerManager

        src = inspect.getsource(inspect.unwrap(TokenizerManager._validate_one_request))
        if "vocab_size" in src or "_validate_input_ids_in_vocab(" in src:
            return "SGLang's TokenizerManager._validate_one_request already range-checks input_ids"
        return None

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(TARGET, validate_before, HookType.BEFORE)


PATCH = InputIdsCheck()
