"""Tensor helpers shared by the weight generator and the weight constructions."""

from __future__ import annotations

from typing import Any, Dict

# Std of random logits for the random variants (softcap 30 stays ~linear).
RANDOM_LOGIT_STD = 3.0


def _is_norm_weight(name: str) -> bool:
    return name.endswith("norm.weight") or "layernorm" in name or name.endswith("_norm.weight")


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
