"""Fused PLE tail for Gemma-4 E2B/E4B decoder layers.

Seed commit "Fused PLE-tail kernels (gemma4_fused_ops.py)": a dense layer with
per-layer embeddings (PLE) ends in seven launches (post_ff_norm; + residual;
gate GEMM; gelu_tanh; * per_layer_input; projection GEMM; post-PLE norm;
+ ; * layer_scalar). The two GEMMs stay; the pointwise/norm work collapses
into three Triton launches:

    h    = rmsnorm(mlp_out) * w_post_ff + residual           gemma_rmsnorm_add
    g    = gelu_tanh(per_layer_input_gate(h)) * ple          gemma_gelu_tanh_mul
    out  = (rmsnorm(per_layer_projection(g)) * w_ple + h) * layer_scalar
                                                             gemma_rmsnorm_residual_scalar

Each kernel rounds once instead of after every op, so results differ from
SGLang's sequence only by bf16 rounding.

Hook: the shared AROUND hook on ``Gemma4DecoderLayer.forward``
(:mod:`sglang_gemma4.patches._layer_forward`: why no narrower target exists,
how one hook serves several fusions). This patch fills its ``dense_tail``
slot: for eligible layers the hook runs 0.5.17's sub-module sequence (input
norm, attention with its o_proj all-reduce, post-attn norm, fused-add pre-ff
norm, MLP with its down_proj all-reduce) and :func:`ple_tail`; other layers run
the original forward. The hook re-states 0.5.17's forward, so the patch is
"unavailable" when the installed forward's source is not that one.

Scope: dense PLE layers (E2B/E4B). MoE layers are ``fused_triple_norm``'s (no
Gemma-4 checkpoint has both MoE and PLE).

The tensor gates at the bottom (:func:`rows_ok`, :func:`plain_rmsnorm`, the
``_TEST_ALLOW_CPU`` switch) are shared with ``fused_triple_norm``.
"""

from __future__ import annotations

from typing import Optional

from sglang_gemma4.patches import _layer_forward
from sglang_gemma4.registry import Patch

TARGET = _layer_forward.TARGET
FIRED = "fused PLE tail running"

# Tests flip this to run the fused paths (this patch's and fused_triple_norm's) on CPU
# tensors under TRITON_INTERPRET=1. Production needs CUDA: the kernels are Triton and
# the seed gates on it.
_TEST_ALLOW_CPU = False


class FusedPle(Patch):
    name = "fused_ple"
    summary = "Gemma-4 E2B/E4B PLE layer tail in 3 fused Triton launches instead of 7"
    knob = "SGLANG_GEMMA4_FUSED_PLE"
    default = True
    seed = "Fused PLE-tail kernels (gemma_rmsnorm_add, gemma_gelu_tanh_mul)"
    targets = (TARGET,)

    def upstream(self) -> Optional[str]:
        from sglang.kernels.ops.layernorm import gemma4_fused_ops

        # SGLang's own port would add these kernels next to the ones it has.
        for fn in ("gemma_rmsnorm_add", "gemma_gelu_tanh_mul"):
            if hasattr(gemma4_fused_ops, fn):
                return f"SGLang ships gemma4_fused_ops.{fn}: PLE tail already fused"
        return None

    def unavailable(self) -> Optional[str]:
        try:
            _layer_forward.check_forward_unchanged()
        except RuntimeError as e:
            return str(e)
        return None

    def register(self, value: Optional[bool]) -> None:
        _layer_forward.enable(self, FUSION)


PATCH = FusedPle()


# ----------------------------------------------------------------- the fusion


def layer_eligible(layer, hidden_states, per_layer_input) -> bool:
    if not layer.has_ple or layer.enable_moe_block or per_layer_input is None:
        return False
    if not rows_ok(hidden_states, per_layer_input) or not hidden_states.is_contiguous():
        return False
    if per_layer_input.shape[1] != layer.hidden_size_per_layer_input:
        return False
    h = layer.hidden_size
    return (
        hidden_states.shape[1] == h
        and plain_rmsnorm(layer.post_feedforward_layernorm, h)
        and _ple_norm_ok(layer.post_per_layer_input_norm, h)
        and layer.layer_scalar.numel() == 1
    )


def ple_tail(layer, hidden_states, residual, per_layer_input):
    """The PLE tail of 0.5.17's forward (slot ``dense_tail``) with three fused launches.

    Intermediates (MLP/GEMM outputs) are checked as they appear: attention has
    already written the KV cache, so an odd tensor here runs the unfused tail,
    never the original forward.
    """
    import torch

    from sglang_gemma4.kernels.ple_tail import (
        gemma_gelu_tanh_mul,
        gemma_rmsnorm_add,
        gemma_rmsnorm_residual_scalar,
    )

    norm = layer.post_feedforward_layernorm
    if rows_ok(hidden_states, residual) and hidden_states.shape == residual.shape:
        hidden_states = gemma_rmsnorm_add(
            hidden_states, norm.weight, residual, norm.variance_epsilon
        )
    else:
        hidden_states = norm(hidden_states) + residual
    gate, _ = layer.per_layer_input_gate(hidden_states)
    if rows_ok(gate, per_layer_input) and gate.shape == per_layer_input.shape:
        gated = gemma_gelu_tanh_mul(gate, per_layer_input)
    else:
        gated = torch.nn.functional.gelu(gate, approximate="tanh") * per_layer_input
    contribution, _ = layer.per_layer_projection(gated)
    ple_norm = layer.post_per_layer_input_norm
    if rows_ok(contribution, hidden_states) and contribution.shape == hidden_states.shape:
        return gemma_rmsnorm_residual_scalar(
            contribution, ple_norm.weight, hidden_states, layer.layer_scalar, ple_norm.eps
        )
    return (hidden_states + ple_norm(contribution)) * layer.layer_scalar


FUSION = _layer_forward.Fusion(
    name=FusedPle.name, slot="dense_tail", eligible=layer_eligible, run=ple_tail, fired=FIRED
)


# ----------------------------------------------------------------- tensor gates (shared)


def _dtypes():
    import torch

    return (torch.bfloat16, torch.float16, torch.float32)


def on_device(t) -> bool:
    return t.is_cuda or (_TEST_ALLOW_CPU and t.device.type == "cpu")


def rows_ok(ref, *others) -> bool:
    """2-D, supported dtype, unit inner stride, non-empty; others match ref's rows/dtype/device."""
    import torch

    if not isinstance(ref, torch.Tensor) or ref.dim() != 2 or ref.shape[0] == 0:
        return False
    if ref.dtype not in _dtypes() or ref.stride(-1) != 1 or not on_device(ref):
        return False
    for t in others:
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.stride(-1) != 1:
            return False
        if t.shape[0] != ref.shape[0] or t.dtype != ref.dtype or t.device != ref.device:
            return False
    return True


def plain_rmsnorm(norm, hidden: int) -> bool:
    """SGLang ``RMSNorm`` computing rmsnorm(x) * weight, nothing else."""
    from sglang.srt.layers.layernorm import RMSNorm

    return (
        isinstance(norm, RMSNorm)
        and norm.variance_size_override is None
        and not norm.cast_x_before_out_mul
        and not norm.fp32_residual
        and norm.override_orig_dtype is None
        and tuple(norm.weight.shape) == (hidden,)
    )


def _ple_norm_ok(norm, hidden: int) -> bool:
    from sglang.srt.layers.layernorm import Gemma4RMSNorm

    # with_scale and no +1 shift: rmsnorm(x) * weight, what the kernel computes
    return (
        isinstance(norm, Gemma4RMSNorm)
        and norm.with_scale
        and norm.scale_shift == 0.0
        and tuple(norm.weight.shape) == (hidden,)
    )
