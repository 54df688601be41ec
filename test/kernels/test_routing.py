"""gemma4_routing vs its fp32 torch reference and SGLang 0.5.17's gemma4_fused_routing
(on CPU both in the Triton interpreter at small T; on GPU up to T=40000)."""

import math
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from kernel_testutil import DEVICE, HAS_CUDA, sglang_fused_op  # noqa: E402

from sglang_gemma4.kernels.routing import gemma4_routing, gemma4_routing_ref  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _inputs(T, E, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, E, generator=g) * 3).to(dtype).to(device)
    scale = (torch.rand(E, generator=g) + 0.5).to(device)
    return logits, scale


def _check(logits, scale, K, **kw):
    w, ids = gemma4_routing(logits, scale, K, **kw)
    wr, ir = gemma4_routing_ref(logits.cpu(), scale.cpu(), K)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (logits.shape[0], K)
    assert torch.equal(ids.cpu(), ir), "expert ids differ from the reference"
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.cpu(), wr, rtol=1e-5, atol=1e-6)
    return w, ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T,E,K",
    [(1, 128, 8), (7, 128, 8), (5, 10, 3), (3, 1, 1), (4, 33, 33), (6, 33, 1), (2, 1000, 5)],
)
@pytest.mark.parametrize("method", ["argmax", "bitonic"])
def test_matches_reference(dtype, T, E, K, method):
    logits, scale = _inputs(T, E, dtype, seed=T * 1000 + E + K)
    _check(logits, scale, K, method=method)


@pytest.mark.parametrize("block_t,num_warps", [(1, 1), (4, 1), (8, 2)])
def test_tiling_overrides(block_t, num_warps):
    # several tokens per program, partial last tile (T=9)
    logits, scale = _inputs(9, 128, torch.bfloat16, seed=3)
    _check(logits, scale, 8, block_t=block_t, num_warps=num_warps)


def test_strided_rows():
    logits, scale = _inputs(5, 64, torch.bfloat16, seed=4)
    base = torch.zeros(5, 80, dtype=torch.bfloat16, device=DEVICE)
    base[:, :64] = logits
    _check(base[:, :64], scale, 4)  # row stride 80 != E


def test_empty():
    logits, scale = _inputs(0, 128, torch.bfloat16)
    w, ids = gemma4_routing(logits, scale, 8)
    assert w.shape == ids.shape == (0, 8) and w.dtype == torch.float32 and ids.dtype == torch.int32


@pytest.mark.parametrize("dtype", DTYPES)
def test_tie_break_lower_id_first(dtype):
    logits = torch.tensor(
        [[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [0.0] * 6, [-0.0, 0.0, -0.0, -1.0, 0.0, -2.0]], dtype=dtype
    ).to(DEVICE)
    scale = torch.ones(6, device=DEVICE)
    w, ids = _check(logits, scale, 4)
    assert ids[0].tolist() == [1, 2, 4, 3]
    assert ids[1].tolist() == [0, 1, 2, 3]
    assert ids[2].tolist() == [0, 1, 2, 4]  # -0.0 == +0.0
    assert torch.allclose(w[1].cpu(), torch.full((4,), 0.25))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf(dtype):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [
            [nan, 1.0, nan, 2.0, 0.5],  # NaN ranks as -inf
            [nan, nan, nan, nan, nan],  # all "-inf": uniform over ids 0..K-1
            [1.0, inf, 0.0, inf, -inf],  # +inf entries share the weight
            [-inf, -inf, 3.0, -inf, -inf],  # -inf gets weight 0
            [nan, -inf, nan, 0.0, -inf],  # NaN and -inf tie -> lower id first
        ],
        dtype=dtype,
    ).to(DEVICE)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device=DEVICE)
    w, ids = _check(logits, scale, 3)
    w, ids = w.cpu(), ids.cpu().tolist()
    assert ids[0] == [3, 1, 4]
    assert ids[1] == [0, 1, 2] and torch.allclose(w[1], torch.tensor([1.0, 2.0, 3.0]) / 3)
    assert ids[2] == [1, 3, 0] and torch.allclose(w[2], torch.tensor([1.0, 2.0, 0.0]))
    assert ids[3] == [2, 0, 1] and torch.allclose(w[3], torch.tensor([3.0, 0.0, 0.0]))
    assert ids[4] == [3, 0, 1] and torch.allclose(w[4], torch.tensor([4.0, 0.0, 0.0]))


def test_weights_are_softmax_times_scale():
    logits, scale = _inputs(4, 16, torch.float32, seed=7)
    w, ids = gemma4_routing(logits, scale, 4)
    top = torch.gather(logits.cpu(), 1, ids.cpu().long())
    expect = torch.softmax(top, dim=-1) * scale.cpu()[ids.cpu().long()]
    torch.testing.assert_close(w.cpu(), expect, rtol=1e-5, atol=1e-6)
    assert (top[:, :-1] >= top[:, 1:]).all()  # sorted by descending logit


def test_bad_inputs():
    logits, scale = _inputs(2, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="logits"):
        gemma4_routing(logits[0], scale, 2)
    with pytest.raises(ValueError, match="logits"):
        gemma4_routing(logits.to(torch.int32), scale, 2)
    with pytest.raises(ValueError, match="per_expert_scale"):
        gemma4_routing(logits, scale[:7], 2)
    with pytest.raises(ValueError, match="per_expert_scale"):
        gemma4_routing(logits, torch.ones(8, dtype=torch.int64, device=DEVICE), 2)
    with pytest.raises(ValueError, match="per_expert_scale"):
        gemma4_routing(logits, torch.ones(8, device="meta"), 2)
    for k in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="top_k"):
            gemma4_routing(logits, scale, k)
    big, bscale = _inputs(1, 1025, torch.bfloat16)
    with pytest.raises(ValueError, match="E"):
        gemma4_routing(big, bscale, 2)
    with pytest.raises(ValueError, match="block_t"):
        gemma4_routing(logits, scale, 2, block_t=3)
    with pytest.raises(ValueError, match="method"):
        gemma4_routing(logits, scale, 2, method="sort")


@settings(max_examples=12, deadline=None)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 80),
    kfrac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    coarse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property(T, E, kfrac, dtype, coarse, seed):
    K = max(1, min(E, math.ceil(kfrac * E)))
    logits, scale = _inputs(T, E, dtype, seed=seed)
    if coarse:  # many exact ties
        logits = logits.round()
    w, ids = _check(logits, scale, K)
    if T:
        # every row: distinct ids, each in range
        assert ids.min() >= 0 and ids.max() < E
        assert all(len(set(r)) == K for r in ids.cpu().tolist())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K", [(1, 128, 8), (2, 128, 8), (9, 128, 8), (17, 128, 8), (5, 10, 3), (3, 33, 33)])
def test_matches_sglang_small_T(dtype, T, E, K):
    """Ours vs SGLang's kernel where both run: CPU (interpreter) or GPU, few tokens.

    Ids: same tie rule (lower id first), no NaN, fp32 compare of logits loaded exactly,
    so they must agree exactly. Weights are fp32 outputs (no bf16 store)."""
    sgl_routing = sglang_fused_op("gemma4_fused_routing")
    logits, scale = _inputs(T, E, dtype, seed=T * 100 + E + K)
    if T == 9:
        logits = logits.float().round().to(dtype)  # many exact ties
    w, ids = gemma4_routing(logits, scale, K)
    ws, ids_s = sgl_routing(logits, scale, K)
    assert torch.equal(ids.cpu(), ids_s.cpu())
    torch.testing.assert_close(w.cpu(), ws.cpu(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ GPU, real widths


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 256, 4097])
def test_gpu_gemma4_widths(dtype, T):
    logits, scale = _inputs(T, 128, dtype, seed=T, device="cuda")
    for method in ("argmax", "bitonic"):
        _check(logits, scale, 8, method=method)


@gpu
@pytest.mark.parametrize("T", [1, 7, 256, 4097, 40000])
def test_gpu_matches_sglang(T):
    gemma4_fused_routing = sglang_fused_op("gemma4_fused_routing")
    logits, scale = _inputs(T, 128, torch.bfloat16, seed=T, device="cuda")
    w, ids = gemma4_routing(logits, scale, 8)
    ws, ids_s = gemma4_fused_routing(logits, scale, 8)
    # Same tie rule (lower id first) and no NaN here, so ids must agree exactly.
    assert torch.equal(ids, ids_s)
    torch.testing.assert_close(w, ws, rtol=1e-5, atol=1e-6)


@gpu
def test_gpu_cuda_graph():
    logits, scale = _inputs(64, 128, torch.bfloat16, seed=1, device="cuda")
    gemma4_routing(logits, scale, 8)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w, ids = gemma4_routing(logits, scale, 8)
    logits.copy_(_inputs(64, 128, torch.bfloat16, seed=2, device="cuda")[0])
    g.replay()
    torch.cuda.synchronize()
    wr, ir = gemma4_routing_ref(logits.cpu(), scale.cpu(), 8)
    assert torch.equal(ids.cpu(), ir)
    torch.testing.assert_close(w.cpu(), wr, rtol=1e-5, atol=1e-6)
