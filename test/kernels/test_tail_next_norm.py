"""gemma_moe_tail_next_norm vs its fp32 reference, SGLang's own tail kernel, and a torch RMSNorm."""

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from kernel_testutil import DEVICE, HAS_CUDA, assert_close, sglang_fused_op  # noqa: E402

from sglang_gemma4.kernels.tail_next_norm import (  # noqa: E402
    gemma_moe_tail_next_norm,
    gemma_moe_tail_next_norm_ref,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _inputs(T, H, dtype, seed=0, device=DEVICE, tensor_scalar=True):
    g = torch.Generator().manual_seed(seed)
    h1 = (torch.randn(T, H, generator=g) * 3).to(dtype).to(device)
    h2 = (torch.randn(T, H, generator=g) * 0.5).to(dtype).to(device)
    r = (torch.randn(T, H, generator=g) * 5).to(dtype).to(device)
    w1, w2, w3, w_in = [(torch.randn(H, generator=g) * 0.5 + 1).to(dtype).to(device) for _ in range(4)]
    s = torch.tensor([0.75]).to(dtype).to(device) if tensor_scalar else 0.75
    return h1, w1, h2, w2, w3, r, s, w_in


def _check(args, eps=(1e-6, 1e-6, 1e-6, 1e-6)):
    out, x_in = gemma_moe_tail_next_norm(*args, *eps)
    ref_out, ref_x = gemma_moe_tail_next_norm_ref(*args, *eps)
    for o in (out, x_in):
        assert o.dtype == args[0].dtype and o.shape == args[0].shape
    assert_close(out, ref_out)
    assert_close(x_in, ref_x, ulps=2)  # a one-rounding flip in out can move its norm by one more
    return out, x_in


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 1), (1, 96), (3, 7), (5, 100), (2, 257)])
def test_matches_reference(dtype, T, H):
    _check(_inputs(T, H, dtype, seed=T * 7 + H))


def test_python_number_scalar():
    _check(_inputs(3, 64, torch.bfloat16, seed=3, tensor_scalar=False))


def test_matches_sglang_tail_then_rmsnorm():
    """out == SGLang 0.5.17's gemma_dual_rmsnorm_residual_scalar; x_in == the next layer's
    RMSNorm of that out (forward_native math). Within one rounding: the reduction orders differ,
    and on CPU the interpreter truncates fp32 -> bf16 (see kernel_testutil)."""
    sg_tail = sglang_fused_op("gemma_dual_rmsnorm_residual_scalar")
    h1, w1, h2, w2, w3, r, s, w_in = _inputs(6, 2816 if HAS_CUDA else 96, torch.bfloat16, seed=9)
    out, x_in = gemma_moe_tail_next_norm(h1, w1, h2, w2, w3, r, s, w_in, 1e-6, 1e-6, 1e-6, 1e-6)
    sg_out = sg_tail(h1, w1, h2, w2, w3, r, s, 1e-6, 1e-6, 1e-6)
    of = out.float()
    x_ref = (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + 1e-6) * w_in.float()).to(out.dtype)
    # not bitwise on the GPU (seen on the H200): the two kernels reduce in different orders
    assert_close(out, sg_out)
    assert_close(x_in, x_ref, ulps=1 if HAS_CUDA else 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_eps_reaches_its_norm_and_zero_rows(dtype):
    """Row 0: h1 = h2 = r = 0 -> out = 0 and x_in = 0 (finite); other rows small (rms ~ 0.1-0.3),
    so moving any one of the four eps to 0.5 changes the outputs well past the tolerance."""
    T, H = 4, 16
    h1, w1, h2, w2, w3, r, s, w_in = _inputs(T, H, dtype, seed=21)
    h1, h2, r = (h1.float() * 0.1).to(dtype), (h2.float() * 0.5).to(dtype), (r.float() * 0.05).to(dtype)
    h1[0], h2[0], r[0] = 0, 0, 0
    args = (h1, w1, h2, w2, w3, r, s, w_in)
    base = _check(args)
    assert all(torch.isfinite(o).all() for o in base)
    assert all(torch.equal(o[0].cpu(), torch.zeros(H, dtype=dtype)) for o in base)
    for i in range(4):
        eps = [1e-6] * 4
        eps[i] = 0.5
        out, x_in = _check(args, tuple(eps))
        moved = max((out[1:].float() - base[0][1:].float()).abs().max(),
                    (x_in[1:].float() - base[1][1:].float()).abs().max())
        assert moved > 0.05, (i, moved)
    # eps_in moves only x_in
    out, _ = _check(args, (1e-6, 1e-6, 1e-6, 0.5))
    assert torch.equal(out, base[0])


def test_strided_rows():
    h1, w1, h2, w2, w3, r, s, w_in = _inputs(3, 48, torch.bfloat16, seed=5)
    wide = torch.zeros(3, 64, dtype=h1.dtype, device=DEVICE)
    wide[:, 8:56] = h2
    _check((h1, w1, wide[:, 8:56], w2, w3, r, s, w_in))


def test_empty():
    out, x_in = gemma_moe_tail_next_norm(*_inputs(0, 32, torch.bfloat16))
    assert out.shape == x_in.shape == (0, 32)


def test_bad_inputs():
    h1, w1, h2, w2, w3, r, s, w_in = _inputs(2, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="h1"):
        gemma_moe_tail_next_norm(h1[0], w1, h2, w2, w3, r, s, w_in)
    with pytest.raises(ValueError, match="h2"):
        gemma_moe_tail_next_norm(h1, w1, h2[:, :4], w2, w3, r, s, w_in)
    with pytest.raises(ValueError, match="residual"):
        gemma_moe_tail_next_norm(h1, w1, h2, w2, w3, r[:1], s, w_in)
    with pytest.raises(ValueError, match="w_in"):
        gemma_moe_tail_next_norm(h1, w1, h2, w2, w3, r, s, w_in[:3])
    with pytest.raises(ValueError, match="layer_scalar"):
        gemma_moe_tail_next_norm(h1, w1, h2, w2, w3, r, torch.ones(2, device=DEVICE), w_in)
    with pytest.raises(ValueError, match="layer_scalar"):
        gemma_moe_tail_next_norm(h1, w1, h2, w2, w3, r, "1.0", w_in)
    with pytest.raises(ValueError, match="eps"):
        gemma_moe_tail_next_norm(h1, w1, h2, w2, w3, r, s, w_in, 1e-6, 1e-6, 1e-6, -1.0)


@settings(max_examples=12, deadline=None)
@given(T=st.integers(0, 5), H=st.integers(1, 300), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property(T, H, dtype, seed):
    _check(_inputs(T, H, dtype, seed=seed))


# ------------------------------------------------------------------ GPU, real widths


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [2816, 5376])
@pytest.mark.parametrize("T", [1, 7, 256, 4097])
def test_gpu_widths(dtype, H, T):
    _check(_inputs(T, H, dtype, seed=H + T, device="cuda"))


@gpu
def test_gpu_poisoned_outputs_are_all_written(monkeypatch):
    """Every element of both outputs is written: pre-fill the allocation with NaN."""
    real_empty = torch.empty

    def poisoned(*a, **k):
        return real_empty(*a, **k).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned)
    out, x_in = gemma_moe_tail_next_norm(*_inputs(33, 2816, torch.bfloat16, seed=4, device="cuda"))
    assert torch.isfinite(out).all() and torch.isfinite(x_in).all()
