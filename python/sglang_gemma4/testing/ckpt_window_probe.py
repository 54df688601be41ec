"""The ``window_copy`` construction (issue #10 window probes): x[p+1] = g(x[p - W + 1]).

A copy head attends the oldest key of its sliding window, so a decode path that
drops (or adds) one window key emits a different token (see :func:`_make_window_copy`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

from sglang_gemma4.testing.ckpt_common import _zero_blocks
from sglang_gemma4.testing.ckpt_specs import FIRST_PROMPT_ID, SLIDING, CheckpointSpec, TextSpec

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
