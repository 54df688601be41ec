"""Split count of SGLang's triton decode attention for Gemma-4, sized to the batch (``--triton-attention-num-kv-splits``).

Why: SGLang sizes a decode step's split count with ``get_num_kv_splits_triton`` and caps it at
``triton_attention_num_kv_splits`` (default 8). At small batches the cap binds: on the full-depth 26B-A4B at
batch 1 each program walks 1/8 of the keys, ~28 us per layer at 1k keys where reading them takes ~2 us, and
decode attention is 18-31 % of the step (runs/decode-profile-26b-nvidia-h200.md). The FROZEN_KV_MTP draft's
attention over the target's KV takes the same path. A plain higher cap is not the answer: SGLang's formula
oversubscribes the GPU (``SMs x log2(keys / 64)`` programs) and at batch 16 picks 17-29 splits, 11-15 % slower
than 8 on the full layers; at batch 1 and 1k keys 32 splits (31 keys each) lose to 16
(runs/decode-attention-nvidia-h200.md, H200).

What, two hooks:
- AFTER ``TritonAttnBackend.__init__`` raises the backend's ``max_kv_splits`` (what the decode scratch buffers
  and the kernels' grid are sized by) to ``SGLANG_GEMMA4_DECODE_KV_SPLITS_CAP`` (default 32) for Gemma-4 model
  runners when the user left ``--triton-attention-num-kv-splits`` at SGLang's default. (0.5.17's model-override
  registry refuses this field: it is not "resolvable", and a declaration of it stops ServerArgs.)
- AROUND ``TritonAttnBackend.get_num_kv_splits`` picks the cap SGLang's formula runs under, per batch, from host
  integers only (no sync, so CUDA-graph replay metadata stays as cheap as SGLang's): about one wave of programs,
  ``cdiv(SMs, programs per split)`` clamped to [SGLang's default, the raised cap], where programs per split is
  SGLang's own ``token_grid``. Where that is SGLang's default, SGLang's call runs unchanged. Above it, each
  sequence's count is then clamped to ``cdiv(keys, 64)``: fewer than ~64 keys per program loses to fewer splits.
Cost: the scratch (``attn_logits``: CUDA-graph tokens x q heads x cap x head dim, fp32, one for the 512-wide and
one for the 256-wide layers) grows linearly with the cap: for 26B-A4B at cap 32, ~100 MB for 64 graph tokens
(plain decode), ~300 MB for FROZEN_KV_MTP's 48 x 4 verify tokens (4x SGLang's 8); the stage-1 grid is the cap
wide, so a batch that keeps 8 splits launches 4x the programs, most of which return at once (~2 % in the bench).
Left alone: deterministic mode (its own split tiles), MLA, ``SGLANG_TRITON_DECODE_ATTN_STATIC_KV_SPLITS`` (every
sequence would take the cap), a user-set cap.

Default off until ``bench/serve.py`` (part ``decode-splits-ab``) has measured it in a server.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

import torch

from sglang_gemma4.registry import Patch, SettingError

logger = logging.getLogger("sglang_gemma4")

BACKEND = "sglang.srt.layers.attention.triton_backend.TritonAttnBackend"
INIT = BACKEND + ".__init__"
SPLITS = BACKEND + ".get_num_kv_splits"
CAP_ENV = "SGLANG_GEMMA4_DECODE_KV_SPLITS_CAP"
DEFAULT_CAP = 32
MAX_CAP = 256  # SGLang's own ceiling for the MLA path; beyond it the scratch outgrows any gain
MIN_KEYS_PER_SPLIT = 64  # H200: 16 splits beat 32 at 1k keys, 64 splits tie 32 at 8k (decode-attention bench)
MARK = "_gemma4_default_kv_splits"  # set on a backend whose cap this patch raised: SGLang's cap, for small grids


def split_cap(environ: Optional[Mapping[str, str]] = None) -> int:
    env = os.environ if environ is None else environ
    raw = (env.get(CAP_ENV) or "").strip()
    if not raw:
        return DEFAULT_CAP
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_CAP:
        raise SettingError(CAP_ENV, env.get(CAP_ENV),
                           f"invalid value {raw!r} for environment variable {CAP_ENV}; expected an integer split "
                           f"cap in [1, {MAX_CAP}] (default {DEFAULT_CAP})")
    return int(raw)


_told: set = set()


def after_init(result, self, model_runner, *args, **kwargs):
    try:
        from sglang.srt.server_args import ServerArgs

        from sglang_gemma4.patches.triton_swa_window import is_gemma4_runner

        user = getattr(getattr(model_runner, "server_args", None), "triton_attention_num_kv_splits", None)
        why = None
        if not is_gemma4_runner(model_runner):
            why = "not a Gemma-4 model"
        elif user != ServerArgs.triton_attention_num_kv_splits:  # no "unset" sentinel in 0.5.17: the default is it
            why = f"--triton-attention-num-kv-splits {user} set by the user; kept"
        elif getattr(self, "split_tile_size", None) is not None or getattr(self, "use_mla", False):
            why = "deterministic split tiles or MLA"
        elif getattr(self, "static_kv_splits", False):
            why = "SGLANG_TRITON_DECODE_ATTN_STATIC_KV_SPLITS: every sequence would take the cap"
        elif self.max_kv_splits == user:
            cap = split_cap()
            self.max_kv_splits = cap
            setattr(self, MARK, user)
            if "set" not in _told:
                _told.add("set")
                logger.info("Gemma-4 triton decode attention: up to %d splits at small batches, SGLang's %s "
                            "where the batch fills the GPU (sglang-gemma4)", cap, user)
        if why is not None and why not in _told:
            _told.add(why)
            logger.info("decode_kv_splits: a triton backend keeps its split cap: %s", why)
    except Exception:  # unexpected backend shape: SGLang's behaviour
        logger.exception("decode_kv_splits: check failed; backend left unpatched")
    return None


def token_grid(num_seq: int, num_group: int, num_head: int, num_kv_head: int) -> int:
    """Programs per split of SGLang's decode stage 1, as ``get_num_kv_splits_triton`` counts them."""
    kv_group = num_head // num_kv_head
    if kv_group == 1:
        return num_seq * num_group * num_head
    block_h = min(16, kv_group)  # _decode_grouped_att_m_fwd's head block
    return num_seq * num_group * -(-num_head // block_h)


def batch_cap(grid: int, cores: int, default: int, cap: int) -> int:
    """About one wave of programs: SGLang's default where the batch alone fills the GPU, up to ``cap`` below;
    never above ``cap``, which sized the buffers (a cap knob below SGLang's default wins)."""
    return min(cap, max(default, -(-cores // max(grid, 1))))


def around_get_num_kv_splits(original, self, num_kv_splits, seq_lens):
    default = self.__dict__.get(MARK)
    if default is None:
        return original(self, num_kv_splits, seq_lens)  # a cap we did not raise: SGLang's own
    num_token, num_seq = num_kv_splits.shape[0], seq_lens.shape[0]
    group = num_token // max(num_seq, 1)
    cap = self.max_kv_splits
    cores = getattr(self, "device_core_count", 0)
    # no SM count: SGLang would fill every sequence with the cap, so give it its default
    want = default if cores <= 0 else batch_cap(token_grid(num_seq, group, self.num_head, self.num_kv_head),
                                                cores, default, cap)
    self.max_kv_splits = want  # the kernel reads it as an argument; buffers stay sized by the raised cap
    try:
        result = original(self, num_kv_splits, seq_lens)
    finally:
        self.max_kv_splits = cap
    if want > min(default, cap) and num_seq:
        # per step on the host's launch path: broadcast over the draft groups (sequence-major) instead of
        # materialising a repeated copy
        least = torch.clamp((seq_lens + (MIN_KEYS_PER_SPLIT - 1)) // MIN_KEYS_PER_SPLIT, min=1)
        per_seq = num_kv_splits.view(num_seq, group)
        torch.minimum(per_seq, least.to(per_seq.dtype).unsqueeze(1), out=per_seq)
    return result


class DecodeKVSplits(Patch):
    name = "decode_kv_splits"
    summary = ("triton decode attention splits sized to the batch for Gemma-4 (SGLang's "
               "--triton-attention-num-kv-splits 8 binds at small batches)")
    knob = "SGLANG_GEMMA4_DECODE_KV_SPLITS"
    default = False  # until a server A/B (part decode-splits-ab) has measured it
    seed = "- (issue #20 decode profile; not in the seed)"
    targets = (INIT, SPLITS)

    def validate(self, environ) -> None:
        split_cap(environ)

    def detail(self, value: Optional[bool]) -> str:
        if not value:
            return ""
        return (f"{self.knob}=1: Gemma-4 triton decode attention splits up to {split_cap()} at small batches "
                "unless the user set a cap")

    def upstream(self) -> Optional[str]:
        from sglang.srt.server_args import ServerArgs

        if ServerArgs.triton_attention_num_kv_splits != 8:  # the cap this patch was measured against
            return (f"SGLang's default triton_attention_num_kv_splits is now "
                    f"{ServerArgs.triton_attention_num_kv_splits} (was 8)")
        return None

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(INIT, after_init, HookType.AFTER)
        self.hook(SPLITS, around_get_num_kv_splits, HookType.AROUND)


PATCH = DecodeKVSplits()
