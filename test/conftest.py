import os
import sys
from pathlib import Path

import pytest

# Engine/ServerArgs children must not inherit knobs from the developer's shell.
KNOB_PREFIXES = ("SGLANG_GEMMA4_", "SGLANG_FROZEN_KV_MTP_V2", "SGLANG_TRTLLM_MHA_DEBUG",
                 "SGLANG_ENABLE_PIECEWISE_CUDA_GRAPH_FOR_MM")


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(KNOB_PREFIXES) or k == "SGLANG_PLUGINS":
            monkeypatch.delenv(k, raising=False)
    return os.environ


def write_gemma4_config(path: Path, moe: bool) -> Path:
    """A tiny Gemma-4 (multimodal wrapper, text only) config.json; no weights needed."""
    from transformers import Gemma4Config

    tc = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32,
              sliding_window=16, max_position_embeddings=1024, hidden_size_per_layer_input=0,
              layer_types=["sliding_attention", "full_attention"])
    if moe:
        tc.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    cfg = Gemma4Config(text_config=tc, vision_config=None, audio_config=None)
    cfg.architectures = ["Gemma4ForConditionalGeneration"]
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def gemma4_configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("g4cfg")
    return {"moe": write_gemma4_config(root / "moe", True),
            "dense": write_gemma4_config(root / "dense", False)}


def run_py(code: str, env: dict, timeout: int = 240):
    import subprocess

    full_env = {k: v for k, v in os.environ.items()
                if not (k.startswith(KNOB_PREFIXES) or k == "SGLANG_PLUGINS")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=timeout)
