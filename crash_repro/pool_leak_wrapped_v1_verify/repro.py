"""'pool memory leak detected!' from SGLang's own invariant checker on double KV bookkeeping.

Real SGLang 0.5.17 objects on CPU: ``MHATokenToKVPool`` + ``TokenToKVPoolAllocator``
(page_size 1), ``ReqToTokenPool``, ``ChunkCache``, ``SchedulerPoolStatsObserver``
and ``SchedulerInvariantChecker`` (the idle check ``Scheduler.on_idle`` runs:
``_check_all_pools`` then ``_report_leak``; strict mode raises). One request is
prefilled, decoded for a few speculative steps and finished, in two variants:

* ``wrapped``: the seed's composition wrap. The spec-v2 scheduler reserves the
  draft slots of each step (and owns kv_allocated/committed lengths); the
  wrapped v1 verify allocates slots for the same positions again and writes
  them into ``req_to_token`` over the scheduler's. Those first slots are
  referenced by no request any more, so nothing frees them: they leak.
* ``single-owner``: only the scheduler allocates and commits (what 0.5.17's
  ``FrozenKVMTPWorkerV2`` + ``batch_result_processor`` do); the check passes.

Usage: python repro.py   (CPU; no GPU needed)
"""

import os

import torch

os.environ["SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE"] = "1"  # raise, as in SGLang's CI

POOL, PROMPT, DRAFT, ACCEPT, STEPS = 256, 20, 4, [3, 1, 0, 2], 4


def build():
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.managers.scheduler_components.invariant_checker import SchedulerInvariantChecker
    from sglang.srt.managers.scheduler_components.pool_stats_observer import SchedulerPoolStatsObserver
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.chunk_cache import ChunkCache
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    kv = MHATokenToKVPool(size=POOL, page_size=1, dtype=torch.bfloat16, head_num=1, head_dim=8,
                          layer_num=1, device="cpu", enable_memory_saver=False)
    alloc = TokenToKVPoolAllocator(POOL, torch.bfloat16, "cpu", kv, need_sort=False)
    r2t = ReqToTokenPool(size=4, max_context_len=128, device="cpu", enable_memory_saver=False)
    cache = ChunkCache(CacheInitParams(disable=True, req_to_token_pool=r2t,
                                       token_to_kv_pool_allocator=alloc, page_size=1))
    common = dict(tree_cache=cache, token_to_kv_pool_allocator=alloc, req_to_token_pool=r2t,
                  is_hybrid_swa=False, is_hybrid_ssm=False, full_tokens_per_layer=None,
                  swa_tokens_per_layer=None, max_total_num_tokens=POOL,
                  get_last_batch=lambda: None, get_running_batch=lambda: None)
    observer = SchedulerPoolStatsObserver(session_controller=None, hisparse_coordinator=None,
                                          enable_hisparse=False, **common)
    checker = SchedulerInvariantChecker(disaggregation_mode=DisaggregationMode.NULL, page_size=1,
                                        server_args=None, pool_stats_observer=observer, **common)
    return alloc, r2t, observer, checker


def serve_one_request(alloc, r2t, wrapped: bool):
    row = r2t.req_to_token[1]
    row[:PROMPT] = alloc.alloc(PROMPT).to(row.dtype)  # prefill
    committed = allocated = PROMPT
    for step in range(STEPS):
        # scheduler (spec v2): reserve slots for this step's draft tokens
        row[allocated:allocated + DRAFT] = alloc.alloc(DRAFT).to(row.dtype)
        allocated += DRAFT
        if wrapped:  # wrapped v1 verify: prepare_for_verify allocates the same positions again
            row[committed:committed + DRAFT] = alloc.alloc(DRAFT).to(row.dtype)
        committed += ACCEPT[step] + 1  # accepted drafts + bonus token
        alloc.free(row[committed:allocated].long())  # rejected tail back to the pool
        allocated = committed
    alloc.free(row[:committed].long())  # request finished: release its KV


def main():
    for wrapped in (False, True):
        alloc, r2t, observer, checker = build()
        serve_one_request(alloc, r2t, wrapped)
        has_leak, messages = checker._check_all_pools(observer.get_pool_stats())
        print(f"[{'wrapped v1 verify' if wrapped else 'single owner'}] has_leak={has_leak} {messages}")
        try:
            if has_leak:
                checker._report_leak("pool", "\n".join(messages))  # what Scheduler.on_idle does
            print("  idle check passed")
        except ValueError as e:
            print(f"  ValueError: {e}")


if __name__ == "__main__":
    main()
