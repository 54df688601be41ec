"""The one AROUND hook on ``Gemma4DecoderLayer.forward`` that the fused layer patches share.

``fused_ple`` and ``fused_triple_norm`` both replace code that is inline in
SGLang 0.5.17's decoder-layer forward, between calls to generic modules that
cannot tell a Gemma-4 layer from any other caller, so no narrower target
exists. Each used to register its own AROUND hook re-stating that forward;
SGLang then warned at every start-up "Multiple AROUND hooks on ..." and the
forward was re-stated twice. Here it is re-stated once, cut into named
*slots*; a fusion fills one slot and everything else is 0.5.17's code.

Registration: a patch's ``register`` calls :func:`enable` with its
:class:`Fusion`. The first active patch registers one :class:`LayerForward`
hook (through its own ``Patch.hook``); a later one finds that hook in SGLang's
``HookRegistry`` and adds its fusion to it (no second hook). Each fusion
therefore runs exactly when its own patch is active (its own knob); with none
active there is no hook. A fusion added to a hook SGLang already applied acts
at once (the hook reads its slots at call time); ``testing.hooks.
patch_applied`` restores the hook list on exit, not a fusion added to a hook
registered by an outer context.

Per call, for each slot of the layer's branch (MoE or dense) the enabled
fusion whose ``eligible`` accepts the layer and inputs fills it. No slot
filled (or inside torch.compile, see :func:`under_compile`) -> SGLang's own
forward runs, unchanged. Because the slots' defaults re-state 0.5.17's
forward, both patches report "unavailable" when the installed forward's source
is not the one this module was written against (:func:`check_forward_unchanged`).

Adding a fusion: give it a slot in :data:`SLOTS` (a new slot needs its 0.5.17
default here and its place in :func:`fused_forward`), build a ``Fusion`` in the
patch module, call :func:`enable` from the patch's ``register``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, Optional

from sglang_gemma4.registry import source_of, source_pin_reason

logger = logging.getLogger("sglang_gemma4")

TARGET = "sglang.srt.models.gemma4_causal.Gemma4DecoderLayer.forward"

# sha256 of inspect.getsource(Gemma4DecoderLayer.forward) in SGLang 0.5.17:
# the code fused_forward and the slot defaults below re-state.
FORWARD_SHA256 = "b7312490d394d9312aa8530e3e1c20552027d1eeac6b7a9d549ef995aef35965"


@dataclasses.dataclass(frozen=True)
class Fusion:
    """One fused replacement of one slot of the layer forward.

    ``eligible(layer, hidden_states, per_layer_input) -> bool`` is asked before
    attention runs; ``run`` has the slot's signature (see :data:`SLOTS`) and
    must finish the slot itself (e.g. with the slot's default) if an
    intermediate it sees is unfit: attention has already written the KV cache.
    ``fired`` is logged once per process the first time the fusion runs.
    """

    name: str  # the patch's name
    slot: str
    eligible: Callable[..., bool]
    run: Callable
    fired: str


# ----------------------------------------------------------------- slots: 0.5.17's code


def sglang_moe_post_attn(layer, attn_out, residual):
    """MoE layer, attention output -> (residual, mlp_in, router_logits, moe_in).

    0.5.17: post_attention_layernorm; fused-add pre_feedforward_layernorm (new
    residual); router(residual); pre_feedforward_layernorm_2(residual). 0.5.17
    runs the dense MLP before the router: independent work, same results.
    """
    hidden_states = layer.post_attention_layernorm(attn_out)
    hidden_states, residual = layer.pre_feedforward_layernorm(hidden_states, residual)
    router_logits = layer.router(residual)
    moe_in = layer.pre_feedforward_layernorm_2(residual)
    return residual, hidden_states, router_logits, moe_in


def _unfused_tail(layer, hidden_states, residual, per_layer_input):
    """0.5.17's shared non-CUDA-fused tail: post-FF norm + residual, PLE, layer scalar."""
    import torch

    hidden_states = layer.post_feedforward_layernorm(hidden_states) + residual
    if layer.has_ple and per_layer_input is not None:
        gate, _ = layer.per_layer_input_gate(hidden_states)
        gate = torch.nn.functional.gelu(gate, approximate="tanh")
        contribution, _ = layer.per_layer_projection(gate * per_layer_input)
        hidden_states = hidden_states + layer.post_per_layer_input_norm(contribution)
    return hidden_states * layer.layer_scalar


def sglang_moe_tail(layer, hidden_states_1, hidden_states_2, residual, per_layer_input):
    """MoE layer, (dense MLP out, MoE out) -> layer output; 0.5.17's kernels and conditions."""
    from sglang.srt.models import gemma4_causal

    if (
        not layer.has_ple
        and (hidden_states_1.is_cuda or hidden_states_1.is_xpu)
        and hidden_states_1.dim() == 2
    ):
        norm1 = layer.post_feedforward_layernorm_1
        norm2 = layer.post_feedforward_layernorm_2
        norm3 = layer.post_feedforward_layernorm
        return gemma4_causal.gemma_dual_rmsnorm_residual_scalar(
            hidden_states_1,
            norm1.weight.data,
            hidden_states_2,
            norm2.weight.data,
            norm3.weight.data,
            residual,
            layer.layer_scalar,
            norm1.variance_epsilon,
            norm2.variance_epsilon,
            norm3.variance_epsilon,
        )
    hidden_states = layer.post_feedforward_layernorm_1(hidden_states_1) + (
        layer.post_feedforward_layernorm_2(hidden_states_2)
    )
    return _unfused_tail(layer, hidden_states, residual, per_layer_input)


def sglang_dense_tail(layer, hidden_states, residual, per_layer_input):
    """Dense layer, MLP output -> layer output; 0.5.17's kernels and conditions."""
    from sglang.srt.models import gemma4_causal

    if (
        not layer.has_ple
        and layer.moe is None
        and (hidden_states.is_cuda or hidden_states.is_xpu)
        and hidden_states.dim() == 2
    ):
        norm = layer.post_feedforward_layernorm
        return gemma4_causal.gemma_rmsnorm_residual_scalar(
            hidden_states, norm.weight.data, residual, layer.layer_scalar, norm.variance_epsilon
        )
    return _unfused_tail(layer, hidden_states, residual, per_layer_input)


def sglang_input_norm(layer, hidden_states):
    """Layer input -> normed input for attention (0.5.17: ``input_layernorm``)."""
    return layer.input_layernorm(hidden_states)


# slot -> 0.5.17's code for it (what runs when no fusion fills the slot)
SLOTS: Dict[str, Callable] = {
    "input_norm": sglang_input_norm,  # fused_next_input_norm (the norm the previous layer made)
    "moe_post_attn": sglang_moe_post_attn,  # fused_triple_norm
    "moe_tail": sglang_moe_tail,  # fused_next_input_norm
    "dense_tail": sglang_dense_tail,  # fused_ple
}
# the slots each branch of the forward passes through
BRANCH_SLOTS = {
    "moe": ("input_norm", "moe_post_attn", "moe_tail"),
    "dense": ("input_norm", "dense_tail"),
}


def fused_forward(layer, positions, hidden_states, per_layer_input, forward_batch, picked):
    """0.5.17's ``Gemma4DecoderLayer.forward`` with the ``picked`` slots' code replaced."""
    for fusion in picked.values():
        announce_once(fusion.fired, layer, hidden_states)

    def slot(name):
        fusion = picked.get(name)
        return SLOTS[name] if fusion is None else fusion.run

    residual = hidden_states
    hidden_states = slot("input_norm")(layer, hidden_states)
    attn_out = layer.self_attn(
        positions=positions, hidden_states=hidden_states, forward_batch=forward_batch
    )
    if layer.enable_moe_block:
        residual, hidden_states, router_logits, moe_in = slot("moe_post_attn")(layer, attn_out, residual)
        hidden_states_1 = layer.mlp(hidden_states)
        hidden_states_2 = layer.moe(moe_in, router_logits)
        return slot("moe_tail")(layer, hidden_states_1, hidden_states_2, residual, per_layer_input)
    hidden_states = layer.post_attention_layernorm(attn_out)
    hidden_states, residual = layer.pre_feedforward_layernorm(hidden_states, residual)
    hidden_states = layer.mlp(hidden_states)
    return slot("dense_tail")(layer, hidden_states, residual, per_layer_input)


# ----------------------------------------------------------------- the hook


class LayerForward:
    """The AROUND hook; ``fusions`` maps slot -> the enabled Fusion filling it."""

    def __init__(self) -> None:
        self.fusions: Dict[str, Fusion] = {}

    def add(self, fusion: Fusion) -> None:
        if fusion.slot not in SLOTS:
            raise ValueError(f"{fusion.name}: unknown layer-forward slot {fusion.slot!r}")
        have = self.fusions.get(fusion.slot)
        if have is not None and have.name != fusion.name:
            raise RuntimeError(f"{fusion.name}: slot {fusion.slot!r} is already filled by {have.name}")
        self.fusions[fusion.slot] = fusion

    def pick(self, layer, hidden_states, per_layer_input) -> Dict[str, Fusion]:
        branch = "moe" if layer.enable_moe_block else "dense"
        picked = {}
        for name in BRANCH_SLOTS[branch]:
            fusion = self.fusions.get(name)
            if fusion is not None and fusion.eligible(layer, hidden_states, per_layer_input):
                picked[name] = fusion
        return picked

    def __call__(self, original, layer, positions, hidden_states, per_layer_input, forward_batch, **kwargs):
        if under_compile():
            return original(layer, positions, hidden_states, per_layer_input, forward_batch, **kwargs)
        picked = self.pick(layer, hidden_states, per_layer_input)
        if not picked:
            return original(layer, positions, hidden_states, per_layer_input, forward_batch, **kwargs)
        return fused_forward(layer, positions, hidden_states, per_layer_input, forward_batch, picked), None

    def __repr__(self) -> str:
        return f"LayerForward({sorted(f.name for f in self.fusions.values())})"


def registered_hook(patch=None) -> Optional[LayerForward]:
    """The LayerForward registered on TARGET in SGLang's HookRegistry, or queued by ``patch``
    (``Patch.hook`` only queues; the registry registers after ``register`` returns), if any."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    queued = [(t, fn, ht) for t, fn, ht in getattr(patch, "_pending", ()) if t == TARGET]
    for _, hook, _ in [*HookRegistry._hooks.get(TARGET, ()), *queued]:
        if isinstance(hook, LayerForward):
            return hook
    return None


def enable(patch, *fusions: Fusion) -> None:
    """From ``patch.register``: add ``fusions`` to the shared hook (registered, or queued by this
    patch earlier in the same ``register``), registering it if there is none."""
    from sglang.srt.plugins.hook_registry import HookType

    hook = registered_hook(patch)
    if hook is None:
        hook = LayerForward()
        patch.hook(TARGET, hook, HookType.AROUND)
    for fusion in fusions:
        hook.add(fusion)


# ----------------------------------------------------------------- shared checks


def check_forward_unchanged() -> None:
    from sglang.srt.models.gemma4_causal import Gemma4DecoderLayer

    why = source_pin_reason(source_of(Gemma4DecoderLayer.forward), FORWARD_SHA256,
                            "Gemma4DecoderLayer.forward", "the fused forward re-states it")
    if why:
        raise RuntimeError(why)


def under_compile() -> bool:
    """Inside torch.compile (tc_piecewise prefill graphs) the hook runs SGLang's own
    forward: Inductor fuses these norms itself, and our launchers pick tiles from T in
    Python, which would pin every captured size to its own graph."""
    import torch

    return torch.compiler.is_compiling()


_ANNOUNCED = set()


def announce_once(what: str, layer, hidden_states) -> None:
    """One log line per process the first time a fused path runs (tests grep it)."""
    import torch

    # tc_piecewise prefill traces this with fullgraph=True: a logger call there is a hard error
    if what not in _ANNOUNCED and not torch.compiler.is_compiling():
        _ANNOUNCED.add(what)
        logger.info("%s (first call: layer %d, %d tokens, %s)", what, layer.layer_id,
                    hidden_states.shape[0], hidden_states.dtype)
