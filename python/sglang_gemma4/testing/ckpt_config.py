"""``config.json`` for a spec, and the tensor names/shapes transformers gives it.

Config conventions (the pitfall): Hugging Face's Gemma-4 text config calls the
*sliding* head dim ``head_dim`` and the full one ``global_head_dim``; SGLang
wants the opposite (``head_dim`` = full, ``swa_head_dim`` = sliding) and only
converts for model types ``gemma4``/``gemma4_assistant``. Text-only
checkpoints here are ``gemma4_text`` / ``Gemma4ForCausalLM`` and their
``config.json`` is written in SGLang's convention with ``swa_head_dim``,
``swa_v_head_dim``, ``swa_num_key_value_heads`` and ``v_head_dim`` explicit.
The wrapper types (``mm``, ``assistant``) are written in Hugging Face's
convention and SGLang converts them.

Naming and shapes come from transformers' own Gemma-4 classes instantiated on
the ``meta`` device, so the safetensors keys are exactly the Hugging Face
checkpoint keys SGLang 0.5.17's ``load_weights`` is written for.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Tuple

from sglang_gemma4.testing.ckpt_specs import CheckpointSpec


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
