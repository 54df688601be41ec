"""Helpers shared by the kernel tests (a uniquely named module, not conftest, so it
cannot collide with another conftest.py when imported)."""

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (rtol, atol, max relative error norm) per output dtype; the kernels and the
# references both compute in fp32 and round once, so outputs differ by at most
# one rounding of the output dtype.
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
