"""Gemma-4 MoE routing: top-K of the router logits, softmax over those K, per-expert scale.

Gemma-4 routes with ``softmax(all logits)`` -> top-K -> renormalise, which equals
``softmax(top-K logits)``; SGLang folds ``per_expert_scale[id]`` into the weight.
This op does all of it in one launch and returns SGLang's TopK contract
``(weights fp32 [T, K], ids int32 [T, K])``.

Ordering and special values (the contract; ``gemma4_routing_ref`` implements it):

* ids are sorted by descending logit; equal logits -> lower expert id first.
  ``-0.0`` and ``+0.0`` are equal.
* NaN logits are treated as ``-inf`` (selected last, weight 0 unless every
  selected logit is ``-inf``/NaN).
* The softmax is evaluated as ``exp(l - m)`` with ``m`` the largest selected
  logit, except that entries equal to ``m`` count ``1`` even when ``m`` is
  infinite. So ``+inf`` logits share the whole weight equally, and a row whose
  selected logits are all ``-inf`` gets uniform ``1/K`` weights (no NaN).
* weights = softmax * float32(per_expert_scale[id]).

Design. SGLang 0.5.17's ``gemma4_fused_routing`` runs one program (one warp) per
token and fully sorts E packed keys. Here a program owns a ``BLOCK_T x BLOCK_E``
tile of tokens, so large T needs far fewer programs and the selection is a
partial sort: each logit and its expert id are packed into one integer whose
signed order is (logit asc, id desc); the top-K of those is taken with K unrolled
rounds of row-max-and-mask (default for K <= 16) or Triton's bitonic ``tl.topk``.
16-bit logits pack into int32 (16 value bits + 16 id bits, exact), fp32 logits into
int64. The logit value is recovered exactly from the packed key, so no gather is
needed. An alignment hint lays a 128-wide row over one whole warp (4 keys per lane),
so each row max is three in-thread maxes plus one warp ``redux``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import check_vector, next_pow2

# Element kinds: which bit layout the logits have.
_KIND_FP32, _KIND_BF16, _KIND_FP16 = 0, 1, 2
_KINDS = {torch.float32: _KIND_FP32, torch.bfloat16: _KIND_BF16, torch.float16: _KIND_FP16}
_BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

MAX_EXPERTS = 1024
METHODS = ("bitonic", "argmax")


@triton.jit(do_not_specialize=["stride_t"])
def _gemma4_routing_kernel(
    bits_ptr,  # [T, E] logits reinterpreted as int16 (bf16/fp16) or int32 (fp32)
    scale_ptr,  # [E] per_expert_scale, any float dtype
    w_ptr,  # [T, K] fp32 out
    id_ptr,  # [T, K] int32 out
    T,
    stride_t,  # row stride of the logits, in elements
    E: tl.constexpr,  # E and K are fixed per model: constexpr drops masks when
    K: tl.constexpr,  # they are powers of two and lets the K loop unroll
    KIND: tl.constexpr,
    BITONIC: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # stride_t and the base are multiples of this (elements)
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per token t of this program's BLOCK_T tokens:

    1. b = raw bits of logits[t, :]; NaN -> -inf bits; -0.0 -> +0.0 bits.
    2. s = b ^ ((b >> 31) & 0x7f..f): signed-int order of s == float order of the logit.
    3. key[e] = (s << W) | (BLOCK_E - 1 - e), W = 16 (int32 key) or 32 (int64 key):
       unique per e, ordered by (logit desc, id asc) when sorted descending.
       Padded lanes get the minimum key so they are never selected (K <= E).
    4. top = K largest keys, descending (bitonic top-k, or K x [row max, mask it out]).
    5. decode: id = BLOCK_E - 1 - low bits; logit = float(un-step-2(top >> W)).
    6. m = max selected logit; p = 1 where l == m else exp(l - m); w = p / sum(p).
    7. w *= float32(scale[id]); store w (fp32) and id (int32).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    tile_ok = row_ok[:, None] & (cols < E)[None, :]
    rows64 = rows.to(tl.int64)
    # Alignment hint sized so a warp spans a 128-wide row with 4 elements per lane:
    # row reductions then stay inside one warp (a single redux.sync for int32 keys).
    row_off = tl.multiple_of(rows64 * stride_t, ROW_ALIGN)

    b = tl.load(bits_ptr + row_off[:, None] + cols[None, :], mask=tile_ok, other=0)
    if KIND == 0:
        # fp32: exponent all ones + non-zero mantissa is NaN -> -inf (0xff800000).
        b = tl.where((b & 0x7FFFFFFF) > 0x7F800000, -8388608, b)
        b = tl.where(b == -2147483648, 0, b)
        s = b ^ ((b >> 31) & 0x7FFFFFFF)
        low = (BLOCK_E - 1 - cols).to(tl.int64)
        key = (s.to(tl.int64) << 32) | low[None, :]
        min_key: tl.constexpr = -9223372036854775807 - 1
        key = tl.where(tile_ok, key, min_key)
    else:
        b = b.to(tl.int32)  # sign-extends the 16 bits
        if KIND == 1:
            b = tl.where((b & 0x7FFF) > 0x7F80, -128, b)  # bf16 -inf = 0xff80
        else:
            b = tl.where((b & 0x7FFF) > 0x7C00, -1024, b)  # fp16 -inf = 0xfc00
        b = tl.where(b == -32768, 0, b)
        s = b ^ ((b >> 31) & 0x7FFF)
        key = (s << 16) | (BLOCK_E - 1 - cols)[None, :]
        min_key: tl.constexpr = -2147483647 - 1
        key = tl.where(tile_ok, key, min_key)

    if BITONIC:
        top = tl.topk(key, BLOCK_K, dim=1)
    else:
        top = tl.full([BLOCK_T, BLOCK_K], min_key, key.dtype)
        if K <= 16:
            for k in tl.static_range(K):
                kmax = tl.max(key, axis=1)
                top = tl.where(kcols[None, :] == k, kmax[:, None], top)
                # Keys are unique per row, so this removes exactly the winner.
                key = tl.where(key == kmax[:, None], min_key, key)
        else:
            for k in range(K):
                kmax = tl.max(key, axis=1)
                top = tl.where(kcols[None, :] == k, kmax[:, None], top)
                key = tl.where(key == kmax[:, None], min_key, key)

    if KIND == 0:
        ids = (BLOCK_E - 1 - (top & 0xFFFFFFFF)).to(tl.int32)
        s = (top >> 32).to(tl.int32)
        b = s ^ ((s >> 31) & 0x7FFFFFFF)
        val = b.to(tl.float32, bitcast=True)
    else:
        ids = BLOCK_E - 1 - (top & 0xFFFF)
        s = top >> 16
        b = s ^ ((s >> 31) & 0x7FFF)
        if KIND == 1:
            val = (b << 16).to(tl.float32, bitcast=True)  # bf16 is the top half of fp32
        else:
            val = b.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    k_ok = kcols < K
    val = tl.where(k_ok[None, :], val, float("-inf"))
    m = tl.max(val, axis=1)
    p = tl.where(val == m[:, None], 1.0, tl.exp(val - m[:, None]))
    p = tl.where(k_ok[None, :], p, 0.0)
    inv = 1.0 / tl.sum(p, axis=1)  # one divide per row, not per element
    w = p * inv[:, None]

    out_ok = row_ok[:, None] & k_ok[None, :]
    scale = tl.load(scale_ptr + ids, mask=out_ok, other=0.0).to(tl.float32)
    out_off = rows64[:, None] * K + kcols[None, :]
    tl.store(w_ptr + out_off, w * scale, mask=out_ok)
    tl.store(id_ptr + out_off, ids, mask=out_ok)


def _launch_config(T: int, block_e: int):
    # Measured on H200 (bench/kernels.py --tune, E=128): T<=2048 is launch-bound, any small
    # tile is within noise of 1.6 us and 4x4 was best. Above that the kernel is bound by
    # the selection arithmetic, not by bytes: every tile from 2x1 to 16x8 lands within 4 %
    # (runs/kernels-tune-nvidia-h200-log.txt); 2 rows on 1 warp was fastest at
    # both T=8192 (4.92 us) and T=32768 (14.30 us). Rows scale with 128/E so other expert
    # counts keep the same elements per program.
    bt, nw = (4, 4) if T <= 2048 else (2, 1)
    return max(1, min(128, bt * 128 // block_e)), nw


def gemma4_routing(
    logits: torch.Tensor,
    per_expert_scale: torch.Tensor,
    top_k: int,
    *,
    block_t: Optional[int] = None,
    num_warps: Optional[int] = None,
    method: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gemma-4 routing in one launch.

    Args:
        logits: [T, E] router logits, fp16/bf16/fp32, E <= 1024.
        per_expert_scale: [E] float tensor on the same device.
        top_k: 1 <= top_k <= E.
        block_t, num_warps, method: tuning overrides (bench/tests); defaults are heuristics.

    Returns:
        (weights fp32 [T, K], ids int32 [T, K]); see the module docstring for
        tie-break and NaN/inf rules. CUDA-graph safe (no host sync).
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [T, E], got shape {tuple(logits.shape)}")
    if logits.dtype not in _KINDS:
        raise ValueError(f"logits has unsupported dtype {logits.dtype}; expected fp16, bf16 or fp32")
    T, E = logits.shape
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"logits must have 1 <= E <= {MAX_EXPERTS} experts, got E={E}")
    check_vector("per_expert_scale", per_expert_scale, E, logits.device)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int with 1 <= top_k <= E={E}, got {top_k!r}")
    if method is None:
        # K rounds of max+mask is ~1.5x fewer instructions than bitonic for
        # K=8/E=128 (PTX count); bitonic wins once K grows.
        method = "argmax" if top_k <= 16 else "bitonic"
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    weights = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids

    if logits.stride(1) != 1:
        logits = logits.contiguous()
    bits = logits.view(_BITS_VIEW[logits.dtype])  # the kernel works on the raw bits
    per_expert_scale = per_expert_scale.contiguous()

    block_e = max(2, next_pow2(E))  # bitonic needs >= 2 lanes
    block_k = next_pow2(top_k)
    bt, nw = _launch_config(T, block_e)
    block_t = bt if block_t is None else int(block_t)
    num_warps = nw if num_warps is None else int(num_warps)
    for name, v in (("block_t", block_t), ("num_warps", num_warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 1, got {v}")

    stride = bits.stride(0)
    row_align = 4 if stride % 4 == 0 else (2 if stride % 2 == 0 else 1)

    grid = (triton.cdiv(T, block_t),)
    _gemma4_routing_kernel[grid](
        bits,
        per_expert_scale,
        weights,
        ids,
        T,
        stride,
        E=E,
        K=top_k,
        KIND=_KINDS[logits.dtype],
        # K=1 is a single row-max; tl.topk would also hit a 0-d edge case there.
        BITONIC=method == "bitonic" and block_k > 1,
        ROW_ALIGN=row_align,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return weights, ids


def gemma4_routing_ref(
    logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch fp32 reference with the same contract as :func:`gemma4_routing`."""
    x = logits.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    # Stable descending sort: equal logits (incl. -0.0 == +0.0) keep id order.
    vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    vals, idx = vals[:, :top_k], idx[:, :top_k]
    m = vals[:, :1]
    p = torch.where(vals == m, torch.ones_like(vals), torch.exp(vals - m))
    w = p / p.sum(dim=-1, keepdim=True)
    w = w * per_expert_scale.float()[idx]
    return w, idx.to(torch.int32)
