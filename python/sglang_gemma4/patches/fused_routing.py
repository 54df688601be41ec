"""Gemma-4 MoE routing in one launch (top-K, softmax over K, per-expert scale).

Seed commit "Gemma4MoE.routing_function ... four per-layer GPU kernels" (the
vLLM ``_gemma4_routing_kernel`` port). SGLang 0.5.17 already carries that
port: ``Gemma4MoE.routing_function`` calls ``gemma4_fused_routing``
(``sglang/kernels/ops/layernorm/gemma4_fused_ops.py``: one program and one
full E-wide sort per token). Ours (``sglang_gemma4.kernels.routing``) tiles
several tokens per program and partial-sorts; it replaces SGLang's only if it
is measurably faster, decided by :data:`USE_OURS`.

Hook (when :data:`USE_OURS`): AROUND the ``gemma4_fused_routing`` name that
``gemma4_causal`` calls. ``routing_function`` is a closure built per layer in
``Gemma4MoE.__init__``, so the kernel call inside it is the narrowest
hookable point; it is only reached for CUDA 2-D float logits, and anything
our kernel does not accept goes to SGLang's.
"""

from __future__ import annotations

from typing import Optional

from sglang_gemma4.registry import Patch

TARGET = "sglang.srt.models.gemma4_causal.gemma4_fused_routing"

# Measured on the H200 (runs/kernels-nvidia-h200.md and
# runs/history/2026-11-29/kernels-routing-retuned-nvidia-h200.md, E=128 K=8 bf16): ours is 1.2-1.4x
# SGLang's at T<=256 (decode) and 1.3-2.2x at T>=8192, with identical ids on the
# GPU tests. Set False to fall back to "upstream" (SGLang's kernel).
USE_OURS = True

# Tests flip this to run our kernel on CPU tensors under TRITON_INTERPRET=1.
_TEST_ALLOW_CPU = False


def _eligible(gating_output, per_expert_scale, topk) -> bool:
    import torch

    from sglang_gemma4.kernels.routing import MAX_EXPERTS

    if not isinstance(gating_output, torch.Tensor) or not isinstance(per_expert_scale, torch.Tensor):
        return False
    if not (gating_output.is_cuda or (_TEST_ALLOW_CPU and gating_output.device.type == "cpu")):
        return False
    if gating_output.dim() != 2 or gating_output.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    E = gating_output.shape[1]
    return (
        1 <= E <= MAX_EXPERTS
        and isinstance(topk, int)
        and not isinstance(topk, bool)
        and 1 <= topk <= E
        and per_expert_scale.dim() == 1
        and per_expert_scale.shape[0] == E
        and per_expert_scale.device == gating_output.device
        and per_expert_scale.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def fused_routing(original, gating_output, per_expert_scale, topk):
    """AROUND hook: same contract as SGLang's (fp32 weights, int32 ids, [T, K])."""
    import torch

    # Under torch.compile SGLang's own routing runs (our launcher picks tiles from T in Python).
    if torch.compiler.is_compiling() or not _eligible(gating_output, per_expert_scale, topk):
        return original(gating_output, per_expert_scale, topk)
    from sglang_gemma4.kernels.routing import gemma4_routing

    return gemma4_routing(gating_output, per_expert_scale, topk)


class FusedRouting(Patch):
    name = "fused_routing"
    summary = "Gemma-4 MoE routing: sglang-gemma4's tiled one-launch kernel"
    knob = "SGLANG_GEMMA4_FUSED_ROUTING"
    default = True
    seed = "Gemma4MoE fused routing kernel (vLLM _gemma4_routing_kernel port)"
    targets = (TARGET,)

    def upstream(self) -> Optional[str]:
        from sglang.srt.models import gemma4_causal

        if not USE_OURS and hasattr(gemma4_causal, "gemma4_fused_routing"):
            return (
                "SGLang's gemma4_fused_routing already routes Gemma-4 in one launch; "
                "ours stays off until runs/kernels-nvidia-h200.md shows it faster (USE_OURS)"
            )
        return None

    def detail(self, value: Optional[bool]) -> str:
        if not value:
            return "SGLang's gemma4_fused_routing kernel"
        return "kernel: sglang_gemma4.kernels.routing.gemma4_routing (replaces SGLang's gemma4_fused_routing)"

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(TARGET, fused_routing, HookType.AROUND)


PATCH = FusedRouting()
