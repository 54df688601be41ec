"""SGLANG_FROZEN_KV_MTP_V2 against real ServerArgs resolution (CPU, tiny local configs).

0.5.17's ``_handle_frozen_kv_mtp`` applies no CPU overlap rule (only the EAGLE
family and NGRAM call ``_disable_overlap_schedule_for_cpu``), so resolving with
device="cpu" is the same decision as on CUDA; both devices are run to show it.
"""

from __future__ import annotations

import pytest

from sglang_gemma4 import registry
from sglang_gemma4.patches import frozen_kv_mtp_v2
from sglang_gemma4.patches.frozen_kv_mtp_v2 import KNOB, PATCH, OverlapUnavailableError
from sglang_gemma4.testing.configs import write_target_and_assistant
from sglang_gemma4.testing.hooks import patch_applied


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_target_and_assistant(tmp_path_factory.mktemp("gemma4"))


def _args(paths, device="cpu", **kw):
    from sglang.srt.server_args import ServerArgs

    target, assistant = paths
    return ServerArgs(
        model_path=target, device=device, attention_backend="triton", skip_tokenizer_init=True,
        speculative_algorithm="NEXTN", speculative_draft_model_path=assistant, **kw,
    )


DEVICES = ["cpu", "cuda"]


@pytest.mark.parametrize("device", DEVICES)
def test_unset_is_sglang_default_overlap(paths, device):
    with patch_applied(PATCH, {}) as st:
        assert st.state == "disabled" and "SGLang" in st.reason
        sa = _args(paths, device)
    assert sa.speculative_algorithm == "FROZEN_KV_MTP"
    assert sa.disable_overlap_schedule is False
    with patch_applied(PATCH, {}):
        assert _args(paths, device, disable_overlap_schedule=True).disable_overlap_schedule is True


@pytest.mark.parametrize("device", DEVICES)
def test_one_requires_overlap(paths, device):
    with patch_applied(PATCH, {KNOB: "1"}) as st:
        assert st.state == "active" and "overlap" in st.reason
        sa = _args(paths, device)
        assert sa.speculative_algorithm == "FROZEN_KV_MTP"
        assert sa.disable_overlap_schedule is False
        with pytest.raises(OverlapUnavailableError, match=f"{KNOB}=1.*--disable-overlap-schedule"):
            _args(paths, device, disable_overlap_schedule=True)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_runs_synchronously(paths, device):
    with patch_applied(PATCH, {KNOB: "0"}) as st:
        assert st.state == "active" and "synchronously" in st.reason
        sa = _args(paths, device)
    assert sa.speculative_algorithm == "FROZEN_KV_MTP"
    assert sa.disable_overlap_schedule is True
    # the declaration went through SGLang's pipeline, not a bare write
    assert any("frozen_kv_mtp_overlap_mode" in src for src, _ in sa._resolved_overrides)


def test_zero_leaves_other_configurations_alone(paths):
    from sglang.srt.server_args import ServerArgs

    with patch_applied(PATCH, {KNOB: "0"}):
        sa = ServerArgs(model_path=paths[0], device="cpu", attention_backend="triton", skip_tokenizer_init=True)
    assert sa.speculative_algorithm is None and sa.disable_overlap_schedule is False


def test_check_server_args_enforces_mode_on_prebuilt_args(paths, caplog):
    # ServerArgs built before the plugin loaded: check_server_args is the gate.
    prebuilt_sync = _args(paths, max_running_requests=8)
    prebuilt_nooverlap = _args(paths, disable_overlap_schedule=True)
    frozen_kv_mtp_v2._logged = False
    with patch_applied(PATCH, {KNOB: "0"}), caplog.at_level("INFO", logger="sglang_gemma4"):
        prebuilt_sync.check_server_args()
    assert prebuilt_sync.disable_overlap_schedule is True
    assert any("synchronously" in r.getMessage() for r in caplog.records)
    with patch_applied(PATCH, {KNOB: "1"}):
        with pytest.raises(OverlapUnavailableError):
            prebuilt_nooverlap.check_server_args()


def test_status_detail_names_each_mode():
    for raw, state, words in [(None, "disabled", "default"), ("1", "active", "overlap"), ("0", "active", "synchronously")]:
        st = registry.evaluate(PATCH, {} if raw is None else {KNOB: raw})
        assert st.state == state and words in st.reason, (raw, st)
    assert registry.evaluate(PATCH, {KNOB: "maybe"}).state == "error"
