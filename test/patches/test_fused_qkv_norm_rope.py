"""fused_qkv_norm_rope: a real SGLang Gemma4Attention (sliding, full/proportional-RoPE and KV-shared
layers) with the patch on vs off. Only its RadixAttention is a stand-in (it needs a ForwardBatch and a
KV pool): it records the q/k/v it is given, so both the tensors attention sees and the layer output
are compared with SGLang's own forward."""

import pytest
import torch

from test_fused_ple import DEVICE, needs_kernels, tp1  # noqa: F401  (fixture tp1 is used by name)

from sglang_gemma4 import registry
from sglang_gemma4.patches import fused_qkv_norm_rope as fqr
from sglang_gemma4.testing.hooks import patch_applied

ON = {"SGLANG_GEMMA4_FUSED_QKV_NORM_ROPE": "1"}
T = 6


class RecordingAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, q, k, v, forward_batch=None, save_kv_cache=True):
        self.seen.append((q.clone(), None if k is None else k.clone(), None if v is None else v.clone(), save_kv_cache))
        out = q.float().tanh()  # any fixed function of what attention receives
        if k is not None:
            out = out + k.float().mean((1, 2), keepdim=True) + v.float().pow(2).mean((1, 2), keepdim=True)
        return out.to(q.dtype)


def config(shared: int = 0):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, sliding_window=16, vocab_size=128, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=shared,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                            "partial_rotary_factor": 0.25}},
    )


def build(layer_id: int, dtype, shared: int = 0, seed: int = 0):
    import pytest as _pytest
    from sglang.srt.layers.rotary_embedding import base as rope_base
    from sglang.srt.models import gemma4_causal

    cfg = config(shared)
    head_dim = cfg.global_head_dim if cfg.layer_types[layer_id] == "full_attention" else cfg.head_dim
    with _pytest.MonkeyPatch.context() as m:
        if DEVICE == "cpu":  # SGLang's CPU RoPE (native math); its non-CPU fallback would import vllm
            m.setattr(rope_base, "_is_cpu", True)
        attn = gemma4_causal.Gemma4Attention(layer_id, cfg, head_dim, 256, prefix=f"model.layers.{layer_id}.self_attn")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    attn.attn = RecordingAttention()
    return attn.to(device=DEVICE, dtype=dtype)


def run(attn, x, pos):
    with torch.no_grad():
        return attn(positions=pos, hidden_states=x.clone(), forward_batch=None)


def inputs(dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, 64, generator=g).to(DEVICE, dtype), torch.randint(0, 200, (T,), generator=g).to(DEVICE))


@pytest.fixture
def kernel_calls(spy):
    from sglang_gemma4.kernels import qkv_norm_rope

    calls = []
    spy(qkv_norm_rope, "gemma_qkv_norm_rope_", lambda a: calls.append(a[5:7]))
    return calls


def test_status_default_off_and_fingerprint(clean_env):
    assert registry.evaluate(fqr.PATCH, {}).state == registry.DISABLED
    assert registry.evaluate(fqr.PATCH, ON).state == registry.ACTIVE


def test_changed_forward_makes_patch_unavailable(monkeypatch):
    monkeypatch.setattr(fqr, "FORWARD_SHA256", "0" * 64)
    st = registry.apply(fqr.PATCH, registry.evaluate(fqr.PATCH, ON), ON)
    assert st.state == registry.UNAVAILABLE and "Gemma4Attention.forward" in st.reason


def _compare(ref_attn, attn, dtype):
    (rq, rk, rv, rs), = ref_attn.attn.seen
    (q, k, v, s), = attn.attn.seen
    assert s == rs and (k is None) == (rk is None) and q.shape == rq.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in ((q, rq), (k, rk), (v, rv)):
        if b is not None:
            assert a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), **tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer_id,shared", [(0, 0), (1, 0), (2, 2), (3, 2)])
def test_attention_matches_unpatched(tp1, allow_cpu, kernel_calls, dtype, layer_id, shared):
    """sliding (default RoPE), full (proportional, 25 % rotated, head 32) and their KV-shared twins."""
    ref_attn, attn = build(layer_id, dtype, shared), build(layer_id, dtype, shared)
    x, pos = inputs(dtype)
    ref = run(ref_attn, x, pos)
    with patch_applied(fqr.PATCH, ON) as st:
        assert st.state == registry.ACTIVE
        out = run(attn, x, pos)
    is_shared = attn.is_kv_shared_layer
    assert is_shared == (shared > 0)
    assert kernel_calls == [(attn.num_heads, 0 if is_shared else attn.num_kv_heads)]
    _compare(ref_attn, attn, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


@needs_kernels
def test_ineligible_calls_run_sglang(tp1, monkeypatch, allow_cpu, kernel_calls):
    attn = build(0, torch.float32)
    x, pos = inputs(torch.float32)
    with patch_applied(fqr.PATCH, ON):
        assert not fqr.eligible(attn, None, x)  # no positions
        assert not fqr.eligible(attn, pos[:3], x)  # length mismatch
        assert not fqr.eligible(attn, pos.float(), x)
        attn.k_norm.eps = 1e-3  # one eps for the kernel: norms that disagree are not fused
        assert not fqr.eligible(attn, pos, x)
        attn.k_norm.eps = attn.q_norm.eps
        monkeypatch.setattr(attn.rotary_emb, "is_neox_style", False)
        assert not fqr.eligible(attn, pos, x)
        ref_attn = build(0, torch.float32)
        monkeypatch.setattr(ref_attn.rotary_emb, "is_neox_style", False)
        out = run(attn, x, pos)  # GPT-J style: SGLang's forward, unchanged
    assert kernel_calls == []
    assert torch.equal(out, run(ref_attn, x, pos))


@needs_kernels
def test_production_gate_is_cuda(tp1, kernel_calls):
    """Without the test switch, a CPU tensor is never fused (the kernel targets GPUs)."""
    attn = build(0, torch.float32)
    x, pos = inputs(torch.float32)
    with patch_applied(fqr.PATCH, ON):
        if DEVICE == "cpu":
            assert not fqr.eligible(attn, pos, x)
            run(attn, x, pos)
            assert kernel_calls == []
