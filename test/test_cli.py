"""The CLI tells the truth: plugin selection as SGLang decides it, demo exit codes, no foreign noise."""

import json
import math
import subprocess
import sys
import types
import warnings

import pytest

from sglang_gemma4 import cli, demo, registry
from sglang_gemma4.testing.configs import clean_environ, run_py

FOREIGN = ("Only CUDA", "Triton is not supported", "No CUDA runtime is found", "All-NaN slice")


def _run_status_all(envs):
    """``python -m sglang_gemma4.cli status`` once per env, concurrently (each imports SGLang)."""
    procs = []
    for extra, args in envs:
        env = clean_environ()
        env.update(extra)
        procs.append(subprocess.Popen([sys.executable, "-m", "sglang_gemma4.cli", "status", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        out.append((p.returncode, o, e))
    return out


def test_status_subprocess_follows_sglang_plugins():
    unset, none_bad, other, text = _run_status_all([
        ({}, ["--json"]),
        ({"SGLANG_PLUGINS": "none", "SGLANG_GEMMA4_SWA_RATIO": "maybe"}, ["--json"]),
        ({"SGLANG_PLUGINS": "smg-servicer, other"}, ["--json"]),
        ({}, []),
    ])
    n = len(registry.all_patches())

    rc, o, e = unset
    assert rc == 0, e[-3000:]
    d = json.loads(o)
    ep = d["entry_point"]
    assert (ep["group"], ep["name"], ep["value"]) == ("sglang.srt.plugins", "gemma4", "sglang_gemma4.plugin:load")
    assert ep["installed"] is True and ep["loaded"] is True
    assert len(d["patches"]) == n and registry.EXCLUDED not in {p["state"] for p in d["patches"]}
    assert registry.ACTIVE in {p["state"] for p in d["patches"]}

    rc, o, e = none_bad
    assert rc == 0, e[-3000:]  # SGLang would not run the plugin, so nothing refuses the bad knob
    d = json.loads(o)
    assert d["entry_point"]["loaded"] is False and d["entry_point"]["installed"] is True
    assert {p["state"] for p in d["patches"]} == {registry.EXCLUDED} and len(d["patches"]) == n
    assert all("SGLANG_PLUGINS=none: SGLang loads no plugin" in p["reason"] for p in d["patches"])
    swa = next(p for p in d["patches"] if p["name"] == "swa_ratio")
    assert "'maybe'" in swa["reason"] and "would not refuse" in swa["reason"], swa

    rc, o, e = other
    assert rc == 0, e[-3000:]
    d = json.loads(o)
    assert {p["state"] for p in d["patches"]} == {registry.EXCLUDED}
    assert all("does not name 'gemma4'" in p["reason"] for p in d["patches"])
    assert "smg-servicer" in d["patches"][0]["reason"]  # what SGLang loads instead

    rc, o, e = text
    assert rc == 0, e[-3000:]
    assert "entry point: group sglang.srt.plugins, gemma4 = sglang_gemma4.plugin:load: installed" in o
    for noise in FOREIGN:
        assert noise not in o + e, (noise, e[-3000:])


# Every value goes through SGLang's own loader in one process; the entry points are
# loaded (imported) but not executed, so nothing is patched.
REAL_RULE = r"""
import json, os
from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group, _get_excluded_dists
out = {}
for raw in %r:
    if raw is None:
        os.environ.pop("SGLANG_PLUGINS", None)
    else:
        os.environ["SGLANG_PLUGINS"] = raw
    out[repr(raw)] = "gemma4" in load_plugins_by_group(GENERAL_PLUGINS_GROUP, _get_excluded_dists())
print("REPORT" + json.dumps(out))
"""
VALUES = [None, "", "none", "other", "gemma4", " gemma4 , other", "other,gemma4", " ", ",", "gemma", "GEMMA4",
          "smg-servicer"]


def test_selection_matches_sglang_loader(clean_env):
    proc = run_py(REAL_RULE % (VALUES,), {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads([l for l in proc.stdout.splitlines() if l.startswith("REPORT")][-1][len("REPORT"):])
    ours = {}
    for raw in VALUES:
        env = {} if raw is None else {"SGLANG_PLUGINS": raw}
        ours[repr(raw)] = cli.plugin_selection(env)["loaded"]
    assert ours == real
    assert real["None"] and not real["'none'"]  # the test must see both outcomes


def test_selection_reasons():
    assert cli.plugin_selection({})["reason"].startswith("SGLANG_PLUGINS unset")
    assert cli.plugin_selection({"SGLANG_PLUGINS": "none"})["reason"] == "SGLANG_PLUGINS=none: SGLang loads no plugin"
    r = cli.plugin_selection({"SGLANG_PLUGINS": "a,b"})["reason"]
    assert r == "SGLANG_PLUGINS=a,b does not name 'gemma4': SGLang loads no plugin"
    assert "' '" in cli.plugin_selection({"SGLANG_PLUGINS": " "})["reason"]


def test_not_installed_entry_point_is_excluded(monkeypatch):
    monkeypatch.setattr(cli.importlib.metadata, "entry_points", lambda group: [])
    sel = cli.plugin_selection({})
    assert sel["installed"] is False and sel["loaded"] is False and "not installed" in sel["reason"]


def test_excluded_matrix_keeps_knob_and_hides_error(monkeypatch):
    st = registry.PatchStatus("p", "s", "SGLANG_GEMMA4_X", "maybe", registry.ERROR, "invalid value 'maybe'")
    sel = {"loaded": False, "reason": "SGLANG_PLUGINS=none: SGLang loads no plugin"}
    monkeypatch.setattr(registry, "evaluate", lambda p: st)
    (row, *_) = cli.patch_matrix(sel)
    assert row.state == registry.EXCLUDED and row.value == "maybe"
    assert row.reason.startswith(sel["reason"]) and "invalid value 'maybe'" in row.reason


def test_status_shows_the_wrong_setting_variable(capsys, clean_env, monkeypatch):
    monkeypatch.setenv("SGLANG_GEMMA4_ENCODER_BUDGET_MB", "-5")
    rc = cli.main(["status"])
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith("batched_encoder"))
    assert rc == 1 and " error " in row
    assert "SGLANG_GEMMA4_ENCODER_BUDGET_MB=-5" in row and "SGLANG_GEMMA4_BATCHED_ENCODER" not in row
    assert "entry point: group sglang.srt.plugins, gemma4 = sglang_gemma4.plugin:load" in out


# -- demo --------------------------------------------------------------------
@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(demo, "_has_cuda", lambda: False)


def test_demo_cpu_selftest_passes(no_cuda, capsys):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli.main(["demo"]) == 0
    out = capsys.readouterr()
    from sglang_gemma4.kernels.selftest import _NAMES

    assert "FAIL" not in out.out and out.out.count(" ok ") == len(_NAMES) == 6, out.out
    # the routing case's deliberate padding NaNs are silenced there, nothing else is
    assert not [w for w in seen if "All-NaN slice" in str(w.message)]


def test_demo_fails_when_a_kernel_returns_nan(no_cuda, monkeypatch, capsys):
    import torch

    from sglang_gemma4 import kernels

    monkeypatch.setattr(kernels, "gemma_gelu_tanh_mul", lambda gate, x: torch.full_like(x, math.nan))
    assert cli.main(["demo"]) == 1
    out = capsys.readouterr()
    row = next(l for l in out.out.splitlines() if l.startswith("gemma_gelu_tanh_mul"))
    assert "FAIL" in row and "nan" in row
    assert "self-test FAILED: 1 of 6" in out.err


def test_demo_fails_when_every_kernel_fails(no_cuda, monkeypatch, capsys):
    import sglang_gemma4.kernels.selftest as st

    monkeypatch.setattr(st, "run_selftest", lambda: [(n, False, math.nan) for n in st._NAMES])
    assert cli.main(["demo"]) == 1
    assert "FAILED: 6 of 6" in capsys.readouterr().err


def _fake_gpu_run(monkeypatch, result):
    from sglang_gemma4.testing import checkpoints, engine

    monkeypatch.setattr(demo, "_has_cuda", lambda: True)
    monkeypatch.setattr(checkpoints, "build", lambda variant, root=None: f"/ckpt/{variant}")
    monkeypatch.setattr(checkpoints, "spec", lambda variant: types.SimpleNamespace(
        text=types.SimpleNamespace(vocab_size=256)))
    r = dict(ok=True, error=None, log="", log_path="/dev/null", tokens=[[1, 2]] * 4, timings={},
             accept_length=None, checks_fired=[], plugin=[{"name": "yoco", "state": "active"}])
    r.update(result)
    monkeypatch.setattr(engine, "greedy", lambda *a, **k: r)


def test_demo_gpu_path_exit_codes(monkeypatch, clean_env, capsys):
    _fake_gpu_run(monkeypatch, {})
    assert cli.main(["demo"]) == 0
    _fake_gpu_run(monkeypatch, {"checks_fired": ["memory leak detected"]})
    assert cli.main(["demo"]) == 1
    _fake_gpu_run(monkeypatch, {"plugin": None})  # status says SGLang loads it, the engine did not
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err.count("demo FAILED") == 2
