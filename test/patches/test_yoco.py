"""YOCO bookkeeping on CPU: eligibility rules, truncate -> scatter, metadata restore.

The reference is SGLang's own (unpatched) ``Gemma4TextModel.forward`` run on a
small float64 stand-in model: row-wise layers plus an attention that reads the
plan the way triton does (prefix KV from ``req_to_token``, extend KV at
``out_cache_loc``, causal inside the extend). A real Gemma-4 cannot be built on
a CPU-only SGLang install; test/gpu/test_yoco_gpu.py covers the real model.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sglang_gemma4 import registry
from sglang_gemma4.patches import yoco
from sglang_gemma4.testing.hooks import patch_applied

H, P, V, SLOTS_PER_REQ = 16, 4, 50, 64


def _cfg(n_layers=5, n_shared=3):
    return SimpleNamespace(num_hidden_layers=n_layers, num_kv_shared_layers=n_shared)


class Plan:
    def __init__(self, qo, kv):
        self.qo, self.kv = qo, kv


class Backend:
    """Records every plan; attends like triton's extend path."""

    def __init__(self, n_layers, n_reqs):
        self.req_to_token = torch.arange(n_reqs * SLOTS_PER_REQ).view(n_reqs, SLOTS_PER_REQ)
        self.kv = {i: (torch.zeros(n_reqs * SLOTS_PER_REQ, H, dtype=torch.float64),
                       torch.zeros(n_reqs * SLOTS_PER_REQ, H, dtype=torch.float64))
                   for i in range(n_layers)}
        self.forward_metadata = None
        self.plans = []
        self.fail_narrow = False

    def init_forward_metadata(self, fb):
        ext, pre = fb.extend_seq_lens.tolist(), fb.extend_prefix_lens.tolist()
        assert ext == list(fb.extend_seq_lens_cpu) and pre == list(fb.extend_prefix_lens_cpu)
        assert fb.out_cache_loc.shape[0] == sum(ext) == fb.extend_num_tokens
        assert fb.extend_start_loc.tolist() == [sum(ext[:i]) for i in range(len(ext))]
        self.plans.append(dict(ext=ext, pre=pre, loc=fb.out_cache_loc.tolist(),
                               pos=fb.positions.tolist()))
        if self.fail_narrow and all(e == 1 for e in ext):
            raise RuntimeError("injected planning failure")
        qo = [0]
        for e in ext:
            qo.append(qo[-1] + e)
        rows = fb.req_pool_indices.tolist()
        self.forward_metadata = Plan(qo, [self.req_to_token[r, :p] for r, p in zip(rows, pre)])

    def attend(self, q, layer_id, fb):
        k_buf, v_buf = self.kv[layer_id]
        m = self.forward_metadata
        out = torch.empty_like(q)
        for i in range(len(m.qo) - 1):
            s, e = m.qo[i], m.qo[i + 1]
            loc = fb.out_cache_loc[s:e]
            keys = torch.cat([k_buf[m.kv[i]], k_buf[loc]])
            vals = torch.cat([v_buf[m.kv[i]], v_buf[loc]])
            n_pre = m.kv[i].shape[0]
            for j in range(e - s):
                n = n_pre + j + 1
                w = torch.softmax(keys[:n] @ q[s + j] / math.sqrt(H), dim=0)
                out[s + j] = w @ vals[:n]
        return out


class Layer(nn.Module):
    def __init__(self, idx, src, backend):
        super().__init__()
        self.idx, self.src, self.backend = idx, src, backend
        self.q, self.k, self.v, self.o, self.up, self.down = (
            nn.Linear(H, H, dtype=torch.float64) for _ in range(6))
        self.ple = nn.Linear(P, H, dtype=torch.float64)

    def forward(self, positions, hidden_states, per_layer_input, forward_batch, **kwargs):
        h = hidden_states
        q = self.q(h) + 0.1 * torch.sin(positions.to(h.dtype))[:, None]
        if self.src == self.idx:  # owns its KV: write it, like save_kv_cache
            k_buf, v_buf = self.backend.kv[self.idx]
            k_buf[forward_batch.out_cache_loc] = self.k(h)
            v_buf[forward_batch.out_cache_loc] = self.v(h)
        h = h + self.o(self.backend.attend(q, self.src, forward_batch))
        h = h + self.down(torch.tanh(self.up(h))) + self.ple(per_layer_input)
        return h, None


class TinyTextModel(nn.Module):
    """Duck-types what Gemma4TextModel.forward reads on a single PP stage."""

    def __init__(self, backend, n_layers=5, n_shared=3):
        super().__init__()
        torch.manual_seed(0)
        self.config = _cfg(n_layers, n_shared)
        self.pp_group = SimpleNamespace(is_first_rank=True, is_last_rank=True, world_size=1)
        self.start_layer, self.end_layer = 0, n_layers
        self.embed_tokens = nn.Embedding(V, H, dtype=torch.float64)
        self.ple_table = nn.Embedding(V, n_layers * P, dtype=torch.float64)
        self.ple_proj = nn.Linear(H, n_layers * P, dtype=torch.float64)
        k = n_layers - n_shared
        self.layers = nn.ModuleList(
            Layer(i, i if i < k else k - 1 - (i % 2), backend) for i in range(n_layers))
        self.norm = nn.LayerNorm(H, dtype=torch.float64)
        self.layers_to_capture = []

    def get_per_layer_inputs(self, input_ids):
        return self.ple_table(input_ids).view(-1, self.config.num_hidden_layers, P)

    def project_per_layer_inputs(self, embeds, ple):
        return self.ple_proj(embeds).view(-1, self.config.num_hidden_layers, P) + ple


def make_batch(pre, ext, mode=None, reqs=None):
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode

    reqs = list(range(len(pre))) if reqs is None else reqs
    slots = torch.arange(len(pre) * 8 * SLOTS_PER_REQ).view(-1, SLOTS_PER_REQ)
    pos = torch.cat([torch.arange(p, p + e) for p, e in zip(pre, ext)])
    loc = torch.cat([slots[r, p:p + e] for r, p, e in zip(reqs, pre, ext)])
    g = torch.Generator().manual_seed(sum(pre) * 31 + sum(ext))
    n = sum(ext)
    return ForwardBatch(
        forward_mode=mode or ForwardMode.EXTEND, batch_size=len(ext),
        input_ids=torch.randint(0, V, (n,), generator=g), req_pool_indices=torch.tensor(reqs),
        seq_lens=torch.tensor([p + e for p, e in zip(pre, ext)]), out_cache_loc=loc,
        seq_lens_sum=sum(pre) + n, positions=pos,
        extend_num_tokens=n, extend_seq_lens=torch.tensor(ext, dtype=torch.int32),
        extend_prefix_lens=torch.tensor(pre, dtype=torch.int32),
        extend_start_loc=torch.tensor([sum(ext[:i]) for i in range(len(ext))], dtype=torch.int32),
        extend_seq_lens_cpu=list(ext), extend_prefix_lens_cpu=list(pre),
        extend_logprob_start_lens_cpu=list(ext), capture_hidden_mode=CaptureHiddenMode.NULL,
    )


@pytest.fixture(scope="module")
def original_forward():
    from sglang.srt.models.gemma4_causal import Gemma4TextModel

    return Gemma4TextModel.forward  # captured before any test patches it


def _run(forward, model, backend, fb, in_context=True):
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    backend.init_forward_metadata(fb)  # what the eager runner does before model.forward
    if not in_context:
        return forward(model, fb.input_ids, fb.positions, fb)
    with forward_context(ForwardContext(attn_backend=backend)):
        return forward(model, fb.input_ids, fb.positions, fb)


def _last_rows(fb):
    return (torch.cumsum(fb.extend_seq_lens, 0) - 1).tolist()


# --------------------------------------------------------------------------- rules
def test_first_kv_shared_layer_real_shapes():
    assert yoco.first_kv_shared_layer(_cfg(35, 20)) == 15  # E2B
    assert yoco.first_kv_shared_layer(_cfg(42, 18)) == 24  # E4B
    assert yoco.first_kv_shared_layer(_cfg(7, 4)) == 3  # bench e2b_w
    assert yoco.first_kv_shared_layer(_cfg(30, 0)) is None  # 26B-A4B
    assert yoco.first_kv_shared_layer(SimpleNamespace(num_hidden_layers=30)) is None
    assert yoco.first_kv_shared_layer(_cfg(4, 4)) is None  # nothing to run first


def _model_ns(**kw):
    m = SimpleNamespace(config=_cfg(), pp_group=SimpleNamespace(world_size=1), start_layer=0,
                        end_layer=5, layers_to_capture=[])
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def test_eligible_batch():
    assert yoco.batch_ineligible_reason(_model_ns(), make_batch([0, 3], [5, 2])) is None


def _mode(name):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return getattr(ForwardMode, name)


def _set(**kw):
    def f(fb):
        for k, v in kw.items():
            setattr(fb, k, v)
    return f


def _full_capture(fb):
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode

    fb.capture_hidden_mode = CaptureHiddenMode.FULL


def _prompt_logprobs(fb):
    fb.return_logprob = True
    fb.extend_logprob_start_lens_cpu = [0, 2]


RULES = [
    ("no KV-shared", dict(config=_cfg(5, 0)), None),
    ("pipeline", dict(pp_group=SimpleNamespace(world_size=2)), None),
    ("layer slice", dict(end_layer=3), None),
    ("aux hidden-state capture", dict(layers_to_capture=[3]), None),
    ("aux hidden-state capture", dict(layers_to_capture=[5]), None),  # final output
    ("forward mode DECODE", {}, _set(forward_mode=_mode("DECODE"))),
    ("forward mode TARGET_VERIFY", {}, _set(forward_mode=_mode("TARGET_VERIFY"))),
    ("forward mode DRAFT_EXTEND_V2", {}, _set(forward_mode=_mode("DRAFT_EXTEND_V2"))),
    ("forward mode SPLIT_PREFILL", {}, _set(forward_mode=_mode("SPLIT_PREFILL"))),
    ("no host extend lengths", {}, _set(extend_seq_lens_cpu=None)),
    ("no request extends", {}, lambda fb: None),  # replaced below by a 1-token batch
    ("prompt logprobs", {}, _prompt_logprobs),
    ("full hidden-state capture", {}, _full_capture),
    ("DP attention", {}, _set(global_num_tokens_cpu=[7])),
    ("context parallel", {}, _set(attn_cp_metadata=object())),
    ("two-batch overlap", {}, _set(tbo_split_seq_index=1)),
    ("multi-item scoring", {}, _set(multi_item_delimiter_indices=[torch.tensor([1])])),
]


@pytest.mark.parametrize("words,model_kw,mutate", RULES, ids=[r[0] for r in RULES])
def test_each_rule_blocks(words, model_kw, mutate):
    fb = make_batch([1, 1], [1, 1]) if words == "no request extends" else make_batch([0, 3], [5, 2])
    if mutate is not None:
        mutate(fb)
    reason = yoco.batch_ineligible_reason(_model_ns(**model_kw), fb)
    assert reason is not None and words in reason, reason


def test_rules_that_allow():
    m = _model_ns(layers_to_capture=[1, 2])  # capture of layer K's input: still full rows
    fb = make_batch([0, 4], [6, 1], mode=_mode("MIXED"))  # decode row inside a mixed batch
    fb.return_logprob = True  # output logprobs only: logprob start == extend length
    assert yoco.batch_ineligible_reason(m, fb) is None
    assert yoco.batch_ineligible_reason(m, make_batch([0], [2])) is None
    assert "embedding" in yoco.batch_ineligible_reason(m, make_batch([0], [2]), {"get_embedding": True})


# ---------------------------------------------------------------- forward vs SGLang
SCENARIOS = {
    "fresh": ([0, 0, 0], [7, 3, 11], "EXTEND", []),
    "prefix_hit": ([5, 0, 9], [4, 6, 2], "EXTEND", []),
    "chunk_then_rest": ([12, 0], [9, 1], "EXTEND", []),  # 2nd chunk; a 1-token request
    "mixed_decode": ([0, 6, 3], [8, 1, 1], "MIXED", []),
    "aux_capture": ([0, 4], [5, 3], "EXTEND", [1, 2]),
}


def _history(model, backend, pre, original_forward):
    """Fill the prefix KV the way an earlier forward (or radix hit) left it."""
    if any(pre):
        idx = [i for i, p in enumerate(pre) if p]
        fb = make_batch([0] * len(idx), [pre[i] for i in idx], reqs=idx)
        _run(original_forward, model, backend, fb, in_context=False)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_yoco_matches_sglang_forward(name, original_forward):
    pre, ext, mode, capture = SCENARIOS[name]
    backend = Backend(5, len(pre))
    model = TinyTextModel(backend)
    model.layers_to_capture = capture
    _history(model, backend, pre, original_forward)

    fb = make_batch(pre, ext, mode=_mode(mode))
    ref = _run(original_forward, model, backend, fb, in_context=False)
    kv_after_ref = {i: (k.clone(), v.clone()) for i, (k, v) in backend.kv.items()}

    from sglang.srt.models.gemma4_causal import Gemma4TextModel

    with patch_applied(yoco.PATCH, {}) as st:
        assert st.state == registry.ACTIVE
        fb = make_batch(pre, ext, mode=_mode(mode))
        fields = {f: getattr(fb, f) for f in yoco.SWAPPED_FIELDS}
        backend.plans.clear()
        out = _run(Gemma4TextModel.forward, model, backend, fb)
        metadata_seen_by_model = backend.plans[0]
        full_meta = backend.forward_metadata

    if capture:
        (ref, ref_aux), (out, out_aux) = ref, out
        assert len(ref_aux) == len(out_aux) == len(capture)
        for a, b in zip(ref_aux, out_aux):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    rows = _last_rows(fb)
    torch.testing.assert_close(out[rows], ref[rows], rtol=1e-12, atol=1e-12)
    assert not torch.equal(out, ref) or all(e == 1 for e in ext)  # other rows really skipped
    for i, (k, v) in backend.kv.items():  # shared layers wrote nothing, others the same
        assert torch.equal(k, kv_after_ref[i][0]) and torch.equal(v, kv_after_ref[i][1])

    # plans: the runner's, the narrow one, the restore
    assert len(backend.plans) == 3
    narrow = backend.plans[1]
    assert narrow["ext"] == [1] * len(ext)
    assert narrow["pre"] == [p + e - 1 for p, e in zip(pre, ext)]
    assert narrow["loc"] == [fields["out_cache_loc"][r].item() for r in rows]
    assert narrow["pos"] == [p + e - 1 for p, e in zip(pre, ext)]
    assert backend.plans[2] == metadata_seen_by_model
    for f, v in fields.items():
        assert getattr(fb, f) is v, f
    assert backend.forward_metadata is full_meta


def test_ineligible_batch_runs_sglang_forward_untouched(original_forward):
    backend = Backend(5, 2)
    model = TinyTextModel(backend)
    fb = make_batch([0, 0], [6, 4])
    _prompt_logprobs(fb)
    ref = _run(original_forward, model, backend, fb, in_context=False)

    from sglang.srt.models.gemma4_causal import Gemma4TextModel

    with patch_applied(yoco.PATCH, {}):
        fb = make_batch([0, 0], [6, 4])
        _prompt_logprobs(fb)
        backend.plans.clear()
        out = _run(Gemma4TextModel.forward, model, backend, fb)
    assert len(backend.plans) == 1  # no narrow plan
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # every row, bit for bit


def test_no_forward_context_runs_sglang_forward(original_forward):
    backend = Backend(5, 1)
    model = TinyTextModel(backend)
    from sglang.srt.models.gemma4_causal import Gemma4TextModel

    with patch_applied(yoco.PATCH, {}):
        fb = make_batch([0], [5])
        backend.plans.clear()
        out = _run(Gemma4TextModel.forward, model, backend, fb, in_context=False)
    assert len(backend.plans) == 1
    ref = _run(original_forward, model, backend, make_batch([0], [5]), in_context=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_failure_falls_back_and_restores(original_forward, monkeypatch):
    monkeypatch.setitem(yoco._state, "broken", False)
    backend = Backend(5, 2)
    model = TinyTextModel(backend)
    ref = _run(original_forward, model, backend, make_batch([0, 2], [5, 3]), in_context=False)
    from sglang.srt.models.gemma4_causal import Gemma4TextModel

    backend.fail_narrow = True
    with patch_applied(yoco.PATCH, {}):
        fb = make_batch([0, 2], [5, 3])
        fields = {f: getattr(fb, f) for f in yoco.SWAPPED_FIELDS}
        out = _run(Gemma4TextModel.forward, model, backend, fb)
        assert yoco._state["broken"]
        backend.plans.clear()
        _run(Gemma4TextModel.forward, model, backend, make_batch([0, 2], [5, 3]))
        assert len(backend.plans) == 1  # stays off after a failure
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for f, v in fields.items():
        assert getattr(fb, f) is v, f


def test_one_token_per_request_round_trip():
    backend = Backend(5, 3)
    fb = make_batch([2, 0, 7], [3, 5, 1])
    before = {f: getattr(fb, f) for f in yoco.SWAPPED_FIELDS}
    backend.init_forward_metadata(fb)
    meta = backend.forward_metadata
    rows = yoco.last_token_rows(fb)
    assert rows.tolist() == [2, 7, 8]
    with yoco.one_token_per_request(fb, backend, rows):
        assert fb.extend_seq_lens.tolist() == [1, 1, 1]
        assert fb.extend_prefix_lens.tolist() == (fb.seq_lens - 1).tolist() == [4, 4, 7]
        assert fb.extend_prefix_lens.dtype == before["extend_prefix_lens"].dtype
        assert fb.out_cache_loc.tolist() == before["out_cache_loc"][[2, 7, 8]].tolist()
        assert backend.forward_metadata.qo == [0, 1, 2, 3]
    for f, v in before.items():
        assert getattr(fb, f) is v, f
    assert backend.forward_metadata is meta and meta.qo == [0, 3, 8, 9]


# ----------------------------------------------------------- prefill graph + status
def _bare_text_model(n_layers, n_shared):
    from sglang.srt.models.gemma4_causal import Gemma4TextModel

    m = Gemma4TextModel.__new__(Gemma4TextModel)
    nn.Module.__init__(m)
    m.config = _cfg(n_layers, n_shared)
    m.pp_group = SimpleNamespace(world_size=1)
    m.start_layer, m.end_layer, m.layers_to_capture = 0, n_layers, []
    return m


@pytest.mark.parametrize("ext,n_shared,expect", [
    ([1500, 700], 4, False),  # saves 2198 rows: run eager so YOCO can fire
    ([600, 300], 4, True),  # saves 898 < 1024: keep the graph
    ([1500, 700], 0, True),  # not a KV-shared model
])
def test_prefill_graph_steps_aside_for_large_yoco_batches(ext, n_shared, expect):
    runner = SimpleNamespace(model_runner=SimpleNamespace(
        model=SimpleNamespace(model=_bare_text_model(7, n_shared))))
    fb = make_batch([0] * len(ext), ext)
    assert yoco.yoco_can_run_graph_hook(lambda r, b: True, runner, fb) is expect
    assert yoco.yoco_can_run_graph_hook(lambda r, b: False, runner, fb) is False
    fb.global_num_tokens_cpu = [sum(ext)]  # DP: the decision must stay rank-uniform
    assert yoco.yoco_can_run_graph_hook(lambda r, b: True, runner, fb) is True


def test_status_and_knob():
    assert registry.evaluate(yoco.PATCH, {}).state == registry.ACTIVE
    assert registry.evaluate(yoco.PATCH, {"SGLANG_GEMMA4_YOCO": "0"}).state == registry.DISABLED
    assert registry.evaluate(yoco.PATCH, {"SGLANG_GEMMA4_YOCO": "maybe"}).state == registry.ERROR
    assert yoco.PATCH.upstream() is None  # 0.5.17 has no YOCO
    assert not registry.missing_targets(yoco.PATCH.targets)


@pytest.mark.parametrize("fixed", [True, False])
def test_hook_is_transparent_under_torch_compile(fixed, monkeypatch):
    """tc_piecewise prefill graphs torch.compile Gemma4TextModel.forward, i.e. our hook,
    with dynamic row counts: the hook must add no size guard (the H200 run before the fix
    recompiled per captured size until dynamo's limit took the engine down)."""
    from torch._dynamo.testing import CompileCounter
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    if not fixed:  # the unfixed behaviour: eligibility checks traced by dynamo
        monkeypatch.setattr(yoco, "_is_compiling", lambda: False)
    backend = Backend(5, 1)
    model = TinyTextModel(backend)

    def original(m, input_ids, positions, fb, input_embeds, per_layer_inputs, pp_proxy_tensors=None):
        return input_embeds * 2 + positions[:, None]

    def fwd(positions, fb, input_embeds):
        return yoco.yoco_forward_hook(original, model, None, positions, fb, input_embeds=input_embeds)

    counter = CompileCounter()
    compiled = torch.compile(fwd, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    try:
        for ext in ([6], [9], [4, 7]):
            fb = make_batch([0] * len(ext), ext)
            x = torch.randn(sum(ext), H, dtype=torch.float64)
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(fb.positions, 0)
            try:
                out = compiled(fb.positions, fb, x)
            except ConstraintViolationError as e:  # mark_dynamic: specialised to one size
                assert not fixed and "specialized" in str(e), e
                return
            torch.testing.assert_close(out, original(model, None, fb.positions, fb, x, None))
    finally:
        torch._dynamo.reset()
    if fixed:
        assert counter.frame_count == 1
    else:
        assert counter.frame_count > 1


def test_eager_min_rows_knob_moves_the_graph_threshold(monkeypatch, clean_env):
    from sglang_gemma4 import registry

    runner = SimpleNamespace(model_runner=SimpleNamespace(model=SimpleNamespace(model=_bare_text_model(7, 4))))
    fb = make_batch([0, 0], [1500, 700])  # saves 2198 rows
    monkeypatch.setitem(yoco._state, "eager_min_rows", 4096)
    assert yoco.yoco_can_run_graph_hook(lambda r, b: True, runner, fb) is True
    monkeypatch.setitem(yoco._state, "eager_min_rows", 2000)
    assert yoco.yoco_can_run_graph_hook(lambda r, b: True, runner, fb) is False
    assert yoco.eager_min_rows({}) == yoco.EAGER_MIN_SAVED_TOKENS
    assert yoco.eager_min_rows({yoco.EAGER_MIN_ENV: " 100000 "}) == 100000
    for bad in ("-1", "1e9", "lots"):
        st = registry.evaluate(yoco.PATCH, {yoco.EAGER_MIN_ENV: bad})
        assert st.state == "error" and st.knob == yoco.EAGER_MIN_ENV and st.value == bad, st
    monkeypatch.setenv(yoco.EAGER_MIN_ENV, "100000")  # the status line reads the process environment
    assert "100000 rows" in registry.evaluate(yoco.PATCH).reason
