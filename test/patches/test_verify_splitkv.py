"""verify_splitkv on SGLang 0.5.17's real ``TritonAttnBackend.forward_extend`` (target-verify), on CPU.

The backend is made with ``object.__new__`` and given the attributes forward_extend reads (its ``__init__``
needs a GPU model runner); the patch's own ``after_init`` decides eligibility. The reference is the same call
unpatched: SGLang's ``extend_attention_fwd`` with the chain's tree mask (Triton interpreter, fp32, where the
interpreter's dot is exact).
"""

import os
import types

import pytest
import torch

from sglang_gemma4 import registry
from sglang_gemma4.patches import verify_splitkv as vsk
from sglang_gemma4.testing.hooks import patch_applied

# CPU tensors through Triton need the interpreter; on a GPU machine the compiled kernels are covered by
# test/kernels/test_verify_attention.py (real widths vs SGLang's kernel) and the engine by the modes test.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU-tensor test of the patch: needs the Triton interpreter (no GPU)")
tb = pytest.importorskip("sglang.srt.layers.attention.triton_backend")
L, HQ, HKV, D = 4, 4, 2, 32
SWS = 6  # a sliding layer's exclusive radius


def _runner(arch="Gemma4ForCausalLM"):
    return types.SimpleNamespace(model=type(arch, (), {})(), model_config=types.SimpleNamespace(
        hf_config=types.SimpleNamespace(architectures=[arch])))


class _Pool:
    """One layer's KV buffers; set_kv_buffer writes the draft tokens' K/V as SGLang's pool does."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v

    def set_kv_buffer(self, layer, loc, k, v, k_scale=None, v_scale=None, **kw):
        if k_scale is not None:  # as SGLang's pool stores a scaled cache: quantised k / k_scale
            k, v = k / k_scale, v / v_scale
        self.k[loc.loc], self.v[loc.loc] = k.to(self.k.dtype), v.to(self.v.dtype)


def _backend(pool, topk=1, runner=None, patched=True):
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    b = object.__new__(tb.TritonAttnBackend)
    b.__dict__.update(
        token_to_kv_pool=pool, _translate_kv_loc=None, dcp_size=1, page_size=1, enable_deterministic=False,
        use_mla=False, topk=topk, num_draft_tokens=L, allow_bidirectional_attention_in_extend=False,
        use_verify_splitkv=False, verify_splitkv_fwd=None, extend_attention_fwd=extend_attention_fwd,
        req_to_token_pool=types.SimpleNamespace(size=8),
    )
    if patched:
        vsk.after_init(None, b, runner or _runner())
    return b


def _case(prefix_lens, window, seed=0):
    """Pool, draft q/k/v, target-verify metadata (as SGLang builds it: chain mask over the untrimmed row,
    window buffers of the last min(P, sws) prefix keys with their offsets)."""
    g = torch.Generator().manual_seed(seed)
    bs = len(prefix_lens)
    slots = sum(prefix_lens) + bs * L + 5
    perm = torch.randperm(slots, generator=g)
    k_buf, v_buf = torch.randn(slots, HKV, D, generator=g), torch.randn(slots, HKV, D, generator=g)
    prefix, at = [], 0
    for P in prefix_lens:
        prefix.append(perm[at:at + P])
        at += P
    out_loc = perm[at:at + bs * L]
    kept = [p[max(0, p.numel() - window):] if window > 0 else p for p in prefix]
    masks = []
    for P in prefix_lens:
        m = torch.ones(L, P + L, dtype=torch.bool)
        m[:, P:] = torch.tril(torch.ones(L, L, dtype=torch.bool))
        masks.append(m.flatten())
    md = types.SimpleNamespace(
        max_extend_len=L, qo_indptr=(torch.arange(bs + 1) * L).to(torch.int32),
        kv_indptr=torch.tensor([0] + prefix_lens).cumsum(0).to(torch.int32), kv_indices=torch.cat(prefix).to(torch.int32),
        window_kv_indptr=torch.tensor([0] + [k.numel() for k in kept]).cumsum(0).to(torch.int32),
        window_kv_indices=torch.cat(kept).to(torch.int32),
        window_kv_offsets=torch.tensor([p.numel() - k.numel() for p, k in zip(prefix, kept)], dtype=torch.int32),
        custom_mask=torch.cat(masks), mask_indptr=torch.tensor([0] + [m.numel() for m in masks]).cumsum(0),
        swa_out_cache_loc=None, out_cache_loc_full_physical=None,
    )
    qkv = [torch.randn(bs * L, h, D, generator=g) for h in (HQ, HKV, HKV)]
    return k_buf, v_buf, md, out_loc, qkv


def _layer(window, **kw):
    from sglang.srt.layers.radix_attention import AttentionType

    d = dict(layer_id=0, tp_q_head_num=HQ, qk_head_dim=D, v_head_dim=D, sliding_window_size=window,
             k_scale=None, v_scale=None, logit_capping_method="tanh", logit_cap=0.0, is_cross_attention=False,
             attn_type=AttentionType.DECODER, scaling=D ** -0.5, xai_temperature_len=-1)
    d.update(kw)
    return types.SimpleNamespace(**d)


def _forward(b, md, out_loc, qkv, layer):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    b.forward_metadata = md
    fb = types.SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY, out_cache_loc=out_loc)
    q, k, v = qkv
    return b.forward_extend(q.reshape(q.shape[0], -1), k, v, layer, fb)


def _both(prefix_lens, window, monkeypatch, layer_kw=None, seed=0):
    k_buf, v_buf, md, out_loc, qkv = _case(prefix_lens, window, seed)
    ran = []
    real = vsk.verify_fwd

    def spy(*a, **kw):
        ran.append(real(*a, **kw))
        return ran[-1]

    layer = _layer(window, **(layer_kw or {}))
    ref = _forward(_backend(_Pool(k_buf.clone(), v_buf.clone()), patched=False), md, out_loc, qkv, layer)
    monkeypatch.setattr(vsk, "verify_fwd", spy)
    got = _forward(_backend(_Pool(k_buf.clone(), v_buf.clone())), md, out_loc, qkv, layer)
    return ref, got, ran


@pytest.mark.parametrize("window", [-1, SWS])
@pytest.mark.parametrize("prefix_lens", [[37], [37, 3, 0, 20]])
def test_patched_verify_equals_sglangs(window, prefix_lens, monkeypatch):
    ref, got, ran = _both(prefix_lens, window, monkeypatch, seed=len(prefix_lens))
    assert ran == [True]  # the split-KV kernel served the call, SGLang's did not run
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5)


def test_what_it_was_not_built_for_runs_sglangs_kernel(monkeypatch):
    """A logit cap: verify_fwd says False and SGLang's kernel serves the call, bit for bit."""
    ref, got, ran = _both([37, 5], SWS, monkeypatch, layer_kw=dict(logit_cap=30.0))
    assert ran == [False]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("window", [-1, SWS])
def test_fp8_pool_with_scales_is_served(window, monkeypatch):
    """An fp8 KV pool (SGLang stores k / k_scale) with host-side descales: ours widens the tiles to q's dtype
    and equals the fp32 attention over the dequantised pool; SGLang's kernel also rounds q and the
    probabilities to fp8, so it agrees only to fp8 precision (a lost or doubled scale is far outside)."""
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:
        pytest.skip("no float8_e4m3fn in this torch")
    k_buf, v_buf, md, out_loc, qkv = _case([37, 5], window, seed=4)
    k_buf, v_buf = (k_buf / 0.5).to(fp8), (v_buf / 2.0).to(fp8)
    layer = _layer(window, k_scale=torch.tensor(0.5), k_scale_float=0.5, v_scale=torch.tensor(2.0), v_scale_float=2.0)
    ran, real = [], vsk.verify_fwd
    ref = _forward(_backend(_Pool(k_buf.clone(), v_buf.clone()), patched=False), md, out_loc, qkv, layer)
    monkeypatch.setattr(vsk, "verify_fwd", lambda *a, **kw: ran.append(real(*a, **kw)) or ran[-1])
    pool = _Pool(k_buf.clone(), v_buf.clone())
    got = _forward(_backend(pool), md, out_loc, qkv, layer)
    assert ran == [True]
    from sglang_gemma4.kernels.verify_attention import verify_attention_ref

    ind, ptr = (md.window_kv_indices, md.window_kv_indptr) if window > 0 else (md.kv_indices, md.kv_indptr)
    q, k, v = qkv
    exact = verify_attention_ref(q, k, v, k_buf, v_buf, ptr, ind, L, D ** -0.5, window, k_scale=0.5, v_scale=2.0)
    torch.testing.assert_close(got.view_as(exact), exact, rtol=2e-5, atol=2e-5)
    exact = exact.view_as(got)
    err_sglang = ((ref - exact).norm() / exact.norm()).item()
    print(f"fp8 pool, window {window}: relative error vs fp32, SGLang {err_sglang:.4f}, ours "
          f"{((got - exact).norm() / exact.norm()).item():.2e}")
    assert 0 < err_sglang < 0.1  # SGLang's fp8 path is close (same scales), not exact


@pytest.mark.parametrize("topk,runner,why", [
    (2, _runner(), "topk 2"), (1, _runner("LlamaForCausalLM"), "not a Gemma-4"), (0, _runner(), "topk 0")])
def test_ineligible_backends_keep_sglangs_gate(topk, runner, why, monkeypatch, caplog):
    import logging

    monkeypatch.setattr(vsk, "_told", set())
    with caplog.at_level(logging.INFO, logger=vsk.logger.name):
        b = _backend(_Pool(None, None), topk=topk, runner=runner)
        _backend(_Pool(None, None), topk=topk, runner=runner)
    assert b.use_verify_splitkv is False and b.verify_splitkv_fwd is None
    assert why in vsk.eligible(b, runner)
    said = [r.getMessage() for r in caplog.records if "keeps SGLang's target-verify kernel" in r.getMessage()]
    assert len(said) == 1 and why in said[0]  # once per reason


def test_ragged_or_tensor_lengths_fall_back():
    k_buf, v_buf, md, out_loc, (q, k, v) = _case([9, 4], -1)
    o = torch.empty_like(q)
    args = (q, k, v, o, k_buf, v_buf, md.qo_indptr, md.kv_indptr, md.kv_indices, md.custom_mask, True,
            md.mask_indptr)
    assert vsk.verify_fwd(*args, torch.tensor(L), 1.0, 1.0) is False  # reading it would sync
    assert vsk.verify_fwd(q[:-1], *args[1:], L, 1.0, 1.0) is False  # not bs * L rows
    assert vsk.verify_fwd(*args[:10], False, md.mask_indptr, L, 1.0, 1.0) is False  # non-causal
    assert vsk.verify_fwd(*args, L, 1.0, 1.0) is True


def test_a_failing_launch_falls_back_to_sglangs_kernel_for_good(monkeypatch, caplog):
    """A kernel that raises (say, a compile failure on an untested GPU) must not stop the server: False (SGLang's
    kernel writes o), logged with the traceback, and every later call keeps SGLang's kernel."""
    import logging

    k_buf, v_buf, md, out_loc, (q, k, v) = _case([9, 4], -1)
    args = (q, k, v, torch.empty_like(q), k_buf, v_buf, md.qo_indptr, md.kv_indptr, md.kv_indices, md.custom_mask,
            True, md.mask_indptr, L, 1.0, 1.0)
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("ptxas failed")

    monkeypatch.setattr(vsk, "_failed", [False])
    monkeypatch.setattr("sglang_gemma4.kernels.verify_attention.verify_attention_fwd", broken)
    with caplog.at_level(logging.ERROR, logger=vsk.logger.name):
        assert vsk.verify_fwd(*args) is False
        assert vsk.verify_fwd(*args) is False
    assert calls == [1]  # not retried per layer
    assert any("SGLang's target-verify kernel serves from now on" in r.getMessage() and r.exc_info
               for r in caplog.records)


def test_registered_through_sglangs_hook_registry(monkeypatch):
    """Through HookRegistry: an AFTER hook on __init__ (a stand-in for SGLang's, which needs a GPU runner)."""

    def init(self, model_runner, skip_prefill=False, kv_indptr_buf=None):
        self.__dict__.update(topk=1, num_draft_tokens=L, page_size=1, dcp_size=1, enable_deterministic=False,
                             use_mla=False, use_verify_splitkv=False, verify_splitkv_fwd="sglang's")

    monkeypatch.setattr(tb.TritonAttnBackend, "__init__", init)
    with patch_applied(vsk.PATCH, {vsk.PATCH.knob: "1"}) as st:
        assert st.state == registry.ACTIVE
        b = tb.TritonAttnBackend(_runner())
        other = tb.TritonAttnBackend(_runner("Qwen3ForCausalLM"))
    assert b.use_verify_splitkv is True and b.verify_splitkv_fwd.__wrapped__ is vsk.verify_fwd  # compile-disabled
    assert other.use_verify_splitkv is False and other.verify_splitkv_fwd == "sglang's"
    off = tb.TritonAttnBackend(_runner())  # hooks removed again
    assert off.use_verify_splitkv is False
    with patch_applied(vsk.PATCH, {}) as st:  # default on
        assert st.state == registry.ACTIVE
    with patch_applied(vsk.PATCH, {vsk.PATCH.knob: "0"}) as st:
        assert st.state != registry.ACTIVE
        assert tb.TritonAttnBackend(_runner()).use_verify_splitkv is False  # knob off: SGLang's verify kernel
    assert vsk.PATCH.upstream() is None and vsk.PATCH.unavailable() is None  # 0.5.17: gfx95 only, no windows


# --- on SGLang's own target-verify metadata (eager and CUDA-graph replay builders) --------------------------
MAX_BS, MAX_CTX, ND = 4, 64, 4


def _real_backend(patched):
    """A backend whose metadata comes from SGLang's builders (attributes as in test_triton_swa_window)."""
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
    from sglang_gemma4.patches import triton_swa_window as tsw

    n_slots = MAX_BS * MAX_CTX
    req_to_token = torch.randperm(n_slots, generator=torch.Generator().manual_seed(1)) + 1
    g = torch.Generator().manual_seed(2)
    pool = _Pool(torch.randn(n_slots + 1, HKV, D, generator=g), torch.randn(n_slots + 1, HKV, D, generator=g))
    b = object.__new__(tb.TritonAttnBackend)
    b.__dict__.update(
        sliding_window_size=SWS, req_to_token=req_to_token.view(MAX_BS, MAX_CTX).to(torch.int32),
        token_to_kv_pool=pool, _translate_kv_loc=None, dcp_size=1, page_size=1, device="cpu",
        max_context_len=MAX_CTX, num_head=HQ, max_kv_splits=2, v_head_dim=D, swa_v_head_dim=None,
        use_sliding_window_kv_pool=False, static_kv_splits=True, enable_deterministic=False, device_core_count=0,
        split_tile_size=None, is_draft_runner=False, skip_prefill=False, num_draft_tokens=ND, speculative_num_steps=ND - 1,
        topk=1, use_mla=False, kv_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int32),
        window_kv_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int32), qo_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int64),
        mask_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int64), forward_metadata=None, _verify_mask=None,
        allow_bidirectional_attention_in_extend=False, use_verify_splitkv=False, verify_splitkv_fwd=None,
        extend_attention_fwd=extend_attention_fwd, req_to_token_pool=types.SimpleNamespace(size=MAX_BS),
    )
    tsw.after_init(None, b, _runner())  # production default: the SWA decode-window fix is on
    if patched:
        vsk.after_init(None, b, _runner())
    return b


def _verify_fb(b, seq):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    masks = []
    for s in seq:
        m = torch.ones(ND, s + ND, dtype=torch.bool)
        m[:, s:] = torch.tril(torch.ones(ND, ND, dtype=torch.bool))
        masks.append(m.flatten())
    seq_t = torch.tensor(seq, dtype=torch.int64)
    spec = types.SimpleNamespace(draft_token_num=ND, kv_indptr=None, custom_mask=torch.cat(masks))
    out_loc = torch.cat([b.req_to_token[r, s:s + ND].to(torch.int64) for r, s in enumerate(seq)])
    return types.SimpleNamespace(
        forward_mode=ForwardMode.TARGET_VERIFY, batch_size=len(seq), spec_info=spec,
        req_pool_indices=torch.arange(len(seq), dtype=torch.int64), seq_lens=seq_t, seq_lens_sum=int(seq_t.sum()),
        seq_lens_cpu=seq_t.clone(), out_cache_loc=out_loc, encoder_lens=None)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("window", [-1, SWS])
def test_on_sglangs_own_verify_metadata(graph, window, monkeypatch):
    """Metadata from SGLang's init_forward_metadata (eager) or init_cuda_graph_state + replay builder (whose
    kv_indices is the whole preallocated buffer): patched forward_extend == unpatched."""
    seq = [3, SWS, 20, 33]  # shorter than, at, and past the window
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(len(seq) * ND, h, D, generator=g) for h in (HQ, HKV, HKV))
    outs, ran = [], []
    real = vsk.verify_fwd
    monkeypatch.setattr(vsk, "verify_fwd", lambda *a, **kw: ran.append(real(*a, **kw)) or ran[-1])
    for patched in (False, True):
        b = _real_backend(patched)
        fb = _verify_fb(b, seq)
        if graph:
            b.init_cuda_graph_state(MAX_BS, MAX_BS * ND)
            b.init_forward_metadata_out_graph(_verify_fb(b, [1] * len(seq)), in_capture=True)  # views on the buffers
            b.init_forward_metadata_out_graph(fb)  # replay: refilled in place
            assert b.forward_metadata.kv_indices.numel() > sum(seq)  # the whole graph buffer
        else:
            b.init_forward_metadata(fb)
        outs.append(b.forward_extend(q.reshape(q.shape[0], -1), k, v, _layer(window), fb))
    assert ran == [True]
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-5, atol=2e-5)
