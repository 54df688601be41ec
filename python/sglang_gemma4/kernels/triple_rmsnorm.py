"""Gemma-4 MoE-layer post-attention block: one norm+add, then three norms of the sum.

What SGLang 0.5.17's ``Gemma4DecoderLayer.forward`` computes (MoE layers,
``sglang/srt/models/gemma4_causal.py``)::

    h        = post_attention_layernorm(attn_out)                 # RMSNorm, weight w_post
    ff_in, post = pre_feedforward_layernorm(h, residual)          # post = h + residual
    router_in = router.norm(post)    # Gemma4RMSNorm(with_scale=False) whose weight is
                                     # overwritten by Gemma4Router.fuse_scale() with
                                     # scale * hidden_size**-0.5, applied as rmsnorm(x, weight)
    ff2_in   = pre_feedforward_layernorm_2(post)                  # RMSNorm, weight w_pre_ff_2

All four norms are ``x * rsqrt(mean(x^2) + eps) * w`` with the weight used as is
(``w``, not ``1 + w``), fp32 math, eps = ``config.rms_norm_eps``. So pass
``router_scale = router.norm.weight`` after ``fuse_scale()`` (equivalently
``router.scale * hidden_size**-0.5``).

Rounding (documented contract, implemented by ``gemma_post_attn_triple_rmsnorm_ref``):
``post`` is computed in fp32 and rounded once to the activation dtype (as SGLang's fused
norm+residual kernels do); the three norms are then taken of that *rounded* ``post`` --
the value the router and ``pre_feedforward_layernorm_2`` read from memory in the model,
and what makes ``ff_in == rmsnorm(post, w_pre_ff)`` hold exactly for the returned
``post``. The unfused model also rounds ``h`` and normalises ``ff_in`` from the unrounded
sum; both differ from this by at most one rounding of the activation dtype.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import check_2d, check_eps, check_same, check_vector, inner_contiguous, next_pow2, rowwise_num_warps


@triton.jit
def _triple_rmsnorm_kernel(
    a_ptr,
    r_ptr,
    w_post_ptr,
    w_ff_ptr,
    w_router_ptr,
    w_ff2_ptr,
    post_ptr,
    ff_ptr,
    router_ptr,
    ff2_ptr,
    stride_a,
    stride_r,
    stride_o,  # the four outputs share one contiguous layout
    H,
    eps,
    BLOCK_H: tl.constexpr,
):
    """One row per program, fp32 math:

    1. post = round(a * rsqrt(mean(a^2) + eps) * w_post + r)       (stored)
    2. q = post * rsqrt(mean(post^2) + eps)                         (post as rounded;
       one reduction shared by the three norms)
    3. ff_in = round(q * w_pre_ff); router_in = round(q * router_scale);
       ff2_in = round(q * w_pre_ff_2)
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    a = tl.load(a_ptr + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    w_post = tl.load(w_post_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    post = a * tl.rsqrt(tl.sum(a * a, axis=0) / H + eps) * w_post + r
    post = post.to(post_ptr.dtype.element_ty)
    o = row * stride_o + cols
    tl.store(post_ptr + o, post, mask=mask)

    p = post.to(tl.float32)
    q = p * tl.rsqrt(tl.sum(p * p, axis=0) / H + eps)
    w = tl.load(w_ff_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(ff_ptr + o, (q * w).to(ff_ptr.dtype.element_ty), mask=mask)
    w = tl.load(w_router_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(router_ptr + o, (q * w).to(router_ptr.dtype.element_ty), mask=mask)
    w = tl.load(w_ff2_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(ff2_ptr + o, (q * w).to(ff2_ptr.dtype.element_ty), mask=mask)


def gemma_post_attn_triple_rmsnorm(
    attn_out: torch.Tensor,
    residual: torch.Tensor,
    w_post: torch.Tensor,
    w_pre_ff: torch.Tensor,
    w_pre_ff_2: torch.Tensor,
    router_scale: torch.Tensor,
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(post, ff_in, router_in, ff2_in)``, each [T, H] in attn_out.dtype.

    attn_out, residual: [T, H] (residual may have another float dtype);
    w_post, w_pre_ff, w_pre_ff_2, router_scale: [H]. See the module docstring.
    """
    check_2d("attn_out", attn_out)
    T, H = attn_out.shape
    check_same("residual", residual, "attn_out", attn_out)
    for name, w in (
        ("w_post", w_post),
        ("w_pre_ff", w_pre_ff),
        ("w_pre_ff_2", w_pre_ff_2),
        ("router_scale", router_scale),
    ):
        check_vector(name, w, H, attn_out.device)
    eps = check_eps(eps)

    outs = torch.empty((4, T, H), dtype=attn_out.dtype, device=attn_out.device)
    post, ff_in, router_in, ff2_in = outs.unbind(0)
    if T == 0 or H == 0:
        return post, ff_in, router_in, ff2_in
    attn_out, residual = inner_contiguous(attn_out), inner_contiguous(residual)
    block_h = next_pow2(H)
    _triple_rmsnorm_kernel[(T,)](
        attn_out,
        residual,
        w_post.contiguous(),
        w_pre_ff.contiguous(),
        router_scale.contiguous(),
        w_pre_ff_2.contiguous(),
        post,
        ff_in,
        router_in,
        ff2_in,
        attn_out.stride(0),
        residual.stride(0),
        post.stride(0),
        H,
        eps,
        BLOCK_H=block_h,
        num_warps=rowwise_num_warps(block_h),
    )
    return post, ff_in, router_in, ff2_in


def gemma_post_attn_triple_rmsnorm_ref(
    attn_out, residual, w_post, w_pre_ff, w_pre_ff_2, router_scale, eps: float = 1e-6
):
    """Plain-torch fp32 reference with the rounding contract of the fused op."""

    def norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    dt = attn_out.dtype
    post = (norm(attn_out.float()) * w_post.float() + residual.float()).to(dt)
    q = norm(post.float())
    return (
        post,
        (q * w_pre_ff.float()).to(dt),
        (q * router_scale.float()).to(dt),
        (q * w_pre_ff_2.float()).to(dt),
    )
