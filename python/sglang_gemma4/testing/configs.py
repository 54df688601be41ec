"""CPU-side test helpers: tiny Gemma-4 config dirs and SGLang child processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Children must not inherit knobs from the developer's shell.
KNOB_PREFIXES = ("SGLANG_GEMMA4_", "SGLANG_FROZEN_KV_MTP_V2", "SGLANG_TRTLLM_MHA_DEBUG",
                 "SGLANG_ENABLE_PIECEWISE_CUDA_GRAPH_FOR_MM")


def clean_environ() -> dict:
    return {k: v for k, v in os.environ.items()
            if not (k.startswith(KNOB_PREFIXES) or k == "SGLANG_PLUGINS")}


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


def run_py(code: str, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    full_env = clean_environ()
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=timeout)
