"""Checkpoint specs: the dataclasses whose fields determine a checkpoint's bytes.

:class:`TextSpec` states a Gemma-4 text stack in explicit terms (``swa_*`` =
sliding layers, ``full_*`` = full-attention layers) and writes it in both
config conventions: Hugging Face's (``hf_dict``: ``head_dim`` = sliding,
``global_head_dim`` = full) and SGLang 0.5.17's for ``gemma4_text``
(``sglang_text_dict``: ``head_dim`` = full, ``swa_head_dim`` = sliding; see
:mod:`sglang_gemma4.testing.ckpt_config`). :class:`CheckpointSpec` adds the
architecture, the weight construction (``init``) and its seeds; its
:meth:`~CheckpointSpec.key` (a hash of every field plus
:data:`GENERATOR_VERSION`) names the cache directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, Optional, Tuple

SLIDING = "sliding_attention"
FULL = "full_attention"

# Bump when the weight generator changes in a way the spec does not capture.
GENERATOR_VERSION = 1

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
FIRST_PROMPT_ID = 8  # prompts draw from [FIRST_PROMPT_ID, vocab): no specials


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
    # untied random heads only: log-normal spread of lm_head row norms (see ckpt_variants)
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
    # offset its matched filter looks for (assistant); see ckpt_window_probe._make_window_copy
    probe_layer: int = -1
    probe_offset: int = 0

    def key(self) -> str:
        blob = json.dumps(
            {"spec": dataclasses.asdict(self), "generator": GENERATOR_VERSION}, sort_keys=True
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
