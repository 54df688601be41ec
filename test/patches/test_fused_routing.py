"""fused_routing: stands down for SGLang 0.5.17's own fused routing unless USE_OURS;
when on, Gemma4MoE's call to gemma4_fused_routing runs our kernel."""

import os
import sys

import torch

if not torch.cuda.is_available():
    _TRITON_TOO_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    _TRITON_TOO_EARLY = False

import pytest  # noqa: E402

from sglang_gemma4 import registry  # noqa: E402
from sglang_gemma4.patches import fused_routing  # noqa: E402
from sglang_gemma4.testing.hooks import patch_applied  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def ours(monkeypatch):
    """USE_OURS on, and undo HookRegistry's propagation of the wrapper into
    gemma4_fused_ops (patch_applied restores only the target attribute)."""
    from sglang.kernels.ops.layernorm import gemma4_fused_ops

    monkeypatch.setattr(fused_routing, "USE_OURS", True)
    monkeypatch.setattr(fused_routing, "_TEST_ALLOW_CPU", True)
    monkeypatch.setattr(gemma4_fused_ops, "gemma4_fused_routing", gemma4_fused_ops.gemma4_fused_routing)


def reference(logits, scale, k):
    """Gemma-4 routing in fp64: softmax over the top-k logits times per_expert_scale."""
    vals, ids = logits.double().topk(k, dim=-1)
    return vals.softmax(-1) * scale.double()[ids], ids


def test_upstream_reported_while_use_ours_is_false(clean_env, monkeypatch):
    monkeypatch.setattr(fused_routing, "USE_OURS", False)
    st = registry.evaluate(fused_routing.PATCH, {})
    assert st.state == registry.UPSTREAM and "gemma4_fused_routing" in st.reason
    off = registry.evaluate(fused_routing.PATCH, {"SGLANG_GEMMA4_FUSED_ROUTING": "0"})
    assert off.state == registry.DISABLED and "SGLang's gemma4_fused_routing" in off.reason


def test_use_ours_makes_it_active(clean_env, monkeypatch):
    monkeypatch.setattr(fused_routing, "USE_OURS", True)
    st = registry.evaluate(fused_routing.PATCH, {})
    assert st.state == registry.ACTIVE and "sglang_gemma4.kernels.routing" in st.reason


@pytest.mark.skipif(_TRITON_TOO_EARLY, reason="no CUDA and triton imported before TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hooked_name_runs_our_kernel(clean_env, ours, dtype):
    from sglang.srt.models import gemma4_causal

    g = torch.Generator().manual_seed(0)
    # distinct per row and exact in bf16 (k/16), so the top-8 order has no ties
    logits = torch.stack([torch.randperm(128, generator=g) for _ in range(37)]) / 16 - 4
    logits = logits.to(device=DEVICE, dtype=dtype)
    scale = (0.5 + torch.rand(128, generator=g)).to(DEVICE)
    original = gemma4_causal.gemma4_fused_routing
    with patch_applied(fused_routing.PATCH, {}) as st:
        assert st.state == registry.ACTIVE
        assert gemma4_causal.gemma4_fused_routing is not original
        w, ids = gemma4_causal.gemma4_fused_routing(logits, scale, 8)
    assert gemma4_causal.gemma4_fused_routing is original
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == (37, 8)
    ref_w, ref_ids = reference(logits, scale, 8)
    assert torch.equal(ids.long().cpu(), ref_ids.cpu())
    torch.testing.assert_close(w.double().cpu(), ref_w.cpu(), rtol=1e-5, atol=1e-6)
    # and what SGLang's own kernel (the unhooked name) returns; on CPU it runs in the
    # interpreter, one program per token: a few rows keep that quick
    ws, ids_s = original(logits[:5], scale, 8)
    assert torch.equal(ids[:5].cpu(), ids_s.cpu())
    torch.testing.assert_close(w[:5].cpu(), ws.cpu(), rtol=1e-5, atol=1e-6)


def test_ineligible_input_goes_to_sglangs_kernel(clean_env, ours):
    """3-D logits are not ours to route: SGLang's function gets them (and rejects them)."""
    from sglang.srt.models import gemma4_causal

    with patch_applied(fused_routing.PATCH, {}):
        with pytest.raises(AssertionError, match=r"expected \[T, E\] router logits"):
            gemma4_causal.gemma4_fused_routing(torch.zeros(2, 3, 8), torch.ones(8), 2)


def test_scale_dtype_our_kernel_rejects_goes_to_sglang(monkeypatch):
    """is_floating_point() also admits fp64/fp8 scales, which our kernel raises on:
    the gate must send them to SGLang's function instead of taking the server down."""
    monkeypatch.setattr(fused_routing, "_TEST_ALLOW_CPU", True)
    logits = torch.randn(4, 8, device=DEVICE)
    sentinel = object()
    got = fused_routing.fused_routing(lambda *a: sentinel, logits, torch.ones(8, dtype=torch.float64, device=DEVICE), 2)
    assert got is sentinel
