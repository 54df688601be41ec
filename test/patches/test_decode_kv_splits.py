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


def _splits(b, seq_lens, group=1):
    out = torch.empty(len(seq_lens) * group, dtype=torch.int32)
    b.get_num_kv_splits(out, torch.tensor(seq_lens, dtype=torch.int32))
    return out.tolist()


def _raised(monkeypatch, cap=None, **over):
    """A backend after the patch's __init__ hook, its get_num_kv_splits through the patch's AROUND hook."""
    if cap is None:
        monkeypatch.delenv(dks.CAP_ENV, raising=False)
    else:
        monkeypatch.setenv(dks.CAP_ENV, str(cap))
    r = _runner()
    b = _backend(r, **over)
    dks.after_init(None, b, r)
    original = tb.TritonAttnBackend.get_num_kv_splits
    b.get_num_kv_splits = lambda n, s: dks.around_get_num_kv_splits(original, b, n, s)
    return b


# (q heads, kv heads): 26B sliding target layers, 26B/E4B full layers, the 26B assistant on sliding layers
WIDTHS = {"26b_sliding": (16, 8), "full": (16, 2), "26b_draft_sliding": (8, 8)}


@pytest.mark.parametrize("width", WIDTHS)
def test_batch_one_takes_the_split_count_the_h200_bench_measured_best(monkeypatch, width):
    """runs/decode-attention-nvidia-h200.md, batch 1: 16 splits best at 1k keys (32 slower), 32-64 at 8k; SGLang's
    own count at its cap of 8 binds."""
    hq, hkv = WIDTHS[width]
    off, on = _backend(_runner(), num_head=hq, num_kv_head=hkv), _raised(monkeypatch, num_head=hq, num_kv_head=hkv)
    assert on.max_kv_splits == dks.DEFAULT_CAP and off.max_kv_splits == 8
    assert _splits(off, [1000]) == [8] and _splits(on, [1000]) == [16]
    if width == "full":  # sliding layers attend at most 1024 keys
        assert _splits(on, [8000]) == [32] and _splits(off, [8000]) == [8]
    assert on.max_kv_splits == dks.DEFAULT_CAP  # restored after each call: the buffers' size and the kernels' grid


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("bs,keys", [(16, 1000), (16, 8000), (48, 1000), (64, 3000)])
def test_batches_that_fill_the_gpu_get_sglangs_own_split_counts(monkeypatch, width, bs, keys):
    """At batch 16 SGLang's formula under a raised cap picks 17-29 splits, 11-15 % slower on the full layers than its
    default 8: the patched backend must compute exactly what unpatched SGLang computes."""
    hq, hkv = WIDTHS[width]
    lens = [keys - 7 * i for i in range(bs)]
    off, on = _backend(_runner(), num_head=hq, num_kv_head=hkv), _raised(monkeypatch, num_head=hq, num_kv_head=hkv)
    if dks.token_grid(bs, 1, hq, hkv) * 8 < 132:  # draft sliding heads are 8 programs per sequence: bs 16 fills
        pytest.skip("this width does not fill the H200 at this batch")
    assert _splits(on, lens) == _splits(off, lens)


def test_mid_batches_stay_within_the_cap_and_64_keys_per_split(monkeypatch):
    on = _raised(monkeypatch, num_head=16, num_kv_head=2)
    off = _backend(_runner(), num_head=16, num_kv_head=2)
    for bs in range(1, 17):
        lens = [100 + 613 * i for i in range(bs)]
        got = _splits(on, lens)
        assert all(1 <= n <= dks.DEFAULT_CAP for n in got)
        assert all(n <= -(-k // 64) for n, k in zip(got, lens))
        assert all(n >= min(m, -(-k // 64)) for n, m, k in zip(got, _splits(off, lens), lens))  # never below SGLang's
    assert _splits(on, [1, 3, 64, 65]) == [1, 1, 1, 2]


def test_speculative_groups_map_each_token_to_its_sequence(monkeypatch):
    """num_kv_splits holds num_seq x group entries, sequence-major (SGLang's store layout)."""
    on = _raised(monkeypatch, num_head=16, num_kv_head=2)
    off = _backend(_runner(), num_head=16, num_kv_head=2)
    # 2 sequences x 2 drafts x 2 head blocks = 8 programs per split -> cap 17; SGLang's formula then gives the
    # 600-key sequence 17 splits and the 300-key one 9, which the 64-key floor cuts to 10 and 5
    assert _splits(on, [300, 600], group=2) == [5, 5, 10, 10]
    assert _splits(off, [300, 600], group=2) == [4, 4, 8, 8]


def test_user_cap_and_cap_knob(monkeypatch):
    b = _raised(monkeypatch, cap=12, num_head=16, num_kv_head=2)
    assert b.max_kv_splits == 12 and _splits(b, [8000]) == [12]
    b = _raised(monkeypatch, cap=4, num_head=16, num_kv_head=2)  # below SGLang's default: the cap still rules
    assert b.max_kv_splits == 4 and _splits(b, [8000]) == [4]


def test_no_sm_count_gives_sglang_its_default(monkeypatch):
    """device_core_count 0: SGLang fills every sequence with max_kv_splits, which must be its default, not ours."""
    on = _raised(monkeypatch, device_core_count=0)
    off = _backend(_runner(), device_core_count=0)
    assert _splits(on, [8000, 20]) == _splits(off, [8000, 20]) == [8, 8]


def test_a_backend_the_patch_did_not_raise_is_sglangs(monkeypatch):
    b = _backend(_runner(user_cap=12), num_head=16, num_kv_head=2)
    dks.after_init(None, b, _runner(user_cap=12))
    original = tb.TritonAttnBackend.get_num_kv_splits
    out = torch.empty(1, dtype=torch.int32)
    dks.around_get_num_kv_splits(original, b, out, torch.tensor([8000], dtype=torch.int32))
    assert out.tolist() == [12]


def test_cap_restored_when_sglang_raises(monkeypatch):
    b = _raised(monkeypatch)

    def boom(self, n, s):
        assert self.max_kv_splits == 17  # one wave of the 8-program-per-split sliding grid: what SGLang runs under
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        dks.around_get_num_kv_splits(boom, b, torch.empty(1, dtype=torch.int32), torch.tensor([10]))
    assert b.max_kv_splits == dks.DEFAULT_CAP


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
        b = tb.TritonAttnBackend(_runner())
        assert b.max_kv_splits == dks.DEFAULT_CAP
        assert _splits(b, [1000]) == [16] and _splits(b, [1000] * 48) == _splits(_backend(_runner()), [1000] * 48)
        assert tb.TritonAttnBackend(_runner("Qwen3ForCausalLM")).max_kv_splits == 8
    assert tb.TritonAttnBackend(_runner()).max_kv_splits == 8  # hooks removed again
    with patch_applied(dks.PATCH, {}) as st:
        assert st.state != registry.ACTIVE
    assert dks.PATCH.upstream() is None and dks.PATCH.unavailable() is None
