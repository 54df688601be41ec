"""Gemma-4 MoE-layer post-FF tail with the next layer's input RMSNorm in the same launch.

What SGLang 0.5.17 runs at a MoE layer boundary (``sglang/srt/models/gemma4_causal.py``)::

    out   = (rmsnorm(rmsnorm(h1) * w1 + rmsnorm(h2) * w2) * w3 + residual) * layer_scalar
            # gemma_dual_rmsnorm_residual_scalar: layer i's output, one launch
    x_in  = rmsnorm(out) * w_in      # layer i+1's input_layernorm: a launch of its own

Every norm is ``x * rsqrt(mean(x^2) + eps) * w`` in fp32 with the weight used as is.
The decode profile (runs/decode-profile-26b-nvidia-h200.md) shows each of these launches
costs ~2.5-3 us at batch 1 inside the CUDA graph while moving a few KiB: latency, not
bandwidth. One program per row does both; the second norm reads the row it just wrote.

Rounding contract (``gemma_moe_tail_next_norm_ref``): ``out`` is rounded once to the
activation dtype, exactly as SGLang's tail stores it; ``x_in`` is the norm of that
*rounded* ``out`` (what layer i+1 reads from memory), rounded once. So ``x_in`` equals
``rmsnorm(out) * w_in`` of the returned ``out`` up to one rounding.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
import triton
import triton.language as tl

from ._common import (
    check_2d,
    check_eps,
    check_same,
    check_scalar,
    check_vector,
    inner_contiguous,
    next_pow2,
    rowwise_num_warps,
)


@triton.jit
def _moe_tail_next_norm_kernel(
    h1_ptr,
    h2_ptr,
    r_ptr,
    w1_ptr,
    w2_ptr,
    w3_ptr,
    w_in_ptr,
    scalar_ptr,
    out_ptr,
    x_in_ptr,
    stride_h1,
    stride_h2,
    stride_r,
    stride_o,  # out and x_in share one contiguous layout
    H,
    scalar_value,
    eps1,
    eps2,
    eps3,
    eps_in,
    HAS_SCALAR_PTR: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    h1 = tl.load(h1_ptr + row * stride_h1 + cols, mask=mask, other=0.0).to(tl.float32)
    h2 = tl.load(h2_ptr + row * stride_h2 + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(w1_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w3 = tl.load(w3_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    c = h1 * tl.rsqrt(tl.sum(h1 * h1, axis=0) / H + eps1) * w1
    c += h2 * tl.rsqrt(tl.sum(h2 * h2, axis=0) / H + eps2) * w2
    n3 = c * tl.rsqrt(tl.sum(c * c, axis=0) / H + eps3) * w3
    if HAS_SCALAR_PTR:
        s = tl.load(scalar_ptr).to(tl.float32)
    else:
        s = scalar_value
    out = ((n3 + r) * s).to(out_ptr.dtype.element_ty)
    o = row * stride_o + cols
    tl.store(out_ptr + o, out, mask=mask)

    p = out.to(tl.float32)  # the next layer normalises the rounded row it reads
    w_in = tl.load(w_in_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x_in = p * tl.rsqrt(tl.sum(p * p, axis=0) / H + eps_in) * w_in
    tl.store(x_in_ptr + o, x_in.to(x_in_ptr.dtype.element_ty), mask=mask)


def gemma_moe_tail_next_norm(
    h1: torch.Tensor,
    w1: torch.Tensor,
    h2: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    residual: torch.Tensor,
    layer_scalar: Union[float, torch.Tensor],
    w_in: torch.Tensor,
    eps1: float = 1e-6,
    eps2: float = 1e-6,
    eps3: float = 1e-6,
    eps_in: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, x_in)``, each [T, H] in h1.dtype: layer i's output and layer i+1's
    normed input. h1 (dense MLP out), h2 (MoE out), residual: [T, H]; w1, w2, w3, w_in: [H];
    layer_scalar: a number or a 1-element tensor. See the module docstring."""
    check_2d("h1", h1)
    T, H = h1.shape
    check_same("h2", h2, "h1", h1)
    check_same("residual", residual, "h1", h1)
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3), ("w_in", w_in)):
        check_vector(name, w, H, h1.device)
    scalar_t = check_scalar("layer_scalar", layer_scalar, h1.device)
    eps1, eps2, eps3, eps_in = (check_eps(e) for e in (eps1, eps2, eps3, eps_in))

    outs = torch.empty((2, T, H), dtype=h1.dtype, device=h1.device)
    out, x_in = outs.unbind(0)
    if T == 0 or H == 0:
        return out, x_in
    h1, h2, residual = inner_contiguous(h1), inner_contiguous(h2), inner_contiguous(residual)
    block_h = next_pow2(H)
    _moe_tail_next_norm_kernel[(T,)](
        h1,
        h2,
        residual,
        w1.contiguous(),
        w2.contiguous(),
        w3.contiguous(),
        w_in.contiguous(),
        scalar_t if scalar_t is not None else w1,  # unread when HAS_SCALAR_PTR is False
        out,
        x_in,
        h1.stride(0),
        h2.stride(0),
        residual.stride(0),
        out.stride(0),
        H,
        float(layer_scalar) if scalar_t is None else 0.0,
        eps1,
        eps2,
        eps3,
        eps_in,
        HAS_SCALAR_PTR=scalar_t is not None,
        BLOCK_H=block_h,
        num_warps=rowwise_num_warps(block_h),
    )
    return out, x_in


def gemma_moe_tail_next_norm_ref(
    h1, w1, h2, w2, w3, residual, layer_scalar, w_in, eps1=1e-6, eps2=1e-6, eps3=1e-6, eps_in=1e-6
):
    """Plain-torch fp32 reference with the rounding contract of the fused op."""

    def norm(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()

    dt = h1.dtype
    s = layer_scalar.float().reshape(()) if isinstance(layer_scalar, torch.Tensor) else float(layer_scalar)
    c = norm(h1.float(), w1, eps1) + norm(h2.float(), w2, eps2)
    out = ((norm(c, w3, eps3) + residual.float()) * s).to(dt)
    return out, norm(out.float(), w_in, eps_in).to(dt)
