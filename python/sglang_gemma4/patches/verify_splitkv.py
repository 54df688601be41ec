"""Split-KV target-verify attention for Gemma-4 FROZEN_KV_MTP / EAGLE chains (topk 1) on the triton backend.

Not from the seed series: issue #19's 26B-A4B step profile (runs/mtp-26b-v2-nvidia-h200.md, H200). There,
target-verify attention is 48 % of the speculative step's kernel time: SGLang's prefill ``_fwd_kernel`` with
16 programs per layer at batch 1, 164 us each at 1k context. Plain decode attention is a fraction of that.

SGLang 0.5.17 already has the dispatch and a split-KV kernel. ``TritonAttnBackend.forward_extend`` calls
``self.verify_splitkv_fwd(...)`` on target-verify when ``self.use_verify_splitkv``, and falls back to
``extend_attention_fwd`` when that returns False. But ``use_verify_splitkv`` is only set on gfx95 (AMD MI350),
and its ``can_handle`` refuses sliding-window layers, 25 of 26B's 30.

Hook: AFTER ``TritonAttnBackend.__init__``. An eligible backend gets ``use_verify_splitkv = True``, and its
``verify_splitkv_fwd`` becomes :func:`verify_fwd`. That runs
:func:`sglang_gemma4.kernels.verify_attention.verify_attention_fwd`, which applies the per-draft window mask
``extend_attention_fwd`` applies. For anything else it returns False, so SGLang's own kernel runs:
- what it was not built for: tensor-valued KV scales, sinks, a logit cap, xai temperature, non-causal
  attention (an fp8 pool with SGLang's host-side scales is served: tiles are widened to q's dtype on load);
- a ragged batch;
- more than 16 drafts.
SGLang's own gate still requires ``forward_mode.is_target_verify()`` and no ``score_mod``.

Eligibility:
- a Gemma-4 model runner;
- speculative ``topk == 1`` (a chain: the tree mask is causal; topk > 1 trees keep SGLang's kernel);
- page size 1, no decode-context parallelism, no deterministic mode, no MLA.

On by default since 2026-12-04 (H200): lossless in both FROZEN_KV_MTP modes, clean under the serving soak, and
26B-A4B V2=1 TPOT 0.65x / 0.62x at concurrency 1 / 16 (runs/mtp-26b-verify-nvidia-h200.md).
``SGLANG_GEMMA4_VERIFY_SPLITKV=0`` keeps SGLang's kernel.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from sglang_gemma4.registry import Patch, source_of

logger = logging.getLogger("sglang_gemma4")

_TRITON = "sglang.srt.layers.attention.triton_backend"
INIT = f"{_TRITON}.TritonAttnBackend.__init__"
FIRED = "split-KV target-verify attention (sglang-gemma4) running"

_announced = [False]
_failed = [False]  # set by a launch that raised: every later verify keeps SGLang's kernel
_told: set = set()


def eligible(backend: Any, model_runner: Any) -> Optional[str]:
    """None when the backend's target-verify can take the split-KV kernel, else why not."""
    from sglang_gemma4.kernels.verify_attention import MAX_DRAFT
    from sglang_gemma4.patches.triton_swa_window import is_gemma4_runner

    if not is_gemma4_runner(model_runner):
        return "not a Gemma-4 model"
    if getattr(backend, "topk", None) != 1:
        return f"speculative topk {getattr(backend, 'topk', None)} (chains only: topk 1)"
    nd = getattr(backend, "num_draft_tokens", None)
    if not isinstance(nd, int) or not 1 <= nd <= MAX_DRAFT:
        return f"num_draft_tokens {nd} (1..{MAX_DRAFT})"
    if getattr(backend, "page_size", 1) != 1 or getattr(backend, "dcp_size", 1) != 1:
        return "page size or decode-context parallelism > 1"
    if getattr(backend, "enable_deterministic", False) or getattr(backend, "use_mla", False):
        return "deterministic mode or MLA"
    return None


def after_init(result, self, model_runner, *args, **kwargs):
    try:
        why = eligible(self, model_runner)
        if why is None:
            import torch

            self.use_verify_splitkv = True
            # as SGLang wraps its own: torch.compile must not trace the launcher's shape checks
            self.verify_splitkv_fwd = torch.compiler.disable(verify_fwd)
        elif why not in _told:  # the knob is on: say once why a backend keeps SGLang's verify kernel
            _told.add(why)
            logger.info("verify_splitkv: a triton backend keeps SGLang's target-verify kernel: %s", why)
    except Exception:  # unexpected backend shape: SGLang's behaviour
        logger.exception("verify_splitkv: eligibility check failed; backend left unpatched")
    return None


def _is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _scale(scale) -> Optional[float]:
    """A host-side dequantisation factor, or None (a tensor would need a sync inside the verify graph)."""
    if _is_tensor(scale):
        return None
    try:
        return float(scale)
    except (TypeError, ValueError):
        return None


def verify_fwd(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices,
               custom_mask, is_causal, mask_indptr, max_len_extend, k_scale, v_scale, sm_scale=None,
               logit_cap=0.0, skip_prefix_custom_mask=True, sliding_window_size=-1, sinks=None,
               window_kv_offsets=None, xai_temperature_len=-1, **_ignored) -> bool:
    """SGLang's ``verify_splitkv_fwd`` contract: True if it wrote ``o_extend``, False to run SGLang's kernel.

    ``custom_mask`` is not read: at topk 1 it is the causal chain this kernel applies (and reading it
    would sync). Only shapes, dtypes and Python scalars decide, so the call is CUDA-graph safe."""
    from sglang_gemma4.kernels.verify_attention import MAX_DRAFT, POOL_FP8, verify_attention_fwd

    ks, vs = _scale(k_scale), _scale(v_scale)
    if (not is_causal or sinks is not None or (logit_cap or 0) > 0 or (xai_temperature_len or -1) > 0
            or ks is None or vs is None or _is_tensor(max_len_extend)):
        return False
    L = int(max_len_extend)
    bs = qo_indptr.shape[0] - 1
    if not 1 <= L <= MAX_DRAFT or bs < 1 or q_extend.dim() != 3 or q_extend.shape[0] != bs * L:
        return False
    pool_ok = (q_extend.dtype,) + POOL_FP8
    if k_buffer.dim() != 3 or v_buffer.dim() != 3 or k_buffer.dtype not in pool_ok \
            or v_buffer.dtype not in pool_ok or k_extend.dtype != q_extend.dtype or v_extend.dtype != q_extend.dtype:
        return False
    if k_extend.dim() != 3 or k_buffer.shape[1:] != k_extend.shape[1:] or v_buffer.shape[1:] != v_extend.shape[1:]:
        return False
    if _failed[0]:
        return False
    scale = sm_scale if sm_scale is not None else q_extend.shape[-1] ** -0.5
    window = sliding_window_size if sliding_window_size is not None and sliding_window_size > 0 else -1
    try:
        verify_attention_fwd(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, kv_indptr, kv_indices,
                             L, scale, window, k_scale=ks, v_scale=vs)
    except Exception:  # e.g. a compile failure on a GPU/shape not tested: SGLang's kernel serves, the server stays up
        _failed[0] = True
        logger.exception("verify_splitkv: the split-KV kernel failed; SGLang's target-verify kernel serves from now on")
        return False
    if not _announced[0]:  # once per process: the engine log shows the kernel ran
        _announced[0] = True
        logger.info("%s: %d drafts, window %s", FIRED, L, sliding_window_size)
    return True


class VerifySplitKV(Patch):
    name = "verify_splitkv"
    summary = "split-KV target-verify attention for Gemma-4 draft chains on triton"
    knob = "SGLANG_GEMMA4_VERIFY_SPLITKV"
    # on since 2026-12-04: lossless in both FROZEN_KV_MTP modes, clean under the serving soak, and 26B V2=1
    # TPOT 0.65x (c1) / 0.62x (c16) on the H200 (runs/mtp-26b-verify-nvidia-h200.md)
    default = True
    seed = "- (issue #19 26B step profile; not in the seed)"
    targets = (INIT,)

    def unavailable(self) -> Optional[str]:
        from sglang.srt.layers.attention import triton_backend as tb

        src = source_of(tb.TritonAttnBackend.forward_extend)
        for needle in ("self.use_verify_splitkv", "self.verify_splitkv_fwd(", "is_target_verify()"):
            if needle not in src:
                return f"TritonAttnBackend.forward_extend no longer has {needle!r} (the verify dispatch this patch feeds)"
        return None

    def upstream(self) -> Optional[str]:
        from sglang.srt.layers.attention import triton_backend as tb

        try:
            from sglang.kernels.ops.attention import verify_splitkv as vs
        except ImportError:
            return None
        init = source_of(tb.TritonAttnBackend.__init__)  # unwrapped: our own AFTER hooks sit on it
        handle = source_of(vs.can_handle)
        if "is_gfx95_supported()" not in init and "sliding_window_size > 0" not in handle:
            return "SGLang's own split-KV verify runs on CUDA and takes sliding-window layers"
        return None

    def detail(self, value: Optional[bool]) -> str:
        if value:
            return "Gemma-4 target-verify (topk 1) attention split across the prefix, sliding windows included"
        return "SGLang's prefill kernel for target-verify (one program per sequence and head at each query block)"

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(INIT, after_init, HookType.AFTER)


PATCH = VerifySplitKV()
