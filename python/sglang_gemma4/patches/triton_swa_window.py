"""Triton SWA decode window: ``sliding_window`` keys, not one fewer, for Gemma-4.

Not from the seed series: found by the fp32 cross-check of the H200 suite
(``runs/numerics-calibration.md``, ``bench/numerics_calibration.py``); upstream
report: sgl-project/sglang#32087 (closed unmerged).

Gemma-4 gives SGLang an exclusive radius ``sws = config.sliding_window - 1``
(``models/gemma4_causal.py``, ``gemma4_mtp.py``): a query at position p attends
keys [p - sws, p], i.e. sws + 1 = ``sliding_window`` keys (what HF and
flashinfer decode do). SGLang 0.5.17's ``TritonAttnBackend`` builds every
sliding-window buffer with ``update_sliding_window_buffer``, which keeps the
last ``min(len, sws)`` keys. For extend / target-verify ``len`` is the prefix
and the kernel masks each query itself (``q - k <= sws``), so sws prefix keys
plus the new tokens are exactly enough. Decode has no per-query mask: the
kernel reads the buffer verbatim and ``seq_lens`` already counts the current
token, so every decode step past the window drops key p - sws.

Fix: the decode metadata is built with radius sws + 1. AROUND hooks set the
backend's ``sliding_window_size`` to sws + 1 for the duration of the two decode
builders (eager ``init_forward_metadata`` in decode/idle mode, and
``_update_decode_kv_buffers``, the cuda-graph capture/replay one), of the
unified-pool window translate in decode mode (its ``clamp(max=...)`` must count
what decode filled), and of ``init_cuda_graph_state`` (the shared window-index
buffer is then ``max_num_tokens * (sws + 1)``: decode needs up to that many,
verify still at most ``max_num_tokens * sws``). Everything else (extend,
target-verify, draft-extend, the layers' own masks, the SWA pool and its
eviction, which already keeps key p - sws for decode) sees SGLang's sws. The
scope is restored in ``finally``; a nested scope keeps sws + 1.

Why a scoped radius and not a hook on ``update_sliding_window_buffer``: the
decode builders, the unified-pool translate and the buffer sizing all read the
same attribute; setting it once per scope makes them agree by construction,
the way SGLang itself would build them for a model of radius sws + 1.

Eligibility: Triton backends built for a Gemma-4 model runner (target
architectures and the FROZEN_KV_MTP assistant, whose decode reads the target's
KV with the same window), identified once by an AFTER hook on ``__init__``.
The bug is generic (Gemma-2/3, ...) but other models keep SGLang's behaviour.
Default on since its H200 validation (issue #10, ``test/gpu/test_window_lossless_gpu.py``,
``crash_repro/spec_swa_window_divergence``): on margin-checked probes plain decode
then equals FROZEN_KV_MTP and the fp32 reference; without it plain decode leaves
the reference at the first step whose window is full.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from typing import Any, Iterator, Optional

from sglang_gemma4.registry import Patch

logger = logging.getLogger("sglang_gemma4")

_TRITON = "sglang.srt.layers.attention.triton_backend"
_BACKEND = f"{_TRITON}.TritonAttnBackend"
INIT = f"{_BACKEND}.__init__"
INIT_CUDA_GRAPH_STATE = f"{_BACKEND}.init_cuda_graph_state"
INIT_FORWARD_METADATA = f"{_BACKEND}.init_forward_metadata"
UPDATE_DECODE_KV_BUFFERS = f"{_BACKEND}._update_decode_kv_buffers"
TRANSLATE_CUDA_GRAPH_LOCS = f"{_BACKEND}._translate_cuda_graph_shared_pool_locs"

GEMMA4_ARCHS = frozenset({
    "Gemma4ForCausalLM",
    "Gemma4ForConditionalGeneration",
    "Gemma4UnifiedForConditionalGeneration",
    # FROZEN_KV_MTP drafts (gemma4_mtp.py EntryClass)
    "Gemma4AssistantForCausalLM",
    "Gemma4UnifiedAssistantForCausalLM",
})

# backend -> SGLang's exclusive radius (sws) for eligible backends
_ELIGIBLE: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def is_gemma4_runner(model_runner: Any) -> bool:
    hf = getattr(getattr(model_runner, "model_config", None), "hf_config", None)
    archs = set(getattr(hf, "architectures", None) or ())
    model = getattr(model_runner, "model", None)
    if model is not None:  # arch lists can be rewritten (e.g. NEXTN); the loaded class cannot
        archs.add(type(model).__name__)
    return bool(archs & GEMMA4_ARCHS)


def decode_radius(backend: Any) -> Optional[int]:
    """sws + 1 for an eligible backend whose radius is still SGLang's, else None."""
    sws = _ELIGIBLE.get(backend)
    if sws is None:
        return None
    if backend.sliding_window_size not in (sws, sws + 1):  # changed behind us: stand down
        return None
    return sws + 1


@contextlib.contextmanager
def decode_scope(backend: Any) -> Iterator[None]:
    radius = decode_radius(backend)
    if radius is None:
        yield
        return
    saved = backend.sliding_window_size
    backend.sliding_window_size = radius
    try:
        yield
    finally:
        backend.sliding_window_size = saved


def after_init(result, self, model_runner, *args, **kwargs):
    try:
        sws = self.sliding_window_size
        if isinstance(sws, int) and sws > 0 and is_gemma4_runner(model_runner):
            _ELIGIBLE[self] = sws
            logger.info("Triton SWA decode window: %d keys (radius %d + current) for %s (sglang-gemma4)",
                        sws + 1, sws, type(model_runner.model).__name__ if hasattr(model_runner, "model") else "?")
    except Exception:  # unexpected runner shape: SGLang's behaviour
        logger.exception("triton_swa_window: eligibility check failed; backend left unpatched")
    return None


def around_always_decode(original, self, *args, **kwargs):
    """``init_cuda_graph_state`` / ``_update_decode_kv_buffers``: radius sws + 1."""
    with decode_scope(self):
        return original(self, *args, **kwargs)


def around_decode_mode(original, self, forward_batch, *args, **kwargs):
    """``init_forward_metadata`` / unified-pool translate: radius sws + 1 in decode mode only."""
    mode = getattr(forward_batch, "forward_mode", None)
    if mode is None or not mode.is_decode_or_idle():
        return original(self, forward_batch, *args, **kwargs)
    with decode_scope(self):
        return original(self, forward_batch, *args, **kwargs)


class TritonSwaWindow(Patch):
    name = "triton_swa_window"
    summary = "triton decode attends sliding_window keys on Gemma-4 SWA layers (SGLang keeps one fewer)"
    knob = "SGLANG_GEMMA4_TRITON_SWA_WINDOW"
    default = True
    seed = "none (fp32 cross-check, runs/numerics-calibration.md; cf. sgl-project/sglang#32087)"
    targets = (INIT, INIT_CUDA_GRAPH_STATE, INIT_FORWARD_METADATA, UPDATE_DECODE_KV_BUFFERS,
               TRANSLATE_CUDA_GRAPH_LOCS)

    def unavailable(self) -> Optional[str]:
        from sglang.srt.layers.attention import triton_backend as tb

        # the scope only works while these read the backend attribute
        for name in ("_update_decode_kv_buffers", "init_forward_metadata", "init_cuda_graph_state"):
            src = inspect.getsource(getattr(tb.TritonAttnBackend, name))
            if "self.sliding_window_size" not in src:
                return f"TritonAttnBackend.{name} no longer reads self.sliding_window_size"
        return None

    def upstream(self) -> Optional[str]:
        from sglang.srt.layers.attention import triton_backend as tb

        fn = tb.update_sliding_window_buffer
        if "include_current_token" in inspect.signature(fn).parameters:
            return "SGLang's update_sliding_window_buffer takes include_current_token (decode window fixed)"
        src = inspect.getsource(fn) + inspect.getsource(tb.TritonAttnBackend._update_decode_kv_buffers)
        if "sliding_window_size + 1" in src.replace("\n", " "):
            return "SGLang's triton decode window already spans sliding_window_size + 1 keys"
        return None

    def detail(self, value: Optional[bool]) -> str:
        if value:
            return "Gemma-4 triton decode window = sliding_window keys (plain decode == spec verify == HF)"
        return "SGLang's triton decode window (sliding_window - 1 keys: plain decode drifts from the model)"

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(INIT, after_init, HookType.AFTER)
        self.hook(INIT_CUDA_GRAPH_STATE, around_always_decode, HookType.AROUND)
        self.hook(UPDATE_DECODE_KV_BUFFERS, around_always_decode, HookType.AROUND)
        self.hook(INIT_FORWARD_METADATA, around_decode_mode, HookType.AROUND)
        self.hook(TRANSLATE_CUDA_GRAPH_LOCS, around_decode_mode, HookType.AROUND)


PATCH = TritonSwaWindow()
