"""Deterministic weights for a spec: seeded per tensor name, then the spec's construction.

``random`` specs keep the random init; ``routed``, ``agree`` and
``window_copy`` edit it (ckpt_routed, ckpt_agree, ckpt_window_probe).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, Tuple

from sglang_gemma4.testing.ckpt_agree import _make_agree
from sglang_gemma4.testing.ckpt_common import RANDOM_LOGIT_STD, _is_norm_weight
from sglang_gemma4.testing.ckpt_config import tensor_shapes
from sglang_gemma4.testing.ckpt_routed import _make_routed
from sglang_gemma4.testing.ckpt_specs import CheckpointSpec
from sglang_gemma4.testing.ckpt_window_probe import _make_window_copy


def _std_for(name: str, shape: Tuple[int, ...], s: CheckpointSpec) -> float:
    fan_in = shape[-1] if len(shape) >= 2 else 1
    return 1.0 / math.sqrt(max(fan_in, 1))


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
