"""gemma_rmsnorm_residual_scalar (ours) vs SGLang 0.5.17's kernel of the same name, few tokens.

Runs wherever both kernels run: on CPU both in the Triton interpreter (small T, so it
stays quick), on GPU too. Within one output rounding only (kernel_testutil: the
interpreter truncates fp32 -> bf16); the bitwise-agreement check at real widths is
test_ple_tail.py's GPU test.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_testutil import DEVICE, assert_close, sglang_fused_op  # noqa: E402

from sglang_gemma4.kernels.ple_tail import gemma_rmsnorm_residual_scalar  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,H", [(1, 96), (2, 256), (5, 100), (9, 64), (17, 128)])
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_matches_sglang_small_T(dtype, T, H, eps):
    sgl_op = sglang_fused_op("gemma_rmsnorm_residual_scalar")
    g = torch.Generator().manual_seed(T * 1000 + H)
    x = (torch.randn(T, H, generator=g) * 2).to(dtype).to(DEVICE)
    w = (torch.randn(H, generator=g) * 0.3 + 1).to(dtype).to(DEVICE)
    r = (torch.randn(T, H, generator=g) * 4).to(dtype).to(DEVICE)
    x[0] = 0  # a zero row: rmsnorm(0) = 0 in both
    s = torch.tensor([0.7], device=DEVICE)  # SGLang's kernel loads the scalar from memory
    ours = gemma_rmsnorm_residual_scalar(x, w, r, s, eps)
    theirs = sgl_op(x, w, r, s, eps)
    assert_close(ours, theirs)
    assert torch.isfinite(ours).all()
