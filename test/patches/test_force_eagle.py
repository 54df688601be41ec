"""SGLANG_GEMMA4_FORCE_EAGLE against SGLang's real alias resolution (CPU, tiny local configs)."""

from __future__ import annotations

import pytest

from sglang_gemma4 import registry
from sglang_gemma4.patches.force_eagle import KNOB, PATCH, ForceEagleUnsupportedError
from sglang_gemma4.testing.configs import write_target_and_assistant
from sglang_gemma4.testing.hooks import patch_applied


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_target_and_assistant(tmp_path_factory.mktemp("gemma4"))


def _args(paths, algo="NEXTN", **kw):
    from sglang.srt.server_args import ServerArgs

    return ServerArgs(
        model_path=paths[0], device="cpu", attention_backend="triton", skip_tokenizer_init=True,
        speculative_algorithm=algo, speculative_draft_model_path=paths[1], **kw,
    )


def test_default_off_sglang_promotes_to_frozen_kv_mtp(paths):
    with patch_applied(PATCH, {}) as st:
        assert st.state == "disabled"
        assert _args(paths).speculative_algorithm == "FROZEN_KV_MTP"


@pytest.mark.parametrize("algo", ["NEXTN", "EAGLE", "nextn"])
def test_on_refuses_gemma4_assistant_at_startup_naming_the_knob(paths, algo):
    with patch_applied(PATCH, {KNOB: "1"}) as st:
        assert st.state == "active"
        with pytest.raises(ForceEagleUnsupportedError) as e:
            _args(paths, algo)
    msg = str(e.value)
    assert f"{KNOB}=1" in msg and f"Unset {KNOB}" in msg
    assert "hidden_size=32" in msg and "backbone_hidden_size=64" in msg


def test_on_leaves_explicit_frozen_kv_mtp_and_other_drafts_alone(paths):
    from sglang.srt.arg_groups import speculative_hook

    with patch_applied(PATCH, {KNOB: "1"}):
        assert _args(paths, "FROZEN_KV_MTP").speculative_algorithm == "FROZEN_KV_MTP"
        # a non-assistant draft resolves exactly as in SGLang (NEXTN -> EAGLE)
        assert speculative_hook._resolve_speculative_algorithm_alias("NEXTN", paths[0]) == "EAGLE"
        assert speculative_hook._resolve_speculative_algorithm_alias(None, None) is None
    assert speculative_hook._resolve_speculative_algorithm_alias("NEXTN", paths[0]) == "EAGLE"


def test_the_reasons_in_the_message_hold_in_sglang_and_transformers(paths):
    # EAGLE sizes its recurrent hidden state from the draft's ModelConfig; the
    # assistant needs the target's width, and owns no KV (all layers shared).
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.utils.hf_transformers_utils import get_config

    draft_cfg = get_config(paths[1], trust_remote_code=False)
    text = draft_cfg.get_text_config()
    assert text.num_kv_shared_layers == text.num_hidden_layers
    assert ModelConfig(paths[1]).spec_hidden_size != draft_cfg.backbone_hidden_size


def test_status_detail():
    assert "refused" in registry.evaluate(PATCH, {KNOB: "1"}).reason
    assert registry.evaluate(PATCH, {}).state == "disabled"
