"""Deterministic random-weight Gemma-4 checkpoints, built locally (no downloads).

The GPU tests and benchmarks need Gemma-4 checkpoints that exercise the code
paths our patches touch (PLE, KV-shared layers, sliding+full layers with
different head dims, MoE routing, the FROZEN_KV_MTP assistant, the multimodal
wrapper) without a hub. ``build(variant)`` writes ``config.json`` +
``model.safetensors`` (+ ``generation_config.json``) under a cache directory
keyed by a hash of the variant's full spec, so a changed spec never reuses a
stale checkpoint. SGLang runs them with ``skip_tokenizer_init=True``: no
tokenizer files are needed, except for the ``mm`` variant's images (below).

Images (``mm``): SGLang 0.5.17 builds image items only through the Hugging
Face processor loaded from the model path (``AutoProcessor``), even with
``skip_tokenizer_init=True``: it decodes the request's ``input_ids`` with the
processor's tokenizer, runs the processor on that text and the images (pixel
patches, position ids, soft-token counts) and keeps the request's own ids,
expanding each image token to the image's soft-token count
(``SGLANG_MM_AVOID_RETOKENIZE``, on by default). So the ``mm`` directory also
holds a tiny tokenizer (a word-level vocabulary ``t<id>`` over the
checkpoint's 2048 ids plus Gemma-4's special tokens at their config ids,
decode/encode an identity on ids) and transformers' Gemma-4 processor
configuration with ``max_soft_tokens=70`` (every image padded to 630
patches of 16 px, at most 70 soft tokens). :func:`image_prompt` writes a
request the way Gemma-4 lays one out. ``ENGINE_KWARGS["mm"]`` keeps the
text-only setting (``enable_multimodal=False``); :data:`IMAGE_ENGINE_KWARGS`
serves images.

Naming and shapes come from transformers' own Gemma-4 classes instantiated on
the ``meta`` device, so the safetensors keys are exactly the Hugging Face
checkpoint keys SGLang 0.5.17's ``load_weights`` is written for.

Config conventions (the pitfall): Hugging Face's Gemma-4 text config calls the
*sliding* head dim ``head_dim`` and the full one ``global_head_dim``; SGLang
wants the opposite (``head_dim`` = full, ``swa_head_dim`` = sliding) and only
converts for model types ``gemma4``/``gemma4_assistant``. Text-only
checkpoints here are ``gemma4_text`` / ``Gemma4ForCausalLM`` and their
``config.json`` is written in SGLang's convention with ``swa_head_dim``,
``swa_v_head_dim``, ``swa_num_key_value_heads`` and ``v_head_dim`` explicit.
The wrapper types (``mm``, ``assistant``) are written in Hugging Face's
convention and SGLang converts them.

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

Variants (see :data:`VARIANTS`):
  dense_ple         E2B-like: PLE, KV-shared layers, double-wide MLP, 3:1 SWA
  moe               26B-A4B-like: 16 experts top-4 + dense MLP, k_eq_v, 5:1 SWA;
                    "routed" init: each token's expert set is decided with a
                    score gap >= 2 (bf16 never changes it, see _make_routed)
  assistant         Gemma4AssistantForCausalLM draft for dense_ple (centroid head)
  agree_target      dense_ple shape, next token = pi(token) with a clear margin
  agree_assistant   draft for agree_target predicting the same pi
  mm                Gemma4ForConditionalGeneration: dense_ple's text stack, a small
                    vision tower, tokenizer + processor files (serves images)
  e2b_w, e4b_w, moe26b_w   real widths/vocab, reduced depth (benchmarks); moe26b_w8: moe26b_w's layers x2;
                    e2b_w_yoco, e4b_w_yoco: 7 layers at the real KV-shared ratio (bench/yoco.py)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

SLIDING = "sliding_attention"
FULL = "full_attention"

# Bump when the weight generator changes in a way the spec does not capture.
GENERATOR_VERSION = 1

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
FIRST_PROMPT_ID = 8  # prompts draw from [FIRST_PROMPT_ID, vocab): no specials

# Logit scale of the agree construction: target logit of pi(token) before the
# 30-softcap; other tokens get alpha * cos(random pair) (|cos| <~ 0.45).
AGREE_ALPHA = 20.0
# Std of random logits for the random variants (softcap 30 stays ~linear).
RANDOM_LOGIT_STD = 3.0
# "routed" MoE init (see _make_routed): code value scale in the unscaled
# embedding, router gain on the code coordinates, std of the router's
# context-dependent score term.
ROUTER_CODE = 0.4
ROUTER_GAIN = 32.0
ROUTER_CONTEXT = 0.3


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """A Gemma-4 text stack, in explicit (unambiguous) terms."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    layer_types: Tuple[str, ...] = (SLIDING, SLIDING, SLIDING, FULL) * 2
    num_attention_heads: int = 4
    swa_head_dim: int = 32
    full_head_dim: int = 64
    swa_kv_heads: int = 1
    full_kv_heads: int = 1
    sliding_window: int = 32
    ple_dim: int = 0
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    attention_k_eq_v: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    final_logit_softcapping: Optional[float] = 30.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    # untied random heads only: log-normal spread of lm_head row norms (see module doc)
    head_row_sigma: float = 0.0

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def validate(self) -> None:
        if self.layer_types[-1] != FULL:
            raise ValueError("Gemma-4: the last layer must be full_attention")
        if not self.attention_k_eq_v and self.full_kv_heads != self.swa_kv_heads:
            # transformers uses num_global_key_value_heads only with k_eq_v
            raise ValueError("full_kv_heads != swa_kv_heads needs attention_k_eq_v=True")
        first_shared = self.num_layers - self.num_kv_shared_layers
        if 0 < self.num_kv_shared_layers < self.num_layers and not set(self.layer_types[first_shared:]) <= set(
            self.layer_types[:first_shared]
        ):
            raise ValueError("every KV-shared layer type needs an earlier owner layer")
        if self.num_experts and not (0 < self.top_k_experts <= self.num_experts):
            raise ValueError("top_k_experts must be in 1..num_experts")

    def hf_dict(self) -> Dict[str, Any]:
        """Hugging Face convention (head_dim = sliding, global_head_dim = full)."""
        d = dict(
            model_type="gemma4_text",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.swa_kv_heads,
            num_global_key_value_heads=self.full_kv_heads,
            head_dim=self.swa_head_dim,
            global_head_dim=self.full_head_dim,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=1e-6,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            bos_token_id=BOS_ID,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=False,
            sliding_window=self.sliding_window,
            layer_types=list(self.layer_types),
            final_logit_softcapping=self.final_logit_softcapping,
            vocab_size_per_layer_input=self.vocab_size if self.ple_dim else 0,
            hidden_size_per_layer_input=self.ple_dim,
            attention_k_eq_v=self.attention_k_eq_v,
            num_kv_shared_layers=self.num_kv_shared_layers,
            enable_moe_block=self.num_experts > 0,
            use_double_wide_mlp=self.use_double_wide_mlp,
            num_experts=self.num_experts or None,
            top_k_experts=self.top_k_experts or None,
            moe_intermediate_size=self.moe_intermediate_size or None,
            rope_parameters={
                SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
            },
        )
        return d

    def sglang_text_dict(self) -> Dict[str, Any]:
        """``gemma4_text`` config.json in SGLang 0.5.17's convention.

        SGLang reads ``head_dim``/``num_key_value_heads`` as the *full*-attention
        values and ``swa_*`` for sliding layers, and derives the ``swa_*``
        fields only for ``gemma4``/``gemma4_assistant`` model types.
        """
        d = self.hf_dict()
        d.update(
            head_dim=self.full_head_dim,
            num_key_value_heads=self.full_kv_heads,
            v_head_dim=self.full_head_dim,
            swa_head_dim=self.swa_head_dim,
            swa_v_head_dim=self.swa_head_dim,
            swa_num_key_value_heads=self.swa_kv_heads,
        )
        return d


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 2
    head_dim: int = 16
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 1024
    # image processor: soft tokens per image (one of transformers' 70/140/280/560/1120);
    # every image is padded to max_soft_tokens * pooling_kernel_size**2 patches
    max_soft_tokens: int = 70
    # bump when the tokenizer/processor files written next to the weights change
    processor_files_version: int = 1

    def hf_dict(self) -> Dict[str, Any]:
        return dict(
            model_type="gemma4_vision",
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            head_dim=self.head_dim,
            patch_size=self.patch_size,
            pooling_kernel_size=self.pooling_kernel_size,
            position_embedding_size=self.position_embedding_size,
        )


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """Everything that determines a checkpoint's bytes (hashed for the cache key)."""

    name: str
    arch: str  # "causal" | "mm" | "assistant"
    text: TextSpec
    init: str = "random"  # "random" | "agree" | "routed" (random + decisive MoE routing)
    seed: int = 0
    dtype: str = "bfloat16"
    vision: Optional[VisionSpec] = None
    # assistant only
    backbone_hidden_size: int = 0
    use_ordered_embeddings: bool = False
    num_centroids: int = 0
    centroid_intermediate_top_k: int = 0
    # mm only: special token ids inside the (small) vocab
    mm_token_ids: Tuple[Tuple[str, int], ...] = ()
    # the agree map pi is drawn from this seed (shared by the agree pair)
    agree_seed: int = 0
    # window_copy only: the layer holding the copy head (target), or the key
    # offset its matched filter looks for (assistant); see _make_window_copy
    probe_layer: int = -1
    probe_offset: int = 0

    def key(self) -> str:
        blob = json.dumps(
            {"spec": dataclasses.asdict(self), "generator": GENERATOR_VERSION}, sort_keys=True
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Config writing
# --------------------------------------------------------------------------


def config_dict(s: CheckpointSpec) -> Dict[str, Any]:
    """The ``config.json`` SGLang reads for ``s``."""
    s.text.validate()
    if s.arch == "causal":
        d = s.text.sglang_text_dict()
        d["architectures"] = ["Gemma4ForCausalLM"]
    elif s.arch == "assistant":
        text = s.text.hf_dict()
        text["vocab_size_per_layer_input"] = 0
        d = dict(
            model_type="gemma4_assistant",
            architectures=["Gemma4AssistantForCausalLM"],
            text_config=text,
            backbone_hidden_size=s.backbone_hidden_size,
            use_ordered_embeddings=s.use_ordered_embeddings,
            num_centroids=s.num_centroids or 2048,
            centroid_intermediate_top_k=s.centroid_intermediate_top_k or 32,
            tie_word_embeddings=True,
        )
    elif s.arch == "mm":
        if s.vision is None:
            raise ValueError(f"{s.name}: mm checkpoint needs a vision spec")
        d = dict(
            model_type="gemma4",
            architectures=["Gemma4ForConditionalGeneration"],
            text_config=s.text.hf_dict(),
            vision_config=s.vision.hf_dict(),
            audio_config=None,
            tie_word_embeddings=s.text.tie_word_embeddings,
            **dict(s.mm_token_ids),
        )
    else:
        raise ValueError(f"{s.name}: unknown arch {s.arch!r}")
    d["torch_dtype"] = s.dtype
    d["transformers_version"] = "5.12.1"
    return d


def _hf_model_meta(s: CheckpointSpec):
    """transformers' model for ``s`` on the meta device (names + shapes only)."""
    import torch

    if s.arch == "causal":
        from transformers import Gemma4ForCausalLM, Gemma4TextConfig

        cfg = Gemma4TextConfig(**_strip(s.text.hf_dict()))
        cls = Gemma4ForCausalLM
    elif s.arch == "assistant":
        from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

        d = config_dict(s)
        cfg = Gemma4AssistantConfig(**_strip(d))
        cls = Gemma4AssistantForCausalLM
    else:
        from transformers import Gemma4Config, Gemma4ForConditionalGeneration

        cfg = Gemma4Config(**_strip(config_dict(s)))
        cls = Gemma4ForConditionalGeneration
    with torch.device("meta"):
        model = cls(cfg)
    return model, cfg


def _strip(d: Dict[str, Any]) -> Dict[str, Any]:
    d = copy.deepcopy(d)
    for k in ("model_type", "architectures", "torch_dtype", "transformers_version"):
        d.pop(k, None)
    if isinstance(d.get("text_config"), dict):
        d["text_config"] = _strip(d["text_config"])
    if isinstance(d.get("vision_config"), dict):
        d["vision_config"] = _strip(d["vision_config"])
    return d


def tensor_shapes(s: CheckpointSpec) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Checkpoint key -> (shape, "float"|"int64"), as transformers names them.

    Tied ``lm_head.weight`` is dropped (real Gemma-4 checkpoints omit it).
    """
    import torch

    model, _ = _hf_model_meta(s)
    tied = getattr(model.config, "tie_word_embeddings", True)
    if s.arch == "causal":
        tied = s.text.tie_word_embeddings
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        kind = "int64" if t.dtype in (torch.int64, torch.long) else "float"
        out[name] = (tuple(t.shape), kind)
    return out


# --------------------------------------------------------------------------
# Weight generation
# --------------------------------------------------------------------------


def agree_permutation(vocab_size: int, agree_seed: int) -> List[int]:
    """pi: the next-token map the agree pair implements (a fixed-point-free-ish permutation)."""
    import torch

    g = torch.Generator().manual_seed(10_000 + agree_seed)
    return torch.randperm(vocab_size, generator=g).tolist()


def agree_continuation(token: int, n: int, variant: str = "agree_target") -> List[int]:
    """The greedy continuation of a prompt ending in ``token`` under the agree pair."""
    s = spec(variant)
    pi = agree_permutation(s.text.vocab_size, s.agree_seed)
    out, t = [], token
    for _ in range(n):
        t = pi[t]
        out.append(t)
    return out


def _std_for(name: str, shape: Tuple[int, ...], s: CheckpointSpec) -> float:
    fan_in = shape[-1] if len(shape) >= 2 else 1
    return 1.0 / math.sqrt(max(fan_in, 1))


def _is_norm_weight(name: str) -> bool:
    return name.endswith("norm.weight") or "layernorm" in name or name.endswith("_norm.weight")


def generate_weights(s: CheckpointSpec, device: str = "cpu") -> Dict[str, Any]:
    """Deterministic tensors for ``s`` (seeded per tensor name; bf16 on CPU)."""
    import torch

    dtype = getattr(torch, s.dtype)
    shapes = tensor_shapes(s)
    out: Dict[str, torch.Tensor] = {}

    def gen(name: str, shape, std: float, mean: float = 0.0) -> torch.Tensor:
        # per-name seed: adding a tensor never changes the others
        h = int.from_bytes(hashlib.sha256(f"{s.seed}:{name}".encode()).digest()[:8], "little")
        g = torch.Generator(device=device).manual_seed(h & ((1 << 63) - 1))
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        return t.mul_(std).add_(mean)

    for name, (shape, kind) in shapes.items():
        base = name.rsplit(".", 1)[-1]
        if kind == "int64":  # token_ordering of the centroid head
            h = int.from_bytes(hashlib.sha256(f"{s.seed}:{name}".encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(h & ((1 << 63) - 1))
            out[name] = torch.randperm(shape[0], generator=g).to(torch.int64)
            continue
        if base == "layer_scalar":
            t = torch.ones(shape)
        elif "position_embedding_table" in name:
            t = gen(name, shape, 0.02)
        elif name.endswith("router.scale") or name.endswith("per_expert_scale"):
            t = gen(name, shape, 0.1, 1.0)
        elif _is_norm_weight(name):
            t = gen(name, shape, 0.1, 1.0)
        elif name.endswith("embed_tokens.weight"):
            # tied head: logit std = sqrt(H) * std
            t = gen(name, shape, RANDOM_LOGIT_STD / math.sqrt(shape[-1]))
        elif name == "lm_head.weight" and s.text.head_row_sigma > 0:
            rows = gen(name + ":row_norm", (shape[0], 1), s.text.head_row_sigma).exp_()
            t = gen(name, shape, 1.0 / math.sqrt(shape[-1])).mul_(rows)
        elif name.endswith("embed_tokens_per_layer.weight"):
            t = gen(name, shape, 1.0 / math.sqrt(max(s.text.ple_dim, 1)))
        else:
            t = gen(name, shape, _std_for(name, shape, s))
        # agree weights are edited in fp32 below; others go to CPU/bf16 now (peak memory)
        out[name] = t if s.init in ("agree", "window_copy") else t.to(dtype).contiguous().cpu()

    if s.init == "agree":
        _make_agree(s, out, device)
    elif s.init == "window_copy":
        _make_window_copy(s, out)
    elif s.init == "routed":
        _make_routed(s, out)
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in out.items()}


def _seeded(s: CheckpointSpec, tag: str):
    import torch

    h = int.from_bytes(hashlib.sha256(f"{s.seed}:{tag}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(h & ((1 << 63) - 1))


def routing_codes(s: CheckpointSpec):
    """(ids [V, k], values [V, k]): the experts each token's code selects, and their code values.

    Code values are in units of the unscaled embedding (the residual carries
    ``sqrt(H)`` times them); uniform in ``ROUTER_CODE * [1, 1.5]`` so the
    top-k weights differ between experts and tokens.
    """
    import torch

    t = s.text
    g = _seeded(s, "router:codes")
    ids = torch.rand(t.vocab_size, t.num_experts, generator=g).argsort(dim=-1)[:, : t.top_k_experts]
    vals = ROUTER_CODE * (1.0 + 0.5 * torch.rand(t.vocab_size, t.top_k_experts, generator=g))
    return ids, vals


def router_code_perm(s: CheckpointSpec, layer: int):
    """Layer ``layer``'s expert -> code coordinate map (each layer routes differently)."""
    import torch

    return torch.randperm(s.text.num_experts, generator=_seeded(s, f"router:perm:{layer}"))


def _make_routed(s: CheckpointSpec, out: Dict[str, Any]) -> None:
    """Random MoE weights whose top-k expert set has a wide margin (see :data:`ROUTER_GAIN`).

    Coordinates ``0..E-1`` of the residual stream carry a per-token code:
    the embedding row of token t holds ``vals`` at its ``k`` code coordinates
    and 0 at the others, and no branch writes there (rows ``0..E-1`` of every
    o_proj / down_proj / expert down_proj are zero; the post-norms scale
    elementwise, so zeros stay zeros). Router row e of layer l reads code
    coordinate ``perm_l[e]`` with gain ``ROUTER_GAIN`` plus a small random
    read of the other coordinates (context-dependent top-k weights). The
    router normalizes by rms(x), which scales all scores alike: the set is
    the token's code, the k-th/(k+1)-th score gap is ~``ROUTER_GAIN *
    ROUTER_CODE / rms(x)`` minus the context term, far above bf16 noise.
    """
    import torch

    t = s.text
    E, H = t.num_experts, t.hidden_size
    if not (0 < t.top_k_experts < E <= H // 2):
        raise ValueError(f"{s.name}: routed init needs 0 < top_k < num_experts <= hidden_size/2")
    dtype = getattr(torch, s.dtype)
    ids, vals = routing_codes(s)
    emb = out["model.embed_tokens.weight"].float()
    emb[:, :E] = 0.0
    emb[:, :E].scatter_(1, ids, vals)
    out["model.embed_tokens.weight"] = emb.to(dtype).contiguous()
    for name, w in out.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w[:E].zero_()
        elif name.endswith("experts.down_proj"):
            w[:, :E].zero_()
    for layer in range(t.num_layers):
        name = f"model.layers.{layer}.router.proj.weight"
        w = torch.randn(E, H, generator=_seeded(s, name + ":ctx")) * (ROUTER_CONTEXT / math.sqrt(H - E))
        w[:, :E] = 0.0
        w[torch.arange(E), router_code_perm(s, layer)] = ROUTER_GAIN
        out[name] = w.to(dtype).contiguous()


def _zero_blocks(out: Dict[str, Any]) -> None:
    """Zero every residual-branch output so the stream stays the scaled embedding."""
    for name, t in out.items():
        if any(
            name.endswith(sfx)
            for sfx in (
                "self_attn.o_proj.weight",
                "mlp.down_proj.weight",
                "per_layer_projection.weight",
                "experts.down_proj",
            )
        ):
            t.zero_()
        elif _is_norm_weight(name) and ".layers." in name:
            t.fill_(1.0)
    for name, t in out.items():
        if name.endswith("norm.weight") and ".layers." not in name:
            t.fill_(1.0)  # final norm: h = x / rms(x) exactly


def _unit_rows(x):
    return x / x.norm(dim=-1, keepdim=True)


def _make_agree(s: CheckpointSpec, out: Dict[str, Any], device: str) -> None:
    """Weights whose greedy next token is pi(current token), margin ~AGREE_ALPHA*(1-max cos).

    Target: every branch output is zero, so the final (unit-weight) norm sees
    the scaled embedding e_t and emits sqrt(H) * u_t (u = unit row of E).
    An untied head with row pi(t) = alpha/sqrt(H) * u_t gives logit alpha to
    pi(t) and alpha * cos(u_s, u_t) to every other token.

    Assistant: pre_projection = [P, 0] ignores the recurrent state, its layers
    are zeroed the same way, so its final norm emits sqrt(Ha) * unit(P e_t);
    its tied head row pi(t) = alpha/sqrt(Ha) * unit(P e_t) again peaks at pi(t).
    """
    import torch

    V = s.text.vocab_size
    pi = torch.tensor(agree_permutation(V, s.agree_seed))
    inv = torch.empty_like(pi)
    inv[pi] = torch.arange(V)
    _zero_blocks(out)
    if s.arch == "causal":
        H = s.text.hidden_size
        u = _unit_rows(out["model.embed_tokens.weight"].float())
        out["lm_head.weight"] = (AGREE_ALPHA / math.sqrt(H)) * u[inv]
        return
    if s.arch != "assistant":
        raise ValueError(f"{s.name}: agree init supports causal/assistant only")
    # the target's embedding: same spec/seed rule as the agree target build
    target = VARIANTS["agree_target"]
    if target.text.hidden_size != s.backbone_hidden_size or target.agree_seed != s.agree_seed:
        raise ValueError("agree_assistant must match agree_target (backbone size, agree seed)")
    e_target = _target_embedding(target, device)
    Ha = s.text.hidden_size
    P = out["pre_projection.weight"][:, : s.backbone_hidden_size].clone()
    out["pre_projection.weight"].zero_()
    out["pre_projection.weight"][:, : s.backbone_hidden_size] = P
    z = _unit_rows(e_target.float() @ P.float().t())  # [V, Ha], unit(P e_t)
    out["model.embed_tokens.weight"] = (AGREE_ALPHA / math.sqrt(Ha)) * z[inv]


# window_copy construction (see _make_window_copy)
PROBE_QK_GAIN = 4.0  # q_norm / k_norm weight on the rotary pairs
PROBE_HEAD_LOGIT = 20.0  # top logit before the 30-softcap
PROBE_MAX_COS = 0.5  # largest cosine between two tokens' value codes
PROBE_OUT = 64  # residual coordinates [PROBE_OUT, PROBE_OUT + head_dim) carry the copied code (target)
PROBE_MAP_SEED = 31


def window_map(vocab_size: int) -> List[int]:
    """g: token -> next token of the window probes (a permutation of the ordinary ids).

    Special ids t < FIRST_PROMPT_ID share the code of t + FIRST_PROMPT_ID, hence its image.
    """
    import torch

    ids = torch.arange(FIRST_PROMPT_ID, vocab_size)
    perm = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(PROBE_MAP_SEED))]
    g = [0] * vocab_size
    for t in range(FIRST_PROMPT_ID, vocab_size):
        g[t] = int(perm[t - FIRST_PROMPT_ID])
    for t in range(FIRST_PROMPT_ID):
        g[t] = g[t + FIRST_PROMPT_ID]
    return g


def window_continuation(prompt: Sequence[int], n: int, window: int, vocab_size: int) -> List[int]:
    """Greedy output of a window probe: x[p+1] = g(x[max(0, p - window + 1)]).

    The copy head attends the oldest key of its ``window``-key window (self
    included), so a path that keeps ``window - 1`` keys copies x[p - window + 2].
    """
    g = window_map(vocab_size)
    x = list(prompt)
    for _ in range(n):
        p = len(x) - 1
        x.append(g[x[max(0, p - window + 1)]])
    return x[len(prompt):]


def probe_codes(vocab_size: int, dim: int):
    """[V, dim] unit value codes, pairwise cosine <= PROBE_MAX_COS (specials share t + 8's)."""
    import torch

    g = torch.Generator().manual_seed(PROBE_MAP_SEED + 1)
    n = vocab_size - FIRST_PROMPT_ID
    acc = torch.empty(0, dim)
    while acc.shape[0] < n:
        c = torch.randn(256, dim, generator=g)
        c = c / c.norm(dim=-1, keepdim=True)
        for row in c:
            if acc.shape[0] == n:
                break
            if acc.shape[0] == 0 or float((acc @ row).max()) <= PROBE_MAX_COS:
                acc = torch.cat([acc, row[None]])
    return torch.cat([acc[:FIRST_PROMPT_ID], acc])


def _rope_freqs(t: TextSpec, dim: int):
    import torch

    theta = t.hf_dict()["rope_parameters"][SLIDING]["rope_theta"]
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def probe_pairs(t: TextSpec) -> Tuple[int, Tuple[int, ...]]:
    """(j*, pairs): j* = the fastest rotary pair whose angle stays within pi/2 over the
    window (score monotone in the key offset); pairs = 0..j*, the ones the keys carry."""
    import math as _m

    freqs = _rope_freqs(t, t.swa_head_dim)
    for j, th in enumerate(freqs.tolist()):
        if th * (t.sliding_window - 1) <= _m.pi / 2:
            return j, tuple(range(j + 1))
    raise ValueError(f"sliding_window {t.sliding_window} too long for head dim {t.swa_head_dim}")


def _set_pairs(w, row0: int, d: int, pairs, angles, col: int) -> None:
    """q/k projection rows of one head: rotary pair j gets (cos a_j, sin a_j) read from input ``col``."""
    half = d // 2
    for j, a in zip(pairs, angles):
        w[row0 + j, col] = math.cos(a)
        w[row0 + j + half, col] = math.sin(a)


def _make_window_copy(s: CheckpointSpec, out: Dict[str, Any]) -> None:
    """Weights whose greedy next token is g(token ``sliding_window - 1`` positions back).

    Residual stream = scaled embedding: codes (unit, value of the token) in
    coordinates [0, d), a constant in the last coordinate, zeros elsewhere;
    every block output is zeroed but the copy head's. Keys of the KV owner
    (the last non-shared sliding layer) read only the constant: after k_norm
    they are one fixed vector on rotary pairs 0..j*, so after RoPE q.k depends
    on the key offset alone. The target's copy head queries pair j* with phase
    -pi/2 - theta*(W-1): its score A*cos(theta*delta - pi/2 - theta*(W-1)) rises
    strictly with the offset delta over the window and is steepest at its oldest
    key delta = W-1 (gap ~ A*theta ~ 20 logits to delta = W-2, and a window one
    key too wide would pick delta = W). Values are the codes; o_proj writes them
    to [PROBE_OUT, PROBE_OUT+d); the untied head row g(t) is code(t) there.
    Outcome: x[p+1] = g(x[max(0, p-W+1)]) with a ~4-logit top-1 margin, and a
    path that drops (or adds) one window key emits a different token.

    Assistant (FROZEN_KV_MTP draft bound to the target's sliding KV owner):
    pre_projection keeps only the target embedding's constant, its sliding
    layer's query is a matched filter over pairs 0..j* peaking at offset
    ``probe_offset`` (W-2: the draft's rope phase is the last written target
    slot, one before the bonus token), and its tied head maps codes like the
    target's, so its first draft token equals the target's next token.
    """
    import torch

    t = s.text
    d, H, V, W = t.swa_head_dim, t.hidden_size, t.vocab_size, t.sliding_window
    jstar, pairs = probe_pairs(t)
    freqs = _rope_freqs(t, d).tolist()
    codes = probe_codes(V, d)
    g = torch.tensor(window_map(V))
    inv = torch.full((V,), -1, dtype=torch.long)
    inv[g[FIRST_PROMPT_ID:]] = torch.arange(FIRST_PROMPT_ID, V)
    _zero_blocks(out)

    def head_rows(width: int, offset: int, logit: float, hidden_norm: float):
        rows = torch.zeros(V, width)
        real = torch.arange(FIRST_PROMPT_ID, V)
        rows[real, offset:offset + d] = codes[inv[real]] * (logit / hidden_norm)
        return rows

    if s.arch == "causal":
        if not (d <= PROBE_OUT and PROBE_OUT + d <= H - 1):
            raise ValueError(f"{s.name}: window_copy needs hidden_size >= {PROBE_OUT + d + 1}")
        first_shared = t.num_layers - t.num_kv_shared_layers
        owner = max(i for i in range(first_shared) if t.layer_types[i] == SLIDING)
        pl = s.probe_layer
        if not (pl == owner or (pl >= first_shared and t.layer_types[pl] == SLIDING)):
            raise ValueError(f"{s.name}: probe_layer {pl} must be the sliding KV owner {owner} or a shared sliding layer")
        emb = torch.zeros(V, H)
        emb[:, :d] = codes
        emb[:, H - 1] = 1.0
        out["model.embed_tokens.weight"] = emb
        pre = f"model.layers.{owner}.self_attn."
        k = torch.zeros(d, H)
        _set_pairs(k, 0, d, pairs, [0.0] * len(pairs), H - 1)
        out[pre + "k_proj.weight"] = k
        out[pre + "k_norm.weight"] = torch.full((d,), PROBE_QK_GAIN)
        v = torch.zeros(d, H)
        v[torch.arange(d), torch.arange(d)] = 1.0
        out[pre + "v_proj.weight"] = v
        pre = f"model.layers.{pl}.self_attn."
        heads = t.num_attention_heads
        q = torch.zeros(heads * d, H)
        phase = -math.pi / 2 - freqs[jstar] * (W - 1)
        for h in range(heads):
            _set_pairs(q, h * d, d, (jstar,), (phase,), H - 1)
        out[pre + "q_proj.weight"] = q
        out[pre + "q_norm.weight"] = torch.full((d,), PROBE_QK_GAIN)
        o = torch.zeros(H, heads * d)
        o[PROBE_OUT + torch.arange(d), torch.arange(d)] = 1.0
        out[pre + "o_proj.weight"] = o
        # final hidden: |emb|*sqrt(H) = sqrt(2H) plus the normed attention output sqrt(H); rms sqrt(3)
        out["lm_head.weight"] = head_rows(H, PROBE_OUT, PROBE_HEAD_LOGIT, math.sqrt(H / 3.0))
        return
    if s.arch != "assistant":
        raise ValueError(f"{s.name}: window_copy supports causal/assistant only")
    Ha, Hb = H, s.backbone_hidden_size
    if t.layer_types[0] != SLIDING or Ha < d + 1:
        raise ValueError(f"{s.name}: window_copy assistant needs a first sliding layer and hidden > head_dim")
    pre_w = torch.zeros_like(out["pre_projection.weight"])
    pre_w[Ha - 1, Hb - 1] = 1.0  # the target embedding's constant coordinate
    out["pre_projection.weight"] = pre_w
    pre = "model.layers.0.self_attn."
    heads = t.num_attention_heads
    q = torch.zeros(heads * d, Ha)
    angles = [-freqs[j] * s.probe_offset for j in pairs]  # cos(theta_j (delta - offset)): peak at offset
    for h in range(heads):
        _set_pairs(q, h * d, d, pairs, angles, Ha - 1)
    out[pre + "q_proj.weight"] = q
    out[pre + "q_norm.weight"] = torch.full((d,), PROBE_QK_GAIN)
    o = torch.zeros(Ha, heads * d)
    o[torch.arange(d), torch.arange(d)] = 1.0
    out[pre + "o_proj.weight"] = o
    # final hidden: constant sqrt(Hb) plus normed attention output sqrt(Ha)
    out["model.embed_tokens.weight"] = head_rows(Ha, 0, PROBE_HEAD_LOGIT, math.sqrt(Ha) / math.sqrt((Hb + Ha) / Ha))


def _target_embedding(target: CheckpointSpec, device: str):
    """The agree target's embedding exactly as its build writes it (bf16-rounded)."""
    import torch

    name = "model.embed_tokens.weight"
    shape = (target.text.vocab_size, target.text.hidden_size)
    h = int.from_bytes(hashlib.sha256(f"{target.seed}:{name}".encode()).digest()[:8], "little")
    g = torch.Generator(device=device).manual_seed(h & ((1 << 63) - 1))
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    t.mul_(RANDOM_LOGIT_STD / math.sqrt(shape[-1]))
    return t.to(getattr(torch, target.dtype)).float()


# --------------------------------------------------------------------------
# Multimodal tokenizer / processor (mm)
# --------------------------------------------------------------------------

# Gemma-4's special-token strings (the ones SGLang's Gemma-4 processor matches)
# for each id field of the mm config, and the tokenizer attribute naming each.
MM_TOKEN_STRINGS: Dict[str, Tuple[str, str]] = {
    "image_token_id": ("<|image|>", "image_token"),
    "boi_token_id": ("<|image>", "boi_token"),
    "eoi_token_id": ("<image|>", "eoi_token"),
    "video_token_id": ("<|video|>", "video_token"),
    "audio_token_id": ("<|audio|>", "audio_token"),
    "boa_token_id": ("<|audio>", "boa_token"),
    "eoa_token_index": ("<audio|>", "eoa_token"),
}
UNK_ID = 3
IMAGE = "<image>"  # placeholder in :func:`image_prompt` parts


def mm_token_id(variant: str, field: str) -> int:
    """The id of ``field`` (e.g. ``"image_token_id"``) in an mm variant's vocab."""
    ids = dict(spec(variant).mm_token_ids)
    if field not in ids:
        raise ValueError(f"{variant}: no {field!r}; known: {', '.join(ids)}")
    return ids[field]


def mm_vocab(s: CheckpointSpec) -> Dict[str, int]:
    """Token string -> id over the whole vocab: specials at their config ids, ``t<id>`` elsewhere."""
    special = {PAD_ID: "<pad>", EOS_ID: "<eos>", BOS_ID: "<bos>", UNK_ID: "<unk>"}
    for field, tid in s.mm_token_ids:
        if field not in MM_TOKEN_STRINGS:
            raise ValueError(f"{s.name}: no token string known for {field!r}")
        if not (FIRST_PROMPT_ID <= tid < s.text.vocab_size) or tid in special:
            raise ValueError(f"{s.name}: {field}={tid} must be a free id in [{FIRST_PROMPT_ID}, {s.text.vocab_size})")
        special[tid] = MM_TOKEN_STRINGS[field][0]
    return {special.get(i, f"t{i}"): i for i in range(s.text.vocab_size)}


def _mm_tokenizer(s: CheckpointSpec):
    """A word-level fast tokenizer whose decode -> encode is the identity on ids.

    Words are ``t<id>`` split on whitespace; specials are added tokens (matched
    before splitting, so ``<|image><|image|>...`` written without spaces
    tokenizes too); encode prepends ``<bos>`` like Gemma's tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = mm_vocab(s)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [w for w in vocab if not w.startswith("t")]
    tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    extra = {MM_TOKEN_STRINGS[f][1]: MM_TOKEN_STRINGS[f][0] for f, _ in s.mm_token_ids}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=extra,
        model_max_length=s.text.max_position_embeddings,
    )


def write_mm_processor(s: CheckpointSpec, out_dir: os.PathLike) -> None:
    """Tokenizer + transformers ``Gemma4Processor`` files (what ``AutoProcessor`` loads).

    Needs torchvision (transformers' Gemma-4 image/video processors).
    """
    from transformers.models.gemma4 import (
        Gemma4AudioFeatureExtractor,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    v = s.vision
    if v is None:
        raise ValueError(f"{s.name}: mm processor files need a vision spec")
    # the tower's position table must cover the widest patch grid the resize can produce
    max_side = v.max_soft_tokens * v.pooling_kernel_size  # patches (transformers' resize rule)
    if max_side > v.position_embedding_size:
        raise ValueError(f"{s.name}: position_embedding_size {v.position_embedding_size} < max patch side {max_side}")
    geometry = dict(
        patch_size=v.patch_size, max_soft_tokens=v.max_soft_tokens, pooling_kernel_size=v.pooling_kernel_size
    )
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(**geometry),
        tokenizer=_mm_tokenizer(s),
        video_processor=Gemma4VideoProcessor(**geometry),
        image_seq_length=v.max_soft_tokens,
    )
    processor.save_pretrained(str(out_dir))


def image_prompt(parts: Sequence[Any], variant: str = "mm") -> List[int]:
    """A BOS-led prompt: ``parts`` are lists of text ids or :data:`IMAGE`.

    Each image is written as Gemma-4 lays it out (``<|image> <|image|> <image|>``);
    SGLang expands the middle token to the image's soft-token count.
    """
    boi, img, eoi = (mm_token_id(variant, f) for f in ("boi_token_id", "image_token_id", "eoi_token_id"))
    specials = {PAD_ID, EOS_ID, BOS_ID, UNK_ID} | {t for _, t in spec(variant).mm_token_ids}
    out = [BOS_ID]
    for p in parts:
        if isinstance(p, str) and p == IMAGE:
            out += [boi, img, eoi]
            continue
        ids = [int(t) for t in p]
        bad = [t for t in ids if t in specials or not 0 <= t < spec(variant).text.vocab_size]
        if bad:
            raise ValueError(f"text ids must be ordinary vocab ids, got {bad}")
        out += ids
    return out


def expand_image_prompt(prompt: Sequence[int], soft_tokens: Sequence[int], variant: str = "mm") -> List[int]:
    """``prompt`` with its i-th image token repeated ``soft_tokens[i]`` times (what the model sees)."""
    img = mm_token_id(variant, "image_token_id")
    n = sum(1 for t in prompt if t == img)
    if n != len(soft_tokens):
        raise ValueError(f"prompt has {n} image tokens, {len(soft_tokens)} counts given")
    out, k = [], 0
    for t in prompt:
        if t == img:
            out += [img] * int(soft_tokens[k])
            k += 1
        else:
            out.append(int(t))
    return out


def synthetic_image(height: int, width: int, seed: int):
    """A deterministic RGB PIL image: smooth random field plus noise (not constant patches)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [np.sin(xx * rng.uniform(0.02, 0.2) + yy * rng.uniform(0.02, 0.2) + rng.uniform(0, 6.3)) for _ in range(3)],
        axis=-1,
    )
    px = 127.5 * (1.0 + 0.8 * base) + rng.normal(0.0, 20.0, (height, width, 3))
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------
# build()
# --------------------------------------------------------------------------


def _gen_device(variant: str) -> str:
    """Big variants generate on CUDA when present (seconds instead of minutes)."""
    if variant not in BIG_VARIANTS:
        return "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def build(variant: str, root: Optional[os.PathLike] = None, force: bool = False) -> Path:
    """Build (or reuse) the checkpoint for ``variant``; returns its directory.

    The directory name is ``<variant>-<hash of spec>[-cuda]``; a checkpoint is
    complete once ``ckpt_spec.json`` exists (written last, after an atomic
    rename of the temporary build directory).
    """
    from safetensors.torch import save_file

    s = spec(variant)
    device = _gen_device(variant)
    root = Path(root) if root is not None else default_root()
    suffix = "" if device == "cpu" else f"-{device}"
    out_dir = root / f"{variant}-{s.key()}{suffix}"
    if (out_dir / "ckpt_spec.json").exists() and not force:
        return out_dir
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=root))
    try:
        cfg = config_dict(s)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen_cfg = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        tensors = generate_weights(s, device=device)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if s.arch == "mm":
            write_mm_processor(s, tmp)
        meta = {
            "variant": variant,
            "key": s.key(),
            "generator_version": GENERATOR_VERSION,
            "gen_device": device,
            "spec": dataclasses.asdict(s),
            "hf_text_config": s.text.hf_dict(),
            "num_params": int(sum(t.numel() for t in tensors.values())),
        }
        (tmp / "ckpt_spec.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def build_pair(target: str, root: Optional[os.PathLike] = None) -> Tuple[Path, Path]:
    """(target, draft) checkpoint directories for FROZEN_KV_MTP."""
    if target not in DRAFT_FOR:
        raise ValueError(f"no draft defined for {target!r}; known: {', '.join(DRAFT_FOR)}")
    return build(target, root), build(DRAFT_FOR[target], root)


def load_meta(path: os.PathLike) -> Dict[str, Any]:
    return json.loads((Path(path) / "ckpt_spec.json").read_text())
