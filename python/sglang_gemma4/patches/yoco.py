"""YOCO fast prefill for Gemma-4's KV-shared layers (E2B 20/35, E4B 18/42).

Seed commit "YOCO fast prefill for Gemma4 KV-shared layers (vllm#22628/#38879)".
The last ``num_kv_shared_layers`` layers read KV written by earlier layers and
write none, so during prefill the only rows of theirs anyone reads are each
request's last token (the logits processor takes ``cumsum(extend_seq_lens)-1``).
Before the first KV-shared layer we gather those rows of hidden states,
positions and per-layer inputs, run the shared layers on them with attention
metadata for one query per request over the full prefix, then scatter the rows
back so everything downstream sees the full-shape tensor (vLLM's
``--kv-sharing-fast-prefill``).

Why the truncation is exact (up to kernel numerics):
* every shared-layer op except attention is row-wise;
* the last query's attention reads the same keys: prefix ``seq_len-1`` from the
  pool + the token itself (triton gathers the extend K/V at ``out_cache_loc``,
  so that is narrowed too; trtllm_mha reads everything from the pool);
* chunked prefill: a chunk's shared-layer rows are never read except its last
  (whose logits are discarded), and no KV is written, so later chunks see the
  same cache; radix prefix hits and MIXED batches are the same formula.

0.5.17 specifics: the model reaches the backend through ``get_attn_backend()``
(no ``forward_batch.attn_backend``); triton's metadata holds views of
persistent buffers (``qo_indptr``, ``window_kv_indptr``), so after the shared
layers the metadata is rebuilt for the full batch and the original metadata
object put back (keeps e.g. Gemma-4 MM's bidirectional ``custom_mask``).
Prefill CUDA graphs capture ``Gemma4TextModel.forward`` with one request slot,
where a per-request gather cannot be captured: YOCO steps aside inside any
capture/replay, and a second hook lets large eligible batches run eager instead
(real E2B/E4B checkpoints are multimodal, whose prefill already runs eager).

``SGLANG_GEMMA4_YOCO=0`` leaves SGLang's forward untouched (A/B switch).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, Optional

from sglang_gemma4.registry import Patch

logger = logging.getLogger("sglang_gemma4")

TARGET_FORWARD = "sglang.srt.models.gemma4_causal.Gemma4TextModel.forward"
TARGET_PREFILL_GRAPH = (
    "sglang.srt.model_executor.runner.prefill_cuda_graph_runner.PrefillCudaGraphRunner.can_run_graph"
)

# A batch that YOCO would shrink by at least this many rows skips the prefill
# CUDA graph and runs eager with YOCO: below it, launch overhead saved by the
# graph can exceed the shared-layer work saved by YOCO. Not yet tuned at full
# depth (an E4B concurrency-16 TTFT regression is suspected to come from it):
# SGLANG_GEMMA4_YOCO_EAGER_MIN_ROWS moves it for that A/B (a huge value keeps
# every graph-eligible batch in the graph, i.e. YOCO only where SGLang is eager).
EAGER_MIN_SAVED_TOKENS = 1024
EAGER_MIN_ENV = "SGLANG_GEMMA4_YOCO_EAGER_MIN_ROWS"


def eager_min_rows(environ=None) -> int:
    import os

    env = os.environ if environ is None else environ
    raw = (env.get(EAGER_MIN_ENV) or "").strip()
    if not raw:
        return EAGER_MIN_SAVED_TOKENS
    if not raw.isdigit():
        from sglang_gemma4.registry import SettingError

        raise SettingError(EAGER_MIN_ENV, env.get(EAGER_MIN_ENV),
                           f"invalid value {raw!r} for environment variable {EAGER_MIN_ENV}; expected a "
                           f"non-negative integer number of rows (default {EAGER_MIN_SAVED_TOKENS})")
    return int(raw)

# ForwardBatch fields narrowed to one token per request around the shared layers.
SWAPPED_FIELDS = (
    "extend_seq_lens",
    "extend_prefix_lens",
    "extend_seq_lens_cpu",
    "extend_prefix_lens_cpu",
    "extend_start_loc",
    "extend_num_tokens",
    "out_cache_loc",
    "positions",
)

_state = {"announced": False, "broken": False, "eager_min_rows": EAGER_MIN_SAVED_TOKENS}


def first_kv_shared_layer(config: Any) -> Optional[int]:
    """Index K of the first KV-shared layer, or None when there is none."""
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    n_shared = int(getattr(config, "num_kv_shared_layers", 0) or 0)
    k = n_layers - n_shared
    if n_shared <= 0 or not 0 < k < n_layers:
        return None
    return k


def batch_ineligible_reason(model: Any, forward_batch: Any, kwargs: Optional[Dict] = None) -> Optional[str]:
    """Why YOCO must not run on this batch (None = eligible); host data only, no GPU sync."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    k = first_kv_shared_layer(model.config)
    if k is None:
        return "no KV-shared layers"
    pp = getattr(model, "pp_group", None)
    if pp is not None and pp.world_size > 1:
        return "pipeline parallel"
    if getattr(model, "start_layer", 0) != 0 or getattr(model, "end_layer", None) != model.config.num_hidden_layers:
        return "model holds a layer slice"
    mode = forward_batch.forward_mode
    if mode not in (ForwardMode.EXTEND, ForwardMode.MIXED):
        return f"forward mode {mode.name}"
    ext, pre = forward_batch.extend_seq_lens_cpu, forward_batch.extend_prefix_lens_cpu
    if any(v is None for v in (ext, pre, forward_batch.extend_seq_lens, forward_batch.extend_prefix_lens)):
        return "no host extend lengths"
    bs = forward_batch.batch_size
    if len(ext) != bs or len(pre) != bs or forward_batch.seq_lens.shape[0] != bs:
        return "extend lengths do not match the batch size"
    if all(e <= 1 for e in ext):
        return "no request extends by more than one token"
    if forward_batch.return_logprob and any(
        e > s for e, s in zip(ext, forward_batch.extend_logprob_start_lens_cpu or [])
    ):
        return "prompt logprobs requested"
    chm = forward_batch.capture_hidden_mode
    if chm is not None and chm.is_full():
        return "full hidden-state capture"
    if any(i > k for i in getattr(model, "layers_to_capture", ()) or ()):
        return "aux hidden-state capture inside the KV-shared range"
    if forward_batch.global_num_tokens_cpu is not None:
        return "DP attention / MLP sync"
    if forward_batch.attn_cp_metadata is not None or forward_batch.attn_dcp_metadata is not None:
        return "context parallel"
    if forward_batch.tbo_split_seq_index is not None:
        return "two-batch overlap"
    if forward_batch.multi_item_delimiter_indices is not None:
        return "multi-item scoring"
    if kwargs and kwargs.get("get_embedding"):
        return "embedding request"
    return None


def runtime_ineligible_reason(forward_batch: Any) -> Optional[str]:
    """Why YOCO must not run right now: inside a graph capture/replay, or no backend."""
    import torch
    from sglang.srt.model_executor.forward_context import has_forward_context
    from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph import (
        is_in_breakable_cuda_graph,
    )
    from sglang.srt.model_executor.runner_backend_utils.tc_piecewise_cuda_graph import (
        get_tc_piecewise_forward_context,
    )

    if get_tc_piecewise_forward_context() is not None or is_in_breakable_cuda_graph():
        return "prefill CUDA graph"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "stream capture"
    if getattr(forward_batch, "_attn_output", None) is not None:
        return "preallocated attention output"
    if not has_forward_context():
        return "no forward context"
    return None


def last_token_rows(forward_batch: Any):
    """Row of each request's last new token; same formula as the logits processor."""
    import torch

    return torch.cumsum(forward_batch.extend_seq_lens, dim=0) - 1


@contextlib.contextmanager
def one_token_per_request(forward_batch: Any, attn_backend: Any, rows):
    """Narrow ``forward_batch`` to the rows ``rows`` (one per request) with a prefix
    of ``seq_len-1``, plan attention for it; restore fields and metadata on exit."""
    import torch

    saved = {name: getattr(forward_batch, name) for name in SWAPPED_FIELDS}
    had_metadata = hasattr(attn_backend, "forward_metadata")
    saved_metadata = getattr(attn_backend, "forward_metadata", None)
    bs = forward_batch.batch_size
    ext = forward_batch.extend_seq_lens
    try:
        forward_batch.extend_seq_lens = torch.ones_like(ext)
        forward_batch.extend_prefix_lens = (forward_batch.seq_lens - 1).to(
            forward_batch.extend_prefix_lens.dtype
        )
        forward_batch.extend_seq_lens_cpu = [1] * bs
        forward_batch.extend_prefix_lens_cpu = [
            p + e - 1 for p, e in zip(saved["extend_prefix_lens_cpu"], saved["extend_seq_lens_cpu"])
        ]
        start = saved["extend_start_loc"]
        forward_batch.extend_start_loc = torch.arange(
            bs, dtype=start.dtype if start is not None else ext.dtype, device=ext.device
        )
        forward_batch.extend_num_tokens = bs
        if saved["out_cache_loc"] is not None:
            forward_batch.out_cache_loc = saved["out_cache_loc"][rows]
        if saved["positions"] is not None:
            forward_batch.positions = saved["positions"][rows]
        attn_backend.init_forward_metadata(forward_batch)
        yield
    finally:
        for name, value in saved.items():
            setattr(forward_batch, name, value)
        # Re-plan to refill the backend's persistent buffers the narrow plan
        # overwrote, then hand back the very metadata object the model saw.
        attn_backend.init_forward_metadata(forward_batch)
        if had_metadata:
            attn_backend.forward_metadata = saved_metadata


def _prologue(model, input_ids, input_embeds, per_layer_inputs):
    """Gemma4TextModel.forward's first-rank input handling (PP is 1 here)."""
    if (input_ids is None) ^ (input_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        input_embeds = model.embed_tokens(input_ids)
        per_layer_inputs = model.get_per_layer_inputs(input_ids)
    per_layer_inputs = model.project_per_layer_inputs(input_embeds, per_layer_inputs)
    return input_embeds, per_layer_inputs


def _run_layers(model, lo, hi, positions, hidden_states, per_layer_inputs, forward_batch, aux, kwargs):
    for layer_idx in range(lo, hi):
        if layer_idx in model.layers_to_capture:
            aux.append(hidden_states)
        per_layer_input = per_layer_inputs[:, layer_idx, :] if per_layer_inputs is not None else None
        hidden_states = model.layers[layer_idx](
            positions=positions,
            hidden_states=hidden_states,
            per_layer_input=per_layer_input,
            forward_batch=forward_batch,
            **kwargs,
        )[0]
    return hidden_states


def yoco_text_forward(model, positions, forward_batch, attn_backend, input_ids=None,
                      input_embeds=None, per_layer_inputs=None, **kwargs):
    """Gemma4TextModel.forward (single PP stage) with the shared layers on last tokens."""
    k = first_kv_shared_layer(model.config)
    hidden_states, per_layer_inputs = _prologue(model, input_ids, input_embeds, per_layer_inputs)
    aux = []
    hidden_states = _run_layers(model, 0, k, positions, hidden_states, per_layer_inputs,
                                forward_batch, aux, kwargs)
    if k in model.layers_to_capture:  # input of layer K: still full rows
        aux.append(hidden_states)
    rows = last_token_rows(forward_batch)
    with one_token_per_request(forward_batch, attn_backend, rows):
        short = _run_layers(
            model, k, model.config.num_hidden_layers, positions[rows], hidden_states[rows],
            per_layer_inputs[rows] if per_layer_inputs is not None else None,
            forward_batch, [], kwargs,
        )
    # Out of place: an aux capture of layer K's input may alias hidden_states.
    # Rows other than the last ones keep layer K-1's output: nothing reads them.
    hidden_states = hidden_states.index_copy(0, rows, short.to(hidden_states.dtype))
    hidden_states = model.norm(hidden_states)
    if not aux:
        return hidden_states
    return hidden_states, aux


def _is_compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def _num_input_rows(input_ids, input_embeds) -> Optional[int]:
    if input_ids is not None:
        return input_ids.shape[0]
    if input_embeds is not None:
        return input_embeds.shape[0]
    return None


def yoco_forward_hook(original, model, input_ids, positions, forward_batch, input_embeds=None,
                      per_layer_inputs=None, pp_proxy_tensors=None, **kwargs):
    """AROUND Gemma4TextModel.forward: YOCO for eligible batches, the original otherwise."""

    def call_original():
        return original(model, input_ids, positions, forward_batch, input_embeds,
                        per_layer_inputs, pp_proxy_tensors=pp_proxy_tensors, **kwargs)

    # Inside a torch.compile trace (tc_piecewise prefill graphs) YOCO never runs, and the
    # eligibility checks below would compare symbolic row counts with Python ints and
    # pin every captured size to its own graph (recompile limit hit, engine down).
    if _state["broken"] or _is_compiling():
        return call_original()
    try:
        reason = batch_ineligible_reason(model, forward_batch, kwargs)
        if reason is None and pp_proxy_tensors is not None:
            reason = "PP proxy tensors"
        if reason is None:
            n = _num_input_rows(input_ids, input_embeds)
            if n is None or n != sum(forward_batch.extend_seq_lens_cpu) or positions.shape[0] != n:
                reason = "row count differs from the extend lengths"
        if reason is None:
            reason = runtime_ineligible_reason(forward_batch)
    except Exception:  # an unexpected batch shape must not take the server down
        logger.exception("YOCO eligibility check failed; running SGLang's forward")
        return call_original()
    if reason is not None:
        return call_original()

    from sglang.srt.model_executor.forward_context import get_attn_backend

    if not _state["announced"]:
        _state["announced"] = True
        logger.info(
            "YOCO fast prefill active: layers %d..%d run on each request's last token (sglang-gemma4)",
            first_kv_shared_layer(model.config), model.config.num_hidden_layers - 1,
        )
    try:
        return yoco_text_forward(model, positions, forward_batch, get_attn_backend(),
                                 input_ids=input_ids, input_embeds=input_embeds,
                                 per_layer_inputs=per_layer_inputs, **kwargs)
    except Exception:
        # Layers 0..K-1 rewrite the same KV on a rerun; shared layers write none.
        _state["broken"] = True
        logger.exception("YOCO forward failed; disabled for this process, rerunning SGLang's forward")
        return call_original()


def gemma4_text_model(model: Any) -> Optional[Any]:
    """The Gemma4TextModel inside a runner's model (CausalLM ``.model``, MM ``.language_model``)."""
    from sglang.srt.models.gemma4_causal import Gemma4TextModel

    for attr in ("model", "language_model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, Gemma4TextModel):
            return inner
    return model if isinstance(model, Gemma4TextModel) else None


def yoco_can_run_graph_hook(original, runner, forward_batch):
    """AROUND PrefillCudaGraphRunner.can_run_graph: large YOCO-eligible batches run eager."""
    ok = original(runner, forward_batch)
    if not ok or _state["broken"]:
        return ok
    try:
        model = gemma4_text_model(runner.model_runner.model)
        if model is None or batch_ineligible_reason(model, forward_batch) is not None:
            return ok
        saved_rows = sum(forward_batch.extend_seq_lens_cpu) - forward_batch.batch_size
        return saved_rows < _state["eager_min_rows"]
    except Exception:
        logger.exception("YOCO prefill-graph check failed; keeping SGLang's decision")
        return ok


class Yoco(Patch):
    name = "yoco"
    summary = "YOCO fast prefill: Gemma-4 KV-shared layers run only each request's last prefill token"
    knob = "SGLANG_GEMMA4_YOCO"
    default = True
    seed = "YOCO fast prefill for Gemma4 KV-shared layers (vllm#22628/#38879)"
    targets = (TARGET_FORWARD, TARGET_PREFILL_GRAPH)

    def upstream(self) -> Optional[str]:
        import inspect

        from sglang.srt.models.gemma4_causal import Gemma4TextModel

        try:
            src = inspect.getsource(Gemma4TextModel.forward).lower()
        except (OSError, TypeError):
            return None
        for marker in ("kv_sharing_fast_prefill", "yoco", "fast_prefill"):
            if marker in src:
                return f"SGLang's Gemma4TextModel.forward already has {marker}"
        return None

    def detail(self, value: Optional[bool]) -> str:
        if not value:
            return ""
        return (f"{self.summary}; prefill CUDA graph skipped when it saves "
                f">= {eager_min_rows()} rows ({EAGER_MIN_ENV})")

    def validate(self, environ) -> None:
        eager_min_rows(environ)  # SettingError: status shows this variable, not the YOCO knob

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        _state["eager_min_rows"] = eager_min_rows()
        self.hook(TARGET_FORWARD, yoco_forward_hook, HookType.AROUND)
        self.hook(TARGET_PREFILL_GRAPH, yoco_can_run_graph_hook, HookType.AROUND)


PATCH = Yoco()
