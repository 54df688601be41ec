"""Triton kernels for Gemma-4 (pure torch + Triton; importable without SGLang).

Ops (each in its own module, with a plain-torch fp32 ``*_ref`` beside it):

* :func:`gemma4_routing` -- top-K + softmax + per-expert scale, one launch.
* :func:`gemma_rmsnorm_add`, :func:`gemma_rmsnorm_residual_scalar`,
  :func:`gemma_gelu_tanh_mul` -- the per-layer-embedding tail of the decoder layer.
* :func:`gemma_post_attn_triple_rmsnorm` -- post-attention norm + residual and the
  three norms of the MoE layers, one launch.
* :func:`gemma_qkv_norm_rope_` -- per-head q/k/v RMSNorm and NeoX RoPE of q/k,
  in place, one launch.
* :func:`gemma_moe_tail_next_norm` -- the MoE layer's post-FF tail and the next
  layer's input RMSNorm, one launch.
* :func:`translate_window_prefix_` -- full -> SWA slot translation of a sliding-window
  index buffer, its length read on the GPU (no host sync).

On a machine without a GPU the kernels run under the Triton interpreter: set
``TRITON_INTERPRET=1`` in the environment *before* ``triton`` is first imported
(see :mod:`sglang_gemma4.kernels.selftest`).
"""

from importlib import import_module

# Lazy exports (PEP 562): importing this package must not import Triton, so that
# callers (the selftest, the CLI) can still set TRITON_INTERPRET=1 first.
_EXPORTS = {
    "gemma4_routing": "routing",
    "gemma4_routing_ref": "routing",
    "gemma_rmsnorm_add": "ple_tail",
    "gemma_rmsnorm_add_ref": "ple_tail",
    "gemma_rmsnorm_residual_scalar": "ple_tail",
    "gemma_rmsnorm_residual_scalar_ref": "ple_tail",
    "gemma_gelu_tanh_mul": "ple_tail",
    "gemma_gelu_tanh_mul_ref": "ple_tail",
    "gemma_post_attn_triple_rmsnorm": "triple_rmsnorm",
    "gemma_post_attn_triple_rmsnorm_ref": "triple_rmsnorm",
    "gemma_qkv_norm_rope_": "qkv_norm_rope",
    "gemma_qkv_norm_rope_ref": "qkv_norm_rope",
    "gemma_moe_tail_next_norm": "tail_next_norm",
    "gemma_moe_tail_next_norm_ref": "tail_next_norm",
    "translate_window_prefix_": "swa_translate",
    "translate_window_prefix_ref": "swa_translate",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
