"""Patch E contract: a FROZEN_KV_MTP draft backend translates SWA layers via the target's SWA pool.

Asserted on SGLang 0.5.17's real backend classes with real pools on CPU; the
model runner is a stand-in carrying only what the resolvers read.
"""

import types

import pytest
import torch

from sglang_gemma4 import registry
from sglang_gemma4.patches import draft_swa_state as dss
from sglang_gemma4.testing.hooks import patch_applied

PAGE = 1
SWA_LAYER, FULL_LAYER = 0, 1


def _target():
    """Target's SWAKVPool + its allocator (which registers the full->SWA mapping)."""
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    pool = SWAKVPool(
        size=64, size_swa=16, page_size=PAGE, dtype=torch.bfloat16, head_num=1, head_dim=8,
        swa_attention_layer_ids=[SWA_LAYER], full_attention_layer_ids=[FULL_LAYER], device="cpu",
    )
    return pool, SWATokenToKVPoolAllocator(64, 16, PAGE, torch.bfloat16, "cpu", pool, False)


def _draft_own_pool():
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(size=64, page_size=PAGE, dtype=torch.bfloat16, head_num=1, head_dim=8,
                            layer_num=2, device="cpu", enable_memory_saver=False)


def _runner(algo, is_draft, own_pool, allocator):
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    return types.SimpleNamespace(
        is_draft_worker=is_draft, spec_algorithm=getattr(SpeculativeAlgorithm, algo),
        token_to_kv_pool=own_pool, token_to_kv_pool_allocator=allocator,
    )


def _backend_classes():
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
    from sglang.srt.layers.attention.trtllm_mha_backend import TRTLLMHAAttnBackend

    return [TRTLLMHAAttnBackend, FlashInferAttnBackend]


def test_status_upstream_on_0517_and_knob_off_disabled():
    st = registry.evaluate(dss.PATCH, {})
    assert st.state == registry.UPSTREAM, st
    assert "_resolve_swa_kv_pool" in st.reason and st.reason == dss.PATCH.upstream()
    assert registry.evaluate(dss.PATCH, {"SGLANG_GEMMA4_DRAFT_SWA_STATE": "0"}).state == registry.DISABLED
    assert dss.contract_violations() == []


@pytest.mark.parametrize("cls_index", [0, 1], ids=["trtllm_mha", "flashinfer"])
def test_contract_on_real_resolvers(cls_index):
    cls = _backend_classes()[cls_index]
    target_pool, allocator = _target()
    own = _draft_own_pool()
    assert cls._resolve_swa_kv_pool(_runner("FROZEN_KV_MTP", True, own, allocator)) is target_pool
    # controls: an EAGLE draft owns its KV, a target runner uses its own SWA pool
    assert cls._resolve_swa_kv_pool(_runner("EAGLE", True, own, allocator)) is None
    assert cls._resolve_swa_kv_pool(_runner("FROZEN_KV_MTP", False, target_pool, allocator)) is target_pool


def test_trtllm_draft_layer_page_table_uses_target_swa_mapping():
    """With the resolved pool, SWA layers read the SWA table the backend builds from the target mapping."""
    from sglang.srt.layers.attention.trtllm_mha_backend import TRTLLMHAAttnBackend, TRTLLMMHAMetadata

    target_pool, allocator = _target()
    allocator.full_attn_allocator.alloc(20)  # full ids run ahead of SWA ids, as in a long-running server
    full_slots = allocator.alloc(6)
    swa_slots = target_pool.translate_loc_from_full_to_swa(full_slots)
    swa_rows = target_pool.get_kv_buffer(SWA_LAYER)[0].shape[0]
    assert int(full_slots.min()) >= swa_rows  # the untranslated table would read past the SWA cache
    b = object.__new__(TRTLLMHAAttnBackend)
    b._swa_kv_pool = TRTLLMHAAttnBackend._resolve_swa_kv_pool(
        _runner("FROZEN_KV_MTP", True, _draft_own_pool(), allocator))
    b.token_to_kv_pool = target_pool  # borrowed inside target_kv_pool_view
    b.forward_metadata = TRTLLMMHAMetadata(page_table=full_slots[None].to(torch.int32),
                                           swa_page_table=swa_slots[None].to(torch.int32))
    fb = types.SimpleNamespace()
    swa_table = b._get_layer_page_table(types.SimpleNamespace(layer_id=SWA_LAYER), fb)
    assert torch.equal(swa_table[0].long(), allocator.translate_loc_from_full_to_swa(full_slots))
    assert int(swa_table.max()) < swa_rows // PAGE
    assert b._get_layer_page_table(types.SimpleNamespace(layer_id=FULL_LAYER), fb) is b.forward_metadata.page_table


def _pre_patch_e_resolver(model_runner):
    """The seed's behaviour: SWA state taken from the runner's own pool only."""
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    pool = model_runner.token_to_kv_pool
    return pool if isinstance(pool, SWAKVPool) else None


def test_fallback_hooks_restore_contract_when_resolver_regresses(monkeypatch):
    from sglang.srt.layers.attention.trtllm_mha_backend import TRTLLMHAAttnBackend

    monkeypatch.setattr(TRTLLMHAAttnBackend, "_resolve_swa_kv_pool", staticmethod(_pre_patch_e_resolver))
    violations = dss.contract_violations()
    assert len(violations) == 1 and "TRTLLMHAAttnBackend" in violations[0]
    target_pool, allocator = _target()
    frozen = _runner("FROZEN_KV_MTP", True, _draft_own_pool(), allocator)
    assert TRTLLMHAAttnBackend._resolve_swa_kv_pool(frozen) is None
    with patch_applied(dss.PATCH, {}) as st:
        assert st.state == registry.ACTIVE, st
        assert TRTLLMHAAttnBackend._resolve_swa_kv_pool(frozen) is target_pool
        assert TRTLLMHAAttnBackend._resolve_swa_kv_pool(_runner("EAGLE", True, _draft_own_pool(), allocator)) is None
        assert dss.contract_violations() == []
    assert TRTLLMHAAttnBackend._resolve_swa_kv_pool(frozen) is None  # restored


def test_triton_window_indices_follow_borrowed_pool():
    """Triton draft backend: window KV indices are translated through the pool it holds at metadata time.

    Its Triton kernel runs in the interpreter without CUDA (TRITON_INTERPRET=1, test/conftest.py)."""
    from sglang.srt.layers.attention.triton_backend import update_sliding_window_buffer
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pool = SWAKVPool(size=64, size_swa=16, page_size=1, dtype=torch.bfloat16, head_num=1, head_dim=8,
                     swa_attention_layer_ids=[0], full_attention_layer_ids=[1], device=dev)
    alloc = SWATokenToKVPoolAllocator(64, 16, 1, torch.bfloat16, dev, pool, False)
    alloc.full_attn_allocator.alloc(20)  # full ids 21..30 vs SWA ids 1..10
    slots = alloc.alloc(10)
    req_to_token = torch.zeros(2, 32, dtype=torch.int32, device=dev)
    req_to_token[1, :10] = slots.to(torch.int32)
    seq_lens = torch.tensor([10], device=dev)
    indptr = torch.zeros(2, dtype=torch.int32, device=dev)
    _, idx, lens, _ = update_sliding_window_buffer(
        indptr, req_to_token, 4, seq_lens, torch.tensor([1], device=dev), 1, device=dev,
        token_to_kv_pool=pool)
    expected = alloc.translate_loc_from_full_to_swa(slots[6:10]).long().cpu()
    assert not torch.equal(expected, slots[6:10].long().cpu())
    assert torch.equal(idx[:4].long().cpu(), expected)
