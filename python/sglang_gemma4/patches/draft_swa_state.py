"""Draft attention backend sees the target's SWA pool under FROZEN_KV_MTP ("Patch E").

Seed commit "Patch E": the FROZEN_KV_MTP draft runner owns a small non-SWA
pool (the Gemma-4 assistant is not a hybrid-SWA architecture) and borrows the
target's ``SWAKVPool`` while it attends (``frozen_kv_target_view`` /
``target_kv_pool_view`` swap ``draft_attn_backend.token_to_kv_pool``). The seed's
trtllm_mha backend cached its SWA state (``_swa_kv_pool = None``) from the
draft's own pool at construction, so SWA layers got *full-pool* page ids and
the SM100 kernel read past the SWA k cache (async illegal address at ~85 %
pool use). The contract: a FROZEN_KV_MTP draft backend translates SWA layers
through the target's full->SWA mapping.

SGLang 0.5.17 already keeps it, at construction time:
``TRTLLMHAAttnBackend._resolve_swa_kv_pool`` and
``FlashInferAttnBackend._resolve_swa_kv_pool`` return the shared allocator's
SWA pool for a FROZEN_KV_MTP draft runner; the triton backend translates its
window indices through whatever pool it holds when metadata is built (the
borrowed target pool). :meth:`DraftSwaState.upstream` probes the two resolvers
with that exact case and reports ``upstream``. Only if a resolver fails the
probe are AFTER hooks registered that supply the target pool.
"""

from __future__ import annotations

import types
from typing import Any, List, Optional, Sequence

from sglang_gemma4.registry import Patch, resolve_target

TRTLLM_RESOLVE = "sglang.srt.layers.attention.trtllm_mha_backend.TRTLLMHAAttnBackend._resolve_swa_kv_pool"
FLASHINFER_RESOLVE = "sglang.srt.layers.attention.flashinfer_backend.FlashInferAttnBackend._resolve_swa_kv_pool"


def target_swa_pool(model_runner: Any):
    """The target's SWA pool a FROZEN_KV_MTP draft runner borrows, else None."""
    from sglang.srt.mem_cache.base_swa_memory_pool import BaseSWAKVPool

    if not getattr(model_runner, "is_draft_worker", False):
        return None
    algo = getattr(model_runner, "spec_algorithm", None)
    if algo is None or not algo.is_frozen_kv_mtp():
        return None
    if isinstance(model_runner.token_to_kv_pool, BaseSWAKVPool):
        return None  # the runner's own pool is SWA: resolvers already use it
    allocator = model_runner.token_to_kv_pool_allocator
    kvcache = allocator.get_kvcache() if allocator is not None else None
    return kvcache if isinstance(kvcache, BaseSWAKVPool) else None


def after_resolve_swa_kv_pool(result, model_runner, *args, **kwargs):
    """AFTER hook on ``_resolve_swa_kv_pool(model_runner)``: fill in the target pool."""
    if result is not None:
        return None
    try:
        return target_swa_pool(model_runner)
    except Exception:  # unexpected runner shape: keep SGLang's answer
        return None


def _probe_runner(spec_algorithm, is_draft: bool, own_pool, target_pool):
    allocator = types.SimpleNamespace(get_kvcache=lambda: target_pool)
    return types.SimpleNamespace(
        is_draft_worker=is_draft,
        spec_algorithm=spec_algorithm,
        token_to_kv_pool=own_pool,
        token_to_kv_pool_allocator=allocator,
    )


def contract_violations(targets: Sequence[str] = (TRTLLM_RESOLVE, FLASHINFER_RESOLVE)) -> List[str]:
    """Check each resolver on the FROZEN_KV_MTP draft case (and the EAGLE control).

    Stand-in runners carry only the four attributes the resolvers read; the
    pools are ``SWAKVPool`` / ``MHATokenToKVPool`` instances made without
    ``__init__`` (only their type is consulted).
    """
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    target_pool = object.__new__(SWAKVPool)
    draft_own = object.__new__(MHATokenToKVPool)
    out = []
    for target in targets:
        fn = resolve_target(target)
        name = ".".join(target.split(".")[-2:])
        frozen = fn(_probe_runner(SpeculativeAlgorithm.FROZEN_KV_MTP, True, draft_own, target_pool))
        if frozen is not target_pool:
            out.append(f"{name}: FROZEN_KV_MTP draft gets {type(frozen).__name__}, not the target SWAKVPool")
        eagle = fn(_probe_runner(SpeculativeAlgorithm.EAGLE, True, draft_own, target_pool))
        if eagle is not None:
            out.append(f"{name}: EAGLE draft (own KV pool) must not get the target SWA pool")
    return out


class DraftSwaState(Patch):
    name = "draft_swa_state"
    summary = "FROZEN_KV_MTP draft attention backend translates SWA layers through the target's SWA pool"
    knob = "SGLANG_GEMMA4_DRAFT_SWA_STATE"
    default = True
    seed = "Patch E: draft backend SWA state follows the borrowed target pool"
    targets = (TRTLLM_RESOLVE, FLASHINFER_RESOLVE)

    def upstream(self) -> Optional[str]:
        if contract_violations():
            return None
        return (
            "SGLang resolves the target SWA pool for FROZEN_KV_MTP draft backends at construction "
            "(TRTLLMHAAttnBackend/FlashInferAttnBackend._resolve_swa_kv_pool); triton translates "
            "through the borrowed pool"
        )

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        for target in self.targets:
            if contract_violations([target]):
                self.hook(target, after_resolve_swa_kv_pool, HookType.AFTER)


PATCH = DraftSwaState()
