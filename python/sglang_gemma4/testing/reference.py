"""fp32 Hugging Face reference for the tiny text checkpoints (no SGLang).

The independent reference the engine tests compare against: transformers'
``Gemma4ForCausalLM`` loaded with the checkpoint's (bf16) weights in fp32,
run greedily by recomputing the whole sequence each step with an explicit
mask, so the sliding window is exactly Gemma-4's (``sliding_window`` keys,
self included) or, to emulate a suspected engine bug, any other width per
query row (``decode_window``: the width used for rows past the prompt).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from sglang_gemma4.testing import checkpoints as ck


def load(variant: str, root: Optional[os.PathLike] = None, device: str = "cpu", dtype=None,
         attn: Optional[str] = "eager"):
    """(transformers model, its TextSpec) for a causal checkpoint variant.

    The checkpoint's (bf16) weights are loaded into fp32, then cast to
    ``dtype`` (default fp32). ``attn=None`` keeps transformers' default
    attention implementation.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    s = ck.spec(variant)
    if s.arch != "causal":
        raise ValueError(f"{variant}: the fp32 reference runs causal text checkpoints only, not {s.arch!r}")
    cfg = Gemma4TextConfig(**ck._strip(s.text.hf_dict()))
    if attn is not None:
        cfg._attn_implementation = attn
    model = Gemma4ForCausalLM(cfg).eval()
    sd = load_file(str(ck.build(variant, root) / "model.safetensors"))
    res = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise RuntimeError(f"{variant}: checkpoint does not match transformers' model: {res}")
    return model.to(device=device, dtype=torch.float32 if dtype is None else dtype), s.text


def masks(n: int, prompt_len: int, window: int, decode_window: Optional[int] = None, device: str = "cpu"):
    """Additive 4-D masks per layer type; rows >= ``prompt_len`` use ``decode_window`` if given."""
    import torch

    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    w = torch.full((n, 1), window, device=device)
    if decode_window is not None:
        w[prompt_len:] = decode_window
    neg = float("-inf")

    def f(b):
        return torch.where(b, 0.0, neg)[None, None]

    return {ck.SLIDING: f((j <= i) & (i - j < w)), ck.FULL: f(j <= i)}


def greedy(
    model,
    text: "ck.TextSpec",
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    decode_window: Optional[int] = None,
) -> Dict[str, List[List]]:
    """Greedy continuation of each prompt: ``tokens``, ``margins`` (top-1 minus top-2 logit)."""
    import torch

    dev = next(model.parameters()).device
    toks, margins = [], []
    with torch.no_grad():
        for p in prompts:
            x = [int(t) for t in p]
            out, mar = [], []
            for _ in range(max_new_tokens):
                ids = torch.tensor([x], device=dev)
                m = masks(len(x), len(p), text.sliding_window, decode_window, device=dev)
                lg = model(input_ids=ids, attention_mask=m).logits[0, -1].float()
                top = torch.topk(lg, 2)
                out.append(int(top.indices[0]))
                mar.append(float(top.values[0] - top.values[1]))
                x.append(out[-1])
            toks.append(out)
            margins.append(mar)
    return {"tokens": toks, "margins": margins}


def teacher_forced(model, text, prompts, continuations) -> Dict[str, List[List]]:
    """fp32 argmax and margin at every position of given continuations (one forward each)."""
    import torch

    dev = next(model.parameters()).device
    arg, mar = [], []
    with torch.no_grad():
        for p, c in zip(prompts, continuations):
            x = list(p) + list(c)
            m = masks(len(x), len(p), text.sliding_window, device=dev)
            lg = model(input_ids=torch.tensor([x], device=dev), attention_mask=m).logits[0].float()
            lg = lg[len(p) - 1: len(p) - 1 + len(c)]
            top = torch.topk(lg, 2, dim=-1)
            arg.append(top.indices[:, 0].tolist())
            mar.append((top.values[:, 0] - top.values[:, 1]).tolist())
    return {"argmax": arg, "margins": mar}


def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))
