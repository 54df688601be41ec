"""The engine runner's plumbing (subprocess, result file, timeout kill, log scan)
and the greedy comparison, without SGLang: a stub child stands in for the engine."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from sglang_gemma4.testing import checkpoints as ck
from sglang_gemma4.testing import engine, suite

STUB = textwrap.dedent(
    """
    import json, os, sys, time
    req = json.load(open(sys.argv[1]))
    mode = os.environ["STUB_MODE"]
    res = {"ok": False, "stage": "engine_start", "jobs": {}, "timings": {"engine_start_s": 0.1}}
    json.dump(res, open(sys.argv[2], "w"))
    print("child started", req["engine_kwargs"]["model_path"], flush=True)
    if mode == "hang":
        time.sleep(600)
    if mode == "crash":
        print("Traceback: boom", flush=True)
        sys.exit(3)
    if mode == "leak":
        print("[2026] token_to_kv_pool_allocator memory leak detected! total=8192", flush=True)
    for j in req["jobs"]:
        res["jobs"][j["name"]] = {"tokens": [[p[-1]] * j["max_new_tokens"] for p in j["prompts"]],
                                 "timings": {"tokens_per_s": 10.0}, "accept_length": None}
    res.update(ok=True, stage="done")
    json.dump(res, open(sys.argv[2], "w"))
    """
)


@pytest.fixture
def stub(tmp_path, monkeypatch):
    (tmp_path / "stub_child.py").write_text(STUB)
    monkeypatch.setattr(engine, "CHILD_MODULE", "stub_child")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path


def _run(stub, mode, **kw):
    jobs = [engine.Job("a", [[2, 9, 10]], 4), engine.Job("b", [[2, 11]], 2)]
    return engine.run_engine(stub / "model", jobs, env={"STUB_MODE": mode}, log_dir=stub / "logs", **kw)


def test_jobs_round_trip(stub):
    r = _run(stub, "ok")
    assert r["ok"] and r["error"] is None and r["returncode"] == 0
    assert r["jobs"]["a"]["tokens"] == [[10] * 4] and r["jobs"]["b"]["tokens"] == [[11] * 2]
    assert r["checks_fired"] == [] and "child started" in r["log"]
    assert r["engine_kwargs"]["attention_backend"] == "triton" and r["engine_kwargs"]["nccl_port"]


def test_result_is_kept_next_to_the_log(stub):
    r = _run(stub, "ok")
    saved = json.loads(Path(r["result_path"]).read_text())
    assert Path(r["result_path"]).parent == stub / "logs" and "log" not in saved
    assert saved["jobs"] == r["jobs"] and saved["ok"] is True and saved["log_path"] == r["log_path"]
    crashed = json.loads(Path(_run(stub, "crash")["result_path"]).read_text())
    assert crashed["ok"] is False and "exited with 3" in crashed["error"]


def test_greedy_shape(stub):
    r = engine.greedy(stub / "m", [[2, 5], [2, 6, 7]], 3, env={"STUB_MODE": "ok"}, log_dir=stub / "logs")
    assert r["ok"] and r["tokens"] == [[5] * 3, [7] * 3] and r["accept_length"] is None
    assert "tokens_per_s" in r["timings"] and "engine_start_s" in r["timings"]


def test_crash_is_reported_with_log(stub):
    r = _run(stub, "crash")
    assert not r["ok"] and "exited with 3" in r["error"] and r["stage"] == "engine_start"
    assert "boom" in r["log"]


def test_timeout_kills_and_keeps_partial_result(stub):
    r = _run(stub, "hang", timeout=3)
    assert not r["ok"] and r["error"].startswith("timeout") and r["stage"] == "engine_start"
    assert (stub / "logs").exists() and "child started" in r["log"]


def test_leak_message_is_surfaced(stub):
    r = _run(stub, "leak")
    assert r["ok"] and len(r["checks_fired"]) == 1 and "memory leak detected" in r["checks_fired"][0]


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="checks must be one of"):
        engine.run_engine(tmp_path, [], checks="paranoid")
    with pytest.raises(ValueError, match="unique"):
        engine.run_engine(tmp_path, [engine.Job("x", []), engine.Job("x", [])])


def test_compare_greedy_excuses_only_a_first_flip_at_a_near_tie():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    margins = [[1.0, 0.1, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    # flip at a near tie (prompt 0, pos 1) is excused; prompt 1 differs at a decisive pos
    c = engine.compare_greedy(ref, [[1, 9, 9, 9], [5, 6, 0, 8]], margins, min_margin=0.5)
    assert not c["ok"] and c["mismatches"] == [{"prompt": 1, "pos": 2, "ref": 7, "test": 0, "margin": 1.0}]
    assert c["excused"] == [{"prompt": 0, "pos": 1, "ref": 2, "test": 9, "margin": 0.1}]
    assert c["per_prompt"] == [1, 2] and c["compared"] == 3 and c["total"] == 8
    c = engine.compare_greedy(ref, [[1, 2, 3, 4], [5, 6, 7, 8]], margins, min_margin=0.5)
    assert c["ok"] and c["per_prompt"] == [3, 4] and c["exact"] == [True, True]
    # a near tie that did not flip leaves the prefix shared: later positions still count
    c = engine.compare_greedy(ref, [[1, 2, 9, 4], [5, 6, 7, 8]], margins, min_margin=0.5)
    assert not c["ok"] and c["mismatches"][0]["pos"] == 2
    # the threshold decides: 1.0 is a near tie under min_margin=2
    assert engine.compare_greedy(ref, [[1, 2, 9, 4], [5, 6, 7, 8]], margins, min_margin=2.0)["ok"]
    # a shorter test output is always a mismatch
    assert not engine.compare_greedy(ref, [[1], [5, 6, 7, 8]], margins, min_margin=2.0)["ok"]
    # no margins: every position decisive
    assert not engine.compare_greedy(ref, [[1, 9, 3, 4], [5, 6, 7, 8]])["ok"]
    with pytest.raises(ValueError, match="prompt count"):
        engine.compare_greedy(ref, ref[:1])


def test_aligned_margins_drop_after_margin_pass_diverges():
    job = {"tokens": [[1, 2, 3], [4, 5, 6]], "margin_pass_tokens": [[1, 9, 3], [4, 5, 6]],
           "margins": [[1.0, 2.0, 3.0], [1.0, None, 3.0]]}
    assert engine.aligned_margins(job) == [[1.0, 0.0, 0.0], [1.0, 0.0, 3.0]]
    assert engine.aligned_margins({"tokens": [[1]]}) is None


def test_mixed_prompts():
    p = engine.mixed_prompts(16, 2048, seed=0)
    assert p == engine.mixed_prompts(16, 2048, seed=0)
    assert len(p) == 16 and all(x[0] == ck.BOS_ID for x in p)
    assert all(ck.FIRST_PROMPT_ID <= t < 2048 for x in p for t in x[1:])
    lens = sorted(len(x) for x in p)
    assert lens[0] <= 5 and lens[-1] >= 256  # short and longer than the 32-token window


def test_suite_comparisons_on_synthetic_results():
    prompts = engine.mixed_prompts(suite.N_PROMPTS, 2048, seed=0)
    chain = [ck.agree_continuation(p[-1], suite.MAX_NEW_TOKENS) for p in prompts]
    ref = [[(i * 7 + k) % 2048 for k in range(suite.MAX_NEW_TOKENS)] for i in range(suite.N_PROMPTS)]
    # above every calibrated threshold (engine.MIN_MARGIN)
    margins = [[max(engine.MIN_MARGIN.values()) + 1.0] * suite.MAX_NEW_TOKENS for _ in ref]

    def res(tokens, m=None):
        return {"ok": True, "jobs": {"mixed": {"tokens": tokens, "margins": m, "timings": {"tokens_per_s": 1.0}}}}

    bad = [list(r) for r in ref]
    bad[3][5] += 1
    results = {
        "dense_on": res(ref, margins), "dense_off": res(ref, margins), "dense_fixed": res(ref, margins),
        "moe_on": res(ref, margins), "moe_off": res(bad, margins),
        "random_spec_v2_0": res(ref), "random_spec_v2_1": res(bad),
        "agree_nospec": res(chain), "agree_spec_v2_0": res(chain), "agree_spec_v2_1": res(bad),
    }
    c = suite.comparisons(results)
    assert c["dense_plugin"]["ok"] and c["random_spec_v2_0"]["ok"] and c["agree_spec_v2_0"]["ok"]
    assert not c["moe_plugin"]["ok"] and c["moe_plugin"]["mismatches"][0]["pos"] == 5
    assert not c["random_spec_v2_1"]["ok"] and not c["agree_spec_v2_1"]["ok"]
    # per-variant thresholds: the same flip is excused where the reference is not decisive
    low = {"dense_ple": 0.5, "moe": 100.0}
    c = suite.comparisons(results, min_margin=low)
    assert c["moe_plugin"]["ok"] and c["moe_plugin"]["excused"][0]["pos"] == 5 and c["moe_plugin"]["compared"] == 0
    assert c["moe_plugin"]["min_margin"] == 100.0 and c["dense_plugin"]["min_margin"] == 0.5
    s = suite.summarize(results)
    assert s["dense_on"]["tokens_per_s"] == 1.0
    json.dumps({"c": c, "s": s})


def test_suite_configurations(tmp_path):
    cfgs = suite.suite_configs(tmp_path)
    by = {c.name: c for c in cfgs}
    assert cfgs[0].name == "dense_on" and len(by) == len(cfgs) == 10
    assert by["dense_off"].env == {"SGLANG_PLUGINS": "none"} and by["dense_fixed"].env == {}
    # plugin-on vs plugin-off identity is checked with the deliberate numeric fixes off
    assert by["dense_on"].env == by["moe_on"].env == suite.FIXES_OFF
    for v in ("0", "1"):
        a = by[f"agree_spec_v2_{v}"]
        assert a.env == {suite.V2_KNOB: v} and a.engine_kwargs["speculative_algorithm"] == "NEXTN"
        assert "agree_assistant" in a.engine_kwargs["speculative_draft_model_path"]
        assert "assistant" in by[f"random_spec_v2_{v}"].engine_kwargs["speculative_draft_model_path"]
    assert all(c.checks == "full" for c in cfgs)


def test_servers_started_together_get_distinct_ports_outside_the_ephemeral_range(tmp_path):
    # a port picked by binding 0 can be handed, before our server binds it, to a sibling server's own
    # nccl-port probe (EADDRINUSE seen with 9 launch_servers starting at once on the H200)
    import socket

    from sglang_gemma4.testing import server as srv

    servers = [srv.make_server(f"s{i}", "/m", tmp_path, ["--skip-tokenizer-init"]) for i in range(12)]
    ports = []
    for s in servers:
        nccl = int(s.cmd[s.cmd.index("--nccl-port") + 1])
        assert int(s.cmd[s.cmd.index("--port") + 1]) == s.port
        ports += [s.port, nccl]
    assert len(set(ports)) == len(ports) and all(20000 <= p < 32768 for p in ports), ports
    from sglang_gemma4.testing import engine

    with socket.socket() as held:  # the next port in line is held by someone else: skipped
        nxt = engine._NEXT_PORT[0] + 11
        held.bind(("127.0.0.1", nxt))
        assert engine.alloc_port() == nxt + 11
    explicit = srv.make_server("x", "/m", tmp_path, ["--nccl-port", "23456"])
    assert explicit.cmd.count("--nccl-port") == 1


def test_sigterm_stops_queued_engines(stub):
    """A part killed by its outer ``timeout`` must not go on starting the engines still queued in run_many
    (a killed modes run once kept launching them beside the next part on the GPU)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    driver = stub / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        from pathlib import Path
        from sglang_gemma4.testing import engine
        engine.CHILD_MODULE = "stub_child"
        cfgs = [engine.EngineConfig(f"e{{i}}", str(Path({str(stub)!r}) / "model"), [engine.Job("a", [[2, 9]], 2)],
                                    env={{"STUB_MODE": "hang"}}) for i in range(4)]
        engine.run_many(cfgs, parallel=1, warm_first=False, log_dir={str(stub / "logs")!r})
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stub)] + sys.path))
    p = subprocess.Popen([sys.executable, str(driver)], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and "child started" not in _read(stub / "logs" / "e0.log"):
            time.sleep(0.1)
        assert "child started" in _read(stub / "logs" / "e0.log")
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 128 + signal.SIGTERM
    started = sorted(f.name for f in (stub / "logs").glob("*.log"))
    assert started == ["e0.log"], started  # e1..e3 never started


def _read(path):
    return path.read_text() if path.exists() else ""
