"""bench/serve.py's arms, statistics and report on synthetic runs (CPU); the configs it serves."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def serve():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arms(serve, tmp_path):
    assert serve.arm_config("off", tmp_path) == ({"SGLANG_PLUGINS": "none"}, [])
    env, args = serve.arm_config("spec", tmp_path)
    assert env == {} and str(tmp_path) in args and "NEXTN" in args
    assert serve.arm_config("SGLANG_GEMMA4_SWA_RATIO=0", tmp_path) == ({"SGLANG_GEMMA4_SWA_RATIO": "0"}, [])
    env, args = serve.arm_config("spec-off+SGLANG_FROZEN_KV_MTP_V2=0+steps=2", tmp_path)
    assert env == {"SGLANG_PLUGINS": "none", "SGLANG_FROZEN_KV_MTP_V2": "0"}
    assert args[args.index("--speculative-num-steps") + 1] == "2"
    assert args[args.index("--speculative-num-draft-tokens") + 1] == "3"
    for bad in ("fast", "FOO=1", "on+steps=2", "spec+steps=9", "spec+x", "spec+FOO=1"):
        with pytest.raises(ValueError):
            serve.arm_config(bad, tmp_path)


def _run(tpot, ttft, acc=None):
    return {k: 1.0 for k in serve_metrics()} | {"median_tpot_ms": tpot, "median_ttft_ms": ttft, "accept_length": acc,
                                                "duration": tpot}


def serve_metrics():
    return ("p99_ttft_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "output_throughput", "total_throughput",
            "completed")


def test_compare_flags_only_what_is_worse_beyond_spread(serve, tmp_path):
    runs = {"w": {"on": [_run(5.0, 100), _run(5.1, 140), _run(4.9, 120)],
                  "off": [_run(6.0, 100), _run(6.1, 101), _run(5.9, 99)],
                  "spec": [_run(4.0, 100, 1.0), _run(4.1, 100, 1.0), _run(3.9, 100, 1.0)]}}
    res = {"runs": runs, "summary": {w: {a: serve.summarise(rs) for a, rs in by.items()} for w, by in runs.items()}}
    cmp = serve.compare(res)["w"]["on/off"]
    assert cmp["median_tpot_ms"]["ratio"] == pytest.approx(5.0 / 6.0, abs=1e-4)
    assert not cmp["median_tpot_ms"]["worse_beyond_spread"]
    # TTFT 120 vs 100 is 1.2x, but on's own spread is 40/120: not beyond spread
    assert cmp["median_ttft_ms"]["ratio"] == pytest.approx(1.2) and not cmp["median_ttft_ms"]["worse_beyond_spread"]
    res["summary"]["w"]["on"]["median_ttft_ms"]["spread"] = 0.01
    assert serve.compare(res)["w"]["on/off"]["median_ttft_ms"]["worse_beyond_spread"]
    # against a spec base (V2=1 vs V2=0), spec arms are compared like any other
    runs2 = {"w": {"spec+A=1": [_run(4.0, 100)] * 3, "spec+A=0": [_run(5.0, 100)] * 3, "on": [_run(3.0, 90)] * 3}}
    res2 = {"summary": {w: {a: serve.summarise(rs) for a, rs in by.items()} for w, by in runs2.items()}}
    c2 = serve.compare(res2, "spec+A=0")["w"]
    assert c2["spec+A=1/spec+A=0"]["median_tpot_ms"]["ratio"] == pytest.approx(0.8) and "on/spec+A=0" in c2
    be = serve.spec_breakeven(res)["w"]["spec"]
    assert be["break_even_accept_length"] == pytest.approx(4.0 / 5.0, abs=1e-3)
    res.update(model="e4b", model_summary={}, date="d", versions={"gpu": "G"}, repeat=3, server_args=["--x"],
               memory="m", workloads={"w": (1, 2, 3, None)}, servers={"on": {"env": {}, "ready_s": 1, "pools": {}}},
               spec=serve.spec_breakeven(res), compare=serve.compare(res), errors=["e1"])
    p = tmp_path / "serve-e4b.json"
    p.write_text(json.dumps(res))
    assert serve.main(["--report", str(p)]) == 0
    md = p.with_suffix(".md").read_text()
    assert "| w | on/off | 1.200 |" in md and "break-even" in md and "- e1" in md


def test_full_size_configs_match_the_model_facts(tmp_path):
    from sglang_gemma4.testing import fullsize

    facts = {"e2b": (35, 20, 1536, 0), "e4b": (42, 18, 2560, 0), "26b": (30, 0, 2816, 128), "31b": (60, 0, 5376, 0)}
    for name, (layers, shared, hidden, experts) in facts.items():
        s = fullsize.summary(name)
        assert (s["layers"], s["kv_shared"], s["hidden"], s["experts"]) == (layers, shared, hidden, experts)
    assert fullsize.summary("26b")["sliding"] == 25 and fullsize.summary("e2b")["sliding"] == 28
    t, d = fullsize.write_model("26b", tmp_path)
    cfg, dcfg = json.loads((t / "config.json").read_text()), json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma4ForCausalLM"] and cfg["vocab_size"] == 262144
    assert dcfg["backbone_hidden_size"] == 2816 and dcfg["text_config"]["hidden_size"] == 1024
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(t))
    assert tok.vocab_size == 262144 and tok.decode([10, 262143]) == "t10 t262143"


def test_decode_profile_table_from_a_chrome_trace(tmp_path):
    import gzip
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import decode_profile

    ev = [{"ph": "X", "cat": "kernel", "name": n, "dur": d} for n, d in
          [("nvjet_tst_128x64_gemm", 60.0), ("_fwd_kernel_stage1", 20.0), ("fused_moe_kernel", 10.0),
           ("_triple_rmsnorm_kernel", 6.0), ("gemma_rmsnorm_kernel", 4.0)]] + [
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 999.0}]
    p = tmp_path / "t.trace.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    t = decode_profile.table(decode_profile.kernels(decode_profile.load_events(p)), steps=2)
    assert t["kernel_us_per_step"] == 50.0
    assert t["shares"] == {"gemm": 0.6, "attention": 0.2, "moe": 0.1, "other": 0.1}
    names = [k["name"] for k in t["other_kernels"]]
    assert names == ["_triple_rmsnorm_kernel", "gemma_rmsnorm_kernel"]
    assert t["other_kernels"][0]["launched_by"] == "sglang-gemma4 fused_triple_norm"
    assert "| other | 10.0 % |" in decode_profile.markdown("x", t)
    assert t["top_by_category"]["attention"] == [{"name": "_fwd_kernel_stage1", "us_per_step": 10.0, "calls_per_step": 0.5}]
    assert "`nvjet_tst_128x64_gemm` 30.0 (0.5)" in decode_profile.markdown("x", t)
    # a table recorded before a pattern existed: listed "other" kernels move to their category now
    old = {"steps": 2, "kernel_us_per_step": 50.0, "shares": {"gemm": 0.6, "other": 0.4},
           "other_kernels": [{"name": "_fwd_grouped_kernel_stage1", "share": 0.3, "launched_by": "?"},
                             {"name": "mystery_kernel", "share": 0.1, "launched_by": "?"}]}
    assert decode_profile.category("void flashinfer::norm::GemmaFusedAddRMSNormKernel<8u, __nv_bfloat16>(...)") == "other"
    assert decode_profile.category("void flashinfer::BatchDecodeWithPagedKVCacheKernel<...>") == "attention"
    assert decode_profile.category("void flash_fwd_splitkv_kernel<...>") == "attention"
    r = decode_profile.reclassify(old)
    assert r["shares"] == {"gemm": 0.6, "attention": 0.3, "other": 0.1}
    assert [k["name"] for k in r["other_kernels"]] == ["mystery_kernel"]


def test_steps_split_at_the_sampler_and_prefill_steps_are_set_apart():
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import decode_profile

    argmax = "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, ...>"
    seq = [("nvjet_gemm", 10.0), ("_fwd_grouped_kernel_stage1", 5.0), (argmax, 1.0),      # decode step
           ("nvjet_gemm", 40.0), ("_fwd_kernel", 30.0), (argmax, 1.0),                     # prefill chunk
           ("nvjet_gemm", 12.0), ("_fwd_grouped_kernel_stage1", 5.0), (argmax, 1.0),      # decode step
           ("nvjet_gemm", 99.0)]                                                          # cut off: dropped
    ev = [{"ph": "X", "cat": "kernel", "name": n, "ts": float(i), "dur": d} for i, (n, d) in enumerate(seq)]
    ev = ev[::-1]  # trace order is not time order
    steps = decode_profile.split_steps(ev)
    assert [len(st) for st in steps] == [3, 3, 3]
    d = decode_profile.decode_only(steps)
    assert (d["decode_steps"], d["prefill_steps"]) == (2, 1)
    assert d["kernel_us_per_step"] == 17.0  # (16 + 18) / 2
    assert d["shares"]["gemm"] == pytest.approx(22 / 34, abs=1e-4)
    assert decode_profile.split_steps([e for e in ev if "ArgMax" not in e["name"]]) == []
    t = decode_profile.table(decode_profile.kernels(ev), steps=3) | {"decode_only": d}
    assert "Steps with no prefill kernel: 2 (and 1 with one), 17.0 us per decode step" in decode_profile.markdown("x", t)


def test_gpu_timeline_merges_overlaps_and_counts_gaps():
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import decode_profile

    k = lambda ts, d: {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": d}  # noqa: E731
    # [0,10] and [5,20] overlap (two streams) -> 20 busy; [30,40] after a 10 us host gap; a CPU op is ignored
    ev = [k(30.0, 10.0), k(0.0, 10.0), k(5.0, 15.0), {"ph": "X", "cat": "cpu_op", "name": "x", "ts": 100.0, "dur": 5.0}]
    tl = decode_profile.gpu_timeline(ev)
    assert tl == {"span_us": 40.0, "busy_us": 30.0, "busy_share": 0.75}
    assert decode_profile.gpu_timeline([])["busy_share"] == 0.0
    both = decode_profile.combine_timelines([tl, {"span_us": 60.0, "busy_us": 60.0, "busy_share": 1.0}])
    assert both == {"span_us": 100.0, "busy_us": 90.0, "busy_share": 0.9}
    t = decode_profile.table(decode_profile.kernels(ev), steps=2) | {"timeline": tl}
    assert "GPU span 20 us/step, busy 75.0 %" in decode_profile.markdown("x", t)


def test_speculative_window_split_into_verify_and_draft():
    """Two speculative steps of a 2-layer target and a 1-layer draft with 2 draft forwards: kernels go to the
    phase of the attention before them; our split-KV verify kernels count as verify attention."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import decode_profile

    names = []
    for verify_attn in (["_fwd_kernel"], ["_verify_prefix_kernel", "_verify_merge_kernel"]):
        names += ["embed_gemm"]  # the first forward's pre-attention kernel: before any attention, not counted
        for _ in range(2):  # target layers
            names += verify_attn + ["fused_moe_kernel"]
        names += ["nvjet_lm_head", "argmax"]  # target lm_head + verify sampling
        for _ in range(2):  # draft forwards
            names += ["_fwd_kernel_stage1", "_fwd_kernel_stage2", "nvjet_draft_head", "cunn_SoftMaxForward"]
    ev = [{"ph": "X", "cat": "kernel", "name": n, "ts": float(i), "dur": 10.0} for i, n in enumerate(names)]
    sp = decode_profile.spec_phases(ev)
    assert sp["spec_steps"] == 2 and sp["draft_attention_calls_per_step"] == 2.0
    # verify: 6 then 8 kernels of 10 us; draft: 8 + 8, plus the second step's embed_gemm (after a draft attention)
    assert sp["verify"]["kernel_us_per_step"] == 70.0
    assert sp["draft"]["kernel_us_per_step"] == 85.0
    assert decode_profile.category("_verify_prefix_kernel") == "attention"
    md = decode_profile.markdown("x", decode_profile.table(decode_profile.kernels(ev), steps=2) | {"spec_phases": sp})
    assert "Speculative steps: 2; target verify 70.0 us/step, draft 85.0 us/step" in md
    assert decode_profile.spec_phases([e for e in ev if "stage1" not in e["name"]]) == {}  # no draft phase


def test_whole_benchmark_against_fake_servers(serve, tmp_path, monkeypatch):
    """main(): servers started and polled, SGLang's real bench_serving run in-process per arm and
    repeat, results parsed, compared and reported; a slower arm is found slower."""
    import sys

    from sglang_gemma4.testing import server as srv

    real = srv.make_server
    fake = str(ROOT / "test" / "bench" / "fake_sglang_server.py")

    def make(name, model_path, log_dir, args=(), env=None, checks="none", port=None):
        s = real(name, model_path, log_dir, args, env=env, checks=checks, port=port)
        tpot = "4" if env and env.get("SGLANG_PLUGINS") == "none" else "1"  # "off" arm is slower
        s.cmd = [sys.executable, fake, "--model-path", str(model_path), "--port", str(s.port), "--tpot-ms", tpot]
        return s

    monkeypatch.setattr(srv, "make_server", make)
    monkeypatch.setitem(serve.WORKLOADS, "tiny", (16, 12, 4, 2))
    rc = serve.main(["--model", "e2b", "--arms", "on,off", "--workloads", "tiny", "--repeat", "2",
                     "--out", str(tmp_path), "--bench-timeout", "120"])
    res = json.loads((tmp_path / "serve-e2b.json").read_text())
    assert rc == 0 and not res["errors"], res["errors"]
    assert [len(res["runs"]["tiny"][a]) for a in ("on", "off")] == [2, 2]
    assert all(r["completed"] == 4 for a in ("on", "off") for r in res["runs"]["tiny"][a])
    tpot = res["compare"]["tiny"]["on/off"]["median_tpot_ms"]
    assert tpot["ratio"] < 0.6, tpot
    # the fake emits only special tokens (as dummy weights do): first token and gaps are still timed
    for r in res["runs"]["tiny"]["off"]:
        assert r["median_ttft_ms"] > 0 and r["median_itl_ms"] >= 3.0, r
    assert res["servers"]["on"]["pools"]["max_running_requests"] == 77
    assert not res["servers"]["on"]["alive"]  # stopped at the end
    assert "| tiny | on/off |" in (tmp_path / "serve-e2b.md").read_text()


def test_only_profile_delay_and_profiles_first_against_fake_servers(serve, tmp_path, monkeypatch):
    """--only limits a workload to some arms; --profile ARM:WL@S traces a live load (the fake writes a
    trace), and --profiles-first runs it before the timed repeats."""
    import sys

    from sglang_gemma4.testing import server as srv

    real = srv.make_server
    fake = str(ROOT / "test" / "bench" / "fake_sglang_server.py")

    def make(name, model_path, log_dir, args=(), env=None, checks="none", port=None):
        s = real(name, model_path, log_dir, args, env=env, checks=checks, port=port)
        s.cmd = [sys.executable, fake, "--model-path", str(model_path), "--port", str(s.port)]
        return s

    monkeypatch.setattr(srv, "make_server", make)
    monkeypatch.setitem(serve.WORKLOADS, "tiny", (16, 8, 2, 1))
    monkeypatch.setitem(serve.WORKLOADS, "tiny2", (16, 8, 2, 1))
    rc = serve.main(["--model", "e2b", "--arms", "on,off,SGLANG_GEMMA4_YOCO=0", "--workloads", "tiny,tiny2",
                     "--repeat", "1", "--only", "tiny2=off", "--profile", "off:tiny2@0.2", "--profiles-first",
                     "--profile-steps", "2", "--out", str(tmp_path), "--bench-timeout", "120"])
    res = json.loads((tmp_path / "serve-e2b.json").read_text())
    assert rc == 0 and not res["errors"], res["errors"]
    assert sorted(res["runs"]["tiny"]) == ["SGLANG_GEMMA4_YOCO=0", "off", "on"]
    assert sorted(res["runs"]["tiny2"]) == ["off"]
    prof = res["profiles"]["off:tiny2@0.2"]
    assert prof["shares"]["gemm"] == pytest.approx(0.6) and prof["timeline"]["busy_share"] == pytest.approx(45 / 55, abs=1e-3)  # [0,30] + [40,55]
    assert prof["load"]["completed"] == 2
    # traced before any timed repeat (a deadline then cuts repeats, not traces)
    logs = tmp_path / "logs"
    first_timed = min(f.stat().st_mtime for f in logs.glob("tiny-*-0.log"))
    assert (logs / "profile-tiny2-off.log").stat().st_mtime < first_timed


def test_bad_only_and_profile_items_fail_before_servers_start(serve, tmp_path):
    for argv in (["--only", "tiny=nope"], ["--only", "other=on"], ["--only", "chat_c1"], ["--only", "chat_c1=spec"],
                 ["--profile", "on:chat_c1@-1"], ["--profile", "on:chat_c1@x"], ["--profile", "spec:chat_c1"]):
        with pytest.raises(SystemExit):
            serve.main(["--model", "e2b", "--arms", "on,off", "--workloads", "chat_c1", "--out", str(tmp_path), *argv])
    assert not (tmp_path / "models").exists()  # no config written, no server started


def test_bench_serving_imports_without_hf_datasets():
    """The GPU bundle has no HF ``datasets``; sglang.benchmark imports it at module level."""
    import subprocess
    import sys

    code = ("import sys, importlib.util; sys.modules['datasets'] = None\n"  # import datasets -> ImportError
            f"spec = importlib.util.spec_from_file_location('s', {str(ROOT / 'bench' / 'serve.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m._stub_hf_datasets()\n"
            "from sglang.benchmark import serving\n"
            "import datasets\n"
            "try:\n    datasets.load_dataset('x')\nexcept ImportError as e:\n    print('refused:', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "refused: HF datasets is not installed" in p.stdout


@pytest.mark.parametrize("part,env", [
    ("prof-26b", {}), ("e4b-all", {}), ("mtp-e4b-v2", {"SERVE_EXTRA": "--cuda-graph-backend-prefill disabled"}),
    ("serve-26b-swa", {}), ("mtp-26b", {"MTP_V2": "0"}), ("serve-e4b-yoco", {}), ("serve-e2b", {}), ("mtp-e4b", {}),
    ("e4b-all", {"SERVE_WORKLOADS": "ttft_c16,chat_c8", "SERVE_PROFILE": ""}), ("mtp-26b-v2", {}), ("mtp-26b-verify", {}),
    ("decode-splits-ab", {}), ("decode-splits-ab", {"SPLITS_CAP": "16"}),
])
def test_gpu_backlog_bench_parts_parse_on_cpu(tmp_path, part, env):
    """Every serve.py call a device part makes parses (arms, --only, --profile items, workloads)
    here, so a typo cannot cost a 10-minute device call. SERVE_DRY_RUN=1 stops after validation."""
    import os
    import subprocess
    import sys

    e = dict(os.environ, SERVE_DRY_RUN="1", GPU_BACKLOG_READY="1", OUT=str(tmp_path), **env)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_backlog.sh"), part], capture_output=True, text=True,
                       env=e, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    plans = [json.loads(line.split("serve.py dry run: ", 1)[1]) for line in out.splitlines() if "serve.py dry run: " in line]
    assert plans, out[-3000:]
    for plan in plans:
        assert plan["arms"] and all(set(a) <= set(plan["arms"]) for a in plan["workloads"].values())
    assert not list(tmp_path.rglob("config.json"))  # nothing written, nothing started
    if "SERVE_WORKLOADS" in env:  # the part's fixed --only entry for chat_c1 is reported, not dropped silently
        assert "chat_c1" not in plans[0]["workloads"] and "entry unused" in out


def _backlog_without_pytest(tmp_path):
    """gpu_backlog.sh with PY swapped for a shim that passes serve.py through and skips pytest
    (for parts that run GPU tests before their serve.py call)."""
    import sys

    shim = tmp_path / "py"
    shim.write_text(f"#!/bin/sh\nif [ \"$1\" = -m ]; then echo skipped-pytest; exit 0; fi\nexec {sys.executable} \"$@\"\n")
    shim.chmod(0o755)
    script = (ROOT / "scripts" / "gpu_backlog.sh").read_text().replace("PY=python3", f"PY={shim}")
    (tmp_path / "scripts").mkdir()
    patched = tmp_path / "scripts" / "gpu_backlog.sh"
    patched.write_text(script.replace('cd "$(dirname "$0")/.."', f'cd {ROOT}'))
    return patched


def test_fusion_ab_part_parses_for_both_fusions(tmp_path):
    """fusion-ab runs GPU tests first; on CPU only its serve.py call is checked."""
    import os
    import subprocess

    patched = _backlog_without_pytest(tmp_path)
    for fusion, model in (("SGLANG_GEMMA4_FUSED_NEXT_INPUT_NORM", "26b"), ("SGLANG_GEMMA4_FUSED_QKV_NORM_ROPE", "e4b")):
        e = dict(os.environ, SERVE_DRY_RUN="1", GPU_BACKLOG_READY="1", OUT=str(tmp_path / fusion), FUSION=fusion,
                 SERVE_MODEL=model)
        p = subprocess.run(["bash", str(patched), "fusion-ab"], capture_output=True, text=True, env=e, timeout=600)
        out = p.stdout + p.stderr
        assert p.returncode == 0 and "skipped-pytest" in out, out[-3000:]
        plan = json.loads(out.split("serve.py dry run: ", 1)[1].splitlines()[0])
        assert plan["model"] == model and plan["arms"] == ["on", f"{fusion}=1"] and plan["base"] == "on"


def test_mtp_nosync_part_parses(tmp_path):
    """mtp-nosync: three spec arms, SGLang's overlap as the base; its pytest steps are skipped here."""
    import os
    import subprocess

    patched = _backlog_without_pytest(tmp_path)
    e = dict(os.environ, SERVE_DRY_RUN="1", GPU_BACKLOG_READY="1", OUT=str(tmp_path / "out"))
    p = subprocess.run(["bash", str(patched), "mtp-nosync"], capture_output=True, text=True, env=e, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "skipped-pytest" in out, out[-3000:]
    plan = json.loads(out.split("serve.py dry run: ", 1)[1].splitlines()[0])
    v1 = "spec+SGLANG_FROZEN_KV_MTP_V2=1"
    assert plan["arms"] == [v1, v1 + "+SGLANG_GEMMA4_MTP_DRAFT_NO_SYNC=1", "spec+SGLANG_FROZEN_KV_MTP_V2=0"]
    assert plan["base"] == v1 and "--cuda-graph-backend-prefill" in plan["extra_server_args"]


def test_patient_flush_retries_a_400_then_gives_up(serve):
    """bench_serving's flush after warmup races an overlap server's last step (400 'pending
    requests'): retried while it is a 400, any other error or a lasting 400 still raises."""
    import requests

    def http_error(code):
        r = requests.Response()
        r.status_code = code
        return requests.HTTPError(f"{code}", response=r)

    calls = []

    def flush(base_url, backend, fail=[400, 400]):
        calls.append((base_url, backend))
        if fail:
            raise http_error(fail.pop(0))

    assert serve.patient_flush(flush, wait_s=5, poll_s=0)("u", "sglang") is None and len(calls) == 3
    with pytest.raises(requests.HTTPError, match="500"):
        serve.patient_flush(lambda *a: (_ for _ in ()).throw(http_error(500)), wait_s=5, poll_s=0)("u", "sglang")
    n = []
    with pytest.raises(requests.HTTPError, match="400"):
        serve.patient_flush(lambda *a: n.append(1) or (_ for _ in ()).throw(http_error(400)), wait_s=0.05, poll_s=0.01)("u", "s")
    assert len(n) >= 2


def test_bench_threads_keep_their_own_stdout(serve, tmp_path, monkeypatch, capsys):
    """A bench_serving thread that outlives its timeout must neither capture the main thread's prints nor
    leave sys.stdout on its (closed) log (serve.py's final print raised ValueError on the H200)."""
    import sys
    import threading

    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test
    out = serve._thread_stdout()
    started, release = threading.Event(), threading.Event()
    logs = [tmp_path / "hung.log", tmp_path / "next.log"]

    def bench(log_path, hang):
        with open(log_path, "w") as log:
            out.local.target = log
            try:
                print(f"inside {log_path.name}")
                started.set()
                if hang:
                    release.wait(10)
            finally:
                out.local.target = None

    hung = threading.Thread(target=bench, args=(logs[0], True))
    hung.start()
    started.wait(10)
    print("main while hung")
    nxt = threading.Thread(target=bench, args=(logs[1], False))
    nxt.start(), nxt.join()
    release.set(), hung.join()
    print("main at the end")
    assert logs[0].read_text() == "inside hung.log\n" and logs[1].read_text() == "inside next.log\n"
    assert capsys.readouterr().out == "main while hung\nmain at the end\n"


def test_an_unfinished_trace_stops_the_profiler_and_is_dropped(serve, tmp_path, monkeypatch):
    """The 26B overlap server's CPU+GPU trace never finished writing and the server stayed busy; serve.py
    must ask it to stop and not ship the partial files (200 MB did not fit the result tarball)."""
    import types

    calls = []
    monkeypatch.setattr(serve.srv, "http", lambda url, payload=None, **kw: calls.append(url) or (200, {}))
    d = tmp_path / "profile-trace"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "rank0.trace.json.gz").write_bytes(b"partial")
    (d / "x.json").write_text("{")
    serve._abandon_trace(types.SimpleNamespace(base="http://127.0.0.1:1"), d)
    assert calls == ["http://127.0.0.1:1/stop_profile"]
    assert list(d.rglob("*")) == []
