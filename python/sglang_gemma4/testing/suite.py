"""The engine-level GPU suite: every configuration run once, results shared by the tests.

An engine costs 30-50 s to start, so test/gpu does not start one per test:
:func:`run_suite` starts each configuration below once (the first alone, to
pay the one-off kernel JIT, then ``parallel`` at a time on the one GPU),
writes ``gpu-suite.json`` + one log per engine under ``out``, and the tests
assert on the stored results. ``python -m sglang_gemma4.testing.suite``
runs it without pytest.

Configurations (CUDA graphs on everywhere; SGLang's pool/KV checks on):
  dense_on / dense_off    dense_ple with the plugin (its bug fixes off, FIXES_OFF) / with
                          SGLANG_PLUGINS=none: the speed patches must not change tokens
  moe_on / moe_off        moe, same
  dense_fixed             dense_ple with the plugin's defaults (SWA window fixes on): the
                          non-speculative reference of random_spec_*
  agree_nospec            agree_target alone (its output must be the pi chain)
  agree_spec_v2_{0,1}     agree pair, FROZEN_KV_MTP, SGLANG_FROZEN_KV_MTP_V2=0/1
  random_spec_v2_{0,1}    dense_ple + assistant, FROZEN_KV_MTP, knob 0/1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from sglang_gemma4.patches import tree_verify_swa, triton_swa_window
from sglang_gemma4.testing import checkpoints
from sglang_gemma4.testing.engine import (
    EngineConfig,
    Job,
    aligned_margins,
    compare_greedy,
    min_margin_for,
    mixed_prompts,
    run_many,
    spec_kwargs,
)

N_PROMPTS = 16
MAX_NEW_TOKENS = 24
PLUGIN_OFF = {"SGLANG_PLUGINS": "none"}
# Patches that fix SGLang numerics on purpose (issue #10): output differs from
# unpatched SGLang wherever a sliding window is full, so plugin-on vs plugin-off
# identity is checked with them off.
FIXES_OFF = {tree_verify_swa.PATCH.knob: "0", triton_swa_window.PATCH.knob: "0"}
V2_KNOB = "SGLANG_FROZEN_KV_MTP_V2"
SUMMARY = "gpu-suite.json"


def out_dir() -> Path:
    return Path(os.environ.get("OUT") or "./gpu-out")


def suite_configs(ckpt_root: Optional[Path] = None, checks: str = "full") -> List[EngineConfig]:
    dense = checkpoints.build("dense_ple", ckpt_root)
    moe = checkpoints.build("moe", ckpt_root)
    assistant = checkpoints.build("assistant", ckpt_root)
    agree_t = checkpoints.build("agree_target", ckpt_root)
    agree_a = checkpoints.build("agree_assistant", ckpt_root)
    V = checkpoints.spec("dense_ple").text.vocab_size
    prompts = mixed_prompts(N_PROMPTS, V, seed=0)
    moe_prompts = mixed_prompts(N_PROMPTS, checkpoints.spec("moe").text.vocab_size, seed=1)

    def job(p, margins):
        return [Job("mixed", p, MAX_NEW_TOKENS, margins=margins)]

    first_timeout = float(os.environ.get("GPU_SUITE_FIRST_TIMEOUT", 420))
    timeout = float(os.environ.get("GPU_SUITE_TIMEOUT", 300))
    cfgs = [
        # first: runs alone and pays the JIT
        EngineConfig("dense_on", str(dense), job(prompts, True), env=dict(FIXES_OFF), timeout=first_timeout,
                     checks=checks),
        EngineConfig("dense_off", str(dense), job(prompts, True), env=dict(PLUGIN_OFF), timeout=timeout, checks=checks),
        EngineConfig("dense_fixed", str(dense), job(prompts, True), timeout=timeout, checks=checks),
        EngineConfig("moe_on", str(moe), job(moe_prompts, True), env=dict(FIXES_OFF), timeout=timeout, checks=checks),
        EngineConfig("moe_off", str(moe), job(moe_prompts, True), env=dict(PLUGIN_OFF), timeout=timeout, checks=checks),
    ]
    for v in ("0", "1"):
        cfgs.append(
            EngineConfig(
                f"agree_spec_v2_{v}", str(agree_t), job(prompts, False), env={V2_KNOB: v},
                engine_kwargs=spec_kwargs(agree_a), timeout=timeout, checks=checks,
            )
        )
        cfgs.append(
            EngineConfig(
                f"random_spec_v2_{v}", str(dense), job(prompts, False), env={V2_KNOB: v},
                engine_kwargs=spec_kwargs(assistant), timeout=timeout, checks=checks,
            )
        )
    cfgs.append(EngineConfig("agree_nospec", str(agree_t), job(prompts, False), timeout=timeout, checks=checks))
    return cfgs


def _strip(r: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in r.items() if k != "log"}


def comparisons(results: Dict[str, Dict[str, Any]], min_margin: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """All token comparisons the suite asserts, computed once (also for the JSON).

    ``min_margin``: checkpoint variant -> decisiveness threshold, default
    :data:`engine.MIN_MARGIN` (calibrated, runs/numerics-calibration.md).
    """
    thr = lambda variant: (min_margin or {}).get(variant, min_margin_for(variant))

    def toks(name):
        r = results.get(name) or {}
        return ((r.get("jobs") or {}).get("mixed") or {}).get("tokens")

    def margins(name):
        r = results.get(name) or {}
        return aligned_margins(((r.get("jobs") or {}).get("mixed") or {}))

    out: Dict[str, Any] = {}
    pairs = [
        ("dense_plugin", "dense_off", "dense_on", "dense_ple"),
        ("moe_plugin", "moe_off", "moe_on", "moe"),
        ("random_spec_v2_0", "dense_fixed", "random_spec_v2_0", "dense_ple"),
        ("random_spec_v2_1", "dense_fixed", "random_spec_v2_1", "dense_ple"),
    ]
    for key, ref, test, variant in pairs:
        if toks(ref) is None or toks(test) is None:
            out[key] = {"ok": False, "error": f"missing tokens: {ref}={toks(ref) is not None} {test}={toks(test) is not None}"}
            continue
        out[key] = dict(compare_greedy(toks(ref), toks(test), margins(ref), thr(variant)), ref=ref, test=test)
    prompts = mixed_prompts(N_PROMPTS, checkpoints.spec("agree_target").text.vocab_size, seed=0)
    expected = [checkpoints.agree_continuation(p[-1], MAX_NEW_TOKENS) for p in prompts]
    for name in ("agree_nospec", "agree_spec_v2_0", "agree_spec_v2_1"):
        t = toks(name)
        if t is None:
            out[name] = {"ok": False, "error": f"missing tokens: {name}"}
        else:
            out[name] = dict(compare_greedy(expected, t), ref="pi chain", test=name)
    return out


def summarize(results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    rows = {}
    for name, r in results.items():
        j = (r.get("jobs") or {}).get("mixed") or {}
        tm = j.get("timings") or {}
        rows[name] = {
            "ok": r.get("ok"),
            "error": r.get("error"),
            "tokens_per_s": tm.get("tokens_per_s"),
            "wall_s": tm.get("best_wall_s"),
            "accept_length": j.get("accept_length"),
            "engine_start_s": (r.get("timings") or {}).get("engine_start_s"),
            "warmup_s": (r.get("timings") or {}).get("warmup_s"),
            "process_wall_s": r.get("wall_s"),
            "checks_fired": len(r.get("checks_fired") or []),
            "plugin_loaded": isinstance(r.get("plugin"), list),
        }
    return rows


def run_suite(out: Optional[Path] = None, parallel: Optional[int] = None, checks: Optional[str] = None) -> Dict[str, Any]:
    out = Path(out) if out is not None else out_dir()
    out.mkdir(parents=True, exist_ok=True)
    parallel = parallel or int(os.environ.get("GPU_SUITE_PARALLEL", 3))
    checks = checks or os.environ.get("GPU_SUITE_CHECKS", "full")
    t0 = time.time()
    cfgs = suite_configs(checks=checks)
    t_ckpt = time.time() - t0
    summary_path = out / SUMMARY
    results: Dict[str, Dict[str, Any]] = {}
    lock = threading.Lock()

    def save(name=None, r=None):
        with lock:
            return _save(name, r)

    def _save(name=None, r=None):
        if name is not None:
            results[name] = r
            print(f"[gpu-suite] {name}: ok={r.get('ok')} error={r.get('error')} wall={r.get('wall_s')}s", flush=True)
        doc = {
            "versions": _versions(),
            "checkpoint_build_s": round(t_ckpt, 2),
            "elapsed_s": round(time.time() - t0, 2),
            "summary": summarize(results),
            "comparisons": comparisons(results),
            "results": {n: _strip(x) for n, x in results.items()},
        }
        tmp = summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, summary_path)
        return doc

    run_many(cfgs, parallel=parallel, warm_first=True, log_dir=out / "logs", on_result=save)
    return save()


def result_of(doc: Dict[str, Any], name: str) -> Dict[str, Any]:
    """One configuration's result from a suite document (AssertionError if absent)."""
    r = doc["results"].get(name)
    if r is None:
        raise AssertionError(f"configuration {name} produced no result; summary: {doc.get('summary')}")
    return r


def describe(r: Dict[str, Any]) -> str:
    return f"{r.get('name')}: error={r.get('error')!r} log={r.get('log_path')}"


def load_or_run(out: Optional[Path] = None) -> Dict[str, Any]:
    """The suite document; ``GPU_SUITE_REUSE=1`` reuses an existing ``gpu-suite.json``.

    On reuse the comparisons are recomputed from the stored tokens/margins, so
    a changed comparison rule or threshold applies to old runs too.
    """
    out = Path(out) if out is not None else out_dir()
    p = out / SUMMARY
    if os.environ.get("GPU_SUITE_REUSE") == "1" and p.exists():
        doc = json.loads(p.read_text())
        doc["comparisons"] = comparisons(doc.get("results") or {})
        return doc
    return run_suite(out)


def _versions() -> Dict[str, Any]:
    try:
        from sglang_gemma4.cli import versions

        return versions()
    except Exception as e:
        return {"error": str(e)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_gemma4.testing.suite", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--parallel", type=int, default=None)
    ap.add_argument("--checks", choices=("none", "idle", "full", "strict"), default=None)
    a = ap.parse_args(argv)
    doc = run_suite(a.out, a.parallel, a.checks)
    print(json.dumps({"summary": doc["summary"], "comparisons": {k: {kk: v.get(kk) for kk in ("ok", "compared", "total", "mismatches", "error")} for k, v in doc["comparisons"].items()}}, indent=1, default=str))
    bad = [k for k, v in doc["comparisons"].items() if not v.get("ok")]
    bad += [k for k, v in doc["summary"].items() if not v["ok"] or v["checks_fired"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
