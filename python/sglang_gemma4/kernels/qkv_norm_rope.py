"""Gemma-4 attention input: per-head q/k/v RMSNorm and NeoX RoPE of q and k, one launch, in place.

What SGLang 0.5.17's ``Gemma4Attention.forward`` runs on CUDA after ``qkv_proj``
(``sglang/srt/models/gemma4_causal.py``)::

    gemma_qkv_rmsnorm(q, k, v, w_q, w_k)   # in place: q, k heads * w; v heads without weight
    rotary_emb(positions, q, k)            # in place NeoX rotation over the whole head
                                           # (Gemma4RotaryEmbedding: zero frequencies pad the
                                           # non-rotated part, so rotary_dim == head_dim)

On KV-shared layers only q is normed, and RoPE still runs on a zeros "key" it then drops.
The 26B decode profile (runs/decode-profile-26b-nvidia-h200.md) has these as ~1.9 us
launches per layer at batch 1. One program per (token, head) does norm and rotation.

Rounding contract (``gemma_qkv_norm_rope_ref``): the normed head is rounded once to the
activation dtype, as SGLang's norm kernel stores it before RoPE reads it back; RoPE is fp32
math on that rounded head with the fp32 cos/sin cache SGLang keeps on CUDA, rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_2d, check_eps, next_pow2


@triton.jit
def _qkv_norm_rope_kernel(
    qkv_ptr,
    pos_ptr,
    wq_ptr,
    wk_ptr,
    cache_ptr,
    stride_t,
    stride_cache,
    NQ,
    NKV,
    eps,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < HALF
    base = qkv_ptr + t * stride_t + h.to(tl.int64) * (2 * HALF)
    x1 = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
    is_q = h < NQ
    is_k = (h >= NQ) & (h < NQ + NKV)
    if is_q | is_k:
        w1 = tl.where(is_q, tl.load(wq_ptr + cols, mask=mask, other=0.0),
                      tl.load(wk_ptr + cols, mask=mask, other=0.0)).to(tl.float32)
        w2 = tl.where(is_q, tl.load(wq_ptr + HALF + cols, mask=mask, other=0.0),
                      tl.load(wk_ptr + HALF + cols, mask=mask, other=0.0)).to(tl.float32)
        # stored and re-read by SGLang's rope: round once here too
        y1 = (x1 * r * w1).to(qkv_ptr.dtype.element_ty).to(tl.float32)
        y2 = (x2 * r * w2).to(qkv_ptr.dtype.element_ty).to(tl.float32)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        c = tl.load(cache_ptr + pos * stride_cache + cols, mask=mask, other=1.0).to(tl.float32)
        s = tl.load(cache_ptr + pos * stride_cache + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(base + cols, (y1 * c - y2 * s).to(qkv_ptr.dtype.element_ty), mask=mask)
        tl.store(base + HALF + cols, (y2 * c + y1 * s).to(qkv_ptr.dtype.element_ty), mask=mask)
    else:  # v: norm without weight, no rotation
        tl.store(base + cols, (x1 * r).to(qkv_ptr.dtype.element_ty), mask=mask)
        tl.store(base + HALF + cols, (x2 * r).to(qkv_ptr.dtype.element_ty), mask=mask)


def _check(qkv, positions, w_q, w_k, cos_sin_cache, num_q_heads, num_kv_heads, head_dim):
    check_2d("qkv", qkv)
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if num_q_heads <= 0 or num_kv_heads < 0:
        raise ValueError(f"num_q_heads must be > 0 and num_kv_heads >= 0, got {num_q_heads}, {num_kv_heads}")
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    if qkv.shape[1] < width:
        raise ValueError(f"qkv has {qkv.shape[1]} columns, fewer than (q + 2 kv heads) * head_dim = {width}")
    if qkv.stride(1) != 1:
        raise ValueError("qkv must have unit stride along its last dim (the kernel writes in place)")
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.shape[0] != qkv.shape[0]:
        raise ValueError(f"positions must be 1-D with {qkv.shape[0]} entries, got "
                         f"{tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__}")
    if positions.dtype not in (torch.int32, torch.int64) or positions.device != qkv.device:
        raise ValueError(f"positions must be int32/int64 on {qkv.device}, got {positions.dtype} on {positions.device}")
    for name, w in (("w_q", w_q),) + ((("w_k", w_k),) if num_kv_heads else ()):
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (head_dim,) or w.device != qkv.device:
            raise ValueError(f"{name} must have shape ({head_dim},) on {qkv.device}")
    if (not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dim() != 2
            or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.device != qkv.device):
        raise ValueError(f"cos_sin_cache must be [max_position, {head_dim}] (cos | sin halves) on {qkv.device}")


def gemma_qkv_norm_rope_(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """In place on ``qkv`` [T, (num_q_heads + 2 * num_kv_heads) * head_dim] (q | k | v heads):
    q and k heads normed (weights w_q, w_k) and rotated by ``cos_sin_cache[positions]``; v heads
    normed without weight. ``num_kv_heads=0``: only the q heads (KV-shared layers; w_k unused).
    Positions must lie in ``[0, cos_sin_cache.shape[0])`` (not checked: that would sync). Returns qkv."""
    _check(qkv, positions, w_q, w_k, cos_sin_cache, num_q_heads, num_kv_heads, head_dim)
    eps = check_eps(eps)
    T = qkv.shape[0]
    if T == 0:
        return qkv
    half = head_dim // 2
    block = next_pow2(half)
    n_heads = num_q_heads + 2 * num_kv_heads
    cache = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    _qkv_norm_rope_kernel[(T, n_heads)](
        qkv, positions, w_q.contiguous(), (w_k if num_kv_heads else w_q).contiguous(), cache,
        qkv.stride(0), cache.stride(0), num_q_heads, num_kv_heads, eps,
        HALF=half, BLOCK=block, num_warps=1 if block <= 128 else 2,
    )
    return qkv


def gemma_qkv_norm_rope_ref(qkv, positions, w_q, w_k, cos_sin_cache, num_q_heads, num_kv_heads, head_dim, eps=1e-6):
    """Plain-torch fp32 reference with the rounding contract of the fused op (returns a new tensor)."""
    dt = qkv.dtype
    out = qkv.clone()
    T = qkv.shape[0]
    n = num_q_heads + 2 * num_kv_heads
    heads = qkv[:, : n * head_dim].float().view(T, n, head_dim)
    normed = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + eps)
    cs = cos_sin_cache.float()[positions.long()]  # [T, head_dim]
    cos, sin = cs[:, None, : head_dim // 2], cs[:, None, head_dim // 2:]

    def rope(x, w):
        y = (x * w.float()).to(dt).float()
        y1, y2 = y[..., : head_dim // 2], y[..., head_dim // 2:]
        return torch.cat((y1 * cos - y2 * sin, y2 * cos + y1 * sin), -1).to(dt)

    res = [rope(normed[:, :num_q_heads], w_q)]
    if num_kv_heads:
        res.append(rope(normed[:, num_q_heads: num_q_heads + num_kv_heads], w_k))
        res.append(normed[:, num_q_heads + num_kv_heads:].to(dt))
    out[:, : n * head_dim] = torch.cat(res, 1).reshape(T, n * head_dim)
    return out
