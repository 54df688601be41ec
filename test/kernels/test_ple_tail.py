"""PLE-tail ops (rmsnorm+add, rmsnorm+residual*scalar, gelu_tanh*ple) vs fp32 references."""

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from kernel_testutil import DEVICE, HAS_CUDA, assert_close  # noqa: E402

from sglang_gemma4.kernels.ple_tail import (  # noqa: E402
    gemma_gelu_tanh_mul,
    gemma_gelu_tanh_mul_ref,
    gemma_rmsnorm_add,
    gemma_rmsnorm_add_ref,
    gemma_rmsnorm_residual_scalar,
    gemma_rmsnorm_residual_scalar_ref,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _rand(shape, dtype, seed, device=DEVICE, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _norm_inputs(T, H, dtype, seed=0, device=DEVICE):
    x = _rand((T, H), dtype, seed, device, scale=2.0)
    w = _rand((H,), dtype, seed + 1, device)
    r = _rand((T, H), dtype, seed + 2, device, scale=4.0)
    return x, w, r


SHAPES = [(1, 1), (1, 96), (3, 7), (5, 100), (2, 257)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", SHAPES)
def test_rmsnorm_add(dtype, T, H):
    x, w, r = _norm_inputs(T, H, dtype, seed=T * 31 + H)
    assert_close(gemma_rmsnorm_add(x, w, r, 1e-6), gemma_rmsnorm_add_ref(x, w, r, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", SHAPES)
@pytest.mark.parametrize("kind", ["float", "fp32[1]", "bf16[1]", "fp32[]"])
def test_rmsnorm_residual_scalar(dtype, T, H, kind):
    x, w, r = _norm_inputs(T, H, dtype, seed=T * 17 + H)
    s = {
        "float": 0.6,
        "fp32[1]": torch.tensor([0.6], device=DEVICE),
        "bf16[1]": torch.tensor([0.6], dtype=torch.bfloat16, device=DEVICE),
        "fp32[]": torch.tensor(0.6, device=DEVICE),
    }[kind]
    out = gemma_rmsnorm_residual_scalar(x, w, r, s, 1e-6)
    assert_close(out, gemma_rmsnorm_residual_scalar_ref(x, w, r, s, 1e-6))


def test_rmsnorm_mixed_dtypes_and_strides():
    # bf16 activations, fp32 residual and weight, rows with a stride (sliced views)
    xb = _rand((4, 80), torch.bfloat16, 1)
    rb = _rand((4, 96), torch.float32, 2)
    w = _rand((64,), torch.float32, 3)
    x, r = xb[:, :64], rb[:, 16:80]
    out = gemma_rmsnorm_residual_scalar(x, w, r, 2.0)
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    assert_close(out, gemma_rmsnorm_residual_scalar_ref(x, w, r, 2.0))
    assert_close(gemma_rmsnorm_add(x, w, r), gemma_rmsnorm_add_ref(x, w, r))


def test_eps_and_zero_rows():
    x = torch.zeros(2, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    r = torch.ones(2, 16, device=DEVICE)
    # rmsnorm(0) = 0 (finite for eps > 0)
    assert torch.equal(gemma_rmsnorm_add(x, w, r, eps=1e-6).cpu(), torch.ones(2, 16))
    x, r = _rand((3, 16), torch.float32, 5), _rand((3, 16), torch.float32, 6)
    for eps in (0.0, 1e-6, 0.5):
        assert_close(gemma_rmsnorm_add(x, w, r, eps), gemma_rmsnorm_add_ref(x, w, r, eps))


def test_weight_is_w_not_one_plus_w():
    x = _rand((2, 32), torch.float32, 9)
    r = torch.zeros(2, 32, device=DEVICE)
    w = torch.zeros(32, device=DEVICE)
    assert torch.equal(gemma_rmsnorm_add(x, w, r).cpu(), torch.zeros(2, 32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 1), (3, 32), (5, 100), (70, 256)])
def test_gelu_tanh_mul(dtype, T, H):
    gate = _rand((T, H), dtype, T + H, scale=3.0)
    ple = _rand((T, H), dtype, T + H + 1)
    assert_close(gemma_gelu_tanh_mul(gate, ple), gemma_gelu_tanh_mul_ref(gate, ple))


@pytest.mark.parametrize("block_t,num_warps", [(1, 1), (2, 1), (4, 2), (16, 4), (None, 2), (8, None)])
def test_gelu_tiling_overrides(block_t, num_warps):
    # T=37 is not a multiple of any tile: the last program's row mask is exercised
    gate = _rand((37, 100), torch.bfloat16, 5, scale=3.0)
    ple = _rand((37, 100), torch.bfloat16, 6)
    out = gemma_gelu_tanh_mul(gate, ple, block_t=block_t, num_warps=num_warps)
    assert_close(out, gemma_gelu_tanh_mul_ref(gate, ple))
    # a tile choice only reschedules elementwise work: bit-identical to the default
    assert torch.equal(out, gemma_gelu_tanh_mul(gate, ple))


def test_gelu_tiling_overrides_rejected():
    gate = _rand((4, 32), torch.bfloat16, 7)
    for kw in ({"block_t": 3}, {"block_t": 0}, {"num_warps": 6}, {"num_warps": 64}, {"block_t": True}, {"block_t": 2.0}):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=name):
            gemma_gelu_tanh_mul(gate, gate, **kw)
    with pytest.raises(TypeError):
        gemma_gelu_tanh_mul(gate, gate, 4)  # overrides are keyword-only


def test_gelu_extremes():
    gate = torch.tensor([[-1e4, -30.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 1e4, -0.0]], device=DEVICE)
    ple = torch.full_like(gate, 1.5)
    out = gemma_gelu_tanh_mul(gate, ple)
    assert torch.isfinite(out).all()
    assert_close(out, gemma_gelu_tanh_mul_ref(gate, ple))


def test_gelu_strided():
    g = _rand((6, 40), torch.bfloat16, 1)[:, 4:36]
    p = _rand((6, 64), torch.bfloat16, 2)[:, ::2]  # inner stride 2 -> copied
    assert_close(gemma_gelu_tanh_mul(g, p), gemma_gelu_tanh_mul_ref(g, p))


def test_empty():
    x, w, r = _norm_inputs(0, 64, torch.bfloat16)
    for out in (
        gemma_rmsnorm_add(x, w, r),
        gemma_rmsnorm_residual_scalar(x, w, r, torch.ones(1, device=DEVICE)),
        gemma_gelu_tanh_mul(x, r),
    ):
        assert out.shape == (0, 64) and out.dtype == torch.bfloat16


def test_bad_inputs():
    x, w, r = _norm_inputs(2, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="x"):
        gemma_rmsnorm_add(x[0], w, r)
    with pytest.raises(ValueError, match="x"):
        gemma_rmsnorm_add(x.to(torch.int32), w, r)
    with pytest.raises(ValueError, match="w"):
        gemma_rmsnorm_add(x, w[:7], r)
    with pytest.raises(ValueError, match="r"):
        gemma_rmsnorm_add(x, w, r[:1])
    with pytest.raises(ValueError, match="r"):
        gemma_rmsnorm_add(x, w, torch.zeros(2, 8, device="meta"))
    with pytest.raises(ValueError, match="eps"):
        gemma_rmsnorm_add(x, w, r, eps=-1.0)
    with pytest.raises(ValueError, match="scalar"):
        gemma_rmsnorm_residual_scalar(x, w, r, torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="scalar"):
        gemma_rmsnorm_residual_scalar(x, w, r, "1.0")
    with pytest.raises(ValueError, match="scalar"):
        gemma_rmsnorm_residual_scalar(x, w, r, torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match="gate"):
        gemma_gelu_tanh_mul(x[0], r)
    with pytest.raises(ValueError, match="ple"):
        gemma_gelu_tanh_mul(x, r[:, :4])


@settings(max_examples=12, deadline=None)
@given(
    T=st.integers(0, 5),
    H=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    scalar=st.floats(-4, 4),
    seed=st.integers(0, 2**16),
)
def test_property(T, H, dtype, scalar, seed):
    x, w, r = _norm_inputs(T, H, dtype, seed=seed)
    assert_close(gemma_rmsnorm_add(x, w, r), gemma_rmsnorm_add_ref(x, w, r))
    s = torch.tensor([scalar], device=DEVICE)
    assert_close(gemma_rmsnorm_residual_scalar(x, w, r, s), gemma_rmsnorm_residual_scalar_ref(x, w, r, s))
    assert_close(gemma_gelu_tanh_mul(x, r), gemma_gelu_tanh_mul_ref(x, r))


# ------------------------------------------------------------------ GPU, real widths


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [1536, 2560, 2816, 5376])
@pytest.mark.parametrize("T", [1, 7, 256, 4097])
def test_gpu_rmsnorm_widths(dtype, H, T):
    x, w, r = _norm_inputs(T, H, dtype, seed=H + T, device="cuda")
    s = torch.tensor([0.7], device="cuda")
    assert_close(gemma_rmsnorm_add(x, w, r), gemma_rmsnorm_add_ref(x, w, r))
    assert_close(gemma_rmsnorm_residual_scalar(x, w, r, s), gemma_rmsnorm_residual_scalar_ref(x, w, r, s))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 256, 4097])
def test_gpu_gelu_ple_width(dtype, T):
    gate = _rand((T, 256), dtype, T, "cuda", scale=3.0)
    ple = _rand((T, 256), dtype, T + 1, "cuda")
    assert_close(gemma_gelu_tanh_mul(gate, ple), gemma_gelu_tanh_mul_ref(gate, ple))


@gpu
@pytest.mark.parametrize("H", [1536, 2560, 2816, 5376])
@pytest.mark.parametrize("T", [1, 7, 256, 4097])
def test_gpu_matches_sglang_rmsnorm_residual_scalar(H, T):
    try:
        from sglang.kernels.ops.layernorm.gemma4_fused_ops import (
            gemma_rmsnorm_residual_scalar as sgl_op,
        )
    except Exception as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"sglang kernel not importable: {e}")
    x, w, r = _norm_inputs(T, H, torch.bfloat16, seed=H * T, device="cuda")
    s = torch.tensor([0.7], device="cuda")
    ours = gemma_rmsnorm_residual_scalar(x, w, r, s, 1e-6)
    theirs = sgl_op(x, w, r, s, 1e-6)
    # Same math, same single rounding: only fp32 summation order may differ.
    assert_close(ours, theirs)
    assert (ours != theirs).float().mean() < 0.01


@pytest.mark.parametrize("T,H,block_t,num_warps", [(1, 256, 1, 1), (7, 256, 2, 2), (33, 96, 4, 4), (5, 17, 1, 1)])
def test_gelu_flat_layout_is_bitwise_the_rows_kernel(T, H, block_t, num_warps):
    g = torch.Generator().manual_seed(T * 131 + H)
    gate = (torch.randn(T, H, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    ple = torch.randn(T, H, generator=g).to(torch.bfloat16).to(DEVICE)
    out = gemma_gelu_tanh_mul(gate, ple, block_t=block_t, num_warps=num_warps, layout="flat")
    assert_close(out, gemma_gelu_tanh_mul_ref(gate, ple))
    assert torch.equal(out, gemma_gelu_tanh_mul(gate, ple))  # same per-element math as the default


def test_gelu_flat_layout_rejects_bad_input():
    gate = torch.zeros(4, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        gemma_gelu_tanh_mul(gate[:, ::2], gate[:, ::2], layout="flat")
    with pytest.raises(ValueError, match="layout"):
        gemma_gelu_tanh_mul(gate, gate, layout="cols")
