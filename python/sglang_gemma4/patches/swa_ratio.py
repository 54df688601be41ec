"""SWA pool ratio default for Gemma-4 MoE checkpoints.

Seed commits "swa_full_tokens_ratio" + its MoE gate: Gemma-4's 25:5 SWA:full
split makes the *full* pool the binding one for long prompts; SGLang's 0.8
over-provisions SWA. 0.15 (the DeepSeek-V4 precedent) moved 26B-A4B summarise
TTFT -16 % on B200. Dense checkpoints keep SGLang's default: the seed measured
the change only on MoE.

Mechanism: SGLang 0.5.17's declarative model-override registry
(``register_model_override``), the path its own per-model defaults take.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Optional

from sglang_gemma4.registry import Patch

logger = logging.getLogger("sglang_gemma4")

TARGET = "sglang.srt.arg_groups.overrides.register_model_override"
ARCHS = (
    "Gemma4ForConditionalGeneration",
    "Gemma4ForCausalLM",
    "Gemma4UnifiedForConditionalGeneration",
)
MOE_RATIO = 0.15


def _text_config(hf_config: Any) -> Any:
    get = getattr(hf_config, "get_text_config", None)
    if callable(get):
        try:
            return get()
        except TypeError:
            pass
    return getattr(hf_config, "text_config", None) or hf_config


def gemma4_swa_ratio_override(server_args: Any, hf_config: Any) -> dict:
    """Provider for SGLang's override registry; reads, never writes, server_args."""
    from sglang.srt.server_args import ServerArgs

    n_experts = getattr(_text_config(hf_config), "num_experts", None) or 0
    current = server_args.swa_full_tokens_ratio
    # 0.5.17 has no "unset" sentinel for this field: the dataclass default is
    # the only signal (same rule as SGLang's own DeepSeek-V4 override).
    if current != ServerArgs.swa_full_tokens_ratio:
        logger.info("swa_full_tokens_ratio=%s set by the user; kept (sglang-gemma4)", current)
        return {}
    if n_experts > 0:
        logger.info(
            "Gemma-4 MoE checkpoint (num_experts=%d): swa_full_tokens_ratio=%s (sglang-gemma4)",
            n_experts, MOE_RATIO,
        )
        return {"swa_full_tokens_ratio": MOE_RATIO}
    logger.info("Gemma-4 dense checkpoint: SGLang's swa_full_tokens_ratio=%s kept (sglang-gemma4)", current)
    return {}


class SwaRatio(Patch):
    name = "swa_ratio"
    summary = "swa_full_tokens_ratio=0.15 for Gemma-4 MoE checkpoints unless the user set it"
    knob = "SGLANG_GEMMA4_SWA_RATIO"
    default = True
    seed = "swa_full_tokens_ratio 0.15 for Gemma-4 (+ MoE-only gate)"
    targets = (TARGET,)

    def upstream(self) -> Optional[str]:
        from sglang.srt.arg_groups import overrides

        for arch in ARCHS:
            for fn in overrides._MODEL_OVERRIDE_FNS.get(arch, ()):
                if fn is gemma4_swa_ratio_override:
                    continue
                try:
                    src = inspect.getsource(fn)
                except (OSError, TypeError):
                    continue
                if "swa_full_tokens_ratio" in src:
                    return f"SGLang's {fn.__qualname__} already sets swa_full_tokens_ratio for {arch}"
        return None

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.arg_groups.overrides import _MODEL_OVERRIDE_FNS, register_model_override

        for arch in ARCHS:
            # idempotent: SGLang may run load_plugins() more than once per process
            if gemma4_swa_ratio_override not in _MODEL_OVERRIDE_FNS.get(arch, ()):
                register_model_override(arch)(gemma4_swa_ratio_override)


PATCH = SwaRatio()
