"""The checkpoint builders produce what SGLang 0.5.17 and transformers accept.

CPU only. Checks: SGLang's ServerArgs/ModelConfig take every tiny variant with
the right head dims / KV heads / hybrid-SWA layout; SGLang's own model classes
load every weight from the safetensors (the only parameters left are the
k_norm weights of KV-shared layers, absent from real checkpoints too); the
MoE variant gets swa_full_tokens_ratio 0.15 from our patch; the agree pair
really implements next = pi(token) in an fp32 transformers forward (target)
and in the assistant's own math; the random variants are informative; the
moe checkpoint's routing is decisive (wide top-k score gap, same expert sets
in bf16); builds are deterministic and cached.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from sglang_gemma4.testing import checkpoints as ck

TINY = ["dense_ple", "moe", "assistant", "agree_target", "agree_assistant", "mm",
        "window_probe", "window_probe_owner", "window_probe_assistant"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def built(root):
    return {v: ck.build(v, root) for v in TINY}


@pytest.fixture(scope="module")
def sglang_cpu():
    from sglang_gemma4.testing.configs import init_sglang_single_process

    init_sglang_single_process("cpu")

def _server_args(path, **kw):
    from sglang.srt.server_args import ServerArgs

    return ServerArgs(model_path=str(path), device="cpu", attention_backend="triton", skip_tokenizer_init=True, **kw)


@pytest.mark.parametrize("variant", ["dense_ple", "moe", "agree_target", "mm"])
def test_sglang_model_config_accepts(built, variant):
    from sglang.srt.configs.model_config import ModelConfig

    kw = ck.ENGINE_KWARGS.get(variant, {})
    sa = _server_args(built[variant], **kw)
    mc = ModelConfig.from_server_args(sa)
    t = ck.spec(variant).text
    assert mc.head_dim == t.full_head_dim and mc.swa_head_dim == t.swa_head_dim
    assert mc.get_num_kv_heads(1) == t.full_kv_heads and mc.get_swa_num_kv_heads(1) == t.swa_kv_heads
    assert mc.is_hybrid_swa
    assert mc.swa_attention_layer_ids == [i for i, x in enumerate(t.layer_types) if x == ck.SLIDING]
    assert mc.full_attention_layer_ids == [i for i, x in enumerate(t.layer_types) if x == ck.FULL]
    assert mc.is_multimodal is False


@pytest.mark.parametrize("variant", TINY)
def test_sglang_loads_every_weight(built, sglang_cpu, variant, monkeypatch):
    from safetensors.torch import load_file
    from sglang.srt.layers.rotary_embedding import base as rope_base
    from sglang.srt.utils.hf_transformers_utils import get_config

    # RotaryEmbedding.__init__ imports vllm's CPU kernel unless SGLang runs its CPU engine
    monkeypatch.setattr(rope_base, "_is_cpu", True)
    cfg = get_config(str(built[variant]), trust_remote_code=False)
    arch = cfg.architectures[0]
    if arch == "Gemma4ForCausalLM":
        from sglang.srt.models.gemma4_causal import Gemma4ForCausalLM as M
    elif arch == "Gemma4AssistantForCausalLM":
        from sglang.srt.models.gemma4_mtp import Gemma4AssistantForCausalLM as M
    else:
        from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration as M
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = M(cfg)
    finally:
        torch.set_default_dtype(prev)
    weights = load_file(str(built[variant] / "model.safetensors"))
    loaded = model.load_weights(list(weights.items()))
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(loaded))
    # real checkpoints have no k_norm on KV-shared layers (nor on assistant layers)
    assert all(n.endswith("self_attn.k_norm.weight") for n in missing), missing
    if "lm_head.weight" in weights:
        head = params.get("lm_head.weight")
        assert head is not None and torch.equal(head.data, weights["lm_head.weight"])


def test_moe_swa_ratio_patch_gives_015(built):
    from sglang_gemma4.patches import swa_ratio
    from sglang_gemma4.testing.hooks import patch_applied

    with patch_applied(swa_ratio.PATCH, {}) as st:
        assert st.state == "active", st
        assert _server_args(built["moe"]).swa_full_tokens_ratio == pytest.approx(0.15)
        assert _server_args(built["dense_ple"]).swa_full_tokens_ratio == pytest.approx(0.8)


def test_assistant_resolves_to_frozen_kv_mtp_and_matches_target_kv(built):
    from sglang.srt.utils.hf_transformers_utils import get_config

    for target, draft in ck.DRAFT_FOR.items():
        t, d = get_config(str(built[target]), False), get_config(str(built[draft]), False)
        dt = d.text_config
        assert d.architectures == ["Gemma4AssistantForCausalLM"]
        assert d.backbone_hidden_size == t.hidden_size
        # the draft attends over the target's KV: per-type geometry must agree
        assert (dt.head_dim, dt.swa_head_dim) == (t.head_dim, t.swa_head_dim)
        assert (dt.num_key_value_heads, dt.swa_num_key_value_heads) == (t.num_key_value_heads, t.swa_num_key_value_heads)
        assert dt.sliding_window == t.sliding_window and dt.vocab_size == t.vocab_size
        assert set(dt.layer_types) <= set(t.layer_types[-2:])
    from sglang.srt.arg_groups.speculative_hook import _resolve_speculative_algorithm_alias as resolve

    assert resolve("NEXTN", str(built["assistant"])) == "FROZEN_KV_MTP"


def test_agree_target_is_pi_in_fp32_transformers(built):
    from safetensors.torch import load_file
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    meta = ck.load_meta(built["agree_target"])
    model = Gemma4ForCausalLM(Gemma4TextConfig(**ck._strip(meta["hf_text_config"]))).float().eval()
    sd = load_file(str(built["agree_target"] / "model.safetensors"))
    res = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not res.missing_keys and not res.unexpected_keys, res
    pi = ck.agree_permutation(ck.spec("agree_target").text.vocab_size, ck.spec("agree_target").agree_seed)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(ck.FIRST_PROMPT_ID, len(pi), (1, 90), generator=g)
    ids[0, 0] = ck.BOS_ID
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    top = logits.topk(2, dim=-1)
    assert top.indices[:, 0].tolist() == [pi[i] for i in ids[0].tolist()]
    assert (top.values[:, 0] - top.values[:, 1]).min().item() > 5.0
    assert ck.agree_continuation(int(ids[0, -1]), 3) == [pi[int(ids[0, -1])], pi[pi[int(ids[0, -1])]], pi[pi[pi[int(ids[0, -1])]]]]


def test_agree_assistant_predicts_pi(built):
    """The assistant's forward on (token, any recurrent state), as SGLang's gemma4_mtp computes it."""
    from safetensors.torch import load_file

    s, t = ck.spec("agree_assistant"), ck.spec("agree_target")
    aw = {k: v.float() for k, v in load_file(str(built["agree_assistant"] / "model.safetensors")).items()}
    tw = load_file(str(built["agree_target"] / "model.safetensors"))
    E = tw["model.embed_tokens.weight"].float()
    Hb, V = t.text.hidden_size, t.text.vocab_size
    prev = torch.randn(V, Hb, generator=torch.Generator().manual_seed(1)) * 5
    z = torch.cat([E * math.sqrt(Hb), prev], dim=-1) @ aw["pre_projection.weight"].t()
    # every branch output is zero: the stack is the identity, then the final norm
    for name, w in aw.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.count_nonzero(w) == 0, name
    h = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * aw["model.norm.weight"]
    logits = h @ aw["model.embed_tokens.weight"].t()
    cap = s.text.final_logit_softcapping
    logits = cap * torch.tanh(logits / cap)
    pi = ck.agree_permutation(V, s.agree_seed)
    top = logits.topk(2, dim=-1)
    assert top.indices[:, 0].tolist() == pi
    assert (top.values[:, 0] - top.values[:, 1]).min().item() > 3.0


def _hf_model(path, dtype=torch.float32):
    """transformers' Gemma4ForCausalLM with the checkpoint's weights."""
    from safetensors.torch import load_file
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    meta = ck.load_meta(path)
    model = Gemma4ForCausalLM(Gemma4TextConfig(**ck._strip(meta["hf_text_config"]))).float().eval()
    sd = load_file(str(path / "model.safetensors"))
    res = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not res.missing_keys and not res.unexpected_keys, res
    return model.to(dtype)


@pytest.mark.parametrize("variant", ["dense_ple", "moe"])
def test_random_variants_are_informative(built, variant):
    """Random variants: context-dependent greedy output, mostly decisive margins (fp32 reference)."""
    from sglang_gemma4.testing.engine import mixed_prompts

    model = _hf_model(built[variant])
    margins, argmax, inputs = [], [], []
    for p in mixed_prompts(4, ck.spec(variant).text.vocab_size, seed=0, max_len=64):
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([p])).logits[0]
        top = lg.topk(2, dim=-1)
        margins += (top.values[:, 0] - top.values[:, 1]).tolist()
        argmax += top.indices[:, 0].tolist()
        inputs += p
    repeat = sum(a == b for a, b in zip(argmax, inputs)) / len(inputs)
    assert repeat < 0.2, f"model mostly repeats its input ({repeat:.0%})"
    assert len(set(argmax)) > len(argmax) // 8
    near_ties = sum(m < 0.25 for m in margins) / len(margins)
    assert near_ties < 0.15, near_ties


def _router_tap(model):
    """Per forward: {layer: (router input, transformers' top-k ids)}."""
    seen = {}
    for name, mod in model.named_modules():
        if name.endswith(".router"):
            layer = int(name.split(".")[-2])
            mod.register_forward_hook(lambda m, inp, out, layer=layer: seen.__setitem__(layer, (inp[0].float(), out[2])))
    return seen


def test_moe_routing_is_decisive(built):
    """The moe checkpoint's top-k expert set has a wide score margin on real hidden states.

    fp32 transformers forward over the suite's prompt mix; router scores
    recomputed here from the safetensors weights (Gemma-4 router math:
    weightless RMSNorm, * scale * H**-0.5, proj). The k-th vs (k+1)-th score
    gap must be far above bf16 resolution (ulp of the largest score), a bf16
    forward must pick the same sets everywhere, and the routing must still
    use several experts per token and different experts across tokens.
    """
    from safetensors.torch import load_file

    from sglang_gemma4.testing.engine import mixed_prompts

    t = ck.spec("moe").text
    E, k, H = t.num_experts, t.top_k_experts, t.hidden_size
    w = {n: v.float() for n, v in load_file(str(built["moe"] / "model.safetensors")).items() if ".router." in n}
    m32, m16 = _hf_model(built["moe"]), _hf_model(built["moe"], torch.bfloat16)
    tap32, tap16 = _router_tap(m32), _router_tap(m16)
    gaps, ulps, top1_share, usage, sets, flips = [], [], [], torch.zeros(t.num_layers, E), set(), 0
    for p in mixed_prompts(6, t.vocab_size, seed=1, max_len=96):
        with torch.no_grad():
            m32(input_ids=torch.tensor([p]))
            m16(input_ids=torch.tensor([p]))
        for layer, (x, ids32) in tap32.items():
            pre = f"model.layers.{layer}.router."
            xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w[pre + "scale"] * H**-0.5
            scores = xn @ w[pre + "proj.weight"].t()
            top = scores.topk(k + 1, dim=-1)
            assert torch.equal(top.indices[:, :k].sort(-1).values, ids32.sort(-1).values), layer
            gaps.append(top.values[:, k - 1] - top.values[:, k])
            # bf16 spacing at the largest |score| of the token
            ulps.append(2.0 ** (torch.floor(torch.log2(scores.abs().max(-1).values)) - 7))
            soft = top.values[:, :k].softmax(-1)
            top1_share.append(soft[:, 0])
            usage[layer] += torch.bincount(ids32.flatten(), minlength=E)
            sets.update(tuple(r) for r in ids32.sort(-1).values.tolist())
            flips += int((tap16[layer][1].sort(-1).values != ids32.sort(-1).values).any(-1).sum())
    gaps, ulps, top1_share = torch.cat(gaps), torch.cat(ulps), torch.cat(top1_share)
    assert gaps.median() >= 32 * ulps.median(), (gaps.median(), ulps.median())
    assert (gaps / ulps).min() >= 16, (gaps / ulps).min()
    assert flips == 0, f"bf16 picks another expert set at {flips} (layer, token) decisions"
    # informative routing: every expert serves tokens in every layer, many distinct sets,
    # and the top-k weights are spread (not one expert with weight ~1)
    assert (usage > 0).all(), usage
    assert len(sets) > 50, len(sets)
    assert top1_share.median() < 0.6 and top1_share.max() < 0.95, (top1_share.median(), top1_share.max())


def test_build_is_deterministic_and_cached(root, built, tmp_path):
    p1 = built["moe"]
    p2 = ck.build("moe", tmp_path)
    assert p1.name == p2.name
    h = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()
    assert h(p1) == h(p2)
    mtime = (p1 / "model.safetensors").stat().st_mtime_ns
    assert ck.build("moe", root) == p1 and (p1 / "model.safetensors").stat().st_mtime_ns == mtime


def test_real_width_variant_shapes():
    shapes = ck.tensor_shapes(ck.spec("moe26b_w"))
    assert shapes["model.layers.0.experts.gate_up_proj"][0] == (128, 2 * 704, 2816)
    assert shapes["model.layers.0.mlp.down_proj.weight"][0] == (2816, 2112)
    assert shapes["model.embed_tokens.weight"][0] == (262144, 2816)
    e2b = ck.tensor_shapes(ck.spec("e2b_w"))
    assert e2b["model.embed_tokens_per_layer.weight"][0] == (262144, 8 * 256)
    # double-wide MLP on the KV-shared layers (E2B)
    assert e2b["model.layers.7.mlp.gate_proj.weight"][0] == (2 * 6144, 1536)
    assert e2b["model.layers.0.self_attn.k_proj.weight"][0] == (256, 1536)
    assert e2b["model.layers.4.self_attn.k_proj.weight"][0] == (512, 1536)


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown checkpoint variant 'e9b'.*dense_ple"):
        ck.build("e9b")
