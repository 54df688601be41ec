"""FROZEN_KV_MTP draft step without its per-step device-to-host sync (issue #19).

SGLang 0.5.17's ``FrozenKVMTPDraftWorker.draft()`` starts every speculative decode step with
``batch.seq_lens_sum = torch.sum(batch.seq_lens).item()``. Under the overlap schedule
(``SGLANG_FROZEN_KV_MTP_V2=1``, SGLang's default) ``batch.seq_lens`` is written on the GPU by the
previous step's verify, so the ``.item()`` blocks the scheduler until the GPU has drained step N
before it can build and launch step N+1: overlap degenerates to synchronous plus its own
bookkeeping. EAGLE v2 avoids exactly this (``eagle_worker_common.py``: "Skip per-iter
.sum().item() D2H via UB"); the frozen worker does not.

What needs the sum, and what this patch gives each (0.5.17):

* ``build_tree_kernel_efficient`` only sizes the FULL_MASK tree mask with it; over-size is safe
  (EAGLE's comment, and the mask is indexed from ``seq_lens`` on the GPU): exact host sum when
  ``seq_lens_cpu`` exists, else ``bs * req_to_token.shape[1]`` (no sequence is longer than its row;
  SGLang's row has spec slack past the context, so ``bs * max_context_len`` could under-size it).
  The verify CUDA graph copies the mask into the target backend's buffer, sized
  ``max_bs * ndraft * (max_context_len + ndraft)``: near the captured max batch the bound-sized
  mask does not fit (``RuntimeError: The expanded size of the tensor (32896) must match the existing
  size (33152)``, the modes test on the H200 at ``bs == max_bs``), so such a step runs SGLang's own
  draft (one sync) instead of a trimmed mask that could hide an over-long request.
* The draft CUDA graph's ``execute`` adds padding to it and hands it to the draft backend's
  replay. ``TritonAttnBackend`` reads it only to translate a unified (virtual -> physical) pool's
  KV indices and ``TRTLLMHAAttnBackend`` never: the bound is used only with those two backends
  and no unified-pool translate. Any other backend runs SGLang's draft unchanged.
* The ScheduleBatch / verify input keep what SGLang's own GPU-only path keeps: the exact host sum
  when the host mirror exists, else ``None``, as EAGLE v2 passes. ``prepare_for_verify`` and
  ``ForwardBatch.init_new`` recompute it from ``seq_lens_cpu`` themselves.

Hook: AROUND ``FrozenKVMTPDraftWorker.draft`` (source pinned). The hook re-states the 0.5.17
method's sequence with SGLang's own calls; only the sum differs. Idle batches and unsupported
backends go to the original. ``topk > 1`` still syncs once inside SGLang's
``expand_for_topk_draft`` (which recomputes the sum); the default ``topk == 1`` does not.

Default off until the overlap A/B and the lossless GPU checks have run with it on.
Enable with ``SGLANG_GEMMA4_MTP_DRAFT_NO_SYNC=1``.
"""

from __future__ import annotations

import logging
from typing import Optional

from sglang_gemma4.registry import Patch, source_of, source_pin_reason

MODULE = "sglang.srt.speculative.frozen_kv_mtp_worker_v2"
TARGET = MODULE + ".FrozenKVMTPDraftWorker.draft"
SYNC_LINE = "batch.seq_lens_sum = torch.sum(batch.seq_lens).item()"

# sha256 of inspect.getsource(FrozenKVMTPDraftWorker.draft) in SGLang 0.5.17 (re-stated below).
DRAFT_SHA256 = "95d7478c8637bb9ec0d910f5cbcb4110b309816d6b423495987c34753acb3ff3"
# Draft backends whose CUDA-graph replay tolerates an over-estimated seq_lens_sum (see above).
BOUND_OK_BACKENDS = ("TritonAttnBackend", "TRTLLMHAAttnBackend")
FIRED = "FROZEN_KV_MTP draft step sized from the host (no seq_lens .item())"

logger = logging.getLogger("sglang_gemma4")
_announced = False
FELL_BACK = "FROZEN_KV_MTP draft step: the bounded tree mask would not fit the verify graph; SGLang's exact draft"
_fallback_announced = False


class MtpDraftNoSync(Patch):
    name = "mtp_draft_no_sync"
    summary = "FROZEN_KV_MTP draft step without its per-step .item() host sync (default off until measured)"
    knob = "SGLANG_GEMMA4_MTP_DRAFT_NO_SYNC"
    default = False
    seed = "- (issue #19 overlap regression; not in the seed)"
    targets = (TARGET,)

    def upstream(self) -> Optional[str]:
        if SYNC_LINE not in _draft_source():
            return "FrozenKVMTPDraftWorker.draft no longer syncs on torch.sum(seq_lens).item()"
        return None

    def unavailable(self) -> Optional[str]:
        src = _draft_source()
        if SYNC_LINE not in src:
            return None  # upstream() reports it
        return source_pin_reason(src, DRAFT_SHA256, "FrozenKVMTPDraftWorker.draft", "the hook re-states it")

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(TARGET, draft, HookType.AROUND)


PATCH = MtpDraftNoSync()


def _draft_source() -> str:
    from sglang.srt.speculative.frozen_kv_mtp_worker_v2 import FrozenKVMTPDraftWorker

    return source_of(FrozenKVMTPDraftWorker.draft)


def bound_ok(worker) -> bool:
    """The draft backend is one whose graph replay tolerates an over-sized seq_lens_sum."""
    backend = getattr(worker, "draft_attn_backend", None)
    return (type(backend).__name__ in BOUND_OK_BACKENDS
            and getattr(backend, "_translate_kv_loc", None) is None)


def host_seq_lens_sum(batch) -> Optional[int]:
    """The exact sum from the host mirror, without touching the GPU; None without a mirror."""
    cpu = batch.seq_lens_cpu
    return int(cpu.sum()) if cpu is not None else None


def seq_lens_bound(batch) -> int:
    """No request is longer than its req_to_token row."""
    return int(batch.seq_lens.shape[0]) * int(batch.req_to_token_pool.req_to_token.shape[1])


def mask_fits_verify_graph(worker, bs: int, seq_lens_sum: int) -> bool:
    """The FULL_MASK sized by ``seq_lens_sum`` fits the target's verify CUDA-graph buffer (or none is used)."""
    vm = getattr(worker.target_worker.model_runner.attn_backend, "verify_mask", None)
    if vm is None or not vm.fits(bs):  # no buffer for this batch: verify reads the mask as allocated
        return True
    nd = worker.speculative_num_draft_tokens
    return seq_lens_sum * nd + nd * nd * bs <= vm.buffer.numel()


def draft(original, worker, batch):
    """AROUND hook: SGLang 0.5.17's draft step, its seq_lens_sum taken from the host."""
    if batch.forward_mode.is_idle() or not bound_ok(worker):
        return original(worker, batch)
    exact = host_seq_lens_sum(batch)
    size = exact if exact is not None else seq_lens_bound(batch)
    if exact is None and not mask_fits_verify_graph(worker, int(batch.seq_lens.shape[0]), size):
        global _fallback_announced
        if not _fallback_announced:  # once: the logs show the captured-max-batch path was reached
            _fallback_announced = True
            logger.info("%s (bs=%d)", FELL_BACK, int(batch.seq_lens.shape[0]))
        return original(worker, batch)
    from sglang.srt.speculative import frozen_kv_mtp_worker_v2 as m  # its globals: a test's stand-ins serve both paths
    spec_info = batch.spec_info
    spec_info.capture_hidden_mode = m.CaptureHiddenMode.LAST
    spec_info.num_tokens_per_req = worker.topk  # the draft forward's width: topk tokens per request
    spec_info.num_tokens_for_logprob_per_req = worker.topk
    spec_info.positions = worker._position_for_batch(batch)
    global _announced
    if not _announced:  # once per process: the engine logs show the hook ran, and how
        _announced = True
        logger.info("%s: %s", FIRED, "exact host sum" if exact is not None else "bound bs * req_to_token row")
    batch.seq_lens_sum = exact  # None is SGLang's GPU-only signal (what EAGLE v2 leaves)
    batch.return_hidden_states = False

    forward_batch = m.ForwardBatch.init_new(batch, worker.draft_model_runner,
                                            return_hidden_states_before_norm=False)
    assert forward_batch.capture_hidden_mode == m.CaptureHiddenMode.LAST
    if forward_batch.seq_lens_sum is None:
        forward_batch.seq_lens_sum = size  # the graph runner adds its padding to an int
    worker._set_positions(forward_batch)
    worker._expand_for_topk_draft(forward_batch)
    forward_batch.out_cache_loc = None  # the frozen draft writes no KV

    runner = worker.cuda_graph_runner
    if runner and runner.can_run_graph(forward_batch):
        parent_list, top_scores_index, draft_tokens = runner.execute(forward_batch)
    else:
        forward_batch.can_run_dp_cuda_graph = False
        parent_list, top_scores_index, draft_tokens = worker.draft_forward(forward_batch)

    (tree_mask, position, retrieve_index, retrieve_next_token, retrieve_next_sibling,
     draft_tokens) = m.build_tree_kernel_efficient(
        spec_info.bonus_tokens, parent_list, top_scores_index, draft_tokens, batch.seq_lens, size,
        worker.topk, worker.speculative_num_steps, worker.speculative_num_draft_tokens,
    )
    return m.FrozenKVMTPVerifyInput(
        draft_token=draft_tokens,
        custom_mask=tree_mask,
        positions=position,
        retrieve_index=retrieve_index,
        retrieve_next_token=retrieve_next_token,
        retrieve_next_sibling=retrieve_next_sibling,
        retrieve_cum_len=None,
        spec_steps=worker.speculative_num_steps,
        topk=worker.topk,
        draft_token_num=worker.speculative_num_draft_tokens,
        capture_hidden_mode=m.CaptureHiddenMode.FULL,
        seq_lens_sum=exact,
        seq_lens_cpu=batch.seq_lens_cpu,
    )
