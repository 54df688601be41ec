"""Fused tail of the Gemma-4 decoder layer (the per-layer-embedding / PLE path).

RMSNorm semantics (SGLang 0.5.17, ``sglang/srt/layers/layernorm.py``): every norm on
this path (``post_feedforward_layernorm`` is ``RMSNorm``; ``post_per_layer_input_norm``
is ``Gemma4RMSNorm`` with ``scale_shift=0``) multiplies by the weight **as is** (``w``,
not ``1 + w``)::

    rmsnorm(x, w) = float32(x) * rsqrt(mean(float32(x)^2) + eps) * float32(w)

with ``eps = config.rms_norm_eps`` (1e-6 for Gemma-4). Everything here is computed in
fp32 and rounded once, to ``x.dtype``, on store -- exactly like SGLang's own fused
``gemma_rmsnorm_residual_scalar`` (``sglang/kernels/ops/layernorm/gemma4_fused_ops.py``)
which this module's op of the same name replaces. The unfused model path rounds the
norm output to the activation dtype before the residual add; that differs from the
fused result by at most one rounding of the activation dtype.

``layer_scalar`` is a 1-element buffer (``register_buffer("layer_scalar", torch.ones(1))``);
pass that tensor (read on device, CUDA-graph safe) or a Python float.
"""

from __future__ import annotations

from typing import Optional, Union

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
def _rmsnorm_residual_kernel(
    x_ptr,
    w_ptr,
    r_ptr,
    s_ptr,  # 1-element scalar tensor (used when SCALAR_PTR)
    out_ptr,
    s_val,  # Python-float scalar (used when HAS_SCALAR and not SCALAR_PTR)
    stride_x,
    stride_r,
    stride_o,
    H,
    eps,
    HAS_SCALAR: tl.constexpr,
    SCALAR_PTR: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One row per program, all in fp32:

    1. rrms = rsqrt(sum(x^2) / H + eps)
    2. y = x * rrms * w + r
    3. if HAS_SCALAR: y = y * scalar
    4. out = y rounded to out dtype (the only rounding)
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rrms = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    y = x * rrms * w + r
    if HAS_SCALAR:
        if SCALAR_PTR:
            y = y * tl.load(s_ptr).to(tl.float32)
        else:
            y = y * s_val
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rmsnorm_residual(x, w, r, scalar, eps, has_scalar):
    check_2d("x", x)
    T, H = x.shape
    check_vector("w", w, H, x.device)
    check_same("r", r, "x", x)
    eps = check_eps(eps)
    s_tensor = check_scalar("scalar", scalar, x.device) if has_scalar else None

    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T == 0 or H == 0:
        return out
    x, r = inner_contiguous(x), inner_contiguous(r)
    block_h = next_pow2(H)
    _rmsnorm_residual_kernel[(T,)](
        x,
        w.contiguous(),
        r,
        s_tensor if s_tensor is not None else out,  # dummy pointer when unused
        out,
        float(scalar) if has_scalar and s_tensor is None else 1.0,
        x.stride(0),
        r.stride(0),
        out.stride(0),
        H,
        eps,
        HAS_SCALAR=has_scalar,
        SCALAR_PTR=s_tensor is not None,
        BLOCK_H=block_h,
        num_warps=rowwise_num_warps(block_h),
    )
    return out


def gemma_rmsnorm_add(
    x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``rmsnorm(x, w) + r`` for x, r [T, H]; fp32 math, one rounding to x.dtype."""
    return _rmsnorm_residual(x, w, r, None, eps, has_scalar=False)


def gemma_rmsnorm_residual_scalar(
    x: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    scalar: Union[torch.Tensor, float],
    eps: float = 1e-6,
) -> torch.Tensor:
    """``(rmsnorm(x, w) + r) * scalar``; same argument order and semantics as SGLang
    0.5.17's ``gemma_rmsnorm_residual_scalar(x, weight, residual, scalar, eps)``."""
    return _rmsnorm_residual(x, w, r, scalar, eps, has_scalar=True)


def gemma_rmsnorm_add_ref(x, w, r, eps: float = 1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float() + r.float()
    return y.to(x.dtype)


def gemma_rmsnorm_residual_scalar_ref(x, w, r, scalar, eps: float = 1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float() + r.float()
    s = scalar.float().reshape(()) if isinstance(scalar, torch.Tensor) else float(scalar)
    return (y * s).to(x.dtype)


# --------------------------------------------------------------------------- gelu(gate) * ple


@triton.jit
def _gelu_tanh_mul_kernel(
    g_ptr,
    p_ptr,
    out_ptr,
    T,
    H,
    stride_g,
    stride_p,
    stride_o,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Elementwise over a BLOCK_T x BLOCK_H tile, in fp32:

    1. u = sqrt(2/pi) * (g + 0.044715 * g^3)
    2. gelu_tanh(g) = 0.5 * g * (1 + tanh(u)) = g * sigmoid(2u) = g / (1 + exp(-2u))
       (the sigmoid form needs no tanh and saturates cleanly: exp -> inf gives 0)
    3. out = gelu_tanh(g) * ple, rounded once to out dtype
    """
    pid = tl.program_id(0)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < T)[:, None] & (cols < H)[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + rows[:, None] * stride_p + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    y = g / (1.0 + tl.exp(-2.0 * u)) * p
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_mul_flat_kernel(g_ptr, p_ptr, out_ptr, N, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Same math as _gelu_tanh_mul_kernel over a contiguous [T*H] view: one mask, no row
    arithmetic (Inductor's layout for this op; a tuning candidate for small T)."""
    pid = tl.program_id(0)
    if WIDE:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    y = g / (1.0 + tl.exp(-2.0 * u)) * p
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _gelu_launch_config(T: int, block_h: int):
    # H200 --tune (runs/kernels-tune-nvidia-h200-log.txt, H=256): 512-element
    # tiles on 4 warps were within 2 % of the best config at every T in 8..8192 (1.11 us at
    # T=8 vs 1.23 for the old 1-row/1-warp tiles; 4.39 vs 4.57 us at T=8192). Larger T keeps
    # the earlier rule (<= 2048-element tiles on 4 warps: 12.8 us, 94 % of copy at T=32768),
    # which was not re-swept.
    if T <= 8192:
        block_t = max(1, 512 // block_h)
    else:
        block_t = max(1, min(2048 // block_h, next_pow2(triton.cdiv(T, 256))))
    return block_t, max(1, min(4, block_t * block_h // 128))


def gemma_gelu_tanh_mul(
    gate: torch.Tensor,
    ple: torch.Tensor,
    *,
    block_t: Optional[int] = None,
    num_warps: Optional[int] = None,
    layout: str = "rows",
) -> torch.Tensor:
    """``gelu(gate, approximate="tanh") * ple`` for [T, H] inputs; fp32 math, one
    rounding to gate.dtype (the model rounds after gelu and after the multiply).

    ``block_t`` (rows per program), ``num_warps`` and ``layout`` ("rows", or "flat":
    block_t * next_pow2(H) contiguous elements per program, contiguous inputs only):
    tuning overrides for bench/kernels.py --tune; the defaults are a heuristic."""
    check_2d("gate", gate)
    check_same("ple", ple, "gate", gate)
    for name, v in (("block_t", block_t), ("num_warps", num_warps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1) or v > 1024):
            raise ValueError(f"{name} must be None or a power-of-two int in [1, 1024], got {v!r}")
    if num_warps is not None and num_warps > 32:
        raise ValueError(f"num_warps must be <= 32, got {num_warps}")
    if layout not in ("rows", "flat"):
        raise ValueError(f"layout must be 'rows' or 'flat', got {layout!r}")
    T, H = gate.shape
    if layout == "flat" and not (gate.is_contiguous() and ple.is_contiguous()):
        raise ValueError("layout='flat' needs contiguous gate and ple (got strides "
                         f"{tuple(gate.stride())} and {tuple(ple.stride())})")
    out = torch.empty((T, H), dtype=gate.dtype, device=gate.device)
    if T == 0 or H == 0:
        return out
    gate, ple = inner_contiguous(gate), inner_contiguous(ple)
    block_h = next_pow2(H)
    bt, nw = _gelu_launch_config(T, block_h)
    block_t = bt if block_t is None else block_t
    num_warps = nw if num_warps is None else num_warps
    if layout == "flat":
        n, block = T * H, block_t * block_h
        _gelu_tanh_mul_flat_kernel[(triton.cdiv(n, block),)](
            gate, ple, out, n, BLOCK=block, WIDE=n + block >= 2**31, num_warps=num_warps)
        return out
    _gelu_tanh_mul_kernel[(triton.cdiv(T, block_t),)](
        gate,
        ple,
        out,
        T,
        H,
        gate.stride(0),
        ple.stride(0),
        out.stride(0),
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return out


def gemma_gelu_tanh_mul_ref(gate, ple):
    g = torch.nn.functional.gelu(gate.float(), approximate="tanh")
    return (g * ple.float()).to(gate.dtype)
