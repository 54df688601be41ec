"""gemma_qkv_norm_rope_ vs its fp32 reference and SGLang's own two steps (qkv norm kernel, then NeoX RoPE)."""

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from kernel_testutil import DEVICE, HAS_CUDA, assert_close, sglang_fused_op  # noqa: E402

from sglang_gemma4.kernels.qkv_norm_rope import gemma_qkv_norm_rope_, gemma_qkv_norm_rope_ref  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def cos_sin(max_pos, head_dim, rope_dims=None, base=10000.0, device=DEVICE):
    """A Gemma-4 style fp32 cache: NeoX over the whole head, frequencies beyond rope_dims zero
    (cos 1, sin 0), as Gemma4RotaryEmbedding pads its proportional RoPE."""
    half = head_dim // 2
    r = (rope_dims or head_dim) // 2
    inv = 1.0 / base ** (torch.arange(0, 2 * r, 2, dtype=torch.float) / head_dim)
    inv = torch.cat([inv, torch.zeros(half - r)])
    f = torch.outer(torch.arange(max_pos, dtype=torch.float), inv)
    return torch.cat([f.cos(), f.sin()], -1).to(device)


def _inputs(T, nq, nkv, D, dtype, seed=0, device=DEVICE, extra_cols=0, rope_dims=None):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, (nq + 2 * nkv) * D + extra_cols, generator=g) * 3).to(dtype).to(device)
    pos = torch.randint(0, 64, (T,), generator=g).to(device)
    wq = (torch.randn(D, generator=g) * 0.3 + 1).to(dtype).to(device)
    wk = (torch.randn(D, generator=g) * 0.3 + 1).to(dtype).to(device)
    return qkv, pos, wq, wk, cos_sin(64, D, rope_dims, device=device), nq, nkv, D


def _check(args, eps=1e-6):
    qkv = args[0]
    ref = gemma_qkv_norm_rope_ref(*args, eps)
    out = gemma_qkv_norm_rope_(qkv.clone(), *args[1:], eps)
    assert_close(out, ref, ulps=2)  # rope of a rounded head: one more rounding can flip
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,nq,nkv,D", [(1, 2, 1, 8), (3, 4, 2, 16), (5, 1, 1, 64), (2, 3, 0, 32), (4, 2, 1, 12)])
def test_matches_reference(dtype, T, nq, nkv, D):
    _check(_inputs(T, nq, nkv, D, dtype, seed=T + nq + D))


def test_kv_shared_layout_leaves_k_and_v_untouched():
    """num_kv_heads=0: only the q heads change, the k/v columns qkv_proj still produced are left as they were."""
    qkv, pos, wq, wk, cache, nq, _, D = _inputs(3, 2, 1, 16, torch.bfloat16, seed=3)
    out = gemma_qkv_norm_rope_(qkv.clone(), pos, wq, wk, cache, nq, 0, D)
    assert torch.equal(out[:, nq * D:], qkv[:, nq * D:])
    assert not torch.equal(out[:, : nq * D], qkv[:, : nq * D])
    assert_close(out, gemma_qkv_norm_rope_ref(qkv, pos, wq, wk, cache, nq, 0, D), ulps=2)


def test_partial_rotary_cache_passes_the_unrotated_dims_normed():
    """Gemma-4 full-attention layers: rotation only where the cache has frequencies."""
    args = _inputs(4, 2, 1, 32, torch.float32, seed=8, rope_dims=8)
    out = _check(args)
    qkv, pos, wq, wk, cache, nq, nkv, D = args
    h = qkv[:, :D].float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * wq.float()
    # dims [4, 16) and [20, 32) of q head 0 have cos 1 / sin 0: exactly the normed values
    for lo, hi in ((4, 16), (20, 32)):
        torch.testing.assert_close(out[:, lo:hi].float(), normed[:, lo:hi], rtol=1e-6, atol=1e-6)


def test_matches_sglang_norm_then_rope():
    """SGLang 0.5.17's gemma_qkv_rmsnorm (its Triton kernel, in place) then the NeoX rotation its
    CUDA RoPE applies with the fp32 cache: the same values (within one rounding on CPU)."""
    sg_norm = sglang_fused_op("gemma_qkv_rmsnorm")
    D = 256 if HAS_CUDA else 32
    qkv, pos, wq, wk, cache, nq, nkv, _ = _inputs(5, 4, 2, D, torch.bfloat16, seed=12)
    s = qkv.clone()
    q, k, v = s.split([nq * D, nkv * D, nkv * D], dim=-1)
    if HAS_CUDA:
        sg_norm(q, k, v, wq, wk, num_q_heads=nq, num_kv_heads=nkv, head_dim=D, eps=1e-6)
    else:  # the wrapper asserts CUDA; launch SGLang's kernel as its M <= 256 branch does
        kern = sglang_fused_op("_gemma_qkv_rmsnorm_kernel")
        kern[(q.shape[0], nq + 2 * nkv)](q, k, v, wq, wk, q.stride(0), k.stride(0), v.stride(0),
                                        NUM_Q_HEADS=nq, NUM_KV_HEADS=nkv, HEAD_DIM=D, eps=1e-6,
                                        HAS_KV=True, BY_HEAD=True, BLOCK=D)
    cs = cache[pos]
    cos, sin = cs[:, None, : D // 2], cs[:, None, D // 2:]
    for part, n in ((q, nq), (k, nkv)):
        x = part.view(-1, n, D).float()
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        part.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).reshape(part.shape).to(part.dtype))
    out = gemma_qkv_norm_rope_(qkv.clone(), pos, wq, wk, cache, nq, nkv, D)
    assert_close(out, s, ulps=2)


def test_eps_reaches_the_norm_and_zero_heads_stay_zero():
    qkv, pos, wq, wk, cache, nq, nkv, D = _inputs(3, 2, 1, 16, torch.float32, seed=5)
    qkv = qkv * 0.05
    qkv[0, :D] = 0  # a zero q head: norm 0, rotation 0
    a = _check((qkv, pos, wq, wk, cache, nq, nkv, D))
    b = _check((qkv, pos, wq, wk, cache, nq, nkv, D), eps=0.5)
    assert torch.equal(a[0, :D], torch.zeros(D, device=DEVICE)) and torch.isfinite(a).all()
    assert (a[1:] - b[1:]).abs().max() > 0.05


def test_empty_and_bad_inputs():
    qkv, pos, wq, wk, cache, nq, nkv, D = _inputs(2, 2, 1, 8, torch.bfloat16)
    assert gemma_qkv_norm_rope_(qkv[:0], pos[:0], wq, wk, cache, nq, nkv, D).shape[0] == 0
    cases = [
        ((qkv[:, :20], pos, wq, wk, cache, nq, nkv, D), "columns"),
        ((qkv, pos[:1], wq, wk, cache, nq, nkv, D), "positions"),
        ((qkv, pos.float(), wq, wk, cache, nq, nkv, D), "positions"),
        ((qkv, pos, wq[:4], wk, cache, nq, nkv, D), "w_q"),
        ((qkv, pos, wq, wk[:4], cache, nq, nkv, D), "w_k"),
        ((qkv, pos, wq, wk, cache[:, :4], nq, nkv, D), "cos_sin_cache"),
        ((qkv, pos, wq, wk, cache, nq, nkv, 7), "head_dim"),
        ((qkv, pos, wq, wk, cache, 0, nkv, D), "num_q_heads"),
        ((qkv.t(), pos, wq, wk, cache, nq, nkv, D), "qkv"),
    ]
    for args, what in cases:
        with pytest.raises(ValueError, match=what):
            gemma_qkv_norm_rope_(*args)
    with pytest.raises(ValueError, match="eps"):
        gemma_qkv_norm_rope_(qkv, pos, wq, wk, cache, nq, nkv, D, -1.0)


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 4), nq=st.integers(1, 4), nkv=st.integers(0, 2), half=st.integers(1, 20),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property(T, nq, nkv, half, dtype, seed):
    _check(_inputs(T, nq, nkv, 2 * half, dtype, seed=seed))


# ------------------------------------------------------------------ GPU, real widths


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nq,nkv,D,rope", [(16, 8, 256, None), (16, 2, 512, 128), (8, 2, 256, None), (8, 0, 512, 128)])
@pytest.mark.parametrize("T", [1, 7, 256, 4097])
def test_gpu_widths(dtype, nq, nkv, D, rope, T):
    _check(_inputs(T, nq, nkv, D, dtype, seed=T + D, device="cuda", rope_dims=rope))
