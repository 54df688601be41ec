"""fused_triple_norm: a real SGLang Gemma4DecoderLayer (MoE block) with the patch on vs off.

Layer construction, stand-ins and CPU setup are shared with test_fused_ple.py.
"""

import pytest
import torch

from test_fused_ple import (  # noqa: F401  (fixture tp1 is used by name)
    DEVICE,
    build_layer,
    hidden,
    needs_kernels,
    ple_slice,
    run,
    tp1,
)

from sglang_gemma4 import registry
from sglang_gemma4.patches import fused_ple, fused_triple_norm
from sglang_gemma4.testing.hooks import patch_applied


@pytest.fixture
def kernel_calls(spy):
    from sglang_gemma4.kernels import triple_rmsnorm

    calls = []
    spy(triple_rmsnorm, "gemma_post_attn_triple_rmsnorm", lambda a: calls.append(a[0].shape))
    return calls


def test_status_and_fingerprints(clean_env):
    assert registry.evaluate(fused_triple_norm.PATCH, {}).state == registry.ACTIVE
    off = {"SGLANG_GEMMA4_FUSED_TRIPLE_NORM": "0"}
    assert registry.evaluate(fused_triple_norm.PATCH, off).state == registry.DISABLED
    fused_triple_norm.check_router_unchanged()


def test_changed_router_makes_patch_unavailable(monkeypatch):
    monkeypatch.setattr(fused_triple_norm, "ROUTER_FORWARD_SHA256", "0" * 64)
    st = registry.apply(fused_triple_norm.PATCH, registry.evaluate(fused_triple_norm.PATCH, {}), {})
    assert st.state == registry.UNAVAILABLE and "Gemma4Router.forward" in st.reason


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_matches_unpatched(tp1, monkeypatch, allow_cpu, kernel_calls, dtype):
    layer = build_layer(monkeypatch, moe=True, ple=False, dtype=dtype)
    x = hidden(dtype)
    ref = run(layer, x)
    assert layer.router._scale_fused  # the unpatched run folded the scale
    layer2 = build_layer(monkeypatch, moe=True, ple=False, dtype=dtype)
    layer2.moe.load_state_dict(layer.moe.state_dict())
    assert not layer2.router._scale_fused  # the fused path must fold it itself
    with patch_applied(fused_triple_norm.PATCH, {}) as st:
        assert st.state == registry.ACTIVE
        out = run(layer2, x)
    assert len(kernel_calls) == 1
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
        assert (out.float() - ref.float()).norm() / ref.float().norm() < 1e-2


@needs_kernels
def test_moe_with_ple_layer_keeps_unfused_tail(tp1, monkeypatch, allow_cpu, kernel_calls):
    """No Gemma-4 checkpoint has both, but the layer allows it: norms fused, PLE tail as SGLang's."""
    layer = build_layer(monkeypatch, moe=True, ple=True)
    x, ple = hidden(torch.float32), ple_slice(torch.float32)
    ref = run(layer, x, ple)
    with patch_applied(fused_triple_norm.PATCH, {}):
        out = run(layer, x, ple)
    assert len(kernel_calls) == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_ineligible_run_the_original(tp1, monkeypatch, kernel_calls):
    layer = build_layer(monkeypatch, moe=True, ple=False)
    x = hidden(torch.float32)
    ref = run(layer, x)
    with patch_applied(fused_triple_norm.PATCH, {}):
        if DEVICE == "cpu":
            assert torch.equal(run(layer, x), ref)  # production gate: CUDA only
        monkeypatch.setattr(fused_ple, "_TEST_ALLOW_CPU", True)
        assert torch.equal(run(layer, x.t().contiguous().t()), ref)  # column-major (clone keeps it)
        layer.pre_feedforward_layernorm_2.variance_epsilon = 1e-2  # eps differs: no shared rsqrt
        eps_ref = run(layer, x)
        layer.pre_feedforward_layernorm_2.variance_epsilon = 1e-6
    assert kernel_calls == []
    assert not torch.equal(eps_ref, ref)


@needs_kernels
@pytest.mark.parametrize("norm", ["router.norm", "post_attention_layernorm", "pre_feedforward_layernorm"])
def test_any_norm_with_another_eps_runs_the_original(tp1, monkeypatch, allow_cpu, kernel_calls, norm):
    """The kernel takes one eps for all four norms: a layer whose norms disagree (the router
    norm included, whose eps is ``.eps`` not ``.variance_epsilon``) is not fused."""
    layer = build_layer(monkeypatch, moe=True, ple=False)
    x = hidden(torch.float32)
    ref = run(layer, x)
    owner, attr = layer, norm
    if "." in norm:
        owner, attr = layer.router, "norm"
    mod = getattr(owner, attr)
    field = "eps" if norm == "router.norm" else "variance_epsilon"
    setattr(mod, field, 1e-1)
    eps_ref = run(layer, x)  # SGLang's forward with that eps
    with patch_applied(fused_triple_norm.PATCH, {}):
        out = run(layer, x)
    assert kernel_calls == []
    assert torch.equal(out, eps_ref)
    assert not torch.equal(eps_ref, ref)  # the eps really changes the math


@needs_kernels
def test_dense_layers_are_left_to_original(tp1, monkeypatch, allow_cpu, kernel_calls):
    layer = build_layer(monkeypatch, moe=False, ple=True)
    x, ple = hidden(torch.float32), ple_slice(torch.float32)
    ref = run(layer, x, ple)
    with patch_applied(fused_triple_norm.PATCH, {}):
        out = run(layer, x, ple)
    assert torch.equal(out, ref) and kernel_calls == []
