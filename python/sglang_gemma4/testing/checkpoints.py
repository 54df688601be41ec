"""Deterministic random-weight Gemma-4 checkpoints, built locally (no downloads).

The GPU tests and benchmarks need Gemma-4 checkpoints that exercise the code
paths our patches touch (PLE, KV-shared layers, sliding+full layers with
different head dims, MoE routing, the FROZEN_KV_MTP assistant, the multimodal
wrapper) without a hub. ``build(variant)`` writes ``config.json`` +
``model.safetensors`` (+ ``generation_config.json``) under a cache directory
keyed by a hash of the variant's full spec, so a changed spec never reuses a
stale checkpoint. SGLang runs them with ``skip_tokenizer_init=True``: no
tokenizer files are needed, except for the ``mm`` variant's images.

This module is the import surface; the parts live beside it:
  ckpt_specs         TextSpec / VisionSpec / CheckpointSpec (what a checkpoint's bytes depend on), token ids
  ckpt_variants      VARIANTS (the variant table, and why random heads are heavy-tailed), DRAFT_FOR,
                     ENGINE_KWARGS, spec(), default_root()
  ckpt_config        config.json in SGLang's / Hugging Face's convention, transformers' tensor names and shapes
  ckpt_weights       generate_weights(): per-name seeded random init, then the spec's construction
  ckpt_routed        "routed" MoE init (decisive expert sets)
  ckpt_agree         "agree" pair: next token = pi(token) with a ~10-logit margin
  ckpt_window_probe  "window_copy" probes (issue #10): next token = g(token sliding_window - 1 back)
  ckpt_tokenizer     the mm checkpoint's identity-on-ids tokenizer
  ckpt_mm            mm processor files, image prompts, synthetic images
  ckpt_build         build(), build_pair(), load_meta()
  ckpt_common        tensor helpers the constructions share
"""

from __future__ import annotations

from sglang_gemma4.testing.ckpt_agree import (
    AGREE_ALPHA,
    _make_agree,
    agree_continuation,
    agree_permutation,
)
from sglang_gemma4.testing.ckpt_build import build, build_pair, load_meta
from sglang_gemma4.testing.ckpt_common import RANDOM_LOGIT_STD
from sglang_gemma4.testing.ckpt_config import _strip, config_dict, tensor_shapes
from sglang_gemma4.testing.ckpt_mm import (
    IMAGE,
    expand_image_prompt,
    image_prompt,
    mm_token_id,
    synthetic_image,
    write_mm_processor,
)
from sglang_gemma4.testing.ckpt_routed import (
    ROUTER_CODE,
    ROUTER_CONTEXT,
    ROUTER_GAIN,
    _make_routed,
    router_code_perm,
    routing_codes,
)
from sglang_gemma4.testing.ckpt_specs import (
    BOS_ID,
    EOS_ID,
    FIRST_PROMPT_ID,
    FULL,
    GENERATOR_VERSION,
    PAD_ID,
    SLIDING,
    CheckpointSpec,
    TextSpec,
    VisionSpec,
)
from sglang_gemma4.testing.ckpt_tokenizer import MM_TOKEN_STRINGS, UNK_ID, mm_vocab
from sglang_gemma4.testing.ckpt_variants import (
    BIG_VARIANTS,
    DRAFT_FOR,
    ENGINE_KWARGS,
    IMAGE_ENGINE_KWARGS,
    VARIANTS,
    _derive,
    _variants,
    default_root,
    spec,
)
from sglang_gemma4.testing.ckpt_weights import generate_weights
from sglang_gemma4.testing.ckpt_window_probe import (
    PROBE_HEAD_LOGIT,
    PROBE_MAP_SEED,
    PROBE_MAX_COS,
    PROBE_OUT,
    PROBE_QK_GAIN,
    _make_window_copy,
    probe_codes,
    probe_pairs,
    window_continuation,
    window_map,
)

__all__ = [
    # specs and ids
    "SLIDING", "FULL", "GENERATOR_VERSION", "PAD_ID", "EOS_ID", "BOS_ID", "FIRST_PROMPT_ID", "UNK_ID",
    "TextSpec", "VisionSpec", "CheckpointSpec",
    # variants
    "VARIANTS", "DRAFT_FOR", "ENGINE_KWARGS", "IMAGE_ENGINE_KWARGS", "BIG_VARIANTS", "spec", "default_root",
    # config and weights
    "config_dict", "tensor_shapes", "generate_weights", "RANDOM_LOGIT_STD",
    # constructions
    "ROUTER_CODE", "ROUTER_GAIN", "ROUTER_CONTEXT", "routing_codes", "router_code_perm",
    "AGREE_ALPHA", "agree_permutation", "agree_continuation",
    "PROBE_QK_GAIN", "PROBE_HEAD_LOGIT", "PROBE_MAX_COS", "PROBE_OUT", "PROBE_MAP_SEED",
    "window_map", "window_continuation", "probe_codes", "probe_pairs",
    # multimodal
    "MM_TOKEN_STRINGS", "IMAGE", "mm_token_id", "mm_vocab", "write_mm_processor", "image_prompt",
    "expand_image_prompt", "synthetic_image",
    # build
    "build", "build_pair", "load_meta",
]
# Also importable from here (private, used by other modules, tests and notes): _strip
# (testing.reference, tests), _variants / _derive (the variant table) and the constructions
# _make_routed / _make_agree / _make_window_copy.
