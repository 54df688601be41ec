"""Post-attention triple RMSNorm for Gemma-4 MoE decoder layers (26B-A4B).

Seed commit "gemma_post_attn_triple_rmsnorm" (ported from the Inductor kernel
``triton_red_fused_add_moe_forward_mul_rms_norm_0`` vLLM's torch.compile emits
for Gemma-4-26B-A4B). Between attention and the MLP/MoE branches a MoE layer
runs four norm launches over the same row:

    post   = rmsnorm(attn_out) * w_post_attn + residual     (post_attention_layernorm
    ff_in  = rmsnorm(post) * w_pre_ff                         + pre_feedforward_layernorm)
    router = rmsnorm(post) * (router.scale * hidden**-0.5)    (router.norm)
    ff2_in = rmsnorm(post) * w_pre_ff_2                       (pre_feedforward_layernorm_2)

The last three share one rsqrt(mean(post^2)); one Triton kernel produces all
four rows. Results differ from SGLang's sequence only by bf16 rounding.

Hook: AROUND ``Gemma4DecoderLayer.forward`` (why not narrower: see
``fused_ple``). For eligible MoE layers the hook runs 0.5.17's sub-module
sequence (input norm, attention + o_proj all-reduce, dense MLP + down_proj
all-reduce, ``router.proj``, MoE + its all-reduce, 0.5.17's post-FF tail) with
the four norms replaced; ``Gemma4Router.forward`` is bypassed (norm fused,
``proj`` called directly), so ``register`` also pins its source. Unlike
SGLang's in-place fused-add norm, the new residual is a fresh tensor: the layer
input is no longer overwritten (nothing in 0.5.17 reads it afterwards).

Eligibility (as the seed): MoE block, CUDA, 2-D contiguous hidden states of a
float dtype, plain ``RMSNorm`` variants with one shared eps, router norm
``Gemma4RMSNorm(with_scale=False)`` (its weight holds the folded scale).
Anything else calls the original forward.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Optional

from sglang_gemma4.patches import fused_ple
from sglang_gemma4.patches.fused_ple import plain_rmsnorm, rows_ok
from sglang_gemma4.registry import Patch

TARGET = "sglang.srt.models.gemma4_causal.Gemma4DecoderLayer.forward"
FIRED = "fused post-attention triple RMSNorm running"

# sha256 of inspect.getsource(Gemma4Router.forward) in SGLang 0.5.17 (bypassed here).
ROUTER_FORWARD_SHA256 = "c9b809ff00a5f0aa817b06f010e61bbc0e3e9350e0ef1be2acff1b6340f4fc32"


def check_router_unchanged() -> None:
    from sglang.srt.models.gemma4_causal import Gemma4Router

    src = inspect.getsource(inspect.unwrap(Gemma4Router.forward))
    got = hashlib.sha256(src.encode()).hexdigest()
    if got != ROUTER_FORWARD_SHA256:
        raise RuntimeError(
            f"Gemma4Router.forward is not SGLang 0.5.17's (source sha256 {got[:12]}...); "
            "the fused path bypasses it"
        )


def layer_eligible(layer, hidden_states) -> bool:
    from sglang.srt.layers.layernorm import Gemma4RMSNorm

    if not layer.enable_moe_block or layer.router is None or layer.moe is None:
        return False
    if not rows_ok(hidden_states) or not hidden_states.is_contiguous():
        return False
    h = layer.hidden_size
    if hidden_states.shape[1] != h:
        return False
    norms = (
        layer.post_attention_layernorm,
        layer.pre_feedforward_layernorm,
        layer.pre_feedforward_layernorm_2,
    )
    if not all(plain_rmsnorm(n, h) for n in norms):
        return False
    rnorm = layer.router.norm
    if not isinstance(rnorm, Gemma4RMSNorm) or rnorm.with_scale or tuple(rnorm.weight.shape) != (h,):
        return False
    eps = norms[0].variance_epsilon
    return all(n.variance_epsilon == eps for n in norms) and rnorm.eps == eps


def _post_ff_tail(layer, hidden_states_1, hidden_states_2, residual, per_layer_input):
    """0.5.17's MoE-layer tail, unchanged (same kernels, same conditions)."""
    import torch

    from sglang.srt.models import gemma4_causal

    if (
        not layer.has_ple
        and (hidden_states_1.is_cuda or hidden_states_1.is_xpu)
        and hidden_states_1.dim() == 2
    ):
        norm1 = layer.post_feedforward_layernorm_1
        norm2 = layer.post_feedforward_layernorm_2
        norm3 = layer.post_feedforward_layernorm
        return gemma4_causal.gemma_dual_rmsnorm_residual_scalar(
            hidden_states_1,
            norm1.weight.data,
            hidden_states_2,
            norm2.weight.data,
            norm3.weight.data,
            residual,
            layer.layer_scalar,
            norm1.variance_epsilon,
            norm2.variance_epsilon,
            norm3.variance_epsilon,
        )
    hidden_states = layer.post_feedforward_layernorm_1(hidden_states_1) + (
        layer.post_feedforward_layernorm_2(hidden_states_2)
    )
    hidden_states = layer.post_feedforward_layernorm(hidden_states) + residual
    if layer.has_ple and per_layer_input is not None:
        gate, _ = layer.per_layer_input_gate(hidden_states)
        gate = torch.nn.functional.gelu(gate, approximate="tanh")
        contribution, _ = layer.per_layer_projection(gate * per_layer_input)
        hidden_states = hidden_states + layer.post_per_layer_input_norm(contribution)
    return hidden_states * layer.layer_scalar


def fused_triple_norm_forward(original, layer, positions, hidden_states, per_layer_input, forward_batch, **kwargs):
    """AROUND hook: 0.5.17's MoE-layer forward with the four post-attention norms fused."""
    from sglang_gemma4.kernels.triple_rmsnorm import gemma_post_attn_triple_rmsnorm

    if fused_ple.under_compile() or not layer_eligible(layer, hidden_states):
        return original(layer, positions, hidden_states, per_layer_input, forward_batch, **kwargs)
    fused_ple.announce_once(FIRED, layer, hidden_states)
    router = layer.router
    residual = hidden_states
    hidden_states = layer.input_layernorm(hidden_states)
    attn_out = layer.self_attn(
        positions=positions, hidden_states=hidden_states, forward_batch=forward_batch
    )
    if rows_ok(attn_out, residual) and attn_out.shape == residual.shape:
        if not router._scale_fused:  # what Gemma4Router.forward does on first call
            router.fuse_scale()
        residual, hidden_states, router_in, moe_in = gemma_post_attn_triple_rmsnorm(
            attn_out,
            residual,
            layer.post_attention_layernorm.weight,
            layer.pre_feedforward_layernorm.weight,
            layer.pre_feedforward_layernorm_2.weight,
            router.norm.weight,
            layer.post_attention_layernorm.variance_epsilon,
        )
        router_logits, _ = router.proj(router_in)
    else:  # attention already ran (KV written): finish unfused, never re-run it
        hidden_states = layer.post_attention_layernorm(attn_out)
        hidden_states, residual = layer.pre_feedforward_layernorm(hidden_states, residual)
        router_logits = router(residual)
        moe_in = layer.pre_feedforward_layernorm_2(residual)
    hidden_states_1 = layer.mlp(hidden_states)
    hidden_states_2 = layer.moe(moe_in, router_logits)
    return _post_ff_tail(layer, hidden_states_1, hidden_states_2, residual, per_layer_input), None


class FusedTripleNorm(Patch):
    name = "fused_triple_norm"
    summary = "Gemma-4 MoE post-attention norms (post-attn, pre-FF, router, pre-FF-2) in one Triton launch"
    knob = "SGLANG_GEMMA4_FUSED_TRIPLE_NORM"
    default = True
    seed = "gemma_post_attn_triple_rmsnorm (Inductor fusion port)"
    targets = (TARGET,)

    def upstream(self) -> Optional[str]:
        from sglang.kernels.ops.layernorm import gemma4_fused_ops

        if hasattr(gemma4_fused_ops, "gemma_post_attn_triple_rmsnorm"):
            return "SGLang ships gemma4_fused_ops.gemma_post_attn_triple_rmsnorm"
        return None

    def unavailable(self) -> Optional[str]:
        try:
            fused_ple.check_forward_unchanged()
            check_router_unchanged()
        except RuntimeError as e:
            return str(e)
        return None

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(TARGET, fused_triple_norm_forward, HookType.AROUND)


PATCH = FusedTripleNorm()
