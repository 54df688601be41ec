"""Next layer's input RMSNorm computed by the MoE layer tail before it (Gemma-4 26B-A4B).

Issue #20's decode profile (runs/decode-profile-26b-nvidia-h200.md): at batch 1 every
non-GEMM kernel of the 26B step is a 1-4 us launch moving a few KiB, so launches, not bytes,
are the cost. At each MoE layer boundary SGLang 0.5.17 runs two row norms back to back:
layer i's post-FF tail (``gemma_dual_rmsnorm_residual_scalar``) writes the layer output,
then layer i+1's ``input_layernorm`` reads it again. One Triton program per row does both
(:mod:`sglang_gemma4.kernels.tail_next_norm`): 29 launches fewer per 30-layer step.

Hooks:
- AFTER ``Gemma4TextModel.__init__``: remembers, for each decoder layer, the layer after it on
  this rank (PP ranks: only layers both present here), outside the module tree.
- the shared AROUND hook on ``Gemma4DecoderLayer.forward`` (:mod:`._layer_forward`), two slots:
  ``moe_tail`` (layer i: output + next layer's normed input, stashed for layer i+1) and
  ``input_norm`` (layer i+1: uses the stash when its input *is* the tensor layer i returned,
  which ``Gemma4TextModel.forward`` passes on unchanged; anything else runs the norm as 0.5.17).
  The stash is popped when used, so no tensor outlives its forward.

The handoff relies on 0.5.17's model loop (``hidden_states = layer_outputs[0]`` into the next
layer), so the patch pins ``Gemma4TextModel.forward``'s source besides the layer forward's:
a loop that changed could leave every stash unused (the extra norm computed for nothing).

Default off: its CPU tests (interpreter, real SGLang layers) pass; it has not yet been measured
on a GPU (no device time was left in the session that wrote it). Enable with
``SGLANG_GEMMA4_FUSED_NEXT_INPUT_NORM=1``.
"""

from __future__ import annotations

import weakref
from typing import Optional

from sglang_gemma4.patches import _layer_forward
from sglang_gemma4.patches.fused_ple import plain_rmsnorm, rows_ok
from sglang_gemma4.registry import Patch, source_of, source_pin_reason

MODEL_INIT = "sglang.srt.models.gemma4_causal.Gemma4TextModel.__init__"
FIRED = "fused MoE tail + next layer's input RMSNorm running"

# sha256 of inspect.getsource(Gemma4TextModel.forward) in SGLang 0.5.17 (its layer loop).
MODEL_FORWARD_SHA256 = "14a219383e36b5341006fdc3e07c077debe54b4c2f6d24c246b28fee367489ae"

# layer -> the decoder layer after it on this rank (weak: never keeps a model alive)
_NEXT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# next layer -> (tensor the previous layer returned, its input_layernorm of it)
_HANDOFF: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class FusedNextInputNorm(Patch):
    name = "fused_next_input_norm"
    summary = "Gemma-4 MoE post-FF tail and the next layer's input RMSNorm in one Triton launch (default off until measured on a GPU)"
    knob = "SGLANG_GEMMA4_FUSED_NEXT_INPUT_NORM"
    default = False
    seed = "- (issue #20 decode profile; not in the seed)"
    targets = (_layer_forward.TARGET, MODEL_INIT)

    def upstream(self) -> Optional[str]:
        from sglang.srt.models.gemma4_causal import Gemma4TextModel

        src = source_of(Gemma4TextModel.forward)
        if "input_layernorm" in src or "next_layer" in src:
            return "Gemma4TextModel.forward handles the next layer's input norm itself"
        return None

    def unavailable(self) -> Optional[str]:
        try:
            _layer_forward.check_forward_unchanged()
            check_model_forward_unchanged()
        except RuntimeError as e:
            return str(e)
        return None

    def register(self, value: Optional[bool]) -> None:
        from sglang.srt.plugins.hook_registry import HookType

        self.hook(MODEL_INIT, link_layers_after_init, HookType.AFTER)
        _layer_forward.enable(self, TAIL, INPUT_NORM)


PATCH = FusedNextInputNorm()


def check_model_forward_unchanged() -> None:
    from sglang.srt.models.gemma4_causal import Gemma4TextModel

    why = source_pin_reason(source_of(Gemma4TextModel.forward), MODEL_FORWARD_SHA256, "Gemma4TextModel.forward",
                            "the next-layer norm handoff relies on its layer loop")
    if why:
        raise RuntimeError(why)


# ----------------------------------------------------------------- linking


def link_layers(layers) -> int:
    """Remember each decoder layer's successor; returns the number of links."""
    from sglang.srt.models.gemma4_causal import Gemma4DecoderLayer

    n = 0
    seq = list(layers)
    for a, b in zip(seq, seq[1:]):
        if isinstance(a, Gemma4DecoderLayer) and isinstance(b, Gemma4DecoderLayer):
            _NEXT[a] = b
            n += 1
    return n


def link_layers_after_init(result, model, *args, **kwargs):
    """AFTER hook on ``Gemma4TextModel.__init__``: never raises (no links = SGLang's path)."""
    try:
        link_layers(getattr(model, "layers", ()))
    except Exception:  # pragma: no cover - defensive
        pass
    return None


# ----------------------------------------------------------------- the two slots


def _tail_norms_ok(layer, h: int) -> bool:
    norms = (layer.post_feedforward_layernorm_1, layer.post_feedforward_layernorm_2, layer.post_feedforward_layernorm)
    return all(n is not None and plain_rmsnorm(n, h) for n in norms)


def tail_eligible(layer, hidden_states, per_layer_input=None) -> bool:
    """A MoE layer without PLE whose successor is here with a plain input RMSNorm."""
    nxt = _NEXT.get(layer)
    if nxt is None or not layer.enable_moe_block or layer.has_ple or layer.moe is None:
        return False
    if not rows_ok(hidden_states) or hidden_states.shape[1] != layer.hidden_size:
        return False
    h = layer.hidden_size
    return _tail_norms_ok(layer, h) and plain_rmsnorm(nxt.input_layernorm, h)


def moe_tail(layer, hidden_states_1, hidden_states_2, residual, per_layer_input):
    """Slot ``moe_tail``: layer output, and the successor's normed input stashed for it."""
    from sglang_gemma4.kernels.tail_next_norm import gemma_moe_tail_next_norm

    nxt = _NEXT.get(layer)
    if nxt is None or not rows_ok(hidden_states_1, hidden_states_2, residual):
        return _layer_forward.sglang_moe_tail(layer, hidden_states_1, hidden_states_2, residual, per_layer_input)
    n1, n2, n3 = layer.post_feedforward_layernorm_1, layer.post_feedforward_layernorm_2, layer.post_feedforward_layernorm
    nin = nxt.input_layernorm
    out, x_in = gemma_moe_tail_next_norm(
        hidden_states_1, n1.weight, hidden_states_2, n2.weight, n3.weight, residual, layer.layer_scalar,
        nin.weight, n1.variance_epsilon, n2.variance_epsilon, n3.variance_epsilon, nin.variance_epsilon,
    )
    _HANDOFF[nxt] = (out, x_in)
    return out


def input_norm_eligible(layer, hidden_states, per_layer_input=None) -> bool:
    got = _HANDOFF.get(layer)
    return got is not None and got[0] is hidden_states


def input_norm(layer, hidden_states):
    """Slot ``input_norm``: the norm the previous layer computed, if it is of this very tensor."""
    got = _HANDOFF.pop(layer, None)
    if got is not None and got[0] is hidden_states:
        return got[1]
    return _layer_forward.sglang_input_norm(layer, hidden_states)


TAIL = _layer_forward.Fusion(
    name=FusedNextInputNorm.name, slot="moe_tail", eligible=tail_eligible, run=moe_tail, fired=FIRED,
)
INPUT_NORM = _layer_forward.Fusion(
    name=FusedNextInputNorm.name, slot="input_norm", eligible=input_norm_eligible, run=input_norm,
    fired="next-layer input RMSNorm taken from the previous layer's tail",
)
