"""Sliding-window CUDA-graph metadata without its per-step host sync (issue #19 P2, also plain decode).

SGLang 0.5.17's ``update_sliding_window_buffer`` (``layers/attention/triton_backend.py``) ends,
on a hybrid SWA pool, with ``indices[:indptr[-1]] = pool.translate_loc_from_full_to_swa(...)``.
Slicing by the 0-d GPU tensor ``indptr[-1]`` is a blocking device-to-host read. The CUDA-graph
replay prep calls it once per step for plain decode (``_update_decode_kv_buffers``) and, under
FROZEN_KV_MTP, again for the draft and for target verify (``_update_target_verify_buffers``): the
scheduler's CPU waits for all queued GPU work before it may launch the next graph, so under the
overlap schedule the GPU idles while the CPU finishes the launch prep. The 26B-A4B speculative step
measured 6.85 ms of kernels in a 7.82 ms step at batch 1 (runs/mtp-26b-nvidia-h200.md).

Change: SGLang's function runs with ``skip_full_to_swa_translation=True`` (its own flag, which
leaves the virtual ids), then one Triton launch (:mod:`sglang_gemma4.kernels.swa_translate`)
translates ``indices[:min(bs * window, indptr[bs])]`` reading ``indptr[bs]`` on the GPU. The
buffer ends up exactly as SGLang leaves it: the index kernel wrote ``[:indptr[bs]]``, the
translation rewrites that same range, the tail is untouched in both.

Only the preallocated-buffer (CUDA-graph) calls on SGLang's own ``SWAKVPool`` translate (a plain
``mapping[indices]`` gather, source pinned) take this path. Eager calls allocate by the device
length (a sync SGLang needs anyway), unified pools skip translation already, and any other pool
runs SGLang's function unchanged.

Hook: AROUND ``triton_backend.update_sliding_window_buffer`` (a module function; SGLang's registry
rebinds it for the backend's in-module callers). Default off until an H200 A/B and the
window-lossless checks have run with it on. Enable with ``SGLANG_GEMMA4_SWA_WINDOW_NOSYNC=1``.
"""

from __future__ import annotations

import logging
from typing import Optional

from sglang_gemma4.registry import Patch, source_of, source_pin_reason

TARGET = "sglang.srt.layers.attention.triton_backend.update_sliding_window_buffer"
POOL = "sglang.srt.mem_cache.swa_memory_pool.SWAKVPool"
SYNC_LINE = "kv_last_index = window_kv_indptr[-1]"

# sha256 of inspect.getsource in SGLang 0.5.17: the hook relies on what the skip flag skips and
# on the pool's translate being a bare gather through full_to_swa_index_mapping.
UPDATE_SHA256 = "98fde398e241e1d0ca40496ce23ed4ac9507acb526a4822c46a1e5207b3e54c6"
TRANSLATE_SHA256 = "8e17ff7501a33172ea46f132d2f9d13c07016dbb6d3821c611c2ab5d41c34d79"
FIRED = "sliding-window CUDA-graph metadata translated on the GPU (no indptr[-1] host read)"

logger = logging.getLogger("sglang_gemma4")
_announced = False


class SwaWindowNoSync(Patch):
    name = "swa_window_nosync"
    summary = ("triton sliding-window CUDA-graph metadata translated to SWA slots without a host sync "
               "(default off until measured on a GPU)")
    knob = "SGLANG_GEMMA4_SWA_WINDOW_NOSYNC"
    default = False
    seed = "- (issue #19 P2, bench/MTP_NOTES.md section 6; not in the seed)"
    targets = (TARGET, POOL + ".translate_loc_from_full_to_swa")

    def upstream(self) -> Optional[str]:
        if SYNC_LINE not in _update_source():
            return "update_sliding_window_buffer no longer slices by window_kv_indptr[-1]"
        return None

    def unavailable(self) -> Optional[str]:
        src = _update_source()
        if SYNC_LINE not in src:
            return None  # upstream() reports it
        from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

        return (source_pin_reason(src, UPDATE_SHA256, "update_sliding_window_buffer", "the hook relies on its skip flag")
                or source_pin_reason(source_of(SWAKVPool.translate_loc_from_full_to_swa), TRANSLATE_SHA256,
                                     "SWAKVPool.translate_loc_from_full_to_swa", "the kernel re-states its gather"))

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(TARGET, update_sliding_window_buffer, HookType.AROUND)


PATCH = SwaWindowNoSync()


def _update_source() -> str:
    from sglang.srt.layers.attention import triton_backend

    return source_of(triton_backend.update_sliding_window_buffer)


def plain_mapping(pool, indices):
    """The pool's full->SWA mapping when its translate is SGLang's bare gather, else None."""
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    fn = getattr(type(pool), "translate_loc_from_full_to_swa", None)
    # an override, or a hook someone put on SGLang's own, may do more than the gather
    if fn is None or fn is not SWAKVPool.translate_loc_from_full_to_swa or hasattr(fn, "__wrapped__"):
        return None
    mapping = getattr(pool, "full_to_swa_index_mapping", None)
    if mapping is None or mapping.dim() != 1 or mapping.device != indices.device:
        return None
    return mapping


def update_sliding_window_buffer(original, window_kv_indptr, req_to_token, sliding_window_size, seq_lens,
                                 req_pool_indices, bs, device=None, token_to_kv_pool=None,
                                 window_kv_indices=None, skip_full_to_swa_translation=False):
    """AROUND hook, SGLang's parameters by name: its fill, then a sync-free translate."""
    mapping = None
    if window_kv_indices is not None and not skip_full_to_swa_translation:
        mapping = plain_mapping(token_to_kv_pool, window_kv_indices)
    out = original(window_kv_indptr, req_to_token, sliding_window_size, seq_lens, req_pool_indices, bs,
                   device=device, token_to_kv_pool=token_to_kv_pool, window_kv_indices=window_kv_indices,
                   skip_full_to_swa_translation=skip_full_to_swa_translation or mapping is not None)
    if mapping is None:
        return out
    from sglang_gemma4.kernels.swa_translate import translate_window_prefix_

    indptr, indices = out[0], out[1]
    # every request keeps at most sliding_window_size keys: a host bound on indptr[bs]
    translate_window_prefix_(indices, mapping, indptr, int(bs), int(bs) * int(sliding_window_size))
    global _announced
    if not _announced:  # once per process: the server log shows the path is live
        _announced = True
        logger.info("%s (bs=%d, window=%d)", FIRED, int(bs), int(sliding_window_size))
    return out
