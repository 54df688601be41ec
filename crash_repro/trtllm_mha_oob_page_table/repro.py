"""trtllm_mha OOB page table under FROZEN_KV_MTP + SWA: the trap and the Patch E contract.

Builds the target's real SWAKVPool + SWATokenToKVPoolAllocator, lets full-pool
ids run ahead of SWA ids (as in a long-running server at high pool use), then
hands the SWA-layer page table of a FROZEN_KV_MTP draft backend to the
``SGLANG_TRTLLM_MHA_DEBUG`` trap twice:

1. seed state (draft backend's ``_swa_kv_pool`` taken from its own non-SWA
   pool = None): the SWA layer gets full-pool page ids -> the trap raises
   where the SM100 kernel would fault asynchronously;
2. SGLang 0.5.17 (``_resolve_swa_kv_pool`` returns the target pool): the
   SWA page table is translated -> the trap stays silent.

On CUDA the page tables come from SGLang's own device builder
(``TRTLLMHAAttnBackend._fill_page_table_device``); on CPU from
``req_to_token`` + the full->SWA mapping in torch. The flashinfer kernel is
never launched (SM100 only). Usage: python repro.py [--dump-dir DIR]
"""

import argparse
import os
import tempfile
import types

import torch

from sglang_gemma4.patches import trtllm_mha_debug as dbg
from sglang_gemma4.testing.hooks import patch_applied

SWA_LAYER, FULL_LAYER = 0, 1
FULL_TOKENS, SWA_TOKENS, RUN_AHEAD, SEQ = 4096, 512, 2048, 300


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump-dir", default=tempfile.mkdtemp(prefix="trtllm_mha_debug_"))
    args = ap.parse_args()
    os.environ[dbg.DIR_ENV] = args.dump_dir
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    from sglang.srt.layers.attention.trtllm_mha_backend import TRTLLMHAAttnBackend, TRTLLMMHAMetadata
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    page = 1  # SWATokenToKVPoolAllocator.alloc (no triton) path; page ids == token ids
    pool = SWAKVPool(size=FULL_TOKENS, size_swa=SWA_TOKENS, page_size=page, dtype=torch.bfloat16,
                     head_num=1, head_dim=8, swa_attention_layer_ids=[SWA_LAYER],
                     full_attention_layer_ids=[FULL_LAYER], device=dev)
    alloc = SWATokenToKVPoolAllocator(FULL_TOKENS, SWA_TOKENS, page, torch.bfloat16, dev, pool, False)
    alloc.full_attn_allocator.alloc(RUN_AHEAD)  # full ids run ahead of SWA ids
    slots = alloc.alloc(SEQ)
    req_to_token = torch.zeros(2, FULL_TOKENS, dtype=torch.int32, device=dev)
    req_to_token[1, :SEQ] = slots.to(torch.int32)
    seq_lens = torch.tensor([SEQ], dtype=torch.int32, device=dev)
    own = MHATokenToKVPool(size=64, page_size=page, dtype=torch.bfloat16, head_num=1, head_dim=8,
                           layer_num=2, device=dev, enable_memory_saver=False)
    print(f"device={dev} full k cache rows={pool.get_kv_buffer(FULL_LAYER)[0].shape[0]} "
          f"SWA k cache rows={pool.get_kv_buffer(SWA_LAYER)[0].shape[0]} request seq_len={SEQ}")

    def draft_backend(swa_pool):
        b = object.__new__(TRTLLMHAAttnBackend)
        b.token_to_kv_pool = pool  # borrowed inside target_kv_pool_view
        b._swa_kv_pool = swa_pool
        b.page_size, b.req_to_token, b.max_num_pages, b.device = page, req_to_token, FULL_TOKENS, dev
        md = TRTLLMMHAMetadata(cache_seqlens_int32=seq_lens)
        md.page_table = torch.zeros(1, FULL_TOKENS, dtype=torch.int32, device=dev)
        md.swa_page_table = b._alloc_swa_page_table(1, FULL_TOKENS) if dev == "cuda" else (
            None if swa_pool is None else torch.zeros(1, FULL_TOKENS, dtype=torch.int32))
        if dev == "cuda":  # SGLang's own on-device page-table builder (triton)
            b._fill_page_table_device(md, torch.tensor([1], device=dev), seq_lens)
        else:
            md.page_table[0, :SEQ] = req_to_token[1, :SEQ]
            if swa_pool is not None:
                md.swa_page_table[0, :SEQ] = swa_pool.translate_loc_from_full_to_swa(
                    req_to_token[1, :SEQ].long()).to(torch.int32)
        b.forward_metadata = md
        return b

    layer = types.SimpleNamespace(layer_id=SWA_LAYER, attn_type=AttentionType.DECODER)
    fb = types.SimpleNamespace(forward_mode=ForwardMode.DECODE)
    qkv = (torch.zeros(1, 8, device=dev),) * 3
    runner = types.SimpleNamespace(is_draft_worker=True, spec_algorithm=SpeculativeAlgorithm.FROZEN_KV_MTP,
                                   token_to_kv_pool=own, token_to_kv_pool_allocator=alloc)
    seed_resolved = own if isinstance(own, SWAKVPool) else None

    with patch_applied(dbg.PATCH, {"SGLANG_TRTLLM_MHA_DEBUG": "1"}) as st:
        print(f"patch {st.name}: {st.state}")
        print("\n[1] seed state: draft backend _swa_kv_pool =", seed_resolved)
        try:
            draft_backend(seed_resolved).forward_decode(*qkv, layer, fb, save_kv_cache=False)
            print("UNEXPECTED: no trap")
        except dbg.TrtllmMhaDebugError as e:
            print("TRAP:", e)
            d = torch.load(e.dump_path)
            print(f"dump keys={sorted(d)} page_table={tuple(d['page_table'].shape)} seq_lens={d['seq_lens'].tolist()}")

        resolved = TRTLLMHAAttnBackend._resolve_swa_kv_pool(runner)
        print("\n[2] SGLang 0.5.17: _resolve_swa_kv_pool(draft runner) is target pool:", resolved is pool)
        b = draft_backend(resolved)
        dbg.before_forward_decode(b, *qkv, layer, fb, save_kv_cache=False)  # the hook the kernel call goes through
        used = b._get_layer_page_table(layer, fb)[0, :SEQ]
        print(f"no trap: SWA-layer page ids in [{int(used.min())}, {int(used.max())}] "
              f"< {pool.get_kv_buffer(SWA_LAYER)[0].shape[0] // page} SWA pages")


if __name__ == "__main__":
    main()
