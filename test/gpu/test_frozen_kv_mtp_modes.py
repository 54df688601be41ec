"""FROZEN_KV_MTP under SGLANG_FROZEN_KV_MTP_V2=0 (synchronous) and =1 (overlap) on CUDA.

Both modes must reproduce the non-speculative greedy tokens with SGLang's
pool-leak / KV-invariant / NaN-OOB checks on (harness ``checks="full"``), and
each engine must log the effective mode. Tokens/s of every run is written to
``$OUT/frozen_kv_mtp_modes.json`` (and printed) for the record.

Pairs: ``agree_target``/``agree_assistant`` (clear margins, high acceptance:
exact token equality) and ``dense_ple``/``assistant`` (random weights: equality
where the reference is decisive, harness ``compare_greedy``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KNOB = "SGLANG_FROZEN_KV_MTP_V2"
ALL_PAIRS = [("agree_target", "agree_assistant", True), ("dense_ple", "assistant", False)]
# GEMMA4_MODES_PAIRS=dense_ple (comma list of targets): only those pairs' engines, for a short device call
_ONLY = [p for p in os.environ.get("GEMMA4_MODES_PAIRS", "").split(",") if p]
PAIRS = [p for p in ALL_PAIRS if not _ONLY or p[0] in _ONLY]
# The effective-mode line (the patch's status line, printed per process, words it differently).
MODE_LOG = {"0": "INFO FROZEN_KV_MTP runs synchronously (no overlap)",
            "1": "INFO FROZEN_KV_MTP runs the spec-v2 overlap schedule"}


@pytest.fixture(scope="module")
def results():
    from sglang_gemma4.testing import checkpoints, engine

    prompts = engine.mixed_prompts(12, vocab_size=2048, seed=3, max_len=200)
    configs, paths = [], {}
    for target, draft, _ in PAIRS:
        t, d = checkpoints.build(target), checkpoints.build(draft)
        paths[target] = (t, d)
        configs.append(engine.EngineConfig(
            f"{target}-ref", str(t), [engine.Job("g", prompts, 32, margins=True, repeat=2)],
        ))
        for mode in ("0", "1"):
            configs.append(engine.EngineConfig(
                f"{target}-mtp{mode}", str(t), [engine.Job("g", prompts, 32, repeat=2)],
                env={KNOB: mode}, engine_kwargs=engine.spec_kwargs(d), draft_model_path=str(d),
            ))
    res = engine.run_many(configs, parallel=3)
    summary = {
        name: {
            "ok": r.get("ok"), "error": r.get("error"), "checks_fired": r.get("checks_fired"),
            "tokens_per_s": r.get("jobs", {}).get("g", {}).get("timings", {}).get("tokens_per_s"),
            "accept_length": r.get("jobs", {}).get("g", {}).get("accept_length"),
            "log_path": r.get("log_path"),
        }
        for name, r in res.items()
    }
    print(json.dumps(summary, indent=1))
    out = os.environ.get("OUT")
    if out:
        Path(out, "frozen_kv_mtp_modes.json").write_text(json.dumps(summary, indent=1))
    return res


def _job(r):
    assert r.get("ok"), (r.get("error"), r.get("log"))
    assert not r.get("checks_fired"), r.get("checks_fired")
    return r["jobs"]["g"]


@pytest.mark.parametrize("mode", ["0", "1"])
@pytest.mark.parametrize("target, draft, exact", PAIRS)
def test_mode_matches_non_speculative_greedy(results, target, draft, exact, mode):
    from sglang_gemma4.testing import engine

    ref = _job(results[f"{target}-ref"])
    r = results[f"{target}-mtp{mode}"]
    got = _job(r)
    assert got["accept_length"] is not None and got["accept_length"] >= 1.0
    if exact:
        assert got["tokens"] == ref["tokens"]
        assert got["accept_length"] > 1.5, got["accept_length"]  # the agree pair must accept drafts
    else:
        cmp = engine.compare_greedy(ref["tokens"], got["tokens"], ref.get("margins"))
        assert cmp["mismatches"] == [], cmp
    log = Path(r["log_path"]).read_text(errors="replace") if r.get("log_path") else r.get("log", "")
    assert log.count(MODE_LOG[mode]) == 1, "effective mode must be logged exactly once"
    status = {s["name"]: s for s in r.get("plugin") or []}
    assert status["frozen_kv_mtp_v2"]["state"] == "active", status.get("frozen_kv_mtp_v2")
