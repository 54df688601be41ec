"""Registry decisions on real SGLang: version gate, missing targets, failing register."""

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_gemma4 import registry


class _Fake(registry.Patch):
    name = "fake"
    summary = "test patch"
    knob = "SGLANG_GEMMA4_FAKE"
    default = True
    targets = ("sglang.srt.server_args.ServerArgs.check_server_args",)

    def register(self, value):
        self.hook(self.targets[0], lambda *a, **k: None, HookType.BEFORE)


class _Missing(_Fake):
    name = "missing"
    targets = ("sglang.srt.server_args.ServerArgs.no_such_method_in_0_5_17",)


class _Broken(_Fake):
    def register(self, value):
        raise RuntimeError("boom")


def test_states():
    assert registry.evaluate(_Fake(), {}).state == registry.ACTIVE
    assert registry.evaluate(_Fake(), {"SGLANG_GEMMA4_FAKE": "off"}).state == registry.DISABLED
    st = registry.evaluate(_Fake(), {"SGLANG_GEMMA4_FAKE": "yes"})
    assert st.state == registry.ERROR and "SGLANG_GEMMA4_FAKE" in st.reason
    st = registry.evaluate(_Fake(), {}, version="0.5.16")
    assert st.state == registry.UNAVAILABLE and "0.5.16" in st.reason
    st = registry.evaluate(_Missing(), {})
    assert st.state == registry.UNAVAILABLE and "no_such_method_in_0_5_17" in st.reason


def test_failing_patch_does_not_register_and_others_do():
    before = {t: len(h) for t, h in HookRegistry._hooks.items()}
    broken, good = _Broken(), _Fake()
    s1 = registry.apply(broken, registry.evaluate(broken, {}), {})
    assert s1.state == registry.UNAVAILABLE and "boom" in s1.reason
    assert {t: len(h) for t, h in HookRegistry._hooks.items() if h} == {t: n for t, n in before.items() if n}
    s2 = registry.apply(good, registry.evaluate(good, {}), {})
    assert s2.state == registry.ACTIVE
    t = good.targets[0]
    assert len(HookRegistry._hooks[t]) == before.get(t, 0) + 1
    HookRegistry._hooks[t].pop()  # never applied: nothing to restore


def test_undeclared_target_is_refused():
    class _Sloppy(_Fake):
        def register(self, value):
            self.hook("sglang.srt.server_args.ServerArgs.__post_init__", lambda *a: None, HookType.BEFORE)

    p = _Sloppy()
    assert registry.apply(p, registry.evaluate(p, {}), {}).state == registry.UNAVAILABLE


def test_every_shipped_patch_is_well_formed():
    names = set()
    for p in registry.all_patches():
        assert p.name and p.summary and p.knob.startswith("SGLANG_") and p.seed
        assert p.name not in names
        names.add(p.name)
        assert p.default in (True, False, None)


def test_broken_patch_module_is_unavailable_not_fatal():
    st = registry.evaluate(registry._ImportFailed("broken", "ImportError: no module x"), {})
    assert st.state == registry.UNAVAILABLE and "no module x" in st.reason


def test_extra_setting_error_is_a_startup_error():
    class _Budget(_Fake):
        def validate(self, environ):
            if environ.get("SGLANG_GEMMA4_FAKE_BUDGET", "1") != "1":
                raise ValueError("invalid value for environment variable SGLANG_GEMMA4_FAKE_BUDGET")

    st = registry.evaluate(_Budget(), {"SGLANG_GEMMA4_FAKE_BUDGET": "x"})
    assert st.state == registry.ERROR and "SGLANG_GEMMA4_FAKE_BUDGET" in st.reason
    # a patch switched off does not validate its extra settings
    st = registry.evaluate(_Budget(), {"SGLANG_GEMMA4_FAKE_BUDGET": "x", "SGLANG_GEMMA4_FAKE": "0"})
    assert st.state == registry.DISABLED


def test_error_row_names_the_wrong_variable():
    class _Budget(_Fake):
        def validate(self, environ):
            raw = environ.get("SGLANG_GEMMA4_FAKE_BUDGET")
            if raw is not None:
                raise registry.SettingError("SGLANG_GEMMA4_FAKE_BUDGET", raw, f"bad budget {raw!r}")

    st = registry.evaluate(_Budget(), {"SGLANG_GEMMA4_FAKE_BUDGET": "-5"})
    assert (st.state, st.knob, st.value) == (registry.ERROR, "SGLANG_GEMMA4_FAKE_BUDGET", "-5")
    # a bad on/off knob (KnobError) names the knob and its raw value
    st = registry.evaluate(_Fake(), {"SGLANG_GEMMA4_FAKE": "yes"})
    assert (st.state, st.knob, st.value) == (registry.ERROR, "SGLANG_GEMMA4_FAKE", "yes")


def test_shipped_budget_error_names_the_budget_variable():
    from sglang_gemma4.patches import batched_encoder as be

    env = {be.BUDGET_ENV: "-5"}
    st = registry.evaluate(be.PATCH, env)
    assert (st.state, st.knob, st.value) == (registry.ERROR, be.BUDGET_ENV, "-5")
    assert be.BUDGET_ENV in st.reason and "'-5'" in st.reason
    assert registry.evaluate(be.PATCH, {be.BUDGET_ENV: " 8 "}).state == registry.ACTIVE


def test_surrounding_spaces_in_knob_values_are_stripped():
    # README promises this
    assert registry.evaluate(_Fake(), {"SGLANG_GEMMA4_FAKE": " off "}).state == registry.DISABLED
    assert registry.evaluate(_Fake(), {"SGLANG_GEMMA4_FAKE": "\tON\n"}).state == registry.ACTIVE
    st = registry.evaluate(_Fake(), {"SGLANG_GEMMA4_FAKE": "   "})
    assert st.state == registry.ACTIVE and st.value == "1 (default)"
