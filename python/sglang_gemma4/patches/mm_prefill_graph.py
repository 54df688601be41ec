"""Prefill CUDA graph for multimodal Gemma-4 (language model captured, vision eager).

Seed PR #16 part 3 ("Piecewise CUDA graph opt-in for multimodal models"): the
blanket "multimodal -> no prefill graph" rule is too coarse for Gemma-4; the
vision tower runs eagerly in the embed routine and only the language model's
prefill gets captured. Measured on 26B-A4B-IT: TPOT 10.97 -> 9.80 ms.

SGLang 0.5.17 keeps the rule but has per-arch allowlists in
``sglang.srt.configs.model_config``: ``multimodal_piecewise_cuda_graph_supported_model_archs``
(tc_piecewise, torch.compile piecewise -- the seed's "piecewise CUDA graph") and
``multimodal_breakable_cuda_graph_supported_model_archs`` (breakable). Neither
lists ``Gemma4ForConditionalGeneration``. ``ServerArgs._apply_cuda_graph_compatibility``
switches the CUDA default (breakable) to tc_piecewise for archs on the piecewise
list and keeps the prefill graph; otherwise the "multimodal model" rule
disables it.

This patch answers "yes" for Gemma-4 MM in
``is_multimodal_piecewise_cuda_graph_supported`` (AFTER hook): tc_piecewise
captures the outer forward, so the Gemma-4 per-layer inputs (PLE, computed
from ``input_ids`` in the outer forward) are inside the traced graph. The
breakable list is deliberately left alone: breakable replays only the
language-model body and re-feeds ``input_embeds`` alone, dropping the
``per_layer_inputs`` the Gemma-4 MM forward passes in (wrong for E2B/E4B).
Explicit ``--cuda-graph-backend-prefill`` choices bypass these rules in
SGLang anyway.
"""

from __future__ import annotations

from typing import List, Optional

from sglang_gemma4.registry import Patch

PIECEWISE_SUPPORTED = (
    "sglang.srt.configs.model_config.is_multimodal_piecewise_cuda_graph_supported"
)
ARCHS = ("Gemma4ForConditionalGeneration",)


def allow_gemma4_mm(result: bool, model_architectures: List[str], *args, **kwargs) -> bool:
    """AFTER hook: SGLang's answer, or True for the Gemma-4 MM architecture."""
    if result:
        return result
    return any(arch in ARCHS for arch in (model_architectures or ()))


class MmPrefillGraph(Patch):
    name = "mm_prefill_graph"
    summary = (
        "Gemma4ForConditionalGeneration keeps the prefill CUDA graph (tc_piecewise: "
        "language model captured, vision tower eager) instead of SGLang's "
        "multimodal disable rule"
    )
    knob = "SGLANG_ENABLE_PIECEWISE_CUDA_GRAPH_FOR_MM"
    default = False
    seed = "PR #16 part 3: piecewise CUDA graph opt-in for multimodal models"
    targets = (PIECEWISE_SUPPORTED,)

    def upstream(self) -> Optional[str]:
        from sglang.srt.configs import model_config

        for arch in ARCHS:
            if arch in model_config.multimodal_piecewise_cuda_graph_supported_model_archs:
                return f"SGLang allowlists {arch} for multimodal piecewise prefill CUDA graph"
            if arch in model_config.multimodal_breakable_cuda_graph_supported_model_archs:
                return f"SGLang allowlists {arch} for multimodal breakable prefill CUDA graph"
        return None

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(PIECEWISE_SUPPORTED, allow_gemma4_mm, HookType.AFTER)


PATCH = MmPrefillGraph()
