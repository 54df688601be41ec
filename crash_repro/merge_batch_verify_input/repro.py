"""merge_batch AttributeError on a stale FrozenKVMTPVerifyInput, and the scheduler guard.

Builds two real ScheduleBatch objects on CPU (tiny Llama ModelConfig written to
a temp dir, real Req / SamplingBatchInfo / penalizer orchestrator): the running
batch still carries the ``FrozenKVMTPVerifyInput`` of a zero-accept verify
whose requests all finished (the seed's state), the other carries a normal
``FrozenKVMTPDraftInput``. Then:

1. unpatched SGLang 0.5.17 ``ScheduleBatch.merge_batch`` -> the seed's
   ``AttributeError: 'FrozenKVMTPVerifyInput' object has no attribute 'merge_batch'``;
2. with ``SGLANG_GEMMA4_SCHEDULER_GUARDS=1`` (patches/scheduler_guards.py) the
   merge completes and the merged spec_info is a draft input with one row per request.

Usage: python repro.py   (CPU; no GPU needed)
"""

import json
import tempfile
from array import array
from pathlib import Path

import torch

from sglang_gemma4.patches import scheduler_guards
from sglang_gemma4.testing.hooks import patch_applied

VOCAB, HIDDEN, TOPK = 64, 8, 2


def model_config():
    from sglang.srt.configs.model_config import ModelConfig

    d = Path(tempfile.mkdtemp(prefix="tiny_llama_"))
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
    }))
    return ModelConfig(str(d))


def batch(cfg, pool_idx, spec_info, finished):
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req, ScheduleBatch
    from sglang.srt.sampling.penaltylib.orchestrator import BatchedPenalizerOrchestrator
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo
    from sglang.srt.sampling.sampling_params import SamplingParams

    reqs = []
    for i in pool_idx:
        r = Req(f"req{i}", "", array("i", [1, 2, 3]), SamplingParams(max_new_tokens=4))
        if finished:
            r.finished_reason = FINISH_LENGTH(length=4)
        reqs.append(r)
    n, idx = len(pool_idx), torch.tensor(pool_idx)
    seq = idx + 10
    b = ScheduleBatch(reqs=reqs, model_config=cfg, device="cpu", req_pool_indices=idx,
                      req_pool_indices_cpu=idx.clone(), seq_lens=seq, orig_seq_lens=seq.clone(),
                      seq_lens_cpu=seq.clone(), spec_info=spec_info)
    b.sampling_info = SamplingBatchInfo(
        temperatures=torch.ones(n, 1), top_ps=torch.ones(n), top_ks=torch.ones(n, dtype=torch.int32),
        min_ps=torch.zeros(n), is_all_greedy=True, is_any_greedy=True, need_top_p_sampling=False,
        need_top_k_sampling=False, need_min_p_sampling=False, vocab_size=VOCAB, device="cpu")
    b.sampling_info.penalizer_orchestrator = BatchedPenalizerOrchestrator(VOCAB, b, set())
    return b


def verify_input(n, steps=2):
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
    from sglang.srt.speculative.frozen_kv_mtp_info import FrozenKVMTPVerifyInput

    k = steps + 1
    return FrozenKVMTPVerifyInput(
        draft_token=torch.zeros(n * k, dtype=torch.int64), custom_mask=torch.ones(n * k * k, dtype=torch.bool),
        positions=torch.zeros(n * k, dtype=torch.int64), retrieve_index=torch.zeros(n, k, dtype=torch.int64),
        retrieve_next_token=torch.full((n, k), -1), retrieve_next_sibling=torch.full((n, k), -1),
        retrieve_cum_len=None, spec_steps=steps, topk=1, draft_token_num=k,
        capture_hidden_mode=CaptureHiddenMode.FULL, seq_lens_sum=0, seq_lens_cpu=torch.zeros(n, dtype=torch.int64))


def draft_input(n):
    from sglang.srt.speculative.frozen_kv_mtp_info import FrozenKVMTPDraftInput

    g = torch.Generator().manual_seed(0)
    return FrozenKVMTPDraftInput(
        topk_p=torch.rand(n, TOPK, generator=g), topk_index=torch.randint(0, VOCAB, (n, TOPK), generator=g),
        hidden_states=torch.randn(n, HIDDEN, generator=g),
        bonus_tokens=torch.randint(0, VOCAB, (n,), generator=g, dtype=torch.int32))


def scenario(cfg):
    running = batch(cfg, [0, 1], verify_input(2), finished=True)  # zero-accept verify, no survivor
    last = batch(cfg, [2], draft_input(1), finished=False)
    return running, last


def main():
    cfg = model_config()
    running, last = scenario(cfg)
    print("[1] unpatched SGLang: running_batch.merge_batch(last_batch), running.spec_info =",
          type(running.spec_info).__name__)
    try:
        running.merge_batch(last)
        print("UNEXPECTED: no error")
    except AttributeError as e:
        print("AttributeError:", e)

    running, last = scenario(cfg)
    with patch_applied(scheduler_guards.PATCH, {"SGLANG_GEMMA4_SCHEDULER_GUARDS": "1"}) as st:
        print(f"\n[2] patch {st.name}: {st.state}")
        running.merge_batch(last)
    si = running.spec_info
    print(f"merged: {len(running.reqs)} reqs, spec_info={type(si).__name__} "
          f"with {si.topk_index.shape[0]} rows, req_pool_indices={running.req_pool_indices.tolist()}")
    running.filter_batch()  # the scheduler's next step drops the finished requests and their rows
    print(f"after filter_batch: {len(running.reqs)} req(s), spec_info rows={running.spec_info.topk_index.shape[0]}")


if __name__ == "__main__":
    main()
