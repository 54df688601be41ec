"""Split cap of SGLang's triton decode attention for Gemma-4 (``--triton-attention-num-kv-splits``).

Why: SGLang sizes a decode step's split count with ``get_num_kv_splits_triton`` and caps it at
``triton_attention_num_kv_splits`` (default 8). At small batches the cap binds: on the full-depth 26B-A4B at
batch 1 each program walks 1/8 of the keys, ~28 us per layer at 1k keys where reading them takes ~2 us, and
decode attention is 18-31 % of the step (runs/decode-profile-26b-nvidia-h200.md). At larger batches SGLang's own
formula picks fewer splits than the cap, so a higher cap changes nothing there. The FROZEN_KV_MTP draft's
attention over the target's KV takes the same path.

What: an AFTER hook on ``TritonAttnBackend.__init__`` raises the backend's ``max_kv_splits`` to
``SGLANG_GEMMA4_DECODE_KV_SPLITS_CAP`` (default 32) for Gemma-4 model runners when the user left
``--triton-attention-num-kv-splits`` at SGLang's default. (0.5.17's model-override registry refuses this field:
it is not "resolvable", and a declaration of it stops ServerArgs.) The decode scratch buffers are sized from
``max_kv_splits`` after ``__init__``, so they follow. Cost: that scratch (``attn_logits``: CUDA-graph tokens x q heads x
cap x head dim, fp32, one for the 512-wide and one for the 256-wide layers) grows linearly with the cap: for
26B-A4B at cap 32, ~100 MB for 64 graph tokens (plain decode), ~300 MB for FROZEN_KV_MTP's 48 x 4 verify tokens
(4x SGLang's 8).
Left alone: deterministic mode (its own split tiles), MLA, ``SGLANG_TRITON_DECODE_ATTN_STATIC_KV_SPLITS`` (every
sequence would take the cap), a user-set cap.

Default off until ``bench/decode_attention.py`` (part ``decode-attn``) has chosen the cap on a GPU.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

from sglang_gemma4.registry import Patch, SettingError

logger = logging.getLogger("sglang_gemma4")

INIT = "sglang.srt.layers.attention.triton_backend.TritonAttnBackend.__init__"
CAP_ENV = "SGLANG_GEMMA4_DECODE_KV_SPLITS_CAP"
DEFAULT_CAP = 32
MAX_CAP = 256  # SGLang's own ceiling for the MLA path; beyond it the scratch outgrows any gain


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
            if "set" not in _told:
                _told.add("set")
                logger.info("Gemma-4 triton decode attention: split cap %d (SGLang's default %s; sglang-gemma4)",
                            cap, user)
        if why is not None and why not in _told:
            _told.add(why)
            logger.info("decode_kv_splits: a triton backend keeps its split cap: %s", why)
    except Exception:  # unexpected backend shape: SGLang's behaviour
        logger.exception("decode_kv_splits: check failed; backend left unpatched")
    return None


class DecodeKVSplits(Patch):
    name = "decode_kv_splits"
    summary = "triton decode attention split cap for Gemma-4 (SGLang's --triton-attention-num-kv-splits 8 binds at small batches)"
    knob = "SGLANG_GEMMA4_DECODE_KV_SPLITS"
    default = False  # until bench/decode_attention.py has measured the cap on a GPU
    seed = "- (issue #20 decode profile; not in the seed)"
    targets = (INIT,)

    def validate(self, environ) -> None:
        split_cap(environ)

    def detail(self, value: Optional[bool]) -> str:
        if not value:
            return ""
        return f"{self.knob}=1: Gemma-4 triton decode attention split cap {split_cap()} unless the user set one"

    def upstream(self) -> Optional[str]:
        from sglang.srt.server_args import ServerArgs

        if ServerArgs.triton_attention_num_kv_splits != 8:  # the cap this patch was measured against
            return (f"SGLang's default triton_attention_num_kv_splits is now "
                    f"{ServerArgs.triton_attention_num_kv_splits} (was 8)")
        return None

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(INIT, after_init, HookType.AFTER)


PATCH = DecodeKVSplits()
