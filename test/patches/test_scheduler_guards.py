"""Scheduler guards against real ScheduleBatch.merge_batch/filter_batch (CPU)."""

from __future__ import annotations

import json
from array import array

import pytest
import torch

from sglang_gemma4.patches import scheduler_guards
from sglang_gemma4.patches.scheduler_guards import PATCH
from sglang_gemma4.testing.hooks import patch_applied

VOCAB, HIDDEN, TOPK = 64, 8, 2


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    from sglang.srt.configs.model_config import ModelConfig

    d = tmp_path_factory.mktemp("llama")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return ModelConfig(str(d))


def _batch(model_config, pool_idx, spec_info, finished=()):
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req, ScheduleBatch
    from sglang.srt.sampling.penaltylib.orchestrator import BatchedPenalizerOrchestrator
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo
    from sglang.srt.sampling.sampling_params import SamplingParams

    reqs = []
    for i in pool_idx:
        r = Req(f"r{i}", "", array("i", [1, 2, 3]), SamplingParams(max_new_tokens=4))
        if i in finished:
            r.finished_reason = FINISH_LENGTH(length=4)
        reqs.append(r)
    n = len(pool_idx)
    idx = torch.tensor(pool_idx, dtype=torch.int64)
    seq = torch.tensor([10 + i for i in pool_idx], dtype=torch.int64)
    b = ScheduleBatch(
        reqs=reqs, model_config=model_config, device="cpu", req_pool_indices=idx,
        req_pool_indices_cpu=idx.clone(), seq_lens=seq, orig_seq_lens=seq.clone(),
        seq_lens_cpu=seq.clone(), spec_info=spec_info,
    )
    b.sampling_info = SamplingBatchInfo(
        temperatures=torch.ones(n, 1), top_ps=torch.ones(n), top_ks=torch.ones(n, dtype=torch.int32),
        min_ps=torch.zeros(n), is_all_greedy=True, is_any_greedy=True, need_top_p_sampling=False,
        need_top_k_sampling=False, need_min_p_sampling=False, vocab_size=VOCAB, device="cpu",
    )
    b.sampling_info.penalizer_orchestrator = BatchedPenalizerOrchestrator(VOCAB, b, set())
    return b


def _draft(pool_idx, overlap=False):
    from sglang.srt.speculative.frozen_kv_mtp_info import FrozenKVMTPDraftInput

    g = torch.Generator().manual_seed(sum(pool_idx) + 7)
    n = len(pool_idx)
    d = FrozenKVMTPDraftInput(
        topk_p=torch.rand(n, TOPK, generator=g),
        topk_index=torch.randint(0, VOCAB, (n, TOPK), generator=g),
        hidden_states=torch.randn(n, HIDDEN, generator=g),
        bonus_tokens=torch.randint(0, VOCAB, (n,), generator=g, dtype=torch.int32),
    )
    if overlap:
        d.future_indices = torch.tensor(pool_idx, dtype=torch.int64)
    return d


def _verify(n, steps=2):
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
    from sglang.srt.speculative.frozen_kv_mtp_info import FrozenKVMTPVerifyInput

    k = steps + 1
    return FrozenKVMTPVerifyInput(
        draft_token=torch.zeros(n * k, dtype=torch.int64), custom_mask=torch.ones(n * k * k, dtype=torch.bool),
        positions=torch.zeros(n * k, dtype=torch.int64), retrieve_index=torch.zeros(n, k, dtype=torch.int64),
        retrieve_next_token=torch.full((n, k), -1), retrieve_next_sibling=torch.full((n, k), -1),
        retrieve_cum_len=None, spec_steps=steps, topk=1, draft_token_num=k,
        capture_hidden_mode=CaptureHiddenMode.FULL, seq_lens_sum=0, seq_lens_cpu=torch.zeros(n, dtype=torch.int64),
    )


FIELDS = ("req_pool_indices", "req_pool_indices_cpu", "seq_lens", "orig_seq_lens", "seq_lens_cpu")
SPEC_FIELDS = ("topk_p", "topk_index", "hidden_states", "bonus_tokens", "future_indices")


def _assert_same(a, b):
    assert [r.rid for r in a.reqs] == [r.rid for r in b.reqs]
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert torch.equal(a.sampling_info.temperatures, b.sampling_info.temperatures)
    assert type(a.spec_info) is type(b.spec_info)
    for f in SPEC_FIELDS:
        x, y = getattr(a.spec_info, f), getattr(b.spec_info, f)
        assert (x is None and y is None) or torch.equal(x, y), f


def test_unpatched_sglang_still_crashes_on_verify_stage_spec_info(model_config):
    running = _batch(model_config, [0, 1], _verify(2))
    with pytest.raises(AttributeError, match="merge_batch"):
        running.merge_batch(_batch(model_config, [5], _draft([5])))
    with pytest.raises(AttributeError, match="filter_batch"):
        _batch(model_config, [0, 1], _verify(2), finished={1}).filter_batch()


@pytest.mark.parametrize("stale_side", ["self", "other"])
def test_merge_with_finished_stale_side_matches_unpatched_after_filter(model_config, stale_side):
    # Reference: SGLang's own merge where both sides carry draft inputs.
    stale_idx, live_idx = [0, 1], [5, 6, 7]
    order = (stale_idx, live_idx) if stale_side == "self" else (live_idx, stale_idx)
    ref_a = _batch(model_config, order[0], _draft(order[0]), finished=set(stale_idx))
    ref_b = _batch(model_config, order[1], _draft(order[1]), finished=set(stale_idx))
    ref_a.merge_batch(ref_b)
    ref_a.filter_batch()

    def side(idx):
        spec = _verify(len(idx)) if idx is stale_idx else _draft(idx)
        return _batch(model_config, idx, spec, finished=set(stale_idx))

    with patch_applied(PATCH) as st:
        assert st.state == "active"
        a, b = side(order[0]), side(order[1])
        a.merge_batch(b)
        assert len(a.spec_info.topk_index) == len(a.reqs) == 5  # rows stay aligned
        a.filter_batch()
    _assert_same(a, ref_a)


@pytest.mark.parametrize("stale_side", ["self", "other"])
def test_merge_overlap_mode_rebuilds_future_indices_like_unpatched(model_config, stale_side):
    stale_idx, live_idx = [3, 4], [8, 9]  # live requests on both sides
    order = (stale_idx, live_idx) if stale_side == "self" else (live_idx, stale_idx)
    ref_a = _batch(model_config, order[0], _draft(order[0], overlap=True))
    ref_a.merge_batch(_batch(model_config, order[1], _draft(order[1], overlap=True)))
    with patch_applied(PATCH):
        a = _batch(model_config, order[0], _verify(2) if order[0] is stale_idx else _draft(order[0], True))
        b = _batch(model_config, order[1], _verify(2) if order[1] is stale_idx else _draft(order[1], True))
        a.merge_batch(b)
    assert torch.equal(a.spec_info.future_indices, ref_a.spec_info.future_indices)
    assert torch.equal(a.spec_info.future_indices, a.req_pool_indices)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(ref_a, f)), f


@pytest.mark.parametrize("stale_side", ["self", "other"])
def test_merge_overlap_mode_clears_dsa_topk_availability(model_config, stale_side):
    """The stale side's DSA top-k seeds are unknown: the merged draft input must not claim
    them (SGLang ANDs the two sides' flags; the stale side counts as False)."""
    stale_idx, live_idx = [3, 4], [8, 9]
    order = (stale_idx, live_idx) if stale_side == "self" else (live_idx, stale_idx)

    def side(idx, stale):
        if stale:
            return _batch(model_config, idx, _verify(2))
        d = _draft(idx, overlap=True)
        d.future_dsa_topk_indices_available = True
        return _batch(model_config, idx, d)

    # reference: SGLang's own merge of two draft inputs, one of them without DSA seeds
    ref_a, ref_b = side(order[0], False), side(order[1], False)
    (ref_a if order[0] is stale_idx else ref_b).spec_info.future_dsa_topk_indices_available = False
    ref_a.merge_batch(ref_b)
    assert ref_a.spec_info.future_dsa_topk_indices_available is False
    with patch_applied(PATCH):
        a, b = side(order[0], order[0] is stale_idx), side(order[1], order[1] is stale_idx)
        valid = b.spec_info if order[0] is stale_idx else a.spec_info
        assert valid.future_dsa_topk_indices_available is True
        a.merge_batch(b)
    assert a.spec_info is valid
    assert a.spec_info.future_dsa_topk_indices_available is False
    assert torch.equal(a.spec_info.future_indices, ref_a.spec_info.future_indices)


def test_merge_sync_mode_live_stale_rows_drops_spec_info_and_warns_once(model_config, caplog):
    scheduler_guards._warned.clear()
    with patch_applied(PATCH), caplog.at_level("WARNING", logger="sglang_gemma4"):
        for _ in range(2):
            a = _batch(model_config, [0, 1], _verify(2))
            a.merge_batch(_batch(model_config, [5], _draft([5])))
            assert a.spec_info is None and len(a.reqs) == 3
            assert torch.equal(a.req_pool_indices, torch.tensor([0, 1, 5]))
    assert sum("live request" in r.getMessage() for r in caplog.records) == 1
    assert sum("merging without it" in r.getMessage() for r in caplog.records) == 1


def test_filter_with_stale_spec_info_filters_batch_keeps_object(model_config):
    stale = _verify(3)
    ref = _batch(model_config, [0, 1, 2], None, finished={1})
    ref.filter_batch()
    with patch_applied(PATCH):
        b = _batch(model_config, [0, 1, 2], stale, finished={1})
        b.filter_batch()
    assert b.spec_info is stale
    b.spec_info = None
    for f in FIELDS:
        assert torch.equal(getattr(b, f), getattr(ref, f)), f


def test_guard_is_transparent_when_spec_info_supports_merge(model_config):
    ref = _batch(model_config, [0, 1], _draft([0, 1]))
    ref.merge_batch(_batch(model_config, [4], _draft([4])))
    with patch_applied(PATCH):
        a = _batch(model_config, [0, 1], _draft([0, 1]))
        a.merge_batch(_batch(model_config, [4], _draft([4])))
    _assert_same(a, ref)


def test_knob_off_leaves_sglang_unpatched(model_config):
    with patch_applied(PATCH, {"SGLANG_GEMMA4_SCHEDULER_GUARDS": "0"}) as st:
        assert st.state == "disabled"
        with pytest.raises(AttributeError):
            _batch(model_config, [0], _verify(1)).merge_batch(_batch(model_config, [2], _draft([2])))
