"""Gemma-4 attention: q/k/v head RMSNorm and RoPE in one Triton launch (all Gemma-4 models).

Issue #20's decode profile (runs/decode-profile-26b-nvidia-h200.md) has, per layer at batch 1,
SGLang's ``gemma_qkv_rmsnorm`` (~1.6 us) then sgl_kernel's RoPE (~1.9 us), each a launch of
its own over a few KiB. On KV-shared layers (E2B/E4B) SGLang also allocates a zeros "key"
only to rotate and drop it. :mod:`sglang_gemma4.kernels.qkv_norm_rope` does both in place,
one program per (token, head).

Hook: AROUND ``Gemma4Attention.forward``. For eligible calls it runs 0.5.17's sequence --
``qkv_proj``, the fused norm + RoPE on the projection's buffer, ``attn`` with the same q/k/v
views and ``save_kv_cache`` rule, ``o_proj`` -- and otherwise (or inside torch.compile) the
original forward. The KV write stays in ``attn``: 0.5.17 disabled its fused RoPE + KV write
("accuracy regression in launch_server path"), and this patch does not bring it back.

Eligibility: CUDA, 2-D hidden states and 1-D integer positions of the same length; q/k norms
``Gemma4RMSNorm`` with weight and ``scale_shift == 0``, v norm without weight (0.5.17's own
fused-norm condition), one eps for the three; RoPE ``RotaryEmbedding`` or
``Gemma4RotaryEmbedding``, NeoX style, ``rotary_dim == head_size`` (Gemma-4 pads its
proportional RoPE with zero frequencies to the whole head), cache ``[*, head_dim]``.

Default off: the CPU tests (interpreter; a real ``Gemma4Attention`` on vs off, sliding,
full/proportional and KV-shared layers) pass; it has not yet been measured on a GPU.
Enable with ``SGLANG_GEMMA4_FUSED_QKV_NORM_ROPE=1``.
"""

from __future__ import annotations

from typing import Optional

from sglang_gemma4.patches import _layer_forward
from sglang_gemma4.patches.fused_ple import rows_ok
from sglang_gemma4.registry import Patch, source_of, source_pin_reason

TARGET = "sglang.srt.models.gemma4_causal.Gemma4Attention.forward"
FIRED = "fused q/k/v RMSNorm + RoPE running"

# sha256 of inspect.getsource(Gemma4Attention.forward) in SGLang 0.5.17 (re-stated below).
FORWARD_SHA256 = "3e2f0f3572e495079c6170ae8f2e7979ec46d6e58aeaf9d92b82591e9e241f6f"


class FusedQkvNormRope(Patch):
    name = "fused_qkv_norm_rope"
    summary = "Gemma-4 attention q/k/v head RMSNorm and RoPE in one Triton launch (default off until measured on a GPU)"
    knob = "SGLANG_GEMMA4_FUSED_QKV_NORM_ROPE"
    default = False
    seed = "- (issue #20 decode profile; not in the seed)"
    targets = (TARGET,)

    def upstream(self) -> Optional[str]:
        src = _forward_source()
        if "norm_rope" in src or "qk_norm_rope" in src:
            return "Gemma4Attention.forward already fuses its head norms with RoPE"
        return None

    def unavailable(self) -> Optional[str]:
        return source_pin_reason(_forward_source(), FORWARD_SHA256, "Gemma4Attention.forward",
                                 "the fused forward re-states it")

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(TARGET, attention_forward, HookType.AROUND)


PATCH = FusedQkvNormRope()


def _forward_source() -> str:
    from sglang.srt.models.gemma4_causal import Gemma4Attention

    return source_of(Gemma4Attention.forward)


def eligible(attn, positions, hidden_states) -> bool:
    import torch
    from sglang.srt.layers.layernorm import Gemma4RMSNorm
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
    from sglang.srt.layers.rotary_embedding.rope_variant import Gemma4RotaryEmbedding

    if not rows_ok(hidden_states):
        return False
    if (not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.shape[0] != hidden_states.shape[0]
            or positions.dtype not in (torch.int32, torch.int64) or positions.device != hidden_states.device):
        return False
    qn, kn, vn = attn.q_norm, attn.k_norm, attn.v_norm
    d = attn.head_dim
    if not all(isinstance(n, Gemma4RMSNorm) for n in (qn, kn, vn)):
        return False
    if qn.scale_shift != 0.0 or kn.scale_shift != 0.0 or not qn.with_scale or not kn.with_scale or vn.with_scale:
        return False
    if not (qn.eps == kn.eps == vn.eps) or tuple(qn.weight.shape) != (d,) or tuple(kn.weight.shape) != (d,):
        return False
    rope = attn.rotary_emb
    if type(rope) not in (RotaryEmbedding, Gemma4RotaryEmbedding) or not rope.is_neox_style:
        return False
    if rope.rotary_dim != rope.head_size or rope.head_size != d:
        return False
    cache = getattr(rope, "cos_sin_cache", None)
    return (isinstance(cache, torch.Tensor) and cache.dim() == 2 and cache.shape[1] == d
            and cache.device == hidden_states.device)


def attention_forward(original, attn, positions, hidden_states, forward_batch, **kwargs):
    """AROUND hook: 0.5.17's attention forward with the q/k/v norm and RoPE in one launch."""
    if kwargs or _layer_forward.under_compile() or not eligible(attn, positions, hidden_states):
        return original(attn, positions, hidden_states, forward_batch, **kwargs)
    from sglang_gemma4.kernels.qkv_norm_rope import gemma_qkv_norm_rope_

    qkv, _ = attn.qkv_proj(hidden_states)
    width = attn.q_size + 2 * attn.kv_size
    if not rows_ok(qkv) or qkv.shape[1] != width:
        # the projection has no side effect: hand the whole call back
        return original(attn, positions, hidden_states, forward_batch, **kwargs)
    _layer_forward.announce_once(FIRED, attn, hidden_states)
    shared = attn.is_kv_shared_layer and attn.kv_shared_layer_index is not None
    gemma_qkv_norm_rope_(
        qkv, positions, attn.q_norm.weight, attn.k_norm.weight, attn.rotary_emb.cos_sin_cache,
        attn.num_heads, 0 if shared else attn.num_kv_heads, attn.head_dim, attn.q_norm.eps,
    )
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = q.unflatten(-1, (attn.num_heads, attn.head_dim))
    if shared:
        k = v = None
    else:
        k = k.unflatten(-1, (attn.num_kv_heads, attn.head_dim))
        v = v.unflatten(-1, (attn.num_kv_heads, attn.head_dim))
    out = attn.attn(q, k, v, forward_batch=forward_batch, save_kv_cache=not attn.is_kv_shared_layer)
    if out.dim() == 3:
        out = out.flatten(-2, -1)
    output, _ = attn.o_proj(out)
    return output
