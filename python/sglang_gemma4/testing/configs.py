"""CPU-side test helpers: tiny Gemma-4 config dirs and SGLang child processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

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


def tiny_text_config(**overrides):
    """A 4-layer (3 sliding + 1 full) Gemma-4 text config, no PLE, no KV sharing."""
    from transformers import Gemma4TextConfig

    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32,
        sliding_window=16, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
        layer_types=["sliding_attention"] * 3 + ["full_attention"], num_kv_shared_layers=0,
    )
    base.update(overrides)
    return Gemma4TextConfig(**base)


def write_target_and_assistant(root: Path) -> tuple:
    """config.json of a tiny Gemma4ForCausalLM target and its Gemma4AssistantForCausalLM draft."""
    from transformers.models.gemma4_assistant.configuration_gemma4_assistant import Gemma4AssistantConfig

    target = tiny_text_config()
    target.architectures = ["Gemma4ForCausalLM"]
    target.save_pretrained(root / "target")
    assistant = Gemma4AssistantConfig(
        text_config=tiny_text_config(hidden_size=32, num_hidden_layers=2, num_kv_shared_layers=2,
                                     layer_types=["sliding_attention", "full_attention"]),
        backbone_hidden_size=64,
    )
    assistant.architectures = ["Gemma4AssistantForCausalLM"]
    assistant.save_pretrained(root / "assistant")
    return str(root / "target"), str(root / "assistant")


def init_sglang_single_process(device: str = "cpu", **server_args) -> None:
    """Published ServerArgs + a one-process gloo TP group: what SGLang's layers read
    when built outside an engine. Idempotent within a process."""
    import socket

    from sglang.srt import runtime_context as rc
    from sglang.srt.distributed import parallel_state as ps

    try:
        rc.get_mm()
    except ValueError:
        from sglang.srt.server_args import ServerArgs

        rc.publish(ServerArgs(model_path="dummy", device=device, **server_args), role="test")
    if not ps.model_parallel_is_initialized():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ps.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{port}",
        )
        ps.initialize_model_parallel(1)


@contextlib.contextmanager
def sglang_tp1(device: str) -> Iterator[None]:
    """Published default ServerArgs overridden for ``device`` + a one-process gloo TP group,
    torn down on exit: what a real SGLang layer needs when built and run outside an engine."""
    import tempfile

    import torch

    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args(device=device)
    override.install()
    mine = not torch.distributed.is_initialized()
    try:
        if mine:
            path = tempfile.mktemp(prefix="g4_gloo_")
            ps.init_distributed_environment(
                world_size=1, rank=0, local_rank=0,
                distributed_init_method=f"file://{path}", backend="gloo",
            )
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(1, backend="gloo")
        yield
    finally:
        if mine:
            ps.destroy_model_parallel()
            ps.destroy_distributed_environment()
        override.restore()
