"""fused_ple: a real SGLang Gemma4DecoderLayer (CPU, single-process gloo TP group)
with the patch on vs off.

Attention is replaced by a deterministic stand-in at construction (SGLang's
needs a ForwardBatch and KV pool); both paths call it the same way, and every
other sub-module is SGLang's own. Without CUDA the fused kernels run in the
Triton interpreter (``_TEST_ALLOW_CPU``); on CUDA the same tests run on GPU.
"""

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
from sglang_gemma4.patches import _layer_forward, fused_ple, fused_triple_norm  # noqa: E402
from sglang_gemma4.testing import configs  # noqa: E402
from sglang_gemma4.testing.hooks import patch_applied  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, PLE_DIM, T = 64, 16, 7

needs_kernels = pytest.mark.skipif(
    _TRITON_TOO_EARLY, reason="no CUDA and triton was imported before TRITON_INTERPRET=1"
)


class StubAttention(torch.nn.Module):
    """Stands in for Gemma4Attention: same call signature, a fixed function of its input."""

    def __init__(self, layer_id, config, **kwargs):
        super().__init__()
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, positions, hidden_states, forward_batch):
        return torch.tanh(self.proj(hidden_states))


class StubMoE(torch.nn.Module):
    """Stands in for Gemma4MoE (its Triton experts do not run on CPU): torch top-k MoE."""

    def __init__(self, n_experts, hidden, top_k):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n_experts, hidden, hidden) / hidden**0.5)
        self.top_k = top_k

    def forward(self, hidden_states, router_logits):
        x = hidden_states.float()
        vals, ids = router_logits.float().topk(self.top_k, dim=-1)
        per_expert = torch.einsum("th,ehg->teg", x, self.w.float())  # [T, E, H]
        picked = per_expert.gather(1, ids[..., None].expand(-1, -1, x.shape[1]))
        return (vals.softmax(-1)[..., None] * picked).sum(1).to(hidden_states.dtype)


def sglang_tp1():
    return configs.sglang_tp1(DEVICE)


def text_config(moe: bool, ple: bool):
    from transformers import Gemma4TextConfig

    kw = dict(
        hidden_size=H, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, global_head_dim=32, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], vocab_size=128,
        hidden_size_per_layer_input=PLE_DIM if ple else 0, rms_norm_eps=1e-6,
    )
    if moe:
        kw.update(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32)
    return Gemma4TextConfig(**kw)


def build_layer(monkeypatch, moe: bool, ple: bool, dtype=torch.float32, seed=0):
    """A real Gemma4DecoderLayer with random weights (norm weights near 1)."""
    from sglang.srt.layers.layernorm import Gemma4RMSNorm, RMSNorm
    from sglang.srt.models import gemma4_causal

    with monkeypatch.context() as m:
        m.setattr(gemma4_causal, "Gemma4Attention", StubAttention)
        layer = gemma4_causal.Gemma4DecoderLayer(0, text_config(moe, ple), prefix="model.layers.0")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
        for mod in layer.modules():
            if isinstance(mod, (RMSNorm, Gemma4RMSNorm)) and isinstance(mod.weight, torch.nn.Parameter):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
        layer.layer_scalar.fill_(0.7)
        if moe:
            layer.router.scale.copy_(1 + 0.3 * torch.randn(H, generator=g))
            layer.moe.per_expert_scale.copy_(0.5 + torch.rand(8, generator=g))
            layer.moe = StubMoE(8, H, 2)
            pin_router_norm_to_cuda_semantics(layer.router.norm)
    return layer.to(device=DEVICE, dtype=dtype)


def pin_router_norm_to_cuda_semantics(norm):
    """On CUDA, Gemma4RMSNorm(with_scale=False) applies its weight (the router scale that
    Gemma4Router.fuse_scale folds in); its forward_native ignores it. Use the CUDA math on
    CPU too so the unpatched reference is what the server computes."""
    if DEVICE == "cuda":
        return

    def forward(x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()
        return y.to(x.dtype)

    norm._forward_method = forward


def run(layer, x, ple=None):
    with torch.no_grad():
        out, none = layer(positions=None, hidden_states=x.clone(), per_layer_input=ple, forward_batch=None)
    assert none is None
    return out


def ple_slice(dtype, seed=1):
    """The model passes per_layer_inputs[:, layer_idx, :]: a strided [T, PLE_DIM] view."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(T, 2, PLE_DIM, generator=g).to(device=DEVICE, dtype=dtype)
    return full[:, 1, :]


def hidden(dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g).to(device=DEVICE, dtype=dtype)


@pytest.fixture(scope="module")
def tp1():
    with sglang_tp1():
        yield


@pytest.fixture
def kernel_calls(spy):
    from sglang_gemma4.kernels import ple_tail

    calls = []
    for name in ("gemma_rmsnorm_add", "gemma_gelu_tanh_mul", "gemma_rmsnorm_residual_scalar"):
        spy(ple_tail, name, lambda a, _name=name: calls.append(_name))
    return calls


def test_status_active_on_0517_and_knob_off(clean_env):
    st = registry.evaluate(fused_ple.PATCH, {})
    assert st.state == registry.ACTIVE, st
    assert registry.evaluate(fused_ple.PATCH, {"SGLANG_GEMMA4_FUSED_PLE": "0"}).state == registry.DISABLED
    assert registry.evaluate(fused_ple.PATCH, {"SGLANG_GEMMA4_FUSED_PLE": "maybe"}).state == registry.ERROR


def test_forward_fingerprint_matches_installed_sglang():
    _layer_forward.check_forward_unchanged()


@pytest.mark.parametrize("patch", [fused_ple.PATCH, fused_triple_norm.PATCH], ids=lambda p: p.name)
def test_changed_forward_makes_patch_unavailable(monkeypatch, patch):
    monkeypatch.setattr(_layer_forward, "FORWARD_SHA256", "0" * 64)
    st = registry.apply(patch, registry.evaluate(patch, {}), {})
    assert st.state == registry.UNAVAILABLE and "Gemma4DecoderLayer.forward" in st.reason


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_ple_layer_matches_unpatched(tp1, monkeypatch, allow_cpu, kernel_calls, dtype):
    from sglang.srt.models.gemma4_causal import Gemma4DecoderLayer

    layer = build_layer(monkeypatch, moe=False, ple=True, dtype=dtype)
    x, ple = hidden(dtype), ple_slice(dtype)
    ref = run(layer, x, ple)
    original = Gemma4DecoderLayer.forward
    with patch_applied(fused_ple.PATCH, {}) as st:
        assert st.state == registry.ACTIVE
        assert Gemma4DecoderLayer.forward is not original
        out = run(layer, x, ple)
    assert Gemma4DecoderLayer.forward is original
    assert kernel_calls == ["gemma_rmsnorm_add", "gemma_gelu_tanh_mul", "gemma_rmsnorm_residual_scalar"]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # the unfused path rounds to bf16 after every op, the fused one once per kernel
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        assert (out.float() - ref.float()).norm() / ref.float().norm() < 1e-2


@needs_kernels
def test_ineligible_inputs_run_the_original(tp1, monkeypatch, kernel_calls):
    """Outside the gates the original forward runs: bit-identical output, no fused launch."""
    layer = build_layer(monkeypatch, moe=False, ple=True)
    x, ple = hidden(torch.float32), ple_slice(torch.float32)
    ref_none = run(layer, x, None)
    ref = run(layer, x, ple)
    with patch_applied(fused_ple.PATCH, {}):
        if DEVICE == "cpu":  # production gate: CUDA only
            assert torch.equal(run(layer, x, ple), ref)
        monkeypatch.setattr(fused_ple, "_TEST_ALLOW_CPU", True)
        assert torch.equal(run(layer, x, None), ref_none)  # no per-layer input
        assert torch.equal(run(layer, x.t().contiguous().t(), ple), ref)  # non-contiguous rows
        layer.post_per_layer_input_norm.scale_shift = 1.0  # norm variant the kernel lacks
        shifted = run(layer, x, ple)
        layer.post_per_layer_input_norm.scale_shift = 0.0
    assert kernel_calls == []
    assert not torch.equal(shifted, ref)  # the variant really changes the math: original ran it


@needs_kernels
def test_moe_layers_are_left_to_original(tp1, monkeypatch, allow_cpu, kernel_calls):
    layer = build_layer(monkeypatch, moe=True, ple=False)
    x = hidden(torch.float32)
    ref = run(layer, x)
    with patch_applied(fused_ple.PATCH, {}):
        out = run(layer, x)
    assert torch.equal(out, ref) and kernel_calls == []


def test_knob_off_applies_nothing(clean_env):
    from sglang.srt.models.gemma4_causal import Gemma4DecoderLayer

    original = Gemma4DecoderLayer.forward
    with patch_applied(fused_ple.PATCH, {"SGLANG_GEMMA4_FUSED_PLE": "0"}) as st:
        assert st.state == registry.DISABLED
        assert Gemma4DecoderLayer.forward is original


def test_announce_once_is_traceable_by_fullgraph_dynamo(monkeypatch):
    """tc_piecewise prefill compiles the layer forward with fullgraph=True; a
    logger call traced there (first fused call inside capture) is a hard error."""
    import types

    monkeypatch.setattr(_layer_forward, "_ANNOUNCED", set())
    layer = types.SimpleNamespace(layer_id=3)

    def f(x):
        _layer_forward.announce_once("compile probe", layer, x)
        return x + 1

    x = torch.ones(2, 2)
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(x), x + 1)
    assert "compile probe" not in _layer_forward._ANNOUNCED  # announced later, by an eager call
    _layer_forward.announce_once("compile probe", layer, x)
    assert "compile probe" in _layer_forward._ANNOUNCED


@pytest.mark.parametrize("fusions", [("fused_ple",), ("fused_triple_norm",), ("fused_ple", "fused_triple_norm"),
                                     "fused_routing"])
def test_hooks_hand_back_to_sglang_under_torch_compile(fusions, monkeypatch):
    """Inside a torch.compile trace (tc_piecewise) every fused hook runs SGLang's own code,
    even for an eligible layer, and adds no size guard: one graph for all row counts."""
    import dataclasses

    from torch._dynamo.testing import CompileCounter

    from sglang_gemma4.patches import fused_routing

    def original(*args, **kwargs):  # x * 3: no fused path computes that
        return args[2 if len(args) > 3 else 0] * 3  # layer forward: hidden_states; routing: logits

    if fusions == "fused_routing":
        monkeypatch.setattr(fused_routing, "_eligible", lambda *a, **k: True)

        def f(x):
            return fused_routing.fused_routing(original, x, torch.ones(x.shape[1]), 2)
    else:
        hook = _layer_forward.LayerForward()
        for name in fusions:  # every fusion eligible for every layer
            mod = {"fused_ple": fused_ple, "fused_triple_norm": fused_triple_norm}[name]
            hook.add(dataclasses.replace(mod.FUSION, eligible=lambda *a, **k: True))
        layer = torch.nn.Identity()  # never touched: the hook must hand back before reading it

        def f(x):
            return hook(original, layer, torch.zeros(x.shape[0]), x, None, None)

    counter = CompileCounter()
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    try:
        for t in (5, 9, 17):
            x = torch.randn(t, 8)
            torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), x * 3)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1  # traced once, through SGLang's forward
