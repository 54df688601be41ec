"""translate_window_prefix_ vs SGLang 0.5.17's host-sliced translate and a torch reference.

SGLang's statement is ``indices[:last] = mapping[indices[:last]]`` with ``last = indptr[-1]``
read on the host; the kernel must leave the whole buffer identical to that (the tail past
``last`` included), read no device scalar on the host, and reject bad arguments by name.
"""

import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))
from kernel_testutil import DEVICE, HAS_CUDA  # noqa: E402

from sglang_gemma4.kernels.swa_translate import (  # noqa: E402
    translate_window_prefix_,
    translate_window_prefix_ref,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _sglang(indices, mapping, indptr, bs):
    """SGLang 0.5.17's statement, on the buffer sliced to bs + 1 as its caller does."""
    out = indices.clone()
    last = indptr[: bs + 1][-1]
    out[:last] = mapping[out[:last]]
    return out


def _case(bs, window, full, swa, seed, device=DEVICE, idx_dtype=torch.int64, capacity=None, poison=True):
    """A window buffer as SGLang fills it: per-request lens <= window, virtual (full-pool) slot ids,
    a stale tail (earlier steps' translated ids) past the live range; a mapping with the -1 sentinel."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, window + 1, (bs,), generator=g)
    indptr = torch.zeros(bs + 3, dtype=torch.int32)  # longer than bs + 1, like the graph buffer
    indptr[1: bs + 1] = torch.cumsum(lens, 0)
    indptr[bs + 1:] = 10 ** 6  # stale entries past bs must not be read
    cap = capacity or bs * window + 5
    tail = torch.randint(0, swa, (cap,), generator=g) if poison else torch.zeros(cap, dtype=torch.int64)
    indices = tail.clone()
    live = int(indptr[bs])
    indices[:live] = torch.randint(0, full, (live,), generator=g)
    mapping = torch.cat([torch.randperm(full, generator=g) % swa + 1, torch.tensor([-1])])
    return indices.to(idx_dtype).to(device), mapping.to(device), indptr.to(device)


@pytest.mark.parametrize("bs,window", [(1, 7), (3, 8), (5, 1), (4, 300), (1, 1500), (2, 0)])
def test_matches_sglang_whole_buffer(bs, window):
    indices, mapping, indptr = _case(bs, window, full=4000, swa=900, seed=bs * 31 + window)
    want = _sglang(indices, mapping, indptr, bs)
    got = translate_window_prefix_(indices.clone(), mapping, indptr, bs, bs * window)
    assert torch.equal(got, want)
    assert torch.equal(translate_window_prefix_ref(indices, mapping, indptr, bs, bs * window), want)


def test_in_place_and_tail_untouched():
    indices, mapping, indptr = _case(4, 16, full=500, swa=100, seed=3)
    before = indices.clone()
    live = int(indptr[4])
    out = translate_window_prefix_(indices, mapping, indptr, 4, 64)
    assert out is indices
    assert torch.equal(indices[live:], before[live:])
    assert torch.equal(indices[:live], mapping[before[:live]])


def test_negative_index_maps_to_sentinel_like_torch():
    mapping = torch.tensor([0, 5, 6, 7, -1], device=DEVICE)
    indices = torch.tensor([1, -1, 3, 2, 9], device=DEVICE)
    indptr = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    translate_window_prefix_(indices, mapping, indptr, 1, 4)
    assert indices.tolist() == [5, -1, 7, 6, 9]


def test_small_bound_stops_early_and_large_bound_stops_at_indptr():
    indices, mapping, indptr = _case(3, 10, full=300, swa=50, seed=5)
    live = int(indptr[3])
    assert live > 4
    part = translate_window_prefix_(indices.clone(), mapping, indptr, 3, 4)
    assert torch.equal(part[:4], mapping[indices[:4]]) and torch.equal(part[4:], indices[4:])
    assert torch.equal(translate_window_prefix_(indices.clone(), mapping, indptr, 3, 10 ** 9),
                       _sglang(indices, mapping, indptr, 3))


def test_int32_indices_and_empty_batch():
    indices, mapping, indptr = _case(3, 9, full=200, swa=70, seed=7, idx_dtype=torch.int32)
    assert torch.equal(translate_window_prefix_(indices.clone(), mapping, indptr, 3, 27),
                       _sglang(indices.long(), mapping, indptr, 3).int())
    before = indices.clone()
    assert torch.equal(translate_window_prefix_(indices, mapping, indptr, 0, 0), before)


def test_out_of_range_index_is_left_not_read():
    mapping = torch.tensor([3, 4, -1], device=DEVICE)
    indices = torch.tensor([0, 7, -9, 1], device=DEVICE)
    indptr = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    translate_window_prefix_(indices, mapping, indptr, 1, 4)
    assert indices.tolist() == [3, 7, -9, 4]
    ref = translate_window_prefix_ref(torch.tensor([0, 7, -9, 1]), mapping.cpu(), indptr.cpu(), 1, 4)
    assert ref.tolist() == [3, 7, -9, 4]


def test_reads_no_device_scalar_on_the_host():
    """SGLang's statement calls aten._local_scalar_dense (the host read); the kernel must not."""

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Reads.n += 1
            return func(*args, **(kwargs or {}))

    indices, mapping, indptr = _case(4, 12, full=300, swa=80, seed=11)
    with Reads():
        _sglang(indices, mapping, indptr, 4)
    assert Reads.n >= 1  # the probe sees SGLang's sync
    Reads.n = 0
    with Reads():
        translate_window_prefix_(indices, mapping, indptr, 4, 48)
    assert Reads.n == 0


@pytest.mark.parametrize("bad,match", [
    (dict(indices=torch.zeros(4)), "indices has dtype"),
    (dict(mapping=torch.zeros(2, 2, dtype=torch.int64)), "mapping must be 1-D"),
    (dict(indptr=[0, 1]), "indptr must be a torch.Tensor"),
    (dict(bs=5), "bs must be an int in"),
    (dict(bs=-1), "bs must be an int in"),
    (dict(bound=-3), "bound must be a non-negative int"),
    (dict(bound=2.5), "bound must be a non-negative int"),
    (dict(mapping=torch.zeros(0, dtype=torch.int64)), "mapping is empty"),
    (dict(indices=torch.zeros(8, dtype=torch.int64)[::2]), "indices must be contiguous"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(indices=torch.zeros(4, dtype=torch.int64), mapping=torch.arange(5),
                indptr=torch.tensor([0, 2], dtype=torch.int32), bs=1, bound=4)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        translate_window_prefix_(**args)


@gpu
def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="mapping is on cpu"):
        translate_window_prefix_(torch.zeros(4, dtype=torch.int64, device="cuda"), torch.arange(5),
                                 torch.tensor([0, 2], dtype=torch.int32, device="cuda"), 1, 4)


@gpu
@pytest.mark.parametrize("bs,window", [(1, 1024), (16, 1024), (48, 1025), (64, 1024), (256, 1024)])
def test_gpu_gemma4_sizes_no_sync(bs, window):
    """Real graph buffers: up to 256 verify rows x the 1024 window, a 300k-slot full pool."""
    indices, mapping, indptr = _case(bs, window, full=300_000, swa=45_000, seed=bs, device="cuda",
                                     capacity=256 * 1025)
    want = _sglang(indices, mapping, indptr, bs)
    got = indices.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        translate_window_prefix_(got, mapping, indptr, bs, bs * window)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
