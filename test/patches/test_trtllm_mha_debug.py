"""SGLANG_TRTLLM_MHA_DEBUG traps, driven through the real hooked SGLang methods on CPU.

The trtllm_mha kernel itself needs SM100; the trap runs before it, so a
``TRTLLMHAAttnBackend`` made without ``__init__`` (no flashinfer/CUDA here)
and carrying a real ``SWAKVPool`` is enough to exercise it.
"""

import inspect
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_gemma4 import registry
from sglang_gemma4.patches import trtllm_mha_debug as dbg
from sglang_gemma4.testing.hooks import patch_applied

ON = {"SGLANG_TRTLLM_MHA_DEBUG": "1"}
PAGE = 4
FULL_TOKENS, SWA_TOKENS = 64, 32  # k caches: (64+4)/4 = 17 full pages, (32+4)/4 = 9 SWA pages
SWA_LAYER, FULL_LAYER = 0, 1


def _swa_pool(page_size=PAGE):
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    return SWAKVPool(
        size=FULL_TOKENS, size_swa=SWA_TOKENS, page_size=page_size, dtype=torch.bfloat16,
        head_num=1, head_dim=8, swa_attention_layer_ids=[SWA_LAYER],
        full_attention_layer_ids=[FULL_LAYER], device="cpu",
    )


def _backend(pool, page_table, swa_page_table, seq_lens, resolved_swa=True):
    from sglang.srt.layers.attention.trtllm_mha_backend import TRTLLMHAAttnBackend, TRTLLMMHAMetadata

    b = object.__new__(TRTLLMHAAttnBackend)
    b.token_to_kv_pool = pool
    b._swa_kv_pool = pool if resolved_swa else None
    b.page_size = PAGE
    b.forward_metadata = TRTLLMMHAMetadata(
        cache_seqlens_int32=seq_lens.to(torch.int32), page_table=page_table,
        swa_page_table=swa_page_table,
    )
    return b


def _layer(layer_id):
    from sglang.srt.layers.radix_attention import AttentionType

    return types.SimpleNamespace(layer_id=layer_id, attn_type=AttentionType.DECODER)


def _batch(mode="DECODE"):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return types.SimpleNamespace(forward_mode=getattr(ForwardMode, mode))


def _qkv():
    return torch.zeros(1, 8), torch.zeros(1, 8), torch.zeros(1, 8)


def _valid_tables(seq_lens):
    width = 6
    full = torch.randint(1, FULL_TOKENS // PAGE + 1, (len(seq_lens), width), dtype=torch.int32)
    swa = torch.randint(1, SWA_TOKENS // PAGE + 1, (len(seq_lens), width), dtype=torch.int32)
    return full, swa


# -- knob off: nothing registered ------------------------------------------------

def test_knob_off_registers_no_hook():
    from sglang.srt.plugins.hook_registry import HookRegistry

    before = {t: list(HookRegistry._hooks.get(t, [])) for t in dbg.PATCH.targets}
    with patch_applied(dbg.PATCH, {}) as status:
        assert status.state == registry.DISABLED
        after = {t: list(HookRegistry._hooks.get(t, [])) for t in dbg.PATCH.targets}
    assert after == before
    assert all(not any(h is dbg.after_swa_alloc or h is dbg.before_forward_decode
                       or h is dbg.before_forward_extend for _, h, _ in hs) for hs in after.values())


def test_knob_on_registers_before_and_after_hooks():
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    with patch_applied(dbg.PATCH, ON) as status:
        assert status.state == registry.ACTIVE
        kinds = {t: [ht for ht, h, _ in HookRegistry._hooks[t]
                     if h in (dbg.before_forward_decode, dbg.before_forward_extend, dbg.after_swa_alloc)]
                 for t in dbg.PATCH.targets}
    assert kinds[dbg.DECODE] == [HookType.BEFORE] and kinds[dbg.EXTEND] == [HookType.BEFORE]
    assert all(kinds[t] == [HookType.AFTER] for t in dbg.ALLOC_TARGETS)


def test_hook_signatures_match_sglang():
    for target, hook in ((dbg.DECODE, dbg.before_forward_decode), (dbg.EXTEND, dbg.before_forward_extend)):
        real = list(inspect.signature(registry.resolve_target(target)).parameters)
        ours = list(inspect.signature(hook).parameters)
        assert real[:6] == ours[:6] == ["self", "q", "k", "v", "layer", "forward_batch"]
    for target in dbg.ALLOC_TARGETS:
        assert list(inspect.signature(registry.resolve_target(target)).parameters)[0] == "self"


# -- page-table trap ---------------------------------------------------------------

@pytest.mark.parametrize("method,mode", [("forward_decode", "DECODE"), ("forward_extend", "EXTEND")])
def test_trap_fires_through_hooked_method_with_dump(tmp_path, monkeypatch, method, mode):
    monkeypatch.setenv(dbg.DIR_ENV, str(tmp_path))
    pool = _swa_pool()
    seq_lens = torch.tensor([5, 13])  # rows read 2 and 4 pages
    full, swa = _valid_tables(seq_lens)
    swa[1, 3] = 9  # SWA k cache has pages 0..8
    swa[0, 5] = 10_000  # beyond row 0's 2 pages: never read, must not matter
    b = _backend(pool, full, swa, seq_lens)
    with patch_applied(dbg.PATCH, ON):
        with pytest.raises(dbg.TrtllmMhaDebugError) as ei:
            getattr(b, method)(*_qkv(), _layer(SWA_LAYER), _batch(mode))
    msg = str(ei.value)
    assert "layer 0, request row 1" in msg and "page index 9 at column 3" in msg and "[0, 9)" in msg
    assert ei.value.dump_path in msg and ei.value.dump_path.startswith(str(tmp_path))
    dump = torch.load(ei.value.dump_path)
    assert torch.equal(dump["page_table"], swa) and torch.equal(dump["seq_lens"], seq_lens.to(torch.int32))
    assert (dump["row"], dump["col"], dump["value"], dump["num_pages"]) == (1, 3, 9, 9)


def test_trap_catches_pre_patch_e_draft_backend(tmp_path, monkeypatch):
    """Seed root cause: a draft backend without the SWA pool hands full-pool page ids to an SWA layer."""
    monkeypatch.setenv(dbg.DIR_ENV, str(tmp_path))
    pool = _swa_pool()
    seq_lens = torch.tensor([40])
    full = torch.arange(5, 15, dtype=torch.int32)[None, :]  # full pages 5..14, valid for the full cache
    b = _backend(pool, full, None, seq_lens, resolved_swa=False)
    with patch_applied(dbg.PATCH, ON):
        b.forward_metadata.swa_page_table = None
        with pytest.raises(dbg.TrtllmMhaDebugError, match=r"page index 9 at column 4 is outside \[0, 9\)"):
            b.forward_decode(*_qkv(), _layer(SWA_LAYER), _batch())
        # the same table on the full layer is in range: the hook passes through to the kernel call
        with pytest.raises(Exception) as ei:
            b.forward_decode(*_qkv(), _layer(FULL_LAYER), _batch())
        assert not isinstance(ei.value, dbg.TrtllmMhaDebugError)


def test_trap_reports_table_narrower_than_sequence(tmp_path, monkeypatch):
    monkeypatch.setenv(dbg.DIR_ENV, str(tmp_path))
    table = torch.ones(1, 2, dtype=torch.int32)
    with pytest.raises(dbg.TrtllmMhaDebugError, match="needs 3 pages but the page table has 2 columns"):
        dbg.check_page_table(table, torch.tensor([9]), 4, 9, layer_id=3, phase="decode")


@st.composite
def _valid_case(draw):
    page_size = draw(st.sampled_from([1, 4, 16, 64]))
    num_pages = draw(st.integers(1, 50))
    bs = draw(st.integers(1, 6))
    width = draw(st.integers(1, 8))
    seq_lens = draw(st.lists(st.integers(0, width * page_size), min_size=bs, max_size=bs))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    table = torch.randint(0, num_pages, (bs, width), generator=g, dtype=torch.int32)
    garbage = torch.randint(-(2**31), 2**31 - 1, (bs, width), generator=g, dtype=torch.int32)
    need = (torch.tensor(seq_lens) + page_size - 1) // page_size
    unread = torch.arange(width)[None, :] >= need[:, None]
    table[unread] = garbage[unread]  # like torch.empty tails: never read, never checked
    return table, torch.tensor(seq_lens, dtype=torch.int32), page_size, num_pages, need


@settings(max_examples=60, deadline=None)
@given(_valid_case(), st.data())
def test_property_valid_tables_never_trap_and_one_bad_entry_always_does(case, data):
    table, seq_lens, page_size, num_pages, need = case
    dbg.check_page_table(table, seq_lens, page_size, num_pages, layer_id=0, phase="decode")
    readable = [(r, c) for r in range(table.shape[0]) for c in range(int(need[r]))]
    if not readable:
        return
    r, c = data.draw(st.sampled_from(readable))
    bad = table.clone()
    bad[r, c] = data.draw(st.sampled_from([-1, num_pages, num_pages + 7]))
    assert dbg.find_page_table_violation(bad, seq_lens, page_size, num_pages) == (r, c, int(bad[r, c]))


def test_valid_table_passes_hook_with_real_signature():
    pool = _swa_pool()
    seq_lens = torch.tensor([1, 24])
    full, swa = _valid_tables(seq_lens)
    b = _backend(pool, full, swa, seq_lens)
    for layer in (SWA_LAYER, FULL_LAYER):
        assert dbg.before_forward_decode(b, *_qkv(), _layer(layer), _batch(), save_kv_cache=False) is None
        assert dbg.before_forward_extend(b, *_qkv(), _layer(layer), _batch("EXTEND")) is None


# -- SWA allocator trap -----------------------------------------------------------

def _swa_allocator(page_size):
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator

    pool = _swa_pool(page_size)
    return SWATokenToKVPoolAllocator(FULL_TOKENS, SWA_TOKENS, page_size, torch.bfloat16, "cpu", pool, False)


def test_swa_trap_through_hooked_alloc(tmp_path, monkeypatch):
    monkeypatch.setenv(dbg.DIR_ENV, str(tmp_path))
    a = _swa_allocator(1)
    with patch_applied(dbg.PATCH, ON):
        ok = a.alloc(SWA_TOKENS - 1)  # every real SWA slot 1..size_swa-1 is legal
        assert ok is not None and ok.numel() == SWA_TOKENS - 1
        a.swa_attn_allocator.free_pages = torch.tensor([SWA_TOKENS + 1], dtype=torch.int64)  # corrupted free list
        with pytest.raises(dbg.TrtllmMhaDebugError) as ei:
            a.alloc(1)
    msg = str(ei.value)
    assert f"mapped to SWA slot {SWA_TOKENS + 1}, outside [0, {SWA_TOKENS + 1})" in msg
    dump = torch.load(ei.value.dump_path)
    assert dump["swa_indices"].tolist() == [SWA_TOKENS + 1] and dump["swa_bound"] == SWA_TOKENS + 1


@pytest.mark.parametrize("method", ["alloc_extend", "alloc_decode"])
def test_swa_trap_paged_methods_with_real_signature(tmp_path, monkeypatch, method):
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator

    monkeypatch.setenv(dbg.DIR_ENV, str(tmp_path))
    a = _swa_allocator(PAGE)
    t = lambda *v: torch.tensor(v)  # noqa: E731
    args = {
        "alloc_extend": (t(0), t(0), t(3), t(3), t(-1), 3),
        "alloc_decode": (t(4), t(4), t(6)),
    }[method]
    inspect.signature(getattr(SWATokenToKVPoolAllocator, method)).bind(a, *args)  # real 0.5.17 signature
    full = t(8, 9, 10)
    a.set_full_to_swa_mapping(full, t(4, 5, 6))
    assert dbg.after_swa_alloc(full, a, *args) is None
    a.set_full_to_swa_mapping(full, t(4, SWA_TOKENS + PAGE, 6))
    with pytest.raises(dbg.TrtllmMhaDebugError, match=f"full slot 9 mapped to SWA slot {SWA_TOKENS + PAGE}"):
        dbg.after_swa_alloc(full, a, *args)
    assert dbg.after_swa_alloc(None, a, *args) is None  # allocation failure stays SGLang's business
