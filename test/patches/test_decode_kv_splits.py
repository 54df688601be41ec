"""decode_kv_splits on SGLang 0.5.17's real TritonAttnBackend: the split cap its own ``get_num_kv_splits`` then
computes (patched vs not), eligibility, the setting, and the hook through HookRegistry. The kernels' results at
any cap equal an fp32 reference: test/bench/test_decode_attention_bench.py."""

import types

import pytest
import torch

from sglang_gemma4 import registry
from sglang_gemma4.patches import decode_kv_splits as dks
from sglang_gemma4.testing.hooks import patch_applied

tb = pytest.importorskip("sglang.srt.layers.attention.triton_backend")


def _runner(arch="Gemma4ForCausalLM", user_cap=8):
    return types.SimpleNamespace(model=type(arch, (), {})(), server_args=types.SimpleNamespace(
        triton_attention_num_kv_splits=user_cap), model_config=types.SimpleNamespace(
        hf_config=types.SimpleNamespace(architectures=[arch])))


def _backend(runner, **over):
    """The attributes SGLang's __init__ sets that get_num_kv_splits reads (H200: 132 SMs; 26B sliding heads)."""
    b = object.__new__(tb.TritonAttnBackend)
    b.__dict__.update(dict(static_kv_splits=False, max_kv_splits=runner.server_args.triton_attention_num_kv_splits,
                           split_tile_size=None, use_mla=False, enable_deterministic=False, device_core_count=132,
                           num_head=16, num_kv_head=8), **over)
    return b


def _splits(b, seq_lens):
    out = torch.empty(len(seq_lens), dtype=torch.int32)
    b.get_num_kv_splits(out, torch.tensor(seq_lens, dtype=torch.int32))
    return out.tolist()


def test_small_batches_get_the_higher_cap_large_ones_are_unchanged(monkeypatch):
    monkeypatch.delenv(dks.CAP_ENV, raising=False)
    r = _runner()
    off, on = _backend(r), _backend(r)
    dks.after_init(None, on, r)
    assert off.max_kv_splits == 8 and on.max_kv_splits == dks.DEFAULT_CAP
    assert _splits(off, [1000]) == [8] and _splits(on, [1000]) == [32]  # batch 1: SGLang's cap binds
    assert _splits(off, [8000] * 2) == [8, 8] and _splits(on, [8000] * 2) == [32, 32]
    big = [1000] * 48  # SGLang's formula wants fewer splits than either cap
    assert _splits(on, big) == _splits(off, big) and max(_splits(off, big)) < 8
    monkeypatch.setenv(dks.CAP_ENV, "16")
    b = _backend(r)
    dks.after_init(None, b, r)
    assert b.max_kv_splits == 16 and _splits(b, [1000]) == [16]


@pytest.mark.parametrize("runner,over", [
    (_runner("Qwen3ForCausalLM"), {}),          # another model
    (_runner(user_cap=12), {}),                 # the user chose a cap
    (_runner(), {"split_tile_size": 256}),      # deterministic mode's split tiles
    (_runner(), {"use_mla": True}),
    (_runner(), {"static_kv_splits": True}),    # every sequence would take the cap
])
def test_left_alone(runner, over):
    b = _backend(runner, **over)
    before = b.max_kv_splits
    dks.after_init(None, b, runner)
    assert b.max_kv_splits == before


@pytest.mark.parametrize("bad", ["0", "-4", "x", "257", "1.5"])
def test_bad_cap_is_an_error_naming_the_variable(bad):
    st = registry.evaluate(dks.PATCH, {dks.PATCH.knob: "1", dks.CAP_ENV: bad})
    assert st.state == registry.ERROR and st.knob == dks.CAP_ENV and "[1, 256]" in st.reason


def test_registered_through_sglangs_hook_registry(monkeypatch):
    """An AFTER hook on __init__ (a stand-in for SGLang's, which needs a GPU model runner); off by default."""

    def init(self, model_runner, skip_prefill=False, kv_indptr_buf=None):
        self.__dict__.update(_backend(model_runner).__dict__)

    monkeypatch.setattr(tb.TritonAttnBackend, "__init__", init)
    monkeypatch.delenv(dks.CAP_ENV, raising=False)
    with patch_applied(dks.PATCH, {dks.PATCH.knob: "1"}) as st:
        assert st.state == registry.ACTIVE
        assert tb.TritonAttnBackend(_runner()).max_kv_splits == dks.DEFAULT_CAP
        assert tb.TritonAttnBackend(_runner("Qwen3ForCausalLM")).max_kv_splits == 8
    assert tb.TritonAttnBackend(_runner()).max_kv_splits == 8  # hooks removed again
    with patch_applied(dks.PATCH, {}) as st:
        assert st.state != registry.ACTIVE
    assert dks.PATCH.upstream() is None and dks.PATCH.unavailable() is None
