"""SGLANG_ENABLE_PIECEWISE_CUDA_GRAPH_FOR_MM against SGLang's real ModelConfig decision (CPU).

On CPU ServerArgs disables every prefill graph ("non-CUDA hardware" rule), so
the test checks the fields ServerArgs' multimodal rules read
(``ModelConfig.is_multimodal_piecewise_cuda_graph_supported`` /
``is_piecewise_cuda_graph_disabled_model``) and then runs the real
``_apply_cuda_graph_compatibility`` with the device check as on CUDA.
"""

from __future__ import annotations

import pytest

from sglang_gemma4 import registry
from sglang_gemma4.patches.mm_prefill_graph import PATCH
from sglang_gemma4.testing.configs import tiny_text_config
from sglang_gemma4.testing.hooks import patch_applied

KNOB = "SGLANG_ENABLE_PIECEWISE_CUDA_GRAPH_FOR_MM"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from transformers import Gemma4Config

    root = tmp_path_factory.mktemp("gemma4mm")
    mm = Gemma4Config(text_config=tiny_text_config().to_dict())
    mm.architectures = ["Gemma4ForConditionalGeneration"]
    mm.save_pretrained(root / "mm")
    text = tiny_text_config()
    text.architectures = ["Gemma4ForCausalLM"]
    text.save_pretrained(root / "text")
    return str(root / "mm"), str(root / "text")


def _mc(path):
    from sglang.srt.configs.model_config import ModelConfig

    return ModelConfig(path)


def test_default_sglang_excludes_gemma4_mm(paths):
    with patch_applied(PATCH, {}) as st:
        assert st.state == "disabled"
        mc = _mc(paths[0])
    assert mc.is_multimodal
    assert not mc.is_multimodal_piecewise_cuda_graph_supported
    assert mc.is_piecewise_cuda_graph_disabled_model


def test_knob_allows_gemma4_mm_and_nothing_else(paths):
    with patch_applied(PATCH, {KNOB: "1"}) as st:
        assert st.state == "active"
        mm, text = _mc(paths[0]), _mc(paths[1])
        from sglang.srt.configs import model_config as m

        assert not m.is_multimodal_piecewise_cuda_graph_supported(["Qwen2VLForConditionalGeneration"])
        assert m.is_multimodal_piecewise_cuda_graph_supported(["KimiK25ForConditionalGeneration"])
        assert not m.is_multimodal_breakable_cuda_graph_supported(["Gemma4ForConditionalGeneration"])
    assert mm.is_multimodal_piecewise_cuda_graph_supported
    assert not mm.is_piecewise_cuda_graph_disabled_model
    assert not text.is_multimodal  # text Gemma-4 never went through the MM rule
    assert _mc(paths[0]).is_piecewise_cuda_graph_disabled_model  # restored after the patch


@pytest.mark.parametrize("knob, expected", [("0", "DISABLED"), ("1", "TC_PIECEWISE")])
def test_server_args_prefill_backend_decision(paths, monkeypatch, knob, expected):
    # Run ServerArgs' own rule set as it runs on CUDA: only the hardware probe differs.
    import sglang.srt.server_args as sa_mod
    from sglang.srt.model_executor.cuda_graph_config import Backend
    from sglang.srt.server_args import ServerArgs

    with patch_applied(PATCH, {KNOB: knob}):
        sa = ServerArgs(model_path=paths[0], device="cpu", attention_backend="triton", skip_tokenizer_init=True)
        monkeypatch.setattr(sa_mod, "is_cpu", lambda: False)
        sa.cuda_graph_config.prefill.backend = Backend.BREAKABLE
        sa._cuda_graph_config_locked = set()
        sa._apply_cuda_graph_compatibility()
        assert sa.cuda_graph_config.prefill.backend == getattr(Backend, expected)


def test_upstream_check_is_false_on_0_5_17():
    assert PATCH.upstream() is None
    assert registry.evaluate(PATCH, {KNOB: "1"}).state == "active"
