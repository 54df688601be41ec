"""Triton SWA decode window on SGLang 0.5.17's real ``TritonAttnBackend`` methods, on CPU.

The backend is made with ``object.__new__`` and given only the attributes the
metadata builders read (its ``__init__`` needs a GPU model runner); every
window index comes from SGLang's own builders and its triton index kernel
(run by the Triton interpreter, see test/conftest.py). The reference is plain
torch: a query at position p must see keys [p - sws, p].
"""

import types

import pytest
import torch

from sglang_gemma4 import registry
from sglang_gemma4.patches import triton_swa_window as tsw
from sglang_gemma4.testing.hooks import patch_applied

ON = {"SGLANG_GEMMA4_TRITON_SWA_WINDOW": "1"}
SWS = 7  # config.sliding_window = 8
MAX_CTX = 64
MAX_BS = 4


def _tb():
    from sglang.srt.layers.attention import triton_backend

    return triton_backend


def _runner(arch):
    model = type(arch, (), {})()
    return types.SimpleNamespace(model=model, model_config=types.SimpleNamespace(
        hf_config=types.SimpleNamespace(architectures=[arch])))


def _backend(sws=SWS, translate=None, pool=None, num_draft_tokens=None):
    tb = _tb()
    b = object.__new__(tb.TritonAttnBackend)
    n_slots = MAX_BS * MAX_CTX
    # distinct, non-contiguous slot ids per request so a wrong start shows up
    req_to_token = (torch.randperm(n_slots, generator=torch.Generator().manual_seed(0)) + 1)
    b.__dict__.update(
        sliding_window_size=sws, req_to_token=req_to_token.view(MAX_BS, MAX_CTX).to(torch.int32),
        token_to_kv_pool=pool, _translate_kv_loc=translate, dcp_size=1, page_size=1,
        device="cpu", max_context_len=MAX_CTX, num_head=2, max_kv_splits=2, v_head_dim=8,
        swa_v_head_dim=None, use_sliding_window_kv_pool=False, static_kv_splits=True,
        enable_deterministic=False, device_core_count=0, split_tile_size=None,
        is_draft_runner=False, skip_prefill=False, num_draft_tokens=num_draft_tokens,
        speculative_num_steps=1, topk=1, use_mla=False,
        kv_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int32),
        window_kv_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int32),
        qo_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int64),
        mask_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int64),
        forward_metadata=None, _verify_mask=None,
    )
    tsw.after_init(None, b, _runner("Gemma4ForCausalLM"))
    return b


def _batch(mode, seq_lens, **kw):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    seq = torch.tensor(seq_lens, dtype=torch.int64)
    fb = types.SimpleNamespace(
        forward_mode=getattr(ForwardMode, mode), batch_size=len(seq_lens), spec_info=None,
        req_pool_indices=torch.arange(len(seq_lens), dtype=torch.int64), seq_lens=seq,
        seq_lens_sum=int(seq.sum()), seq_lens_cpu=seq.clone(), out_cache_loc=None, encoder_lens=None,
    )
    fb.__dict__.update(kw)
    return fb


def _window(indptr, indices, r):
    return indices[int(indptr[r]):int(indptr[r + 1])].tolist()


def _expected(b, r, end, n):
    """Slots of keys [end - n, end) of request r."""
    return b.req_to_token[r, max(end - n, 0):end].to(torch.int64).tolist()


SEQ = [3, SWS, SWS + 1, SWS + 2, 40]  # below, at, just past, past the window


OFF = {"SGLANG_GEMMA4_TRITON_SWA_WINDOW": "0"}


def test_status_default_on_upstream_check_and_knob_off_applies_nothing(clean_env):
    assert registry.evaluate(tsw.PATCH, {}).state == registry.ACTIVE  # default on since the H200 run
    st = registry.evaluate(tsw.PATCH, OFF)
    assert st.state == registry.DISABLED and "sliding_window - 1" in st.reason
    assert tsw.PATCH.upstream() is None  # 0.5.17 keeps min(seq_lens, sws)
    tb = _tb()
    before = {n: tb.TritonAttnBackend.__dict__[n] for n in
              ("__init__", "init_forward_metadata", "_update_decode_kv_buffers", "init_cuda_graph_state")}
    with patch_applied(tsw.PATCH, OFF) as st:
        assert st.state == registry.DISABLED
        assert all(tb.TritonAttnBackend.__dict__[n] is f for n, f in before.items())
    with patch_applied(tsw.PATCH, ON):
        assert all(tb.TritonAttnBackend.__dict__[n] is not f for n, f in before.items())
    assert all(tb.TritonAttnBackend.__dict__[n] is f for n, f in before.items())


@pytest.mark.parametrize("arch,eligible", [
    ("Gemma4ForCausalLM", True), ("Gemma4ForConditionalGeneration", True),
    ("Gemma4UnifiedForConditionalGeneration", True), ("Gemma4AssistantForCausalLM", True),
    ("Gemma4UnifiedAssistantForCausalLM", True), ("Gemma3ForCausalLM", False),
    ("Gemma2ForCausalLM", False), ("MistralForCausalLM", False),
])
def test_eligibility_by_architecture(arch, eligible):
    b = object.__new__(_tb().TritonAttnBackend)
    b.sliding_window_size = SWS
    tsw.after_init(None, b, _runner(arch))
    assert (tsw.decode_radius(b) == SWS + 1) is eligible
    nowin = object.__new__(_tb().TritonAttnBackend)
    nowin.sliding_window_size = None
    tsw.after_init(None, nowin, _runner(arch))
    assert tsw.decode_radius(nowin) is None


def test_eager_decode_window_has_sliding_window_keys_ending_at_current_token():
    seq = SEQ[:MAX_BS]
    with patch_applied(tsw.PATCH, ON):
        b = _backend()
        b.init_forward_metadata(_batch("DECODE", seq))
        md = b.forward_metadata
        assert b.sliding_window_size == SWS  # scope restored
        for r, s in enumerate(seq):
            win = _window(md.window_kv_indptr, md.window_kv_indices, r)
            assert len(win) == min(s, SWS + 1)
            assert win == _expected(b, r, s, SWS + 1)  # keys [p - sws, p], p = s - 1
    # unpatched SGLang: one key short once past the window
    b = _backend()
    b.init_forward_metadata(_batch("DECODE", seq))
    md = b.forward_metadata
    lens = [int(md.window_kv_indptr[r + 1] - md.window_kv_indptr[r]) for r in range(len(seq))]
    assert lens == [min(s, SWS) for s in seq]


def test_other_models_keep_sglang_decode_window():
    with patch_applied(tsw.PATCH, ON):
        b = _backend()
        tsw._ELIGIBLE.pop(b)
        tsw.after_init(None, b, _runner("Gemma3ForCausalLM"))
        b.init_forward_metadata(_batch("DECODE", [40, 3]))
        ind = b.forward_metadata.window_kv_indptr
        assert [int(ind[1] - ind[0]), int(ind[2] - ind[1])] == [SWS, 3]


def _extend_batch(prefix, extend):
    p = torch.tensor(prefix, dtype=torch.int64)
    e = torch.tensor(extend, dtype=torch.int64)
    return _batch("EXTEND", [a + c for a, c in zip(prefix, extend)], extend_prefix_lens=p,
                  extend_prefix_lens_cpu=list(prefix), extend_seq_lens=e, extend_seq_lens_cpu=list(extend))


def _verify_batch(seq, ndraft):
    spec = types.SimpleNamespace(draft_token_num=ndraft, kv_indptr=None,
                                 custom_mask=torch.ones(len(seq) * ndraft * (max(seq) + ndraft), dtype=torch.uint8))
    return _batch("TARGET_VERIFY", seq, spec_info=spec)


def _md_tuple(md):
    return (md.window_kv_indptr.clone(), md.window_kv_indices.clone(),
            None if md.window_kv_offsets is None else md.window_kv_offsets.clone())


@pytest.mark.parametrize("kind", ["extend", "verify"])
def test_eager_extend_and_verify_windows_unchanged(kind):
    make = (lambda: _extend_batch([0, SWS, SWS + 3, 30], [5, 2, 1, 4])) if kind == "extend" \
        else (lambda: _verify_batch([3, SWS, SWS + 3, 30], 3))
    b = _backend(num_draft_tokens=3)
    b.init_forward_metadata(make())
    ref = _md_tuple(b.forward_metadata)
    with patch_applied(tsw.PATCH, ON):
        b2 = _backend(num_draft_tokens=3)
        b2.init_forward_metadata(make())
        got = _md_tuple(b2.forward_metadata)
    for x, y in zip(ref, got):
        assert (x is None and y is None) or torch.equal(x, y)
    # what extend/verify must keep: the last min(prefix, sws) prefix keys (the kernel masks q - k <= sws)
    prefix = [0, SWS, SWS + 3, 30] if kind == "extend" else [3, SWS, SWS + 3, 30]
    for r, p in enumerate(prefix):
        assert _window(got[0], got[1], r) == _expected(b2, r, p, SWS)


def test_cuda_graph_buffers_sized_for_decode_and_filled_in_bounds():
    max_num_tokens = MAX_BS  # plain decode graph: one token per request
    ref = _backend()
    ref.init_cuda_graph_state(MAX_BS, max_num_tokens)
    assert ref.cuda_graph_window_kv_indices.numel() == max_num_tokens * SWS
    seq = [40, 41, 33, 60]  # every request past the window: decode needs bs * (sws + 1) slots
    assert sum(min(s, SWS + 1) for s in seq) > ref.cuda_graph_window_kv_indices.numel()
    with patch_applied(tsw.PATCH, ON):
        b = _backend()
        b.init_cuda_graph_state(MAX_BS, max_num_tokens)
        assert b.sliding_window_size == SWS
        assert b.cuda_graph_window_kv_indices.numel() == max_num_tokens * (SWS + 1)
        assert b.cuda_graph_kv_indices.numel() == ref.cuda_graph_kv_indices.numel()
        b.init_forward_metadata_out_graph(_batch("DECODE", seq))  # replay path
        for r, s in enumerate(seq):
            assert _window(b.window_kv_indptr, b.cuda_graph_window_kv_indices, r) == _expected(b, r, s, SWS + 1)
        # capture path builds the same view on the same buffers
        b.init_forward_metadata_out_graph(_batch("DECODE", seq), in_capture=True)
        md = b.forward_metadata
        assert md.window_kv_indices is b.cuda_graph_window_kv_indices
        assert int(md.window_kv_indptr[-1]) == sum(SWS + 1 for _ in seq)


def test_cuda_graph_target_verify_window_unchanged():
    seq, nd = [3, SWS, 20, 33], 3

    def run(b):
        b.init_cuda_graph_state(MAX_BS, MAX_BS * nd)
        b.init_forward_metadata_out_graph(_verify_batch(seq, nd))
        n = int(b.window_kv_indptr[len(seq)])
        return (b.window_kv_indptr[: len(seq) + 1].clone(), b.cuda_graph_window_kv_indices[:n].clone(),
                b.cuda_graph_window_kv_offsets[: len(seq)].clone())

    ref = run(_backend(num_draft_tokens=nd))
    with patch_applied(tsw.PATCH, ON):
        got = run(_backend(num_draft_tokens=nd))
    assert all(torch.equal(x, y) for x, y in zip(ref, got))
    assert [int(ref[0][r + 1] - ref[0][r]) for r in range(len(seq))] == [min(s, SWS) for s in seq]


def test_unified_pool_translate_covers_the_whole_decode_window():
    """``_translate_cuda_graph_shared_pool_locs`` clamps with the radius: it must count sws + 1."""
    off = 10_000
    pool = types.SimpleNamespace(translate_loc_from_full_to_swa=lambda x: x + off)
    seq = [40, 5, 33]
    with patch_applied(tsw.PATCH, ON):
        b = _backend(translate=lambda x: x, pool=pool)
        b.init_cuda_graph_state(MAX_BS, MAX_BS)
        fb = _batch("DECODE", seq, out_cache_loc=torch.arange(len(seq), dtype=torch.int64))
        b.init_forward_metadata_out_graph(fb)
        for r, s in enumerate(seq):
            want = [x + off for x in _expected(b, r, s, SWS + 1)]
            assert _window(b.window_kv_indptr, b.cuda_graph_window_kv_indices, r) == want


def test_decode_kernel_matches_torch_sliding_window_reference():
    """SGLang's triton decode kernel on the patched window == torch attention over sliding_window keys."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    seq = [40, 5, SWS + 1]
    H, D = 2, 16
    with patch_applied(tsw.PATCH, ON):
        b = _backend()
        b.init_forward_metadata(_batch("DECODE", seq))
        md = b.forward_metadata
    g = torch.Generator().manual_seed(1)
    n_slots = int(b.req_to_token.max()) + 1
    kbuf = torch.randn(n_slots, 1, D, generator=g)
    vbuf = torch.randn(n_slots, 1, D, generator=g)
    q = torch.randn(len(seq), H, D, generator=g)
    o = torch.empty(len(seq), H, D)
    logits = torch.empty(len(seq), H, b.max_kv_splits, D)
    lse = torch.empty(len(seq), H, b.max_kv_splits)
    decode_attention_fwd(q, kbuf, vbuf, o, md.window_kv_indptr, md.window_kv_indices, logits, lse,
                         md.num_kv_splits, b.max_kv_splits, D ** -0.5, 1.0, 1.0)
    for r, s in enumerate(seq):
        slots = torch.tensor(_expected(b, r, s, SWS + 1))  # keys p - k <= sws, p = s - 1
        att = torch.softmax(q[r] @ kbuf[slots, 0].T * D ** -0.5, dim=-1)
        torch.testing.assert_close(o[r], att @ vbuf[slots, 0], atol=1e-4, rtol=1e-4)
        if s > SWS + 1:  # SGLang's window would differ from this reference
            short = torch.tensor(_expected(b, r, s, SWS))
            att_s = torch.softmax(q[r] @ kbuf[short, 0].T * D ** -0.5, dim=-1)
            assert not torch.allclose(o[r], att_s @ vbuf[short, 0], atol=1e-3)
