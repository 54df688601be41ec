"""The ``agree`` construction (``agree_target`` + ``agree_assistant``): next token = pi(token).

Every position has a top-1 margin of ~10 logits, so token equality between
engines is exact there (see :func:`_make_agree`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, List

from sglang_gemma4.testing.ckpt_common import RANDOM_LOGIT_STD, _unit_rows, _zero_blocks
from sglang_gemma4.testing.ckpt_specs import CheckpointSpec
from sglang_gemma4.testing.ckpt_variants import VARIANTS, spec

# Logit scale of the agree construction: target logit of pi(token) before the
# 30-softcap; other tokens get alpha * cos(random pair) (|cos| <~ 0.45).
AGREE_ALPHA = 20.0


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
