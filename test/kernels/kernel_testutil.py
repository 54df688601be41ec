"""Helpers shared by the kernel tests (a uniquely named module, not conftest, so it
cannot collide with another conftest.py when imported)."""

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (rtol, atol, max relative error norm) per output dtype; the kernels and the
# references both compute in fp32 and round once, so outputs differ by at most
# one rounding of the output dtype.
#
# Without CUDA the kernels run in Triton's interpreter, and there (Triton 3.6) an
# fp32 -> bf16 conversion inside a kernel truncates toward zero instead of rounding
# to nearest-even as the GPU and torch's .to(torch.bfloat16) do: e.g. 1 + 2**-8 +
# 2**-10 becomes 1.0, not 1.0078125. A CPU bf16 output can thus sit one bf16 ulp
# from the reference (always toward zero); the bf16 tolerances below allow one
# ulp (2**-7 relative), so they hold on both. For the same reason a bitwise claim
# (ours == SGLang's kernel, ours == a torch sequence) belongs in the GPU tests
# only; on CPU compare within these tolerances.
TOL = {
    torch.float32: (1e-5, 1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3, 8e-3),
}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype=None, ulps: int = 1):
    """Elementwise within `ulps` roundings of the output dtype, and a small relative
    error norm. Use ulps=2 for outputs computed from an already-rounded output."""
    dtype = dtype or ref.dtype
    rtol, atol, rel = TOL[dtype]
    rtol, atol = rtol * ulps, atol * ulps
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    o, r = out.float().cpu(), ref.float().cpu()
    assert torch.isfinite(o).all() == torch.isfinite(r).all()
    torch.testing.assert_close(o, r, rtol=rtol, atol=atol)
    if r.numel():
        # relative norm with the elementwise atol as floor: a handful of outputs
        # near zero (e.g. gelu of a negative gate) make a pure ratio ill-conditioned
        diff, bound = (o - r).norm(), rel * r.norm() + atol * r.numel() ** 0.5
        assert diff <= bound, f"error norm {diff:.3g} > {bound:.3g} (rel {rel}, atol {atol})"


def sglang_fused_op(name: str):
    """A kernel entry point of SGLang 0.5.17's gemma4_fused_ops, or skip the test."""
    import pytest

    try:
        from sglang.kernels.ops.layernorm import gemma4_fused_ops
    except Exception as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"sglang gemma4_fused_ops not importable: {e}")
    return getattr(gemma4_fused_ops, name)
