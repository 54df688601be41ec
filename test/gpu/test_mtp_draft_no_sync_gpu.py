"""mtp_draft_no_sync on CUDA: SGLang's real build_tree_kernel_efficient sized by the bound.

The patch hands the tree builder ``bs * max_context`` instead of the exact ``sum(seq_lens)``
when there is no host mirror. The builder must then produce the same draft tokens, positions
and retrieve indices, and the same FULL_MASK entries for every position the verify reads
(its offsets come from ``seq_lens`` on the GPU); only the unread tail is extra. The engine-level
check (speculative greedy == plain greedy with the leak checks on) is part ``mtp-nosync``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("seq_lens", [[1], [37, 5, 120], [1024] * 8, list(range(1, 49))])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_tree_with_bound_equals_exact(seq_lens, steps):
    from sglang.srt.speculative.eagle_utils import build_tree_kernel_efficient

    from sglang.srt.speculative.eagle_utils import organize_draft_results
    from sglang.srt.speculative.spec_utils import select_top_k_tokens

    g = torch.Generator(device="cuda").manual_seed(len(seq_lens) * 10 + steps)
    bs, topk, ndraft = len(seq_lens), 1, steps + 1
    sl = torch.tensor(seq_lens, device="cuda", dtype=torch.int64)
    bonus = torch.randint(0, 262144, (bs,), device="cuda", generator=g)
    # the frozen draft loop's bookkeeping (SGLang's own helpers), fed random draft distributions
    score_list, token_list, parents_list = [], [], []
    hidden, scores = torch.randn(bs, 16, device="cuda", generator=g), None
    for i in range(steps):
        topk_p = torch.rand(bs, topk, device="cuda", generator=g)
        topk_index = torch.randint(0, 262144, (bs, topk), device="cuda", generator=g)
        _, hidden, scores, tree_info = select_top_k_tokens(i, topk_p, topk_index, hidden, scores, topk)
        score_list.append(tree_info[0]), token_list.append(tree_info[1]), parents_list.append(tree_info[2])
    parents, top_idx, tokens = organize_draft_results(score_list, token_list, parents_list, ndraft)
    exact, bound = int(sl.sum()), bs * 10240

    def build(size):
        return build_tree_kernel_efficient(bonus, parents, top_idx, tokens, sl, size, topk, steps, ndraft)

    a, b = build(exact), build(bound)
    torch.cuda.synchronize()
    for name, x, y in zip(("mask", "position", "retrieve_index", "retrieve_next_token", "retrieve_next_sibling",
                           "draft_tokens"), a, b):
        if name == "mask":
            n = x.numel()
            assert n == exact * ndraft + ndraft * ndraft * bs and y.numel() >= n
            assert torch.equal(x, y[:n]), "the bound changed mask entries the verify reads"
        else:
            assert torch.equal(x, y), name
