"""_layer_forward: fused_ple and fused_triple_norm share ONE AROUND hook on
Gemma4DecoderLayer.forward, each fusion switched by its own knob.

Registration goes the way SGLang loads plugins: every active patch registers
(registry.apply, in the order given), then the target is applied once
(HookRegistry._apply_target, where SGLang warns about several AROUND hooks).
Layers and stand-ins are test_fused_ple.py's.
"""

import contextlib
import dataclasses
import logging

import pytest
import torch

from test_fused_ple import (  # noqa: F401  (fixture tp1 is used by name)
    build_layer,
    hidden,
    needs_kernels,
    ple_slice,
    run,
    tp1,
)

from sglang_gemma4 import registry
from sglang_gemma4.patches import _layer_forward, fused_ple, fused_triple_norm

TARGET = _layer_forward.TARGET
PATCHES = {"fused_ple": fused_ple.PATCH, "fused_triple_norm": fused_triple_norm.PATCH}
PLE_KERNELS = ["gemma_rmsnorm_add", "gemma_gelu_tanh_mul", "gemma_rmsnorm_residual_scalar"]
MULTIPLE_AROUND = "Multiple AROUND hooks"


@contextlib.contextmanager
def applied(names, environ):
    """Register the named patches (that evaluate active) in order, apply TARGET once; restore."""
    from sglang.srt.models.gemma4_causal import Gemma4DecoderLayer
    from sglang.srt.plugins.hook_registry import HookRegistry

    before = {t: list(h) for t, h in HookRegistry._hooks.items()}
    patched_before = set(HookRegistry._patched)
    raw = Gemma4DecoderLayer.__dict__["forward"]
    try:
        statuses = {}
        for name in names:
            patch = PATCHES[name]
            statuses[name] = registry.apply(patch, registry.evaluate(patch, environ), environ)
        hooks = list(HookRegistry._hooks.get(TARGET, ()))
        if hooks:
            HookRegistry._apply_target(TARGET, hooks)
            HookRegistry._patched.add(TARGET)
        yield statuses, hooks
    finally:
        Gemma4DecoderLayer.forward = raw
        HookRegistry._hooks.clear()
        HookRegistry._hooks.update(before)
        HookRegistry._patched.clear()
        HookRegistry._patched.update(patched_before)


@pytest.fixture
def kernel_calls(spy):
    """Names of our layer kernels as they are called."""
    from sglang_gemma4.kernels import ple_tail, triple_rmsnorm

    calls = []
    for mod, name in [(ple_tail, n) for n in PLE_KERNELS] + [(triple_rmsnorm, "gemma_post_attn_triple_rmsnorm")]:
        spy(mod, name, lambda a, _name=name: calls.append(_name))
    return calls


def _around(hooks):
    from sglang.srt.plugins.hook_registry import HookType

    return [h for ht, h, _ in hooks if ht == HookType.AROUND]


@pytest.mark.parametrize("order", [("fused_ple", "fused_triple_norm"), ("fused_triple_norm", "fused_ple")],
                         ids=["ple_first", "triple_first"])
def test_both_active_register_exactly_one_around_hook(clean_env, caplog, order):
    from sglang.srt.models.gemma4_causal import Gemma4DecoderLayer
    from sglang.srt.plugins.hook_registry import HookRegistry

    original = Gemma4DecoderLayer.forward
    with caplog.at_level(logging.WARNING), applied(order, {}) as (statuses, hooks):
        assert all(s.state == registry.ACTIVE for s in statuses.values()), statuses
        assert len(hooks) == 1 and len(_around(hooks)) == 1, hooks
        hook = hooks[0][1]
        assert isinstance(hook, _layer_forward.LayerForward)
        assert hook is _layer_forward.registered_hook()
        assert {s: f.name for s, f in hook.fusions.items()} == {
            "dense_tail": "fused_ple", "moe_post_attn": "fused_triple_norm"}
        assert Gemma4DecoderLayer.forward is not original
        assert Gemma4DecoderLayer.forward.__wrapped__ is original
        # a second registration of either patch adds no hook (SGLang may load plugins twice)
        for name in order:
            registry.apply(PATCHES[name], registry.evaluate(PATCHES[name], {}), {})
        assert len(HookRegistry._hooks[TARGET]) == 1
    assert not [r for r in caplog.records if MULTIPLE_AROUND in r.getMessage()]
    assert Gemma4DecoderLayer.forward is original


def test_multiple_around_warning_is_observable(caplog):
    """Control for the test above: SGLang's warning reaches caplog when there are two hooks."""
    from sglang.srt.models.gemma4_causal import Gemma4DecoderLayer
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    raw = Gemma4DecoderLayer.__dict__["forward"]
    a, b = _layer_forward.LayerForward(), _layer_forward.LayerForward()
    try:
        with caplog.at_level(logging.WARNING):
            HookRegistry._apply_target(TARGET, [(HookType.AROUND, a, None), (HookType.AROUND, b, None)])
    finally:
        Gemma4DecoderLayer.forward = raw
    assert [r for r in caplog.records if MULTIPLE_AROUND in r.getMessage()]


def test_both_knobs_off_register_no_hook(clean_env):
    from sglang.srt.models.gemma4_causal import Gemma4DecoderLayer

    original = Gemma4DecoderLayer.forward
    off = {"SGLANG_GEMMA4_FUSED_PLE": "0", "SGLANG_GEMMA4_FUSED_TRIPLE_NORM": "0"}
    with applied(("fused_ple", "fused_triple_norm"), off) as (statuses, hooks):
        assert all(s.state == registry.DISABLED for s in statuses.values()), statuses
        assert hooks == [] and _layer_forward.registered_hook() is None
        assert Gemma4DecoderLayer.forward is original


def test_slot_conflict_is_refused():
    hook = _layer_forward.LayerForward()
    hook.add(fused_ple.FUSION)
    hook.add(fused_ple.FUSION)  # the same fusion again: fine
    with pytest.raises(RuntimeError, match="already filled by fused_ple"):
        hook.add(dataclasses.replace(fused_ple.FUSION, name="other"))
    with pytest.raises(ValueError, match="unknown layer-forward slot"):
        hook.add(dataclasses.replace(fused_ple.FUSION, slot="nowhere"))


@needs_kernels
@pytest.mark.parametrize("on", [("fused_ple", "fused_triple_norm"), ("fused_ple",), ("fused_triple_norm",)],
                         ids=["both", "ple_only", "triple_only"])
def test_each_knob_switches_only_its_fusion(clean_env, tp1, monkeypatch, allow_cpu, kernel_calls, on):
    """Knob off: that fusion's layers run SGLang's code (bit-identical, none of our kernels);
    knob on: its kernels run. One hook either way."""
    env = {PATCHES[n].knob: "0" for n in PATCHES if n not in on}
    dense = build_layer(monkeypatch, moe=False, ple=True)
    moe = build_layer(monkeypatch, moe=True, ple=False)
    x, ple = hidden(torch.float32), ple_slice(torch.float32)
    ref_dense, ref_moe = run(dense, x, ple), run(moe, x)
    with applied(("fused_ple", "fused_triple_norm"), env) as (statuses, hooks):
        assert {n for n, s in statuses.items() if s.state == registry.ACTIVE} == set(on)
        assert len(hooks) == 1 and len(_around(hooks)) == 1
        out_dense = run(dense, x, ple)
        dense_calls = list(kernel_calls)
        out_moe = run(moe, x)
        moe_calls = kernel_calls[len(dense_calls):]
    if "fused_ple" in on:
        assert dense_calls == PLE_KERNELS
        torch.testing.assert_close(out_dense, ref_dense, rtol=1e-5, atol=1e-5)
    else:
        assert dense_calls == [] and torch.equal(out_dense, ref_dense)
    if "fused_triple_norm" in on:
        assert moe_calls == ["gemma_post_attn_triple_rmsnorm"]
        torch.testing.assert_close(out_moe, ref_moe, rtol=1e-5, atol=1e-5)
    else:
        assert moe_calls == [] and torch.equal(out_moe, ref_moe)


@pytest.mark.parametrize("moe,ple", [(False, True), (True, False), (True, True)], ids=["dense_ple", "moe", "moe_ple"])
def test_slot_defaults_restate_sglang_forward(tp1, monkeypatch, moe, ple):
    """Every slot filled by a pass-through fusion running the slot's default: the re-stated
    forward must equal SGLang's own bit for bit (CPU: the non-CUDA branches of 0.5.17)."""
    from sglang.srt.models.gemma4_causal import Gemma4DecoderLayer

    layer = build_layer(monkeypatch, moe=moe, ple=ple)
    x = hidden(torch.float32)
    p = ple_slice(torch.float32) if ple else None
    ref = run(layer, x, p)
    hook = _layer_forward.LayerForward()
    seen = []
    for slot, default in _layer_forward.SLOTS.items():
        def passthrough(*a, _default=default, _slot=slot):
            seen.append(_slot)
            return _default(*a)

        hook.add(_layer_forward.Fusion(f"probe_{slot}", slot, lambda *a: True, passthrough, f"probe {slot}"))
    original = Gemma4DecoderLayer.forward
    with torch.no_grad():
        out, none = hook(original, layer, None, x.clone(), p, None)
    assert none is None
    assert seen == list(_layer_forward.BRANCH_SLOTS["moe" if moe else "dense"])
    assert torch.equal(out, ref)


def test_two_enables_in_one_register_share_one_queued_hook(monkeypatch):
    """Patch.hook only queues; a second enable() in the same register() must find the queued hook
    (two AROUND hooks would bypass one of them)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_gemma4.patches import fused_next_input_norm as fnin

    monkeypatch.setitem(HookRegistry._hooks, _layer_forward.TARGET, [])

    class Queue:
        def __init__(self):
            self._pending = []

        def hook(self, target, fn, hook_type):
            self._pending.append((target, fn, hook_type))

    q = Queue()
    _layer_forward.enable(q, fnin.TAIL)
    _layer_forward.enable(q, fnin.INPUT_NORM)
    assert len(q._pending) == 1
    hook = q._pending[0][1]
    assert {f.slot for f in hook.fusions.values()} == {"moe_tail", "input_norm"}
