"""Split-KV attention for the speculative target-verify step of a draft chain (topk = 1).

Why: SGLang's triton backend runs target-verify through its prefill kernel (``_fwd_kernel``), whose grid is
(sequences, q heads, query blocks). A verify step has ``L`` = num_draft_tokens (2-8) queries per sequence, so
at batch 1 a 16-head layer gets 16 programs, each walking the whole prefix serially: 164 us per layer at 1k
context on Gemma-4 26B-A4B (H200), 48 % of the speculative step (runs/mtp-26b-v2-nvidia-h200.md), while plain
decode attention over the same keys takes a fraction of that. Here the prefix is split across programs
(flash-decode) and the partials are merged with the causal draft-draft block in a second launch.

Math, per sequence b, q head h (kv head h // (Hq / Hkv)), draft query m in [0, L) at relative position Lp + m,
where the layer's prefix keys j in [0, Lp) are ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` (SGLang trims them to
the window for sliding layers) and the L draft keys are ``k_draft``/``v_draft`` rows b*L .. b*L+L-1:
  1. s_mj = (q_m . k_j) * sm_scale for prefix keys with (W < 0 or Lp + m - j <= W), and for draft keys n <= m
     with (W < 0 or m - n <= W); every other score is -inf. W is SGLang's exclusive radius (the layer's
     ``sliding_window_size``), the mask ``extend_attention_fwd`` applies.
  2. o_m = softmax_j(s_mj) @ v, accumulated in fp32; probabilities are rounded to q's dtype before the
     p @ v product, as SGLang's kernel does for a bf16 pool.
  An fp8 pool (keys k_buffer * k_scale, values v_buffer * v_scale) is widened to q's dtype on load and the
  scales are applied in fp32. SGLang's kernel instead rounds q and the probabilities to fp8 (~5 % relative
  error on the tests' data); this one stays at the dequantised cache's precision.
  Stage 1, grid (bs, Hq / GH, S): split s of the prefix -> its normalised partial output and log-sum-exp, for GH
  q heads of one kv head per program (GH = the GQA group when its accumulator is small enough, so every K/V
  tile is read once for the group; else 1).
  Stage 2, grid (bs, Hq, Dv / 64): log-sum-exp merge of the S partials and the draft block -> o, one 64-wide
  output slice per program while bs x Hq programs leave most SMs idle; grid (bs, Hq, 1), the whole width per
  program, once they do (``merge_slices_wanted``).
The split count S depends on the batch and head count only (CUDA-graph safe: no value is read on the host) and is
a runtime argument, so the captured batch sizes share one compiled kernel per layer type; each split's key range
is cut from its own sequence's length inside the kernel, so unused splits end at once.

Scope: causal chains only. A tree (topk > 1) is not causal between drafts; the caller must not use this then.
Pure torch + Triton; :func:`verify_attention_ref` is the fp32 reference.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

MAX_DRAFT = 16  # rows of one program's query tile
POOL_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    # Triton 3.6's interpreter returns garbage for a bf16 tl.dot (CPU tests); there the already-rounded
    # operands are multiplied in fp32, which is what the GPU's bf16 MMA computes too
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _softmax_tile(qk, keep, v, v_scale, acc, e_sum, e_max, DOT_F32: tl.constexpr):
    """One key tile of online softmax: scores ``qk`` (kept where ``keep``), values ``v`` -> the running
    (unnormalised output, sum, max); a row with no key yet stays at 0 / 0 / -inf, without NaN."""
    qk = tl.where(keep, qk, float("-inf"))
    n_max = tl.maximum(e_max, tl.max(qk, 1))
    safe = tl.where(n_max == float("-inf"), 0.0, n_max)
    p = tl.exp(qk - safe[:, None])
    alpha = tl.exp(e_max - safe)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32) * v_scale
    return acc, e_sum * alpha + tl.sum(p, 1), n_max


@triton.jit
def _verify_prefix_kernel(
    Q, K_Buf, V_Buf, Kv_Indptr, Kv_Indices, Mid_O, Mid_Lse,
    qk_scale, v_scale,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_ob, stride_oh, stride_os, stride_om,
    kv_group: tl.constexpr, L: tl.constexpr, W: tl.constexpr, NSPLIT, HQ: tl.constexpr,
    GH: tl.constexpr, LSE_M: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr,
):
    # one program: GH q heads of one kv head (GH = 1, or the whole GQA group so each K/V tile is read
    # once for all of them), all L drafts, one prefix split; row r = draft r // GH of head h0 + r % GH
    b = tl.program_id(0)
    h0 = tl.program_id(1) * GH
    s = tl.program_id(2)
    kvh = h0 // kv_group
    kv_start = tl.load(Kv_Indptr + b)
    lp = tl.load(Kv_Indptr + b + 1) - kv_start
    chunk = tl.cdiv(tl.cdiv(lp, NSPLIT), BLOCK_N) * BLOCK_N
    lo = s * chunk
    hi = tl.minimum(lo + chunk, lp)

    offs_r = tl.arange(0, BLOCK_M)
    draft = offs_r // GH
    head = h0 + offs_r % GH
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = draft < L
    q = tl.load(Q + (b * L + draft[:, None]) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)

    e_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    e_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        mask_n = n < hi
        loc = tl.load(Kv_Indices + kv_start + n, mask=mask_n, other=0).to(tl.int64)
        # an fp8 pool is widened to q's dtype on load (q stays unrounded; scales applied in fp32)
        k = tl.load(K_Buf + loc[None, :] * stride_kb + kvh * stride_kh + offs_d[:, None],
                    mask=mask_n[None, :] & (offs_d[:, None] < D), other=0.0).to(q.dtype)
        qk = _dot(q, k, DOT_F32) * qk_scale
        keep = mask_m[:, None] & mask_n[None, :]
        if W >= 0:
            keep &= (lp + draft[:, None] - n[None, :]) <= W
        v = tl.load(V_Buf + loc[:, None] * stride_vb + kvh * stride_vh + offs_dv[None, :],
                    mask=mask_n[:, None] & (offs_dv[None, :] < DV), other=0.0).to(q.dtype)
        acc, e_sum, e_max = _softmax_tile(qk, keep, v, v_scale, acc, e_sum, e_max, DOT_F32)

    has = e_sum > 0
    out = acc / tl.where(has, e_sum, 1.0)[:, None]
    lse = tl.where(has, e_max + tl.log(tl.where(has, e_sum, 1.0)), float("-inf"))
    row = b * stride_ob + head * stride_oh + s * stride_os + draft * stride_om
    tl.store(Mid_O + row[:, None] + offs_dv[None, :], out, mask=mask_m[:, None] & (offs_dv[None, :] < DV))
    tl.store(Mid_Lse + ((b * HQ + head) * NSPLIT + s) * LSE_M + draft, lse, mask=mask_m)


@triton.jit
def _verify_merge_kernel(
    Q, K_Draft, V_Draft, O, Mid_O, Mid_Lse,
    sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_ob, stride_mh, stride_ms, stride_mm,
    kv_group: tl.constexpr, L: tl.constexpr, W: tl.constexpr, NSPLIT,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr, SPLIT_UNROLL: tl.constexpr,
):
    # one program: one q head's L drafts, one BLOCK_DV slice of the output (program_id 2). The partials are
    # merged in two passes, max then weighted sum, so the unrolled loads of SPLIT_UNROLL splits do not wait on
    # each other (a serial online merge was 15 us per call at 26B batch 1, more than the prefix pass).
    b = tl.program_id(0)
    h = tl.program_id(1)
    dv0 = tl.program_id(2) * BLOCK_DV
    kvh = h // kv_group
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = dv0 + tl.arange(0, BLOCK_DV)
    mask_m = offs_m < L
    mask_dv = offs_dv < DV
    lse_base = Mid_Lse + (b * tl.num_programs(1) + h) * NSPLIT * BLOCK_M

    offs_s = tl.arange(0, SPLIT_UNROLL)
    e_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s0 in range(0, NSPLIT, SPLIT_UNROLL):
        lse = tl.load(lse_base + (s0 + offs_s[:, None]) * BLOCK_M + offs_m[None, :],
                      mask=((s0 + offs_s[:, None]) < NSPLIT) & mask_m[None, :], other=float("-inf"))
        e_max = tl.maximum(e_max, tl.max(lse, 0))
    safe = tl.where(e_max == float("-inf"), 0.0, e_max)
    e_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for s0 in range(0, NSPLIT, SPLIT_UNROLL):  # prefix partials: each is softmax-normalised, weight exp(lse)
        for i in tl.static_range(SPLIT_UNROLL):
            live = (s0 + i) < NSPLIT
            lse = tl.load(lse_base + (s0 + i) * BLOCK_M + offs_m, mask=mask_m & live, other=float("-inf"))
            part = tl.load(Mid_O + b * stride_ob + h * stride_mh + (s0 + i) * stride_ms
                           + offs_m[:, None] * stride_mm + offs_dv[None, :],
                           mask=(mask_m & live)[:, None] & mask_dv[None, :], other=0.0)
            w = tl.exp(lse - safe)
            acc += part * w[:, None]
            e_sum += w

    # the causal draft-draft block: draft n is key row b*L + n; its scores need all of D, in BLOCK_D chunks
    qk = tl.zeros([BLOCK_M, BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(Q + (b * L + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)
        k = tl.load(K_Draft + (b * L + offs_m[None, :]) * stride_kt + kvh * stride_kh + offs_d[:, None],
                    mask=mask_m[None, :] & (offs_d[:, None] < D), other=0.0)
        qk += _dot(q, k, DOT_F32)
    keep = mask_m[:, None] & mask_m[None, :] & (offs_m[None, :] <= offs_m[:, None])
    if W >= 0:
        keep &= (offs_m[:, None] - offs_m[None, :]) <= W
    v = tl.load(V_Draft + (b * L + offs_m[:, None]) * stride_vt + kvh * stride_vh + offs_dv[None, :],
                mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
    acc, e_sum, e_max = _softmax_tile(qk * sm_scale, keep, v, 1.0, acc, e_sum, e_max, DOT_F32)
    out = acc / tl.where(e_sum > 0, e_sum, 1.0)[:, None]
    tl.store(O + (b * L + offs_m[:, None]) * stride_ot + h * stride_oh + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def num_splits(bs: int, num_programs: int, device: torch.device, whole_waves: bool = False) -> int:
    """About two programs per SM over the prefix, 1..16 splits (a function of the shapes only). More splits
    shorten each program's walk but lengthen the merge's serial loop over them. ``whole_waves``: round down, so
    the grid never spills into a partial wave; the 512-wide tiles need it (H200, E4B full layer, batch 16, 8k:
    9 splits 428 us, 8 splits 278 us, runs/verify-attention-nvidia-h200.md). Tune with
    ``bench/verify_attention.py --splits``."""
    per_split = max(1, bs * num_programs)
    slots = 2 * _sm_count(device)
    return max(1, min(16, slots // per_split if whole_waves else triton.cdiv(slots, per_split)))


def merge_slices_wanted(bs: int, Hq: int, device: torch.device) -> bool:
    """64-wide merge slices only while one program per (sequence, q head) leaves most SMs idle. H200: slices win at
    batch 1 (26B full 1k 24.3 vs 27.2 us, 16 programs) and lose at batch 16 (98.7 vs 90.8; E4B full with 128
    programs 56.5 vs 51.3), runs/verify-attention-nvidia-h200.md; between the two it is not measured."""
    return 2 * bs * Hq < _sm_count(device)


def launch_config(L: int, Hq: int, Hkv: int, D: int, Dv: int, grouped: Optional[bool] = None,
                  block_n: Optional[int] = None, num_warps: Optional[int] = None,
                  merge_dv: Optional[int] = None) -> dict:
    """Tile sizes and program layout of a launch (also what test_verify_attention_aot compiles for sm_90)."""
    BLOCK_D, BLOCK_DV = triton.next_power_of_2(D), triton.next_power_of_2(Dv)
    G = Hq // Hkv
    if grouped is None:  # the whole GQA group per program while its accumulator stays <= 32 x 512 fp32 (26B's
        # full layer, 8 q heads per kv head: grouped 102 us vs per-head 249 us at batch 16 on the H200)
        grouped = G > 1 and max(16, triton.next_power_of_2(L * G)) * BLOCK_DV <= 32 * 512
    GH = G if grouped else 1
    warps = num_warps or (4 if max(BLOCK_D, BLOCK_DV) <= 256 else 8)
    merge_dv = min(BLOCK_DV, triton.next_power_of_2(merge_dv)) if merge_dv else min(BLOCK_DV, 64)
    return dict(BLOCK_M=max(16, triton.next_power_of_2(L)), BLOCK_R=max(16, triton.next_power_of_2(L * GH)), GH=GH,
                BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_N=block_n or (32 if max(BLOCK_D, BLOCK_DV) <= 256 else 16),
                warps=warps,
                # the merge: 64-wide output slices per program (more programs at small batches) with 4 warps;
                # merge_dv (bench: one slice of the whole width, the layout before 2026-12-04) overrides
                MERGE_D=min(BLOCK_D, 64), MERGE_DV=merge_dv, MERGE_WARPS=4 if merge_dv <= 64 else warps,
                SPLIT_UNROLL=8 if merge_dv <= 128 else 2)


def _check(name: str, t: torch.Tensor, dim: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} needs unit stride in its last dim, got strides {t.stride()}")


def verify_attention_fwd(
    q: torch.Tensor, k_draft: torch.Tensor, v_draft: torch.Tensor, o: torch.Tensor,
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
    num_draft: int, sm_scale: float, sliding_window: int = -1, splits: Optional[int] = None,
    block_n: Optional[int] = None, num_warps: Optional[int] = None, grouped: Optional[bool] = None,
    k_scale: float = 1.0, v_scale: float = 1.0, merge_dv: Optional[int] = None,
) -> torch.Tensor:
    """Attention of ``num_draft`` chained draft queries per sequence over their prefix and each other; writes ``o``.

    q [bs*L, Hq, D], k_draft [bs*L, Hkv, D], v_draft [bs*L, Hkv, Dv], o [bs*L, Hq, Dv]; k_buffer
    [slots, Hkv, D], v_buffer [slots, Hkv, Dv] (the KV pool); kv_indptr [bs+1], kv_indices: pool slots of the
    prefix keys. ``sliding_window``: the exclusive radius W (-1: full attention). ``k_scale``/``v_scale``: the
    pool's dequantisation factors (an fp8 pool: keys are ``k_buffer * k_scale``); the draft K/V are unscaled.
    See the module docstring.
    """
    L = int(num_draft)
    if not 1 <= L <= MAX_DRAFT:
        raise ValueError(f"num_draft must be in [1, {MAX_DRAFT}], got {num_draft}")
    for name, t, dim in (("q", q, 3), ("k_draft", k_draft, 3), ("v_draft", v_draft, 3), ("o", o, 3),
                         ("k_buffer", k_buffer, 3), ("v_buffer", v_buffer, 3), ("kv_indptr", kv_indptr, 1),
                         ("kv_indices", kv_indices, 1)):
        _check(name, t, dim)
    bs = kv_indptr.shape[0] - 1
    T, Hq, D = q.shape
    Hkv, Dv = k_draft.shape[1], v_draft.shape[2]
    if bs < 1 or T != bs * L:
        raise ValueError(f"q has {T} rows; a verify batch of {bs} sequences x {L} drafts needs {bs * L}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{Hq} q heads are not a multiple of {Hkv} kv heads")
    if k_draft.shape != (T, Hkv, D) or v_draft.shape[:2] != (T, Hkv) or o.shape != (T, Hq, Dv):
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k_draft {tuple(k_draft.shape)}, "
                         f"v_draft {tuple(v_draft.shape)}, o {tuple(o.shape)}")
    if k_buffer.shape[1:] != (Hkv, D) or v_buffer.shape[1:] != (Hkv, Dv):
        raise ValueError(f"KV pool {tuple(k_buffer.shape)} / {tuple(v_buffer.shape)} does not match "
                         f"{Hkv} kv heads of dims {D} / {Dv}")
    if k_draft.dtype != q.dtype or v_draft.dtype != q.dtype or o.dtype != q.dtype:
        raise ValueError(f"q, k_draft, v_draft and o must share a dtype, got {q.dtype}, {k_draft.dtype}, "
                         f"{v_draft.dtype}, {o.dtype}")
    pool_ok = (q.dtype,) + POOL_FP8
    if k_buffer.dtype not in pool_ok or v_buffer.dtype not in pool_ok:
        raise ValueError(f"KV pool dtype {k_buffer.dtype} / {v_buffer.dtype}: expected {q.dtype} or fp8")
    if kv_indptr.dtype not in (torch.int32, torch.int64) or kv_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_indptr / kv_indices must be int32 or int64, got {kv_indptr.dtype} / {kv_indices.dtype}")
    W = int(sliding_window) if sliding_window is not None and sliding_window >= 0 else -1
    if merge_dv is None and not merge_slices_wanted(bs, Hq, q.device):
        merge_dv = Dv  # one program per (sequence, head) already fills the GPU: the whole width each
    cfg = launch_config(L, Hq, Hkv, D, Dv, grouped, block_n, num_warps, merge_dv)
    GH, BLOCK_M = cfg["GH"], cfg["BLOCK_M"]
    S = int(splits) if splits is not None else num_splits(bs, Hq // GH, q.device, cfg["BLOCK_DV"] > 256)
    if S < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    mid_o = torch.empty((bs, Hq, S, L, Dv), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((bs, Hq, S, BLOCK_M), dtype=torch.float32, device=q.device)
    common = dict(kv_group=Hq // Hkv, L=L, W=W, NSPLIT=S, D=D, DV=Dv, BLOCK_M=BLOCK_M, BLOCK_D=cfg["BLOCK_D"],
                  BLOCK_DV=cfg["BLOCK_DV"], DOT_F32=_INTERPRET or q.dtype == torch.float32, num_warps=cfg["warps"],
                  num_stages=1)
    _verify_prefix_kernel[(bs, Hq // GH, S)](
        q, k_buffer, v_buffer, kv_indptr, kv_indices, mid_o, mid_lse, float(sm_scale) * float(k_scale), float(v_scale),
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_o.stride(3), HQ=Hq, GH=GH, LSE_M=BLOCK_M,
        BLOCK_N=cfg["BLOCK_N"], **dict(common, BLOCK_M=cfg["BLOCK_R"]))
    merge = dict(common, BLOCK_D=cfg["MERGE_D"], BLOCK_DV=cfg["MERGE_DV"], num_warps=cfg["MERGE_WARPS"],
                 SPLIT_UNROLL=cfg["SPLIT_UNROLL"])
    _verify_merge_kernel[(bs, Hq, triton.cdiv(Dv, cfg["MERGE_DV"]))](
        q, k_draft, v_draft, o, mid_o, mid_lse, float(sm_scale),
        q.stride(0), q.stride(1), k_draft.stride(0), k_draft.stride(1), v_draft.stride(0), v_draft.stride(1),
        o.stride(0), o.stride(1), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_o.stride(3), **merge)
    return o


def verify_attention_ref(
    q: torch.Tensor, k_draft: torch.Tensor, v_draft: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor, kv_indices: torch.Tensor, num_draft: int, sm_scale: float, sliding_window: int = -1,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """fp32 reference of :func:`verify_attention_fwd` (per sequence, dense softmax, the pool dequantised),
    output in q's dtype."""
    L = int(num_draft)
    bs = kv_indptr.shape[0] - 1
    Hq, Hkv = q.shape[1], k_draft.shape[1]
    W = sliding_window if sliding_window is not None and sliding_window >= 0 else None
    out = []
    for b in range(bs):
        idx = kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])].long()
        lp = idx.numel()
        k = torch.cat([k_buffer[idx].float() * k_scale, k_draft[b * L:(b + 1) * L].float()])  # [lp + L, Hkv, D]
        v = torch.cat([v_buffer[idx].float() * v_scale, v_draft[b * L:(b + 1) * L].float()])
        k = k.repeat_interleave(Hq // Hkv, 1)
        v = v.repeat_interleave(Hq // Hkv, 1)
        qb = q[b * L:(b + 1) * L].float()
        s = torch.einsum("mhd,jhd->hmj", qb, k) * sm_scale
        qpos = lp + torch.arange(L)[:, None]
        kpos = torch.arange(lp + L)[None, :]
        keep = kpos <= qpos
        if W is not None:
            keep &= (qpos - kpos) <= W
        s = s.masked_fill(~keep.to(s.device), float("-inf"))
        out.append(torch.einsum("hmj,jhd->mhd", torch.softmax(s, -1), v))
    return torch.cat(out).to(q.dtype)
