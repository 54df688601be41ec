"""Opt-in bounds traps for trtllm_mha page tables and SWA allocations.

Seed commits "trtllm_mha bounds-check trap" and "SWA allocator trap" (same env
var): on B200 an out-of-range page index in a trtllm_mha block table shows up
as an *asynchronous* ``cudaErrorIllegalAddress`` in ``fmhaSm100fKernel_*``,
far from its cause and with no state left to inspect. With
``SGLANG_TRTLLM_MHA_DEBUG=1`` the plugin checks, on the host and before the
kernel is queued, that every page-table entry a request can read is inside the
KV buffer the kernel gets, and raises :class:`TrtllmMhaDebugError` (layer,
request row, index, bound) with a ``torch.save`` dump of the page table and
sequence lengths. The same knob checks every SWA allocation: the SWA slot a new
token maps to must be inside the SWA KV buffer.

Hooks (BEFORE / AFTER only; nothing is registered when the knob is off):

* ``TRTLLMHAAttnBackend.forward_decode`` / ``forward_extend`` (BEFORE). In
  SGLang 0.5.17 the flashinfer kernels are called inline in these two methods
  (0.5.23 factored decode into ``_run_fixed_q_len_decode``); they are the
  narrowest methods from which the layer's page table (``_get_layer_page_table``),
  ``forward_metadata.cache_seqlens_int32`` and the layer's k cache are all
  reachable. The multi-step draft backend runs per-step instances of the same
  class, so it is covered too. Not checked: the CP-v2 zigzag tables.
* ``SWATokenToKVPoolAllocator.alloc/alloc_extend/alloc_decode`` and the
  ``UnifiedSWATokenToKVPoolAllocator`` overrides (AFTER). ``alloc`` is the
  page_size=1 path. ``PureSWATokenToKVPoolAllocator`` (all-SWA models, not
  Gemma-4) and the NPU DSV4 allocator are not hooked.

The checks are vectorised with one device->host sync per call, and are skipped
while a CUDA graph is being captured (a sync is illegal there): run with
``--disable-cuda-graph`` so decode steps go through the eager path the trap sees.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from typing import Optional

from sglang_gemma4.registry import Patch

logger = logging.getLogger("sglang_gemma4")

_BACKEND = "sglang.srt.layers.attention.trtllm_mha_backend.TRTLLMHAAttnBackend"
DECODE = f"{_BACKEND}.forward_decode"
EXTEND = f"{_BACKEND}.forward_extend"
_SWA = "sglang.srt.mem_cache.allocator.swa.SWATokenToKVPoolAllocator"
SWA_ALLOC = f"{_SWA}.alloc"
SWA_ALLOC_EXTEND = f"{_SWA}.alloc_extend"
SWA_ALLOC_DECODE = f"{_SWA}.alloc_decode"
_USWA = "sglang.srt.mem_cache.multi_ended_allocator.UnifiedSWATokenToKVPoolAllocator"
USWA_ALLOC = f"{_USWA}.alloc"
USWA_ALLOC_EXTEND = f"{_USWA}.alloc_extend"
USWA_ALLOC_DECODE = f"{_USWA}.alloc_decode"
ALLOC_TARGETS = (
    SWA_ALLOC, SWA_ALLOC_EXTEND, SWA_ALLOC_DECODE,
    USWA_ALLOC, USWA_ALLOC_EXTEND, USWA_ALLOC_DECODE,
)

DIR_ENV = "SGLANG_TRTLLM_MHA_DEBUG_DIR"
_dump_seq = itertools.count()


class TrtllmMhaDebugError(RuntimeError):
    """A trap of ``SGLANG_TRTLLM_MHA_DEBUG`` fired; ``dump_path`` holds the state."""

    def __init__(self, message: str, dump_path: str):
        super().__init__(message)
        self.dump_path = dump_path


def _capturing() -> bool:
    import torch

    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _dump(kind: str, payload: dict) -> str:
    import torch

    d = os.environ.get(DIR_ENV) or tempfile.gettempdir()
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{kind}_pid{os.getpid()}_{time.time_ns()}_{next(_dump_seq)}.pt")
    torch.save(payload, path)
    return path


def find_page_table_violation(page_table, seq_lens, page_size: int, num_pages: int):
    """First readable out-of-range entry as ``(row, col, value)``, else ``None``.

    Row ``r`` reads columns ``[0, cdiv(seq_lens[r], page_size))``; a column past
    the table width is reported with ``value=None``. One host sync.
    """
    import torch

    need = (seq_lens.to(torch.int64) + page_size - 1) // page_size
    cols = torch.arange(page_table.shape[1], device=page_table.device)
    readable = cols[None, :] < need[:, None]
    bad = readable & ((page_table < 0) | (page_table >= num_pages))
    too_wide = need > page_table.shape[1]
    if not bool(bad.any() | too_wide.any()):  # the one sync on the happy path
        return None
    if bad.any():
        row, col = (int(x) for x in bad.nonzero()[0])
        return row, col, int(page_table[row, col])
    row = int(too_wide.nonzero()[0, 0])
    return row, page_table.shape[1], None


def check_page_table(page_table, seq_lens, page_size: int, num_pages: int, *, layer_id, phase: str) -> None:
    hit = find_page_table_violation(page_table, seq_lens, page_size, num_pages)
    if hit is None:
        return
    row, col, value = hit
    path = _dump("trtllm_mha_oob", {
        "page_table": page_table.detach().cpu(), "seq_lens": seq_lens.detach().cpu(),
        "page_size": page_size, "num_pages": num_pages, "layer_id": layer_id,
        "phase": phase, "row": row, "col": col, "value": value,
    })
    seq_len = int(seq_lens[row])
    if value is None:
        what = f"needs {-(-seq_len // page_size)} pages but the page table has {page_table.shape[1]} columns"
    else:
        what = f"page index {value} at column {col} is outside [0, {num_pages}) (number of pages in the k cache)"
    raise TrtllmMhaDebugError(
        f"SGLANG_TRTLLM_MHA_DEBUG: trtllm_mha {phase} kernel would read out of bounds: "
        f"layer {layer_id}, request row {row} (seq_len {seq_len}, page_size {page_size}): {what}; "
        f"dump: {path}",
        path,
    )


def _layer_tables(backend, layer, forward_batch):
    """(page_table, seq_lens) pairs the kernel of this layer will get."""
    from sglang.srt.layers.radix_attention import AttentionType

    md = backend.forward_metadata
    mode = forward_batch.forward_mode
    if (
        mode.is_target_verify()
        and getattr(layer, "attn_type", None) == AttentionType.ENCODER_ONLY
        and md.encoder_page_table is not None
    ):
        return [(md.encoder_page_table, md.encoder_cache_seqlens)]
    return [(backend._get_layer_page_table(layer, forward_batch), md.cache_seqlens_int32)]


_warned = set()


def _unchecked(where: str, e: Exception) -> None:
    # A debug aid must not take the server down on a state it does not know.
    if where not in _warned:
        _warned.add(where)
        logger.warning("SGLANG_TRTLLM_MHA_DEBUG: %s not checked (%s: %s)", where, type(e).__name__, e)


def _check_backend(backend, layer, forward_batch, phase: str) -> None:
    md = getattr(backend, "forward_metadata", None)
    if md is None or md.page_table is None or _capturing():
        return
    try:
        k_cache = backend.token_to_kv_pool.get_kv_buffer(layer.layer_id)[0]
        num_pages = k_cache.shape[0] // backend.page_size
        tables = _layer_tables(backend, layer, forward_batch)
    except Exception as e:
        _unchecked(f"trtllm_mha {phase}", e)
        return
    for table, seq_lens in tables:
        if table is None or seq_lens is None:
            continue
        n = min(table.shape[0], seq_lens.shape[0])
        check_page_table(table[:n], seq_lens[:n], backend.page_size, num_pages,
                         layer_id=layer.layer_id, phase=phase)


def before_forward_decode(self, q, k, v, layer, forward_batch, *args, **kwargs):
    _check_backend(self, layer, forward_batch, "decode")


def before_forward_extend(self, q, k, v, layer, forward_batch, *args, **kwargs):
    _check_backend(self, layer, forward_batch, "extend")


def swa_bound(allocator) -> int:
    """Rows of the SWA KV buffer: ``size_swa`` real slots + the padding page."""
    kvcache = allocator.get_kvcache()
    size_swa = getattr(kvcache, "size_swa", None) or allocator.size_swa
    return int(size_swa) + int(allocator.page_size)


def after_swa_alloc(result, allocator, *args, **kwargs):
    """AFTER hook: the SWA slots behind freshly allocated full slots are in range."""
    if result is None or getattr(result, "numel", lambda: 0)() == 0 or _capturing():
        return None
    try:
        swa = allocator.translate_loc_from_full_to_swa(result)
        bound = swa_bound(allocator)
    except Exception as e:
        _unchecked(f"{type(allocator).__name__} allocation", e)
        return None
    bad = (swa < 0) | (swa >= bound)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0, 0])
    path = _dump("swa_alloc_oob", {
        "full_indices": result.detach().cpu(), "swa_indices": swa.detach().cpu(),
        "swa_bound": bound, "allocator": type(allocator).__name__,
    })
    raise TrtllmMhaDebugError(
        f"SGLANG_TRTLLM_MHA_DEBUG: {type(allocator).__name__} allocated full slot {int(result[i])} "
        f"mapped to SWA slot {int(swa[i])}, outside [0, {bound}) (SWA pool size + page); dump: {path}",
        path,
    )


class TrtllmMhaDebug(Patch):
    name = "trtllm_mha_debug"
    summary = "debug traps: trtllm_mha page-table and SWA-allocation bounds checks with a dump"
    knob = "SGLANG_TRTLLM_MHA_DEBUG"
    default = False
    seed = "trtllm_mha bounds-check trap + SWA allocator trap (SGLANG_TRTLLM_MHA_DEBUG)"
    targets = (DECODE, EXTEND) + ALLOC_TARGETS

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(DECODE, before_forward_decode, HookType.BEFORE)
        self.hook(EXTEND, before_forward_extend, HookType.BEFORE)
        for t in ALLOC_TARGETS:
            self.hook(t, after_swa_alloc, HookType.AFTER)

    def detail(self, value: Optional[bool]) -> str:
        if not value:
            return ""
        d = os.environ.get(DIR_ENV) or tempfile.gettempdir()
        return f"traps on (one host sync per attention layer and SWA allocation); dumps to {d}"


PATCH = TrtllmMhaDebug()
