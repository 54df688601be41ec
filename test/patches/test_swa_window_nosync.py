"""swa_window_nosync on SGLang 0.5.17's real TritonAttnBackend builders and SWAKVPool translate (CPU).

The backend is made with ``object.__new__`` and the attributes its builders read, as in
test_triton_swa_window.py; its pool is a real ``SWAKVPool`` (no __init__) holding a full->SWA
mapping with SGLang's -1 sentinel. Reference: the same builders with the patch off. The graph
buffers must come out identical (the stale tail included), and the replay prep must read no device
scalar on the host (``aten._local_scalar_dense``, the sync on a GPU); SGLang's reads two per call.
"""

import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sglang_gemma4 import registry
from sglang_gemma4.patches import swa_window_nosync as nosync
from sglang_gemma4.patches import triton_swa_window as tsw
from sglang_gemma4.testing.hooks import patch_applied

tb = pytest.importorskip("sglang.srt.layers.attention.triton_backend")
from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
ON = {nosync.PATCH.knob: "1"}
SWS, MAX_CTX, MAX_BS, FULL, SWA = 7, 64, 4, 4 * 64 + 1, 61


def _pool(seed=0):
    pool = object.__new__(SWAKVPool)
    g = torch.Generator().manual_seed(seed)
    pool.full_to_swa_index_mapping = torch.cat([torch.randperm(FULL, generator=g) % SWA + 1, torch.tensor([-1])])
    return pool


def _backend(pool, num_draft_tokens=None, translate=None):
    b = object.__new__(tb.TritonAttnBackend)
    req_to_token = torch.randperm(MAX_BS * MAX_CTX, generator=torch.Generator().manual_seed(1)) + 1
    b.__dict__.update(
        sliding_window_size=SWS, req_to_token=req_to_token.view(MAX_BS, MAX_CTX).to(torch.int32),
        token_to_kv_pool=pool, _translate_kv_loc=translate, dcp_size=1, page_size=1,
        device="cpu", max_context_len=MAX_CTX, num_head=2, max_kv_splits=2, v_head_dim=8,
        swa_v_head_dim=None, use_sliding_window_kv_pool=True, static_kv_splits=True,
        enable_deterministic=False, device_core_count=0, split_tile_size=None,
        is_draft_runner=False, skip_prefill=False, num_draft_tokens=num_draft_tokens,
        speculative_num_steps=1, topk=1, use_mla=False,
        kv_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int32),
        window_kv_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int32),
        qo_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int64),
        mask_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int64),
        forward_metadata=None, _verify_mask=None,
    )
    return b


def _batch(mode, seq_lens, spec_info=None):
    seq = torch.tensor(seq_lens, dtype=torch.int64)
    return types.SimpleNamespace(
        forward_mode=getattr(ForwardMode, mode), batch_size=len(seq_lens), spec_info=spec_info,
        req_pool_indices=torch.arange(len(seq_lens), dtype=torch.int64), seq_lens=seq,
        seq_lens_sum=int(seq.sum()), seq_lens_cpu=seq.clone(), out_cache_loc=None, encoder_lens=None)


def _verify(seq, nd):
    spec = types.SimpleNamespace(draft_token_num=nd, kv_indptr=None,
                                 custom_mask=torch.ones(len(seq) * nd * (max(seq) + nd), dtype=torch.uint8))
    return _batch("TARGET_VERIFY", seq, spec)


class HostReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense: a device scalar read on the host (a sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _replay(b, batches, max_tokens):
    """SGLang's graph replay prep for each batch in turn (a longer one first leaves a stale tail)."""
    b.init_cuda_graph_state(MAX_BS, max_tokens)
    reads = HostReads()
    for fb in batches:
        with reads:
            b.init_forward_metadata_out_graph(fb)
    return (b.window_kv_indptr.clone(), b.cuda_graph_window_kv_indices.clone(),
            getattr(b, "cuda_graph_window_kv_offsets", torch.empty(0)).clone()), reads.n


CASES = {
    "decode": (lambda: [_batch("DECODE", [40, 41, 33, 60]), _batch("DECODE", [3, SWS, SWS + 1, 20])], MAX_BS),
    "decode_bs1": (lambda: [_batch("DECODE", [50])], MAX_BS),
    "verify": (lambda: [_verify([30, 33, 25, 40], 3), _verify([3, SWS, 20, 1], 3)], MAX_BS * 3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window_fix", [False, True])
def test_graph_buffers_identical_with_one_host_read_fewer(case, window_fix):
    make, max_tokens = CASES[case]
    nd = 3 if case == "verify" else None
    env = dict(ON, **{tsw.PATCH.knob: "1" if window_fix else "0"})

    def run():
        b = _backend(_pool(), num_draft_tokens=nd)
        if window_fix:
            tsw.after_init(None, b, types.SimpleNamespace(model_config=types.SimpleNamespace(
                hf_config=types.SimpleNamespace(architectures=["Gemma4ForCausalLM"]))))
        return _replay(b, make(), max_tokens)

    with patch_applied(tsw.PATCH, env):
        ref, ref_reads = run()
        with patch_applied(nosync.PATCH, env) as st:
            assert st.state == registry.ACTIVE
            got, got_reads = run()
    for x, y in zip(ref, got):
        assert torch.equal(x, y)
    # SGLang slices by indptr[-1] twice per builder call; with the patch the replay prep reads none
    assert ref_reads == 2 * len(make()) and got_reads == 0
    # the buffers really were translated: live ids are SWA slots (mapping values), not full-pool ids
    n = int(got[0][1 if case == "decode_bs1" else MAX_BS])
    assert n > 0 and set(got[1][:n].tolist()) <= set(_pool().full_to_swa_index_mapping.tolist())


def test_eager_unified_and_foreign_pools_run_sglang_unchanged(monkeypatch):
    calls = []
    from sglang_gemma4.kernels import swa_translate

    orig_kernel = swa_translate.translate_window_prefix_
    # the hook imports the kernel at call time, so this stand-in is what it calls
    monkeypatch.setattr(swa_translate, "translate_window_prefix_",
                        lambda *a, **k: calls.append(a) or orig_kernel(*a, **k))

    class OtherPool(SWAKVPool):
        def translate_loc_from_full_to_swa(self, kv_indices):  # not the bare gather: must not be bypassed
            return self.full_to_swa_index_mapping[kv_indices] + 1000

    other = object.__new__(OtherPool)
    other.full_to_swa_index_mapping = _pool().full_to_swa_index_mapping
    with patch_applied(nosync.PATCH, ON):
        # eager decode: SGLang allocates by the device length itself
        b = _backend(_pool())
        b.init_forward_metadata(_batch("DECODE", [30, 5]))
        assert calls == []
        # a pool with its own translate
        b = _backend(other)
        (indptr, idx, _), _ = _replay(b, [_batch("DECODE", [30, 5])], MAX_BS)
        assert calls == [] and (idx[: int(indptr[2])] >= 1000).all()
        # unified pool: SGLang skips the translate here (done later from the live v2p)
        b = _backend(_pool(), translate=lambda x: x)
        fb = _batch("DECODE", [30, 5])
        fb.out_cache_loc = torch.arange(2, dtype=torch.int64)
        _replay(b, [fb], MAX_BS)
        assert calls == []
        # SGLang's pool: the kernel runs
        _replay(_backend(_pool()), [_batch("DECODE", [30, 5])], MAX_BS)
        assert len(calls) == 1


def test_default_off_status_and_source_pins(monkeypatch):
    st = registry.evaluate(nosync.PATCH, {})
    assert st.state == registry.DISABLED
    before = tb.update_sliding_window_buffer
    with patch_applied(nosync.PATCH, {}):
        assert tb.update_sliding_window_buffer is before
    with patch_applied(nosync.PATCH, ON):
        assert tb.update_sliding_window_buffer is not before
    assert tb.update_sliding_window_buffer is before
    assert nosync.PATCH.unavailable() is None and nosync.PATCH.upstream() is None  # 0.5.17 as pinned
    src = nosync._update_source()
    monkeypatch.setattr(nosync, "_update_source", lambda: src + "\n# changed")
    assert "update_sliding_window_buffer is not SGLang 0.5.17's" in nosync.PATCH.unavailable()
    monkeypatch.setattr(nosync, "_update_source", lambda: src.replace(nosync.SYNC_LINE, "kv_last_index = None"))
    assert nosync.PATCH.unavailable() is None and "no longer slices" in nosync.PATCH.upstream()
