"""SGLANG_GEMMA4_FORCE_EAGLE: opt out of NEXTN/EAGLE -> FROZEN_KV_MTP promotion.

Seed PR #22 (scheduler guard commit, part 3) added the knob so users could A/B
vanilla EAGLE against FROZEN_KV_MTP for Gemma-4 assistant drafts, while noting
that EAGLE "currently can't actually serve the Gemma4 assistant".

That is still true in SGLang 0.5.17, for reasons that make EAGLE fail deep in
the worker (or produce garbage drafts) rather than at start-up:

* The assistant owns no KV projections: HF's ``Gemma4AssistantConfig`` makes
  every layer KV-shared and the checkpoint has no k/v weights. Only
  FROZEN_KV_MTP binds the target's KV pool (``bind_frozen_kv_context``);
  ``EAGLEWorkerV2`` gives the draft its own pool that nothing could fill.
* Its recurrent input is the *target's* hidden state (``backbone_hidden_size``,
  through ``pre_projection``), while EAGLE sizes the draft-step hidden-state
  buffers from the draft's own ``hidden_size`` (``get_draft_recurrent_hidden_state_spec``).

So with the knob on, SGLang's alias resolution
(``speculative_hook._resolve_speculative_algorithm_alias``) is left as is and
an AFTER hook turns its silent promotion into a start-up error that names the
knob. Explicit ``--speculative-algorithm FROZEN_KV_MTP`` and non-Gemma-4
drafts are untouched.
"""

from __future__ import annotations

from typing import Any, Optional

from sglang_gemma4.registry import Patch

RESOLVE_ALIAS = "sglang.srt.arg_groups.speculative_hook._resolve_speculative_algorithm_alias"
KNOB = "SGLANG_GEMMA4_FORCE_EAGLE"
PROMOTED = "FROZEN_KV_MTP"
PROMOTABLE = ("NEXTN", "EAGLE")


class ForceEagleUnsupportedError(ValueError):
    """EAGLE was forced for a Gemma-4 assistant draft, which EAGLE cannot serve."""


def _draft_sizes(draft_path: Optional[str], trust_remote_code: bool) -> str:
    try:
        from sglang.srt.utils.hf_transformers_utils import get_config

        cfg = get_config(draft_path, trust_remote_code=trust_remote_code)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return (
            f" (draft {cfg.architectures[0]}: hidden_size={text.hidden_size}, "
            f"backbone_hidden_size={getattr(cfg, 'backbone_hidden_size', '?')})"
        )
    except Exception:  # the message must not depend on re-reading the config
        return ""


def refuse_promotion(result: Optional[str], *args: Any, **kwargs: Any) -> Optional[str]:
    """AFTER hook on the alias resolver: original result, or a clear error."""
    algo = args[0] if args else kwargs.get("speculative_algorithm")
    if result != PROMOTED or algo not in PROMOTABLE:
        return result
    draft = args[1] if len(args) > 1 else kwargs.get("speculative_draft_model_path")
    trust = args[2] if len(args) > 2 else kwargs.get("trust_remote_code", False)
    raise ForceEagleUnsupportedError(
        f"{KNOB}=1 keeps --speculative-algorithm {algo} as EAGLE, but the draft "
        f"{draft!r} is a Gemma-4 assistant{_draft_sizes(draft, trust)}, which SGLang "
        "0.5.17's EAGLE worker cannot serve: the assistant has no KV projections of "
        "its own (it reads the target's KV cache, which only FROZEN_KV_MTP binds) and "
        "its recurrent state has the target's hidden size, not the draft's. "
        f"Unset {KNOB} (or set it to 0) to let SGLang run this draft as FROZEN_KV_MTP."
    )


class ForceEagle(Patch):
    name = "force_eagle"
    summary = (
        "keep NEXTN/EAGLE as EAGLE instead of promoting Gemma-4 assistant drafts to "
        "FROZEN_KV_MTP; SGLang 0.5.17's EAGLE cannot serve that draft, so such a "
        "launch stops at start-up with an error naming this knob"
    )
    knob = KNOB
    default = False
    seed = "PR #22 FROZEN_KV_MTP zero-accept fix, part 3 (SGLANG_GEMMA4_FORCE_EAGLE)"
    targets = (RESOLVE_ALIAS,)

    def detail(self, value: Optional[bool]) -> str:
        if value:
            return "NEXTN/EAGLE with a Gemma-4 assistant draft is refused at start-up (EAGLE cannot serve it)"
        return "SGLang promotes NEXTN/EAGLE with a Gemma-4 assistant draft to FROZEN_KV_MTP"

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(RESOLVE_ALIAS, refuse_promotion, HookType.AFTER)


PATCH = ForceEagle()
