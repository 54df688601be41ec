"""Full -> SWA slot translation of a sliding-window index buffer, without a host sync.

What SGLang 0.5.17 runs after it fills a CUDA-graph window buffer
(``triton_backend.update_sliding_window_buffer``, hybrid SWA pool)::

    last = window_kv_indptr[-1]                    # a 0-d GPU tensor
    indices[:last] = mapping[indices[:last]]       # slicing by it reads it on the host

Slicing by a device scalar is a blocking device-to-host copy: the CPU waits for every queued
kernel (the whole previous forward under the overlap schedule) before it can launch the next
graph. This kernel reads ``last`` on the GPU instead and translates a host-sized prefix:

1. ``last = indptr[bs]`` (device value), ``n`` = a host bound on it (``bs * window``);
2. for ``i < min(n, last)``: ``indices[i] = mapping[indices[i]]``, a negative index wrapping as
   torch's does (``-1`` -> the mapping's trailing ``-1`` sentinel);
3. entries at or past ``last`` are left as they are, as SGLang leaves them.

An index outside ``[-len(mapping), len(mapping))`` (torch would raise) is left untranslated
rather than read out of bounds; SGLang's own buffers never hold one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT_DTYPES = (torch.int32, torch.int64)
BLOCK = 1024


@triton.jit
def _translate_prefix_kernel(idx_ptr, map_ptr, last_ptr, n, map_len, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    last = tl.load(last_ptr).to(tl.int64)
    m = (offs < n) & (offs < last)
    j = tl.load(idx_ptr + offs, mask=m, other=0).to(tl.int64)
    j = tl.where(j < 0, j + map_len, j)
    m = m & (j >= 0) & (j < map_len)
    v = tl.load(map_ptr + j, mask=m, other=0)
    tl.store(idx_ptr + offs, v.to(idx_ptr.dtype.element_ty), mask=m)


def _check(indices, mapping, indptr, bs, bound):
    for name, t in (("indices", indices), ("mapping", mapping), ("indptr", indptr)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.dtype not in _INT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; expected int32 or int64")
        if t.device != indices.device:
            raise ValueError(f"{name} is on {t.device}, expected {indices.device} (like indices)")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is written/read with unit stride)")
    if not isinstance(bs, int) or not 0 <= bs < indptr.shape[0]:
        raise ValueError(f"bs must be an int in [0, {indptr.shape[0] - 1}] (indptr has {indptr.shape[0]} entries), got {bs!r}")
    if not isinstance(bound, int) or bound < 0:
        raise ValueError(f"bound must be a non-negative int, got {bound!r}")
    if mapping.shape[0] == 0:
        raise ValueError("mapping is empty")


def translate_window_prefix_(indices: torch.Tensor, mapping: torch.Tensor, indptr: torch.Tensor,
                             bs: int, bound: int) -> torch.Tensor:
    """In place: ``indices[i] = mapping[indices[i]]`` for ``i < min(bound, indptr[bs])``.

    ``bound`` is a host-side upper bound on ``indptr[bs]`` (e.g. ``bs * sliding_window``);
    translating stops at whichever is smaller, so a bound that is too small leaves the tail
    untranslated: callers pass a true bound. Returns ``indices``.
    """
    _check(indices, mapping, indptr, bs, bound)
    n = min(bound, indices.shape[0])
    if n:
        _translate_prefix_kernel[(triton.cdiv(n, BLOCK),)](
            indices, mapping, indptr[bs:], n, mapping.shape[0], BLOCK=BLOCK, num_warps=4)
    return indices


def translate_window_prefix_ref(indices: torch.Tensor, mapping: torch.Tensor, indptr: torch.Tensor,
                                bs: int, bound: int) -> torch.Tensor:
    """Plain torch, out of place, with the host read the kernel avoids."""
    out = indices.clone()
    n = min(bound, int(indptr[bs]), indices.shape[0])
    j = out[:n].to(torch.int64)
    ok = (j >= -mapping.shape[0]) & (j < mapping.shape[0])
    out[:n] = torch.where(ok, mapping[torch.where(ok, j, 0)].to(out.dtype), out[:n])
    return out
