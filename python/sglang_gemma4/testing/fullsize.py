"""Full-size Gemma-4 model directories for ``--load-format dummy`` serving (no weights).

Each directory holds the real text config (depth, widths, experts, KV sharing;
facts from ../shared/reference/anchors.md section 4) and a local word-level
tokenizer over Gemma-4's 262144-token vocabulary, so SGLang's own
``sglang.bench_serving`` can drive the server (it needs a tokenizer for the
random-ids dataset and to count streamed tokens). Each target has its MTP
assistant at its real width for FROZEN_KV_MTP runs.

Known gaps, stated rather than guessed silently: 31B's full-attention KV heads
(4) and the 26B/31B assistants' FFN width and head count are not published;
they are set to plausible values (see ``ASSUMED``). With dummy weights the
assistant's accept length is ~1, so speculative runs measure the step cost,
not the speed-up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Tuple

from sglang_gemma4.testing.ckpt_config import config_dict
from sglang_gemma4.testing.ckpt_specs import FULL, SLIDING, CheckpointSpec, TextSpec
from sglang_gemma4.testing.ckpt_tokenizer import _mm_tokenizer
from sglang_gemma4.testing.ckpt_variants import _assistant_text

VOCAB = 262144

ASSUMED = {
    "31b.full_kv_heads": 4,
    "26b_assistant": "4 layers (3 sliding + 1 full), FFN 4096, 8 heads",
    "31b_assistant": "4 layers (3 sliding + 1 full), FFN 4096, 8 heads",
    "e2b_assistant": "as E4B's: hidden 256, 4 layers, FFN 2048, 4 heads, ordered embeddings",
}


def _pattern(n_layers: int, period: int) -> Tuple[str, ...]:
    """Gemma-4's period-``period`` layer pattern (period-1 sliding, then full); the last layer is full."""
    types = [FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers)]
    types[-1] = FULL
    return tuple(types)


TARGETS: Dict[str, TextSpec] = {
    "e2b": TextSpec(
        vocab_size=VOCAB, hidden_size=1536, intermediate_size=6144, layer_types=_pattern(35, 5),
        num_attention_heads=8, swa_head_dim=256, full_head_dim=512, swa_kv_heads=1, full_kv_heads=1,
        sliding_window=512, ple_dim=256, num_kv_shared_layers=20, use_double_wide_mlp=True,
        max_position_embeddings=131072,
    ),
    "e4b": TextSpec(
        vocab_size=VOCAB, hidden_size=2560, intermediate_size=10240, layer_types=_pattern(42, 6),
        num_attention_heads=8, swa_head_dim=256, full_head_dim=512, swa_kv_heads=2, full_kv_heads=2,
        sliding_window=512, ple_dim=256, num_kv_shared_layers=18, max_position_embeddings=131072,
    ),
    "26b": TextSpec(
        vocab_size=VOCAB, hidden_size=2816, intermediate_size=2112, layer_types=_pattern(30, 6),
        num_attention_heads=16, swa_head_dim=256, full_head_dim=512, swa_kv_heads=8, full_kv_heads=2,
        sliding_window=1024, attention_k_eq_v=True, num_experts=128, top_k_experts=8,
        moe_intermediate_size=704, max_position_embeddings=262144,
    ),
    "31b": TextSpec(
        vocab_size=VOCAB, hidden_size=5376, intermediate_size=21504, layer_types=_pattern(60, 6),
        num_attention_heads=32, swa_head_dim=256, full_head_dim=512, swa_kv_heads=16,
        full_kv_heads=ASSUMED["31b.full_kv_heads"], sliding_window=1024, attention_k_eq_v=True,
        max_position_embeddings=262144,
    ),
}

_ASSIST_LAYERS = (SLIDING, SLIDING, SLIDING, FULL)
# name -> (hidden, ffn, heads, ordered embeddings)
ASSISTANTS: Dict[str, Tuple[int, int, int, bool]] = {
    "e2b": (256, 2048, 4, True),
    "e4b": (256, 2048, 4, True),
    "26b": (1024, 4096, 8, False),
    "31b": (1024, 4096, 8, False),
}


def specs(name: str) -> Tuple[CheckpointSpec, CheckpointSpec]:
    if name not in TARGETS:
        raise ValueError(f"unknown full-size model {name!r}; known: {', '.join(TARGETS)}")
    t = TARGETS[name]
    hidden, ffn, heads, ordered = ASSISTANTS[name]
    target = CheckpointSpec(f"{name}_full", "causal", t)
    draft = CheckpointSpec(
        f"{name}_full_assistant", "assistant", _assistant_text(t, hidden, ffn, heads, _ASSIST_LAYERS),
        backbone_hidden_size=t.hidden_size, use_ordered_embeddings=ordered,
        num_centroids=2048 if ordered else 0, centroid_intermediate_top_k=32 if ordered else 0,
    )
    return target, draft


def _write(spec: CheckpointSpec, out: Path, tokenizer) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_dict(spec), indent=1))
    tokenizer.save_pretrained(out)
    return out


def write_model(name: str, root: os.PathLike) -> Tuple[Path, Path]:
    """Write ``root/<name>`` (target) and ``root/<name>-assistant``; returns both paths."""
    target, draft = specs(name)
    tok = _mm_tokenizer(target)  # no mm ids: specials <pad>/<eos>/<bos>/<unk>, t<id> elsewhere
    root = Path(root)
    return _write(target, root / name, tok), _write(draft, root / f"{name}-assistant", tok)


def summary(name: str) -> Dict[str, object]:
    t = TARGETS[name]
    return {
        "layers": t.num_layers, "sliding": t.layer_types.count(SLIDING), "full": t.layer_types.count(FULL),
        "hidden": t.hidden_size, "kv_shared": t.num_kv_shared_layers, "experts": t.num_experts,
        "window": t.sliding_window, "assistant_hidden": ASSISTANTS[name][0],
    }
