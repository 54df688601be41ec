"""The ``routed`` MoE init (``moe``): random weights whose top-k expert set is decisive.

Each token's embedding carries a code naming its experts, no branch writes the
code coordinates, and every layer's router reads them with a large gain, so the
k-th/(k+1)-th router score gap is far above bf16 noise (see :func:`_make_routed`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Dict

from sglang_gemma4.testing.ckpt_specs import CheckpointSpec

# "routed" MoE init (see _make_routed): code value scale in the unscaled
# embedding, router gain on the code coordinates, std of the router's
# context-dependent score term.
ROUTER_CODE = 0.4
ROUTER_GAIN = 32.0
ROUTER_CONTEXT = 0.3


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
