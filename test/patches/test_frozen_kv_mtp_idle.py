"""frozen_kv_mtp_idle: SGLang 0.5.17's real FrozenKVMTPDraftWorker.draft on an idle batch, unpatched (TypeError)
vs patched (the empty verify input EAGLE v2's idle path builds), on CPU."""

import types

import pytest
import torch

from sglang_gemma4 import registry
from sglang_gemma4.patches import frozen_kv_mtp_idle as idle
from sglang_gemma4.patches import mtp_draft_no_sync as nosync
from sglang_gemma4.testing.hooks import patch_applied

fw = pytest.importorskip("sglang.srt.speculative.frozen_kv_mtp_worker_v2")


def _worker():
    w = object.__new__(fw.FrozenKVMTPDraftWorker)
    w.__dict__.update(topk=1, speculative_num_steps=3, speculative_num_draft_tokens=4, device="cpu")
    return w


def _idle():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return types.SimpleNamespace(forward_mode=ForwardMode.IDLE)


def test_sglang_0517_idle_draft_raises():
    with pytest.raises(TypeError, match="device"):
        fw.FrozenKVMTPDraftWorker.draft(_worker(), _idle())


@pytest.mark.parametrize("with_nosync", [False, True])
def test_patched_idle_draft_is_eagles_empty_verify_input(with_nosync):
    from sglang.srt.speculative.eagle_info import EagleVerifyInput

    with patch_applied(idle.PATCH, {}) as st:  # default on
        assert st.state == registry.ACTIVE
        if with_nosync:  # both AROUND hooks on the same target
            with patch_applied(nosync.PATCH, {nosync.PATCH.knob: "1"}) as st2:
                assert st2.state == registry.ACTIVE
                got = fw.FrozenKVMTPDraftWorker.draft(_worker(), _idle())
        else:
            got = fw.FrozenKVMTPDraftWorker.draft(_worker(), _idle())
    ref = EagleVerifyInput.create_idle_input(1, 3, 4, device="cpu")
    assert type(got) is fw.FrozenKVMTPVerifyInput
    for f in ("draft_token", "custom_mask", "positions", "retrieve_index", "retrieve_next_token"):
        a, b = getattr(got, f), getattr(ref, f)
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device == torch.device("cpu"), f
    assert (got.topk, got.spec_steps, got.draft_token_num) == (ref.topk, ref.spec_steps, ref.draft_token_num)
    with pytest.raises(TypeError):  # hooks removed again
        fw.FrozenKVMTPDraftWorker.draft(_worker(), _idle())


def test_other_batches_go_to_sglang():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    b = types.SimpleNamespace(forward_mode=ForwardMode.DECODE)
    assert idle.draft(lambda w, x: ("sglang", w, x), "w", b) == ("sglang", "w", b)


def test_status_and_upstream_check(monkeypatch):
    with patch_applied(idle.PATCH, {idle.PATCH.knob: "0"}) as st:
        assert st.state == registry.DISABLED
    assert idle.PATCH.unavailable() is None and idle.PATCH.upstream() is None
    fixed = idle._idle_branch().replace("self.speculative_num_draft_tokens,", "self.speculative_num_draft_tokens, device=self.device,")
    monkeypatch.setattr(idle, "_idle_branch", lambda: fixed)
    assert "passes device" in idle.PATCH.upstream()
