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

Hook: the shared AROUND hook on ``Gemma4DecoderLayer.forward``
(:mod:`sglang_gemma4.patches._layer_forward`). This patch fills its
``moe_post_attn`` slot: for eligible MoE layers the hook runs 0.5.17's
sub-module sequence (input norm, attention + o_proj all-reduce, dense MLP +
down_proj all-reduce, ``router.proj``, MoE + its all-reduce, 0.5.17's post-FF
tail) with the four norms replaced; ``Gemma4Router.forward`` is bypassed (norm
fused, ``proj`` called directly), so the patch also pins its source. Unlike
SGLang's in-place fused-add norm, the new residual is a fresh tensor: the layer
input is no longer overwritten (nothing in 0.5.17 reads it afterwards).

Eligibility (as the seed): MoE block, CUDA, 2-D contiguous hidden states of a
float dtype, plain ``RMSNorm`` variants with one shared eps (the router norm's
included), router norm ``Gemma4RMSNorm(with_scale=False)`` (its weight holds
the folded scale). Anything else calls the original forward.
"""

from __future__ import annotations

from typing import Optional

from sglang_gemma4.patches import _layer_forward
from sglang_gemma4.patches.fused_ple import plain_rmsnorm, rows_ok
from sglang_gemma4.registry import Patch, source_of, source_pin_reason

TARGET = _layer_forward.TARGET
FIRED = "fused post-attention triple RMSNorm running"

# sha256 of inspect.getsource(Gemma4Router.forward) in SGLang 0.5.17 (bypassed here).
ROUTER_FORWARD_SHA256 = "c9b809ff00a5f0aa817b06f010e61bbc0e3e9350e0ef1be2acff1b6340f4fc32"


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
            _layer_forward.check_forward_unchanged()
            check_router_unchanged()
        except RuntimeError as e:
            return str(e)
        return None

    def register(self, value: Optional[bool]) -> None:
        _layer_forward.enable(self, FUSION)


PATCH = FusedTripleNorm()


def check_router_unchanged() -> None:
    from sglang.srt.models.gemma4_causal import Gemma4Router

    why = source_pin_reason(source_of(Gemma4Router.forward), ROUTER_FORWARD_SHA256, "Gemma4Router.forward",
                            "the fused path bypasses it")
    if why:
        raise RuntimeError(why)


# ----------------------------------------------------------------- the fusion


def layer_eligible(layer, hidden_states, per_layer_input=None) -> bool:
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


def post_attn_norms(layer, attn_out, residual):
    """Slot ``moe_post_attn``: (residual, mlp_in, router_logits, moe_in) from one kernel."""
    from sglang_gemma4.kernels.triple_rmsnorm import gemma_post_attn_triple_rmsnorm

    if not (rows_ok(attn_out, residual) and attn_out.shape == residual.shape):
        # attention already ran (KV written): finish unfused, never re-run it
        return _layer_forward.sglang_moe_post_attn(layer, attn_out, residual)
    router = layer.router
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
    return residual, hidden_states, router_logits, moe_in


FUSION = _layer_forward.Fusion(
    name=FusedTripleNorm.name, slot="moe_post_attn", eligible=layer_eligible, run=post_attn_norms,
    fired=FIRED,
)
