"""gemma_post_attn_triple_rmsnorm vs its fp32 reference and the model's unfused sequence."""

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from kernel_testutil import DEVICE, HAS_CUDA, assert_close  # noqa: E402

from sglang_gemma4.kernels.triple_rmsnorm import (  # noqa: E402
    gemma_post_attn_triple_rmsnorm,
    gemma_post_attn_triple_rmsnorm_ref,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _inputs(T, H, dtype, seed=0, device=DEVICE, res_dtype=None):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(T, H, generator=g) * 3).to(dtype).to(device)
    r = (torch.randn(T, H, generator=g) * 5).to(res_dtype or dtype).to(device)
    ws = [(torch.randn(H, generator=g) * 0.5 + 1).to(dtype).to(device) for _ in range(3)]
    router = (torch.randn(H, generator=g) * H**-0.5).to(dtype).to(device)  # scale * H**-0.5
    return a, r, ws[0], ws[1], ws[2], router


def _check(args, eps=1e-6):
    outs = gemma_post_attn_triple_rmsnorm(*args, eps)
    refs = gemma_post_attn_triple_rmsnorm_ref(*args, eps)
    assert len(outs) == 4
    for i, (o, q) in enumerate(zip(outs, refs)):
        assert o.dtype == args[0].dtype and o.shape == args[0].shape
        # a one-rounding flip in post can move the three norms of it by one more
        assert_close(o, q, ulps=1 if i == 0 else 2)
    return outs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 1), (1, 96), (3, 7), (5, 100), (2, 257)])
def test_matches_reference(dtype, T, H):
    _check(_inputs(T, H, dtype, seed=T * 7 + H))


def test_self_consistent_and_matches_unfused_model():
    a, r, w_post, w_ff, w_ff2, router = _inputs(4, 64, torch.bfloat16, seed=11)
    post, ff_in, router_in, ff2_in = _check((a, r, w_post, w_ff, w_ff2, router))

    def rms(x, w):  # SGLang RMSNorm.forward_native: fp32, weight as is, one cast
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(x.dtype)

    # exactly rmsnorm of the returned post
    assert_close(ff_in, rms(post, w_ff))
    assert_close(router_in, rms(post, router))
    assert_close(ff2_in, rms(post, w_ff2))
    # the unfused model (rounds the norm output before the add): within bf16 rounding
    post_model = rms(a, w_post) + r
    torch.testing.assert_close(post.float(), post_model.float(), rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eps_and_zero_rows(dtype):
    """The caller's eps reaches both norms, and rmsnorm(0) = 0 (finite for eps > 0) in each.

    Row 0: attn_out = residual = 0, so post = 0 and the shared norm sees a zero row too;
    row 1: attn_out = 0 (post = residual); row 2: residual = 0. Small values (rms ~ 0.3)
    let eps = 0.1 / 0.5 move every output well past the tolerance.
    """
    T, H = 4, 16
    a, r, w_post, w_ff, w_ff2, router = _inputs(T, H, dtype, seed=21)
    a, r = (a.float() * 0.1).to(dtype), (r.float() * 0.06).to(dtype)
    a[0], r[0], a[1], r[2] = 0, 0, 0, 0
    args = (a, r, w_post, w_ff, w_ff2, router)
    for eps in (1e-1, 0.5):
        outs = _check(args, eps)
        assert all(torch.isfinite(o).all() for o in outs)
        assert all(torch.equal(o[0].cpu(), torch.zeros(H, dtype=dtype)) for o in outs)
        # the eps really matters here: the same inputs with the default eps give other rows
        other = gemma_post_attn_triple_rmsnorm_ref(*args, 1e-6)
        for o, q in zip(outs, other):
            assert (o[1:].float() - q[1:].float()).abs().max() > 0.05
    # eps = 1e-6 with the zero rows: still finite, still exactly zero
    outs = _check(args)
    assert all(torch.equal(o[0].cpu(), torch.zeros(H, dtype=dtype)) for o in outs)


def test_mixed_residual_dtype_and_strides():
    a, r, *ws = _inputs(3, 48, torch.bfloat16, seed=5, res_dtype=torch.float32)
    wide_a = torch.zeros(3, 64, dtype=a.dtype, device=DEVICE)
    wide_a[:, 8:56] = a
    _check((wide_a[:, 8:56], r, *ws))


def test_empty():
    outs = gemma_post_attn_triple_rmsnorm(*_inputs(0, 32, torch.bfloat16))
    assert all(o.shape == (0, 32) for o in outs)


def test_bad_inputs():
    a, r, w1, w2, w3, wr = _inputs(2, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="attn_out"):
        gemma_post_attn_triple_rmsnorm(a[0], r, w1, w2, w3, wr)
    with pytest.raises(ValueError, match="residual"):
        gemma_post_attn_triple_rmsnorm(a, r[:, :4], w1, w2, w3, wr)
    with pytest.raises(ValueError, match="w_pre_ff_2"):
        gemma_post_attn_triple_rmsnorm(a, r, w1, w2, w3[:3], wr)
    with pytest.raises(ValueError, match="router_scale"):
        gemma_post_attn_triple_rmsnorm(a, r, w1, w2, w3, wr.to(torch.int64))
    with pytest.raises(ValueError, match="w_post"):
        gemma_post_attn_triple_rmsnorm(a, r, torch.ones(8, device="meta"), w2, w3, wr)
    with pytest.raises(ValueError, match="eps"):
        gemma_post_attn_triple_rmsnorm(a, r, w1, w2, w3, wr, float("nan"))


@settings(max_examples=12, deadline=None)
@given(T=st.integers(0, 5), H=st.integers(1, 300), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property(T, H, dtype, seed):
    _check(_inputs(T, H, dtype, seed=seed))


# ------------------------------------------------------------------ GPU, real widths


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [1536, 2560, 2816, 5376])
@pytest.mark.parametrize("T", [1, 7, 256, 4097])
def test_gpu_widths(dtype, H, T):
    _check(_inputs(T, H, dtype, seed=H + T, device="cuda"))
