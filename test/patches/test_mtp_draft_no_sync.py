"""mtp_draft_no_sync against SGLang 0.5.17's own FrozenKVMTPDraftWorker.draft (CPU).

Both run on the same worker state: a real FrozenKVMTPDraftWorker (no __init__), its real
position / topk-expansion helpers, a real FrozenKVMTPDraftInput and FrozenKVMTPVerifyInput.
Only what needs a GPU model is replaced in SGLang's module: ForwardBatch.init_new (records the
seq_lens_sum it is given), the draft CUDA-graph runner and build_tree_kernel_efficient (both
record their inputs and return tensors derived from them). The patched draft must make the same
calls with the same tensors and return the same verify input, and read no tensor with .item()
when there is no host mirror. The bound's safety in the real tree kernel and verify attention is
the GPU tests' (test/gpu/test_mtp_draft_no_sync_gpu.py and the FROZEN_KV_MTP engine checks).
"""

from __future__ import annotations

import logging
import types

import pytest
import torch

from sglang_gemma4 import registry
from sglang_gemma4.patches import mtp_draft_no_sync as nosync
from sglang_gemma4.testing.hooks import patch_applied

fw = pytest.importorskip("sglang.srt.speculative.frozen_kv_mtp_worker_v2")
ON = {nosync.PATCH.knob: "1"}
STEPS, NDRAFT, MAX_CTX = 3, 4, 640


@pytest.fixture
def calls(monkeypatch):
    """Stand-ins for the GPU-only pieces in SGLang's module; every input they see is recorded."""
    rec = []

    class ForwardBatch:
        @staticmethod
        def init_new(batch, runner, return_hidden_states_before_norm):
            # what 0.5.17's init_new does with the sum: backfill from the host mirror, else keep
            if batch.seq_lens_sum is None and batch.seq_lens_cpu is not None:
                batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())
            rec.append(("init_new", batch.seq_lens_sum, runner))
            return types.SimpleNamespace(
                batch_size=len(batch.seq_lens), seq_lens=batch.seq_lens, seq_lens_cpu=batch.seq_lens_cpu,
                seq_lens_sum=batch.seq_lens_sum, req_pool_indices=batch.req_pool_indices, positions=None,
                spec_info=batch.spec_info, capture_hidden_mode=batch.spec_info.capture_hidden_mode,
                out_cache_loc="unset", can_run_dp_cuda_graph=True,
            )

    def build_tree(bonus, parents, top_idx, tokens, seq_lens, seq_lens_sum, topk, steps, ndraft):
        rec.append(("build_tree", seq_lens_sum, topk, steps, ndraft, seq_lens.clone(), bonus.clone()))
        bs = seq_lens.shape[0]
        mask = torch.ones(seq_lens_sum * ndraft + ndraft * ndraft * bs, dtype=torch.bool)
        pos = (seq_lens[:, None] + torch.arange(ndraft)).flatten()
        ret = torch.arange(bs * ndraft).view(bs, ndraft)
        return mask, pos, ret, ret + 1, ret - 1, torch.cat([bonus[:, None], tokens], 1).flatten()

    monkeypatch.setattr(fw, "ForwardBatch", ForwardBatch)
    monkeypatch.setattr(fw, "build_tree_kernel_efficient", build_tree)
    return rec


class GraphRunner:
    def __init__(self, rec, ok=True):
        self.rec, self.ok = rec, ok

    def can_run_graph(self, fb):
        return self.ok

    def execute(self, fb):
        # 0.5.17's execute adds padding to fb.seq_lens_sum: it must be an int here
        self.rec.append(("execute", fb.seq_lens_sum + 0, fb.positions.clone(), fb.out_cache_loc))
        bs = fb.batch_size
        return [torch.zeros(bs, 1)], torch.zeros(bs, STEPS, dtype=torch.long), fb.seq_lens[:, None] % 7 + torch.arange(STEPS)


def worker(rec, backend="TritonAttnBackend", graph=True, translate=None, topk=1, verify_max_bs=8):
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    class Worker(fw.FrozenKVMTPDraftWorker):
        draft_model_runner = "draft-runner"  # a property (the TpModelWorker's runner) in SGLang

    w = object.__new__(Worker)
    w.topk, w.speculative_num_steps, w.speculative_num_draft_tokens = topk, STEPS, NDRAFT
    cls = TritonAttnBackend if backend == "TritonAttnBackend" else type(backend, (), {})
    w.draft_attn_backend = object.__new__(cls)
    w.draft_attn_backend._translate_kv_loc = translate
    w.cuda_graph_runner = GraphRunner(rec, graph)
    # the target's verify CUDA-graph mask buffer, allocated by SGLang's own sizing
    from sglang.srt.layers.attention.verify_mask import maybe_create_verify_mask

    vm = None if verify_max_bs is None else maybe_create_verify_mask(
        is_draft_runner=False, skip_prefill=False, max_bs=verify_max_bs, max_context_len=MAX_CTX,
        num_draft_tokens=NDRAFT, device="cpu", is_read=True, dtype=torch.uint8)
    w.target_worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(
        attn_backend=types.SimpleNamespace(verify_mask=vm)))

    def draft_forward(fb):
        rec.append(("draft_forward", fb.seq_lens_sum, fb.can_run_dp_cuda_graph))
        return GraphRunner(rec).execute(fb)

    w.draft_forward = draft_forward
    return w


def batch(seq_lens, host_mirror):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    sl = torch.tensor(seq_lens)
    spec = fw.FrozenKVMTPDraftInput(bonus_tokens=torch.tensor(seq_lens) * 3 % 11, hidden_states=torch.randn(len(seq_lens), 8))
    return types.SimpleNamespace(
        forward_mode=ForwardMode.DECODE, spec_info=spec, seq_lens=sl, req_pool_indices=torch.arange(len(seq_lens)),
        seq_lens_cpu=sl.clone() if host_mirror else None, seq_lens_sum=None, return_hidden_states=True,
        req_to_token_pool=types.SimpleNamespace(req_to_token=torch.zeros(8, MAX_CTX + 8, dtype=torch.int32)),
    )


@pytest.fixture
def item_reads(monkeypatch):
    """Every Tensor.item() call (the host read this patch removes)."""
    reads = []
    real = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t.shape) or real(t))
    return reads


def run(rec, patched, seq_lens, host_mirror, **wkw):
    w, b = worker(rec, **wkw), batch(seq_lens, host_mirror)
    if patched:
        with patch_applied(nosync.PATCH, ON) as st:
            assert st.state == registry.ACTIVE
            out = fw.FrozenKVMTPDraftWorker.draft(w, b)
    else:
        out = fw.FrozenKVMTPDraftWorker.draft(w, b)
    return out, b


VERIFY_FIELDS = ("draft_token", "positions", "retrieve_index", "retrieve_next_token", "retrieve_next_sibling",
                 "spec_steps", "topk", "draft_token_num", "capture_hidden_mode", "retrieve_cum_len")


def same_verify(a, b):
    for f in VERIFY_FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), f
    assert type(a) is type(b) is fw.FrozenKVMTPVerifyInput


@pytest.mark.parametrize("graph", [True, False])
def test_no_host_mirror_no_item_same_step(calls, item_reads, graph):
    seq_lens = [37, 5, 120]
    ref, rb = run(calls, False, seq_lens, host_mirror=False, graph=graph)
    assert item_reads, "SGLang's own draft reads the sum with .item() (what the patch is for)"
    ref_calls = list(calls)
    calls.clear(), item_reads.clear()
    out, pb = run(calls, True, seq_lens, host_mirror=False, graph=graph)
    assert item_reads == []
    same_verify(out, ref)
    bound = len(seq_lens) * (MAX_CTX + 8)
    # same calls, same tensors; the sum is the bound where SGLang had the exact one
    assert [c[0] for c in calls] == [c[0] for c in ref_calls]
    for got, want in zip(calls, ref_calls):
        if got[0] == "init_new":
            assert want[1] == sum(seq_lens) and got[1] is None and got[2] == want[2]
        elif got[0] == "build_tree":
            assert want[1] == sum(seq_lens) and got[1] == bound
            assert got[2:5] == want[2:5] and torch.equal(got[5], want[5]) and torch.equal(got[6], want[6])
        elif got[0] == "execute":
            assert got[1] == bound and torch.equal(got[2], want[2]) and got[3] is None is want[3]
    # the tree mask is only larger; the prefix the verify reads is the same
    assert out.custom_mask.numel() > ref.custom_mask.numel()
    # and it fits the target's verify CUDA-graph buffer (what triton's graph path copies it into)
    assert out.custom_mask.numel() <= worker(calls).target_worker.model_runner.attn_backend.verify_mask.buffer.numel()
    # what is left on the batch / verify input: SGLang's GPU-only None, not the bound
    assert pb.seq_lens_sum is None and out.seq_lens_sum is None and out.seq_lens_cpu is None
    assert rb.seq_lens_sum == sum(seq_lens)
    assert pb.return_hidden_states is False and pb.spec_info.num_tokens_per_req == 1


def test_host_mirror_gives_the_exact_sum(calls, item_reads):
    seq_lens = [9, 300]
    ref, _ = run(calls, False, seq_lens, host_mirror=True)
    ref_calls = list(calls)
    calls.clear(), item_reads.clear()
    out, pb = run(calls, True, seq_lens, host_mirror=True)
    assert item_reads == []
    same_verify(out, ref)
    assert torch.equal(out.custom_mask, ref.custom_mask)
    assert [c[:2] for c in calls] == [c[:2] for c in ref_calls]  # exact sum everywhere
    assert pb.seq_lens_sum == out.seq_lens_sum == sum(seq_lens)


@pytest.mark.parametrize("wkw", [dict(backend="FlashInferAttnBackend"), dict(translate=lambda x: x)])
def test_other_backends_run_sglang(calls, item_reads, wkw):
    """A backend not known to tolerate the bound, or a unified-pool translate: SGLang's draft."""
    out, pb = run(calls, True, [4, 4], host_mirror=False, **wkw)
    assert item_reads and pb.seq_lens_sum == 8
    assert [c for c in calls if c[0] == "build_tree"][0][1] == 8


@pytest.mark.parametrize("max_bs", [2, 3])
def test_bound_past_the_verify_graph_buffer_runs_sglang(calls, item_reads, max_bs, monkeypatch, caplog):
    """At the captured max batch the row-sized mask would not fit the verify graph's buffer (the
    H200 modes-run RuntimeError): that step is SGLang's own, exact sum and all. One request fewer
    than the captured max still takes the bound."""
    seq_lens = [37, 5, 120][:max_bs]
    ref, _ = run(calls, False, seq_lens, host_mirror=False, verify_max_bs=max_bs)
    ref_calls = list(calls)
    calls.clear(), item_reads.clear()
    monkeypatch.setattr(nosync, "_fallback_announced", False)
    with caplog.at_level(logging.INFO, logger=nosync.logger.name):
        out, pb = run(calls, True, seq_lens, host_mirror=False, verify_max_bs=max_bs)
    assert [r.getMessage() for r in caplog.records if nosync.FELL_BACK in r.getMessage()] == [
        f"{nosync.FELL_BACK} (bs={max_bs})"]  # the GPU logs show this path was reached
    same_verify(out, ref)
    assert item_reads and [c[:2] for c in calls] == [c[:2] for c in ref_calls] and pb.seq_lens_sum == sum(seq_lens)
    calls.clear(), item_reads.clear()
    run(calls, True, seq_lens[:-1], host_mirror=False, verify_max_bs=max_bs)
    assert item_reads == [] and [c for c in calls if c[0] == "build_tree"][0][1] == (max_bs - 1) * (MAX_CTX + 8)


@pytest.mark.parametrize("verify_max_bs", [None, 1])
def test_no_verify_graph_buffer_for_the_batch_takes_the_bound(calls, item_reads, verify_max_bs):
    """No buffer, or a batch past its max_bs (verify runs eager on the mask as allocated): the bound."""
    out, _ = run(calls, True, [37, 5, 120], host_mirror=False, verify_max_bs=verify_max_bs)
    assert item_reads == [] and [c for c in calls if c[0] == "build_tree"][0][1] == 3 * (MAX_CTX + 8)


def test_idle_batch_runs_sglang(calls):
    """Idle batches go to SGLang's draft untouched. (0.5.17's idle branch itself raises: it calls
    EagleVerifyInput.create_idle_input without its `device` argument; the patch must not mask that.)"""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    def outcome(patched):
        w, b = worker(calls), types.SimpleNamespace(forward_mode=ForwardMode.IDLE)
        try:
            if patched:
                with patch_applied(nosync.PATCH, ON):
                    return fw.FrozenKVMTPDraftWorker.draft(w, b)
            return fw.FrozenKVMTPDraftWorker.draft(w, b)
        except Exception as e:  # noqa: BLE001 - compared below
            return f"{type(e).__name__}: {e}"

    assert outcome(True) == outcome(False) and calls == []


def test_default_off_and_source_pin(monkeypatch):
    with patch_applied(nosync.PATCH, {}) as st:
        assert st.state == registry.DISABLED
    assert nosync.PATCH.unavailable() is None and nosync.PATCH.upstream() is None  # 0.5.17 as pinned
    src = nosync._draft_source()
    monkeypatch.setattr(nosync, "_draft_source", lambda: src + "\n# changed")
    assert "not SGLang 0.5.17's" in nosync.PATCH.unavailable()
    monkeypatch.setattr(nosync, "_draft_source", lambda: src.replace(nosync.SYNC_LINE, "batch.seq_lens_sum = None"))
    assert nosync.PATCH.unavailable() is None and "no longer syncs" in nosync.PATCH.upstream()
