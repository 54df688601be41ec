"""Answer bad multimodal input (unloadable items, more items than placeholders) with HTTP 400.

Found on the H200 (real ``launch_server``, Gemma-4 multimodal, ``/generate`` with
``input_ids`` + ``image_data``):

- a truncated PNG or a missing file path got HTTP 500 "Internal Server Error"
  with no message: SGLang 0.5.17's ``load_mm_data`` paths (``fast_load_mm_data``
  when item and placeholder counts match, ``legacy_load_mm_data`` otherwise)
  re-raise every loader failure that is not a ``ValueError`` as
  ``RuntimeError("An exception occurred while loading ...")``, and the HTTP layer
  turns only ``ValueError`` into a 400;
- two images for a prompt with one image placeholder got 200: the legacy path
  consumes one item per placeholder and drops the rest without a word.

Hook: AROUND ``BaseMultimodalProcessor.load_mm_data`` (async). Loader failures
become ``ValueError`` naming the field; other exceptions pass through unchanged
(server bugs stay 500s). After a successful load, an ``images``/``videos``/
``audios`` list shorter than the non-None items given is rejected.
"""

from __future__ import annotations

import inspect
import re
from typing import Optional

from sglang_gemma4.registry import Patch

TARGET = "sglang.srt.multimodal.processors.base_processor.BaseMultimodalProcessor.load_mm_data"

_LOAD_ERROR = "An exception occurred while loading"
# upstream still wraps loader errors in RuntimeError (0.5.17: both load paths)
_UPSTREAM_WRAP = re.compile(r'raise\s+RuntimeError\(\s*f?"An exception occurred while loading')

# (request field, output list, noun); the fast path names the modality in its message
_FIELDS = (("image_data", "images", "image"), ("video_data", "videos", "video"), ("audio_data", "audios", "audio"))
_MODALITY_FIELD = {"IMAGE": "image_data", "VIDEO": "video_data", "AUDIO": "audio_data"}


def _count(items) -> int:
    if not items:
        return 0
    if not isinstance(items, (list, tuple)):
        return 1
    return sum(x is not None for x in items)


def _failed_field(message: str, given) -> str:
    m = re.match(_LOAD_ERROR + r" (IMAGE|VIDEO|AUDIO) data", message)
    if m:
        return _MODALITY_FIELD[m.group(1)]
    return "/".join(given) or "multimodal data"


async def check_load_mm_data(original, self, *args, **kwargs):
    """AROUND hook: loader failures become ValueError (400); surplus items are rejected."""
    try:
        bound = inspect.signature(original).bind(self, *args, **kwargs).arguments
    except TypeError:
        bound = kwargs  # let the original raise its own TypeError below
    given = [f for f, _, _ in _FIELDS if _count(bound.get(f))]
    try:
        out = await original(self, *args, **kwargs)
    except RuntimeError as e:
        msg = str(e)
        if not msg.startswith(_LOAD_ERROR):
            raise
        if isinstance(e.__context__, StopIteration) and "/".join(given):
            # legacy path: a placeholder with no item left
            raise ValueError(
                f"{'/'.join(given)}: the prompt has more multimodal placeholders than items given"
            ) from e
        raise ValueError(f"{_failed_field(msg, given)}: could not load item: {msg}") from e
    except OSError as e:
        raise ValueError(f"{_failed_field('', given)}: could not load item: {e}") from e
    for field, attr, noun in _FIELDS:
        n = _count(bound.get(field))
        if not n or not hasattr(out, attr):
            continue
        m = len(getattr(out, attr) or [])
        if m < n:
            raise ValueError(f"{field} has {n} {noun}s but the prompt has {m} {noun} placeholders")
    return out


class MmInputCheck(Patch):
    name = "mm_input_check"
    summary = "multimodal requests with unloadable items (truncated/missing image files) or more items than placeholders get HTTP 400 (SGLang 0.5.17 answers 500 or silently drops the extra items)"
    knob = "SGLANG_GEMMA4_MM_INPUT_CHECK"
    default = True
    seed = "- (serving robustness run on the H200; not in the seed)"
    targets = (TARGET,)

    def upstream(self) -> Optional[str]:
        from sglang.srt.multimodal.processors.base_processor import BaseMultimodalProcessor as P

        srcs = [
            inspect.getsource(inspect.unwrap(getattr(P, n)))
            for n in ("fast_load_mm_data", "legacy_load_mm_data")
            if hasattr(P, n)
        ]
        if not any(_UPSTREAM_WRAP.search(s) for s in srcs):
            return "SGLang's load_mm_data no longer wraps loader errors in RuntimeError"
        return None

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(TARGET, check_load_mm_data, HookType.AROUND)


PATCH = MmInputCheck()
