"""Tree verify (topk > 1) on sliding-window layers: window by token depth, not tree index.

Not from the seed series: found by the window probes of issue #10
(``crash_repro/spec_swa_window_divergence``). SGLang 0.5.17's triton extend
kernel applies the sliding window with the query's *index* in the request's
extend block as its position (``prefix + i <= kv + sws``). For a linear verify
chain (topk 1) index == depth. In a draft tree (topk > 1) token i sits at depth
d_i <= i (siblings share a depth; RoPE gets prefix + d_i), so the kernel drops
its oldest i - d_i window keys. Greedy FROZEN_KV_MTP / EAGLE output then leaves
the model wherever an accepted tree token has i > d_i and its oldest key matters.

Fix, for Gemma-4 target-verify batches with a tree mask, on sliding layers only:
the kernel gets a window ``num_draft_tokens - 1`` keys wider (it can then never
drop a key the token needs, since i - d_i <= N - 1) and a copy of the tree mask
in which every prefix column older than the token's own window is cleared
(prefix + d_i - col > sws), read for the prefix too (``skip_prefix_custom_mask``
off). Depths come from the tree mask itself (a token's draft-token ancestors,
self included, minus one), so no other input is needed. The mask is built
without host syncs over the whole buffer, eagerly in ``init_forward_metadata``
and into a static buffer in ``init_forward_metadata_out_graph`` (CUDA-graph
capture and replay both run it outside the graph; the captured kernel reads
that buffer). Full-attention layers and topk 1 keep SGLang's arguments.

Not covered: ``--enable-deterministic-inference`` (SGLang's unified extend
kernel) and decode context parallel (``dcp_size > 1``) take other kernels
this patch does not rewrite; they keep SGLang's behaviour.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any, Dict, Optional

from sglang_gemma4.registry import Patch

logger = logging.getLogger("sglang_gemma4")

_TRITON = "sglang.srt.layers.attention.triton_backend"
_BACKEND = f"{_TRITON}.TritonAttnBackend"
INIT = f"{_BACKEND}.__init__"
INIT_FORWARD_METADATA = f"{_BACKEND}.init_forward_metadata"
INIT_OUT_GRAPH = f"{_BACKEND}.init_forward_metadata_out_graph"
FORWARD_EXTEND = f"{_BACKEND}.forward_extend"
_KERNEL = "sglang.kernels.ops.attention.extend_attention"

# backend -> {"sws": int, "mask": Optional[Tensor] (current batch), "static": Optional[Tensor]}
_STATE: "weakref.WeakKeyDictionary[Any, Dict[str, Any]]" = weakref.WeakKeyDictionary()
_LOGGED = [False]


def tree_window_mask(custom_mask, mask_indptr, seq_lens, num_draft: int, sws: int, out=None):
    """The tree mask with each token's out-of-window prefix columns cleared.

    ``custom_mask``: flat per-request blocks of ``num_draft`` rows x
    ``seq_len + num_draft`` columns (prefix, then draft tokens) starting at
    ``mask_indptr[b]``; only the first ``mask_indptr[bs]`` entries are
    rewritten, the rest is copied. Row i's depth = (draft columns set) - 1;
    prefix column c stays only if ``seq_len + depth - c <= sws``.
    """
    import torch

    bs = int(seq_lens.shape[0])
    n = int(custom_mask.shape[0])
    dev = custom_mask.device
    f = torch.arange(n, device=dev)
    ends = mask_indptr[1:bs + 1].to(torch.int64)
    b = torch.searchsorted(ends, f, right=True)
    valid = b < bs
    bc = b.clamp(max=max(bs - 1, 0))
    seq = seq_lens.to(torch.int64)[bc]
    width = seq + num_draft
    local = f - mask_indptr[:bs].to(torch.int64)[bc]
    row = local // width
    col = local - row * width
    m = custom_mask.to(torch.bool)
    is_draft_col = valid & (col >= seq)
    bins = torch.where(valid, bc * num_draft + row.clamp(max=num_draft - 1), bs * num_draft)
    anc = torch.zeros(bs * num_draft + 1, dtype=torch.int64, device=dev)
    anc.scatter_add_(0, bins, (is_draft_col & m).to(torch.int64))
    depth = anc[bins] - 1
    keep = ~valid | (col >= seq) | (seq + depth - col <= sws)
    res = (m & keep).to(custom_mask.dtype)
    if out is None:
        return res
    out[:n].copy_(res)
    return out


def _eligible_state(backend) -> Optional[Dict[str, Any]]:
    return _STATE.get(backend)


def after_init(result, self, model_runner, *args, **kwargs):
    try:
        from sglang_gemma4.patches.triton_swa_window import is_gemma4_runner

        sws = getattr(self, "sliding_window_size", None)
        topk = getattr(self, "topk", 0) or 0
        # drafts never run target verify (their topk > 1 backend is built with skip_prefill)
        draft = getattr(self, "is_draft_runner", False) or getattr(self, "skip_prefill", False)
        if isinstance(sws, int) and sws > 0 and topk > 1 and not draft and is_gemma4_runner(model_runner):
            _STATE[self] = {"sws": sws, "mask": None, "static": None}
            logger.info("Tree verify SWA window by depth (topk %d, window %d keys) for %s (sglang-gemma4)",
                        topk, sws + 1, type(getattr(model_runner, "model", None)).__name__)
    except Exception:
        logger.exception("tree_verify_swa: eligibility check failed; backend left unpatched")
    return None


def _num_draft(self, spec_info) -> int:
    n = getattr(spec_info, "draft_token_num", None) if spec_info is not None else None
    return int(n) if n is not None else int(self.num_draft_tokens)


def after_init_forward_metadata(result, self, forward_batch, *args, **kwargs):
    st = _eligible_state(self)
    if st is None:
        return None
    st["mask"] = None
    fm = self.forward_metadata
    if not forward_batch.forward_mode.is_target_verify() or fm is None or fm.custom_mask is None:
        return None
    bs = forward_batch.batch_size
    st["mask"] = tree_window_mask(fm.custom_mask, fm.mask_indptr, forward_batch.seq_lens[:bs],
                                  _num_draft(self, forward_batch.spec_info), st["sws"])
    st["num_draft"] = _num_draft(self, forward_batch.spec_info)
    return None


def after_init_out_graph(result, self, forward_batch, *args, **kwargs):
    st = _eligible_state(self)
    if st is None:
        return None
    st["mask"] = None
    vm = getattr(self, "_verify_mask", None)
    spec = forward_batch.spec_info
    # same condition as SGLang's own use of the tree mask in its CUDA-graph buffers
    if (not forward_batch.forward_mode.is_target_verify() or vm is None or spec is None
            or getattr(spec, "custom_mask", None) is None):
        return None
    # replay reuses the captured metadata, so read SGLang's static buffers, not
    # self.forward_metadata (an eager batch in between may have replaced it)
    src = vm.buffer
    if st["static"] is None:  # allocated once: the captured kernels read this address
        st["static"] = src.clone()
    n = min(src.shape[0], st["static"].shape[0])
    bs = len(forward_batch.req_pool_indices)
    nd = _num_draft(self, forward_batch.spec_info)
    tree_window_mask(src[:n], self.mask_indptr[: bs + 1], forward_batch.seq_lens[:bs], nd, st["sws"],
                     out=st["static"])
    st["mask"] = st["static"]
    st["num_draft"] = nd
    return None


def around_forward_extend(original, self, q, k, v, layer, forward_batch, *args, **kwargs):
    st = _eligible_state(self)
    sws = getattr(layer, "sliding_window_size", None)
    if (st is None or st.get("mask") is None or sws is None or sws <= -1
            or not forward_batch.forward_mode.is_target_verify()):
        return original(self, q, k, v, layer, forward_batch, *args, **kwargs)
    mask, wide = st["mask"], sws + st["num_draft"] - 1
    inner = self.__dict__.get("extend_attention_fwd")
    kernel = inner if inner is not None else type(self).extend_attention_fwd

    def fwd(*a, **kw):
        a = list(a)
        if len(a) > 9:
            a[9] = mask
        else:
            kw["custom_mask"] = mask
        kw["sliding_window_size"] = wide
        kw["skip_prefix_custom_mask"] = False
        return kernel(*a, **kw)

    if not _LOGGED[0]:
        _LOGGED[0] = True
        logger.info("tree_verify_swa: depth-based window in tree verify (layer %s)", getattr(layer, "layer_id", "?"))
    self.extend_attention_fwd = fwd
    try:
        return original(self, q, k, v, layer, forward_batch, *args, **kwargs)
    finally:
        if inner is not None:
            self.extend_attention_fwd = inner
        else:
            del self.extend_attention_fwd


class TreeVerifySwa(Patch):
    name = "tree_verify_swa"
    summary = ("tree verify (topk > 1) applies each draft token's sliding window at its depth "
               "(SGLang uses its tree index and drops window keys)")
    knob = "SGLANG_GEMMA4_TREE_VERIFY_SWA"
    default = True
    seed = "none (window probes, issue #10; crash_repro/spec_swa_window_divergence)"
    targets = (INIT, INIT_FORWARD_METADATA, INIT_OUT_GRAPH, FORWARD_EXTEND)

    def unavailable(self) -> Optional[str]:
        from sglang.kernels.ops.attention import extend_attention as ea
        from sglang.srt.layers.attention import triton_backend as tb

        params = inspect.signature(ea.extend_attention_fwd).parameters
        for p in ("custom_mask", "sliding_window_size", "skip_prefix_custom_mask", "window_kv_offsets"):
            if p not in params:
                return f"extend_attention_fwd has no {p!r} parameter"
        if "self.extend_attention_fwd(" not in inspect.getsource(tb.TritonAttnBackend.forward_extend):
            return "TritonAttnBackend.forward_extend no longer calls self.extend_attention_fwd"
        return None

    def upstream(self) -> Optional[str]:
        from sglang.kernels.ops.attention import extend_attention as ea

        src = inspect.getsource(ea).replace(" ", "").replace("\n", "")
        # 0.5.17: the prefix-stage window is checked at (prefix + tree index)
        if "cur_seq_len_prefix+cur_block_m*BLOCK_M+offs_m[:,None])<=(start_n+offs_n[None,:]+SLIDING_WINDOW_SIZE" not in src:
            return "SGLang's extend kernel no longer checks the window at prefix + tree index"
        return None

    def detail(self, value: Optional[bool]) -> str:
        if value:
            return "Gemma-4 tree verify: sliding window at each draft token's depth (topk > 1 only)"
        return "SGLang's tree verify window (drops window keys of tree tokens whose index exceeds their depth)"

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(INIT, after_init, HookType.AFTER)
        self.hook(INIT_FORWARD_METADATA, after_init_forward_metadata, HookType.AFTER)
        self.hook(INIT_OUT_GRAPH, after_init_out_graph, HookType.AFTER)
        self.hook(FORWARD_EXTEND, around_forward_extend, HookType.AROUND)


PATCH = TreeVerifySwa()
