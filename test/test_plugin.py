"""The plugin as SGLang loads it: entry point, hooks, strict knobs, status."""

import json

from sglang_gemma4 import cli, registry
from sglang_gemma4.testing.configs import run_py

LOAD_AND_REPORT = r"""
import json, pkgutil
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
load_plugins()
from sglang_gemma4 import plugin
wrapped = {}
for target, hooks in HookRegistry._hooks.items():
    if not any(src is not None and src.plugin_name == "gemma4" for _, _, src in hooks):
        continue  # SGLang's own dependencies ship plugins too (smg-servicer)
    obj_path, attr = target.rsplit(".", 1)
    obj = pkgutil.resolve_name(obj_path)
    raw = obj.__dict__.get(attr) if isinstance(obj, type) else getattr(obj, attr)
    raw = getattr(raw, "__func__", raw)
    wrapped[target] = hasattr(raw, "__wrapped__")
print("REPORT" + json.dumps({
    "statuses": [s.as_dict() for s in (plugin.statuses() or [])],
    "wrapped": wrapped,
    "patched": sorted(HookRegistry._patched),
}))
"""


def _report(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


def test_entry_point_discovered_and_targets_wrapped():
    rep = _report(run_py(LOAD_AND_REPORT, {}))
    names = {s["name"] for s in rep["statuses"]}
    assert names == {p.name for p in registry.all_patches()}
    # every hook registered by an active patch really wraps its SGLang target
    assert rep["wrapped"], "no hook registered at all"
    assert all(rep["wrapped"].values()), rep["wrapped"]
    assert set(rep["wrapped"]) <= set(rep["patched"])


def test_excluded_plugin_registers_nothing():
    rep = _report(run_py(LOAD_AND_REPORT, {"SGLANG_PLUGINS": "none"}))
    assert rep["statuses"] == [] and rep["wrapped"] == {}


SWA = r"""
import json
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import ServerArgs
out = {}
for name, path in %r.items():
    for user in (None, 0.5):
        kw = {} if user is None else {"swa_full_tokens_ratio": user}
        sa = ServerArgs(model_path=path, skip_tokenizer_init=True, device="cpu",
                        attention_backend="triton", **kw)
        out[f"{name}/{user}"] = [sa.swa_full_tokens_ratio, sa._resolved().swa_full_tokens_ratio]
print("REPORT" + json.dumps(out))
"""


def _swa(cfgs, env):
    proc = run_py(SWA % {k: str(v) for k, v in cfgs.items()}, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):]), proc.stderr


def test_swa_ratio_resolved_by_real_server_args(gemma4_configs):
    got, log = _swa(gemma4_configs, {})
    assert got == {"moe/None": [0.15, 0.15], "moe/0.5": [0.5, 0.5],
                   "dense/None": [0.8, 0.8], "dense/0.5": [0.5, 0.5]}
    assert "swa_full_tokens_ratio=0.15" in log and "dense checkpoint" in log


def test_swa_ratio_knob_off_keeps_sglang_default(gemma4_configs):
    got, _ = _swa({"moe": gemma4_configs["moe"]}, {"SGLANG_GEMMA4_SWA_RATIO": "0"})
    assert got == {"moe/None": [0.8, 0.8], "moe/0.5": [0.5, 0.5]}


GEMMA4_ARCHS = ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM", "Gemma4UnifiedForConditionalGeneration")


def test_swa_ratio_override_registered_and_applied_for_every_gemma4_arch(monkeypatch, clean_env):
    """Every architecture SGLang's own Gemma-4 override serves (the configs above only use
    Gemma4ForConditionalGeneration) gets ours, through SGLang's declaration collector."""
    import types

    from sglang.srt.arg_groups import overrides
    from sglang.srt.server_args import ServerArgs
    from transformers import Gemma4Config

    from sglang_gemma4.patches import swa_ratio

    sglang_archs = tuple(a for a, fns in overrides._MODEL_OVERRIDE_FNS.items() if overrides._gemma4_overrides in fns)
    assert sglang_archs == GEMMA4_ARCHS
    monkeypatch.setattr(overrides, "_MODEL_OVERRIDE_FNS", {k: list(v) for k, v in overrides._MODEL_OVERRIDE_FNS.items()})
    assert registry.apply(swa_ratio.PATCH, registry.evaluate(swa_ratio.PATCH, {}), {}).state == registry.ACTIVE
    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32)
    moe = Gemma4Config(text_config=dict(text, enable_moe_block=True, num_experts=4, top_k_experts=2,
                                        moe_intermediate_size=32), vision_config=None, audio_config=None)
    dense = Gemma4Config(text_config=text, vision_config=None, audio_config=None)
    # what the providers read (attention backend set: SGLang's Gemma-4 provider declares nothing)
    args = types.SimpleNamespace(swa_full_tokens_ratio=ServerArgs.swa_full_tokens_ratio, attention_backend="triton",
                                 is_attention_backend_not_set=lambda: False, moe_runner_backend="auto")
    ours = swa_ratio.gemma4_swa_ratio_override.__qualname__
    for arch in GEMMA4_ARCHS:
        assert overrides._MODEL_OVERRIDE_FNS[arch].count(swa_ratio.gemma4_swa_ratio_override) == 1, arch
        got = dict(overrides.collect_model_override_declarations(arch, args, moe))
        assert got.get(ours) == {"swa_full_tokens_ratio": swa_ratio.MOE_RATIO}, (arch, got)
        assert ours not in dict(overrides.collect_model_override_declarations(arch, args, dense)), arch


BAD_ENGINE = r"""
import sglang
try:
    sglang.Engine(model_path=%r, skip_tokenizer_init=True, device="cpu", attention_backend="triton")
except Exception as e:
    print("RAISED", type(e).__name__, e)
else:
    print("STARTED")
"""


def _assert_knob_message(text):
    assert "SGLANG_GEMMA4_SWA_RATIO" in text and "'maybe'" in text
    assert "1, true, on, 0, false, off" in text


def test_bad_knob_stops_engine_startup(gemma4_configs):
    proc = run_py(BAD_ENGINE % str(gemma4_configs["moe"]), {"SGLANG_GEMMA4_SWA_RATIO": "maybe"})
    out = proc.stdout + proc.stderr
    assert "RAISED KnobError" in proc.stdout, out[-3000:]
    _assert_knob_message(proc.stdout)


def test_bad_knob_stops_launch_server(gemma4_configs):
    code = ("import runpy, sys; sys.argv=['sglang.launch_server','--model-path',%r,"
            "'--device','cpu','--attention-backend','triton','--skip-tokenizer-init'];"
            "runpy.run_module('sglang.launch_server', run_name='__main__')") % str(gemma4_configs["moe"])
    proc = run_py(code, {"SGLANG_GEMMA4_SWA_RATIO": "maybe"}, timeout=240)
    assert proc.returncode != 0
    assert "KnobError" in proc.stderr, proc.stderr[-3000:]
    _assert_knob_message(proc.stderr)


def test_status_json_lists_every_patch(capsys, clean_env):
    rc = cli.main(["status", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert data["versions"]["sglang"] == "0.5.17"
    names = [p["name"] for p in data["patches"]]
    assert sorted(names) == sorted(p.name for p in registry.all_patches())
    states = {registry.ACTIVE, registry.DISABLED, registry.UPSTREAM, registry.UNAVAILABLE}
    for p in data["patches"]:
        assert p["state"] in states and p["reason"], p


def test_status_reports_bad_knob(capsys, clean_env, monkeypatch):
    monkeypatch.setenv("SGLANG_GEMMA4_SWA_RATIO", "maybe")
    rc = cli.main(["status"])
    out = capsys.readouterr().out
    assert rc == 1 and "error" in out and "'maybe'" in out


def test_readme_knob_table_is_current():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert cli.knob_table_markdown() in readme, "regenerate with: sglang-gemma4 knobs"


# -- the patch table once per server (issue #21) ------------------------------
SPAWN_CHILD = r"""
import multiprocessing as mp, os, sys
from sglang.srt.plugins import load_plugins
load_plugins()  # the launcher
p = mp.get_context("spawn").Process(target=load_plugins)  # a scheduler, as SGLang starts it
p.start(); p.join()
print("PID", os.getpid(), "CHILD_RC", p.exitcode)
"""


def test_patch_table_logged_once_per_server():
    proc = run_py(SPAWN_CHILD, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    pid = proc.stdout.split("PID ")[1].split()[0]
    assert "CHILD_RC 0" in proc.stdout
    table = [l for l in proc.stderr.splitlines() if "INFO patch " in l]
    summary = [l for l in proc.stderr.splitlines() if "patch table logged by pid" in l]
    assert len(table) == len(registry.all_patches()), proc.stderr[-3000:]
    assert len(summary) == 1 and f"logged by pid {pid}" in summary[0], proc.stderr[-3000:]
    assert "active" in summary[0]


def _fake_statuses(state=registry.ACTIVE):
    return [registry.PatchStatus(f"p{i}", "s", f"SGLANG_GEMMA4_P{i}", "1 (default)", state, "r") for i in range(3)]


class _Lines(list):
    def __enter__(self):
        import logging

        self.h = logging.Handler()
        self.h.emit = lambda rec: self.append(rec.getMessage())
        self.lg = logging.getLogger("sglang_gemma4")
        self.level = self.lg.level
        self.lg.addHandler(self.h)
        self.lg.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self.lg.removeHandler(self.h)
        self.lg.setLevel(self.level)


def test_log_result_table_or_summary(monkeypatch):
    import os

    from sglang_gemma4 import plugin

    st = _fake_statuses()
    monkeypatch.delenv(plugin.TABLE_OWNER_ENV, raising=False)
    monkeypatch.setattr(plugin.multiprocessing, "parent_process", lambda: None)
    with _Lines() as lines:
        plugin._log_result(st)  # first process: the table, and the marker for its children
    assert len(lines) == 3 and all(l.startswith("patch p") for l in lines)
    marker = os.environ[plugin.TABLE_OWNER_ENV]
    assert marker.startswith(f"{os.getpid()}:")

    # a multiprocessing child of that process, same decisions: one line
    monkeypatch.setattr(plugin.multiprocessing, "parent_process", lambda: object())
    monkeypatch.setattr(plugin, "_ancestors", lambda: [os.getpid(), 1234])
    with _Lines() as lines:
        plugin._log_result(st)
    assert lines == [f"sglang-gemma4: 3 active (patch table logged by pid {os.getpid()})"]

    # decided differently (its env changed): its own table
    with _Lines() as lines:
        plugin._log_result(_fake_statuses(registry.DISABLED))
    assert len(lines) == 3
    monkeypatch.setenv(plugin.TABLE_OWNER_ENV, marker)
    # the marker's pid is no ancestor (inherited through some other path): table
    monkeypatch.setattr(plugin, "_ancestors", lambda: [1234])
    with _Lines() as lines:
        plugin._log_result(st)
    assert len(lines) == 3
    # a server started by subprocess from a process that loaded the plugin: table
    monkeypatch.setattr(plugin, "_ancestors", lambda: [os.getpid()])
    monkeypatch.setattr(plugin.multiprocessing, "parent_process", lambda: None)
    with _Lines() as lines:
        plugin._log_result(st)
    assert len(lines) == 3


def test_errors_logged_in_child_processes_too(monkeypatch):
    import os

    import pytest

    from sglang_gemma4 import plugin
    from sglang_gemma4.knobs import KnobError

    class _Bad(registry.Patch):
        name, summary, knob, seed = "bad", "s", "SGLANG_GEMMA4_BAD_TEST", "-"

    monkeypatch.setattr(plugin, "_STATUSES", None)
    monkeypatch.setattr(plugin, "_stop_startup", lambda e: None)  # no refuse hooks in this process
    monkeypatch.setattr(plugin.registry, "all_patches", lambda: [_Bad()])
    monkeypatch.setenv("SGLANG_GEMMA4_BAD_TEST", "maybe")
    monkeypatch.setattr(plugin.multiprocessing, "parent_process", lambda: object())
    monkeypatch.setattr(plugin, "_ancestors", lambda: [os.getpid()])
    monkeypatch.setenv(plugin.TABLE_OWNER_ENV, f"{os.getpid()}:whatever")
    with _Lines() as lines, pytest.raises(KnobError):
        plugin.load()
    assert len(lines) == 1 and "SGLANG_GEMMA4_BAD_TEST" in lines[0] and "refusing to start" in lines[0]
