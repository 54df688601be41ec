"""The checkpoint variants (:data:`VARIANTS`) and what runs them.

Variants:
  dense_ple         E2B-like: PLE, KV-shared layers, double-wide MLP, 3:1 SWA
  moe               26B-A4B-like: 16 experts top-4 + dense MLP, k_eq_v, 5:1 SWA;
                    "routed" init: each token's expert set is decided with a
                    score gap >= 2 (bf16 never changes it, see ckpt_routed)
  assistant         Gemma4AssistantForCausalLM draft for dense_ple (centroid head)
  agree_target      dense_ple shape, next token = pi(token) with a clear margin (ckpt_agree)
  agree_assistant   draft for agree_target predicting the same pi
  window_probe, window_probe_owner, window_probe_assistant
                    issue #10: next token = g(token sliding_window - 1 back), copied
                    through a sliding layer's KV (ckpt_window_probe)
  mm                Gemma4ForConditionalGeneration: dense_ple's text stack, a small
                    vision tower, tokenizer + processor files (serves images, ckpt_mm)
  e2b_w, e4b_w, moe26b_w   real widths/vocab, reduced depth (benchmarks); moe26b_w8: moe26b_w's layers x2;
                    e2b_w_yoco, e4b_w_yoco: 7 layers at the real KV-shared ratio (bench/yoco.py)

Margins (near-tie logits): random tiny models have top-1/top-2 logit gaps that
bf16 noise can flip, so "identical greedy tokens" is only meaningful where
the reference's top-1 margin is clear. Two measures. (1) ``dense_ple``,
``moe`` and ``mm`` use an untied head whose row norms are log-normal (sigma
1): a tied random Gemma-4 only repeats its input token (the sqrt(H)-scaled
embedding dominates the residual: uninformative), Gaussian rows give a near-tie
(< 0.25 logit) at ~15 % of greedy steps, heavy-tailed rows at ~4 % (measured
in fp32 with transformers on 8 prompts x 24 tokens: 64 % of tokens before
the first near-tie, 32 distinct outputs, 2 % repeats). (2)
:func:`sglang_gemma4.testing.engine.compare_greedy` compares token-by-token
only up to the first position where the reference margin (from a second
logprob pass, ``margins=True``) is below a threshold, and reports how many
tokens were compared strictly. The ``agree_*`` pair is built so every
position has a margin of ~10 logits: there token equality is exact.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Optional

from sglang_gemma4.testing.ckpt_specs import FULL, SLIDING, CheckpointSpec, TextSpec, VisionSpec

# Random test models get an untied head with log-normal row norms: with the tied
# Gemma head a random model just repeats its input token (the scaled input
# embedding dominates the residual), and with Gaussian rows most greedy steps
# are near-ties; heavy-tailed rows give context-dependent output whose top-1
# margin is decisive at most steps (see the module docstring).
_DENSE_PLE = TextSpec(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    # E2B is 4:1 sliding:full with 20 of 35 layers KV-shared; here 3:1, 4 of 8
    layer_types=(SLIDING, SLIDING, SLIDING, FULL) * 2,
    num_attention_heads=4,
    swa_head_dim=32,
    full_head_dim=64,
    swa_kv_heads=1,
    full_kv_heads=1,
    sliding_window=32,
    ple_dim=16,
    num_kv_shared_layers=4,
    use_double_wide_mlp=True,
    tie_word_embeddings=False,
    head_row_sigma=1.0,
)

_MOE = TextSpec(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=96,
    layer_types=(SLIDING,) * 5 + (FULL,),
    num_attention_heads=4,
    swa_head_dim=32,
    full_head_dim=64,
    swa_kv_heads=2,
    full_kv_heads=1,
    sliding_window=32,
    attention_k_eq_v=True,
    num_experts=16,
    top_k_experts=4,
    moe_intermediate_size=32,
    tie_word_embeddings=False,
    head_row_sigma=1.0,
)

# The issue-#10 shape: 6 layers, window 16, last two layers KV-shared, PLE.
_WINDOW_PROBE = TextSpec(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=64,
    layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL),
    num_attention_heads=2,
    swa_head_dim=32,
    full_head_dim=64,
    swa_kv_heads=1,
    full_kv_heads=1,
    sliding_window=16,
    ple_dim=16,
    num_kv_shared_layers=2,
    use_double_wide_mlp=True,
    tie_word_embeddings=False,
)


def _assistant_text(target: TextSpec, hidden: int, inter: int, heads: int, layer_types) -> TextSpec:
    # The assistant reads the target's KV: head dims, kv heads and window must
    # match the target layers it is bound to.
    return TextSpec(
        vocab_size=target.vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        layer_types=tuple(layer_types),
        num_attention_heads=heads,
        swa_head_dim=target.swa_head_dim,
        full_head_dim=target.full_head_dim,
        swa_kv_heads=target.swa_kv_heads,
        full_kv_heads=target.full_kv_heads,
        attention_k_eq_v=target.attention_k_eq_v,
        sliding_window=target.sliding_window,
        ple_dim=0,
        num_kv_shared_layers=len(layer_types),
        final_logit_softcapping=target.final_logit_softcapping,
        max_position_embeddings=target.max_position_embeddings,
    )


def _variants() -> Dict[str, CheckpointSpec]:
    v: Dict[str, CheckpointSpec] = {}
    v["dense_ple"] = CheckpointSpec("dense_ple", "causal", _DENSE_PLE, seed=1)
    v["moe"] = CheckpointSpec("moe", "causal", _MOE, init="routed", seed=2)
    v["assistant"] = CheckpointSpec(
        "assistant",
        "assistant",
        _assistant_text(_DENSE_PLE, 64, 128, 4, (SLIDING, SLIDING, SLIDING, FULL)),
        seed=3,
        backbone_hidden_size=_DENSE_PLE.hidden_size,
        use_ordered_embeddings=True,  # E2B/E4B assistants use the centroid head
        num_centroids=64,
        centroid_intermediate_top_k=8,
    )
    agree_t = dataclasses.replace(_DENSE_PLE, head_row_sigma=0.0)
    v["agree_target"] = CheckpointSpec("agree_target", "causal", agree_t, init="agree", seed=4, agree_seed=7)
    v["agree_assistant"] = CheckpointSpec(
        "agree_assistant",
        "assistant",
        _assistant_text(agree_t, 64, 128, 4, (SLIDING, FULL)),
        init="agree",
        seed=5,
        backbone_hidden_size=agree_t.hidden_size,
        agree_seed=7,
    )
    # Window probes (issue #10): next token = g(token sliding_window - 1 back),
    # copied through a sliding layer's KV; decisive where a window is one key short.
    probe_t = _WINDOW_PROBE
    v["window_probe"] = CheckpointSpec(
        "window_probe", "causal", probe_t, init="window_copy", seed=21, probe_layer=4  # KV-shared sliding layer
    )
    v["window_probe_owner"] = CheckpointSpec(
        "window_probe_owner", "causal", probe_t, init="window_copy", seed=21, probe_layer=3  # its KV owner
    )
    v["window_probe_assistant"] = CheckpointSpec(
        "window_probe_assistant",
        "assistant",
        _assistant_text(probe_t, 64, 128, 4, (SLIDING, FULL)),
        init="window_copy",
        seed=22,
        backbone_hidden_size=probe_t.hidden_size,
        probe_offset=probe_t.sliding_window - 2,
    )
    # dense_ple's untied heavy-tailed head: with a tied head the output would only
    # repeat the last prompt token, whatever the images hold (see module doc)
    mm_text = _DENSE_PLE
    v["mm"] = CheckpointSpec(
        "mm",
        "mm",
        mm_text,
        seed=6,
        vision=VisionSpec(),
        mm_token_ids=(
            ("image_token_id", 2040),
            ("boi_token_id", 2041),
            ("eoi_token_id", 2042),
            ("video_token_id", 2043),
            ("audio_token_id", 2044),
            ("boa_token_id", 2045),
            ("eoa_token_index", 2046),
        ),
    )
    # Real widths and vocab, reduced depth: per-layer and lm-head costs are
    # realistic, total cost is not (benchmark A/B only).
    v["e2b_w"] = CheckpointSpec(
        "e2b_w",
        "causal",
        TextSpec(
            vocab_size=262144,
            hidden_size=1536,
            intermediate_size=6144,
            layer_types=(SLIDING, SLIDING, SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL),
            num_attention_heads=8,
            swa_head_dim=256,
            full_head_dim=512,
            swa_kv_heads=1,
            full_kv_heads=1,
            sliding_window=512,
            ple_dim=256,
            num_kv_shared_layers=3,
            use_double_wide_mlp=True,
            max_position_embeddings=131072,
        ),
        seed=11,
    )
    v["e4b_w"] = CheckpointSpec(
        "e4b_w",
        "causal",
        TextSpec(
            vocab_size=262144,
            hidden_size=2560,
            intermediate_size=10240,
            layer_types=(SLIDING,) * 5 + (FULL,) + (SLIDING, FULL),
            num_attention_heads=8,
            swa_head_dim=256,
            full_head_dim=512,
            swa_kv_heads=2,
            full_kv_heads=2,
            sliding_window=512,
            ple_dim=256,
            num_kv_shared_layers=2,
            max_position_embeddings=131072,
        ),
        seed=12,
    )
    v["moe26b_w"] = CheckpointSpec(
        "moe26b_w",
        "causal",
        TextSpec(
            vocab_size=262144,
            hidden_size=2816,
            intermediate_size=2112,
            layer_types=(SLIDING, SLIDING, SLIDING, FULL),
            num_attention_heads=16,
            swa_head_dim=256,
            full_head_dim=512,
            swa_kv_heads=8,
            full_kv_heads=2,
            sliding_window=1024,
            attention_k_eq_v=True,
            num_experts=128,
            top_k_experts=8,
            moe_intermediate_size=704,
            max_position_embeddings=262144,
        ),
        seed=13,
    )
    # Same layers twice over: bench/e2e.py takes the per-layer decode time as the step difference
    # of the two depths (lm_head, sampling and launch overhead cancel) and projects real depth.
    _derive(v, "moe26b_w", "moe26b_w8", seed=14, layer_types=v["moe26b_w"].text.layer_types * 2)
    # bench/yoco.py: 7 layers with the real models' KV-shared ratio (E2B 20/35, E4B 18/42).
    _derive(v, "e2b_w", "e2b_w_yoco", layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, SLIDING, FULL),
            num_kv_shared_layers=4)
    _derive(v, "e4b_w", "e4b_w_yoco", layer_types=(SLIDING, SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL),
            num_kv_shared_layers=3)
    return v


def _derive(v: Dict[str, CheckpointSpec], base: str, name: str, seed: Optional[int] = None, **text) -> None:
    """v[name] = v[base] with some TextSpec fields changed (a new spec, hence a new cache key)."""
    b = v[base]
    v[name] = dataclasses.replace(b, name=name, text=dataclasses.replace(b.text, **text),
                                  seed=b.seed if seed is None else seed)


VARIANTS: Dict[str, CheckpointSpec] = _variants()

# The draft that goes with each target for FROZEN_KV_MTP.
DRAFT_FOR = {
    "dense_ple": "assistant",
    "agree_target": "agree_assistant",
    "window_probe": "window_probe_assistant",
    "window_probe_owner": "window_probe_assistant",
}

# Engine kwargs a variant needs beyond the harness defaults.
ENGINE_KWARGS: Dict[str, Dict[str, Any]] = {
    # text-only runs of the mm wrapper (token-id prompts, no image processing)
    "mm": {"enable_multimodal": False},
}

# Engine kwargs for serving images (tokenizer/processor files in the checkpoint).
IMAGE_ENGINE_KWARGS: Dict[str, Dict[str, Any]] = {
    "mm": {"enable_multimodal": True},
}

BIG_VARIANTS = ("e2b_w", "e4b_w", "moe26b_w", "moe26b_w8", "e2b_w_yoco", "e4b_w_yoco")


def spec(variant: str) -> CheckpointSpec:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown checkpoint variant {variant!r}; known: {', '.join(VARIANTS)}") from None


def default_root() -> Path:
    env = os.environ.get("SGLANG_GEMMA4_CKPT_ROOT")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "sglang-gemma4" / "ckpt"
