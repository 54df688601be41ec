"""bench/e2e.py's per-layer split: step(L) = fixed + L * layer, recovered from two depths."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_e2e", Path(__file__).resolve().parents[2] / "bench" / "e2e.py")
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)


def _doc(arms, batch=(1, 8), invalid=()):
    """arms: label -> (fixed_ms, layer_ms) per batch; steps built from the closed form."""
    from sglang_gemma4.testing import checkpoints

    doc = {"ab": "K=0,1", "gpu": "test", "date": "d", "versions": {}, "prompt_len": 8, "decode_tokens": 4,
           "repeat": 1, "batch": list(batch), "results": {}}
    for v in ("moe26b_w", "moe26b_w8"):
        n = len(checkpoints.spec(v).text.layer_types)
        doc["results"][v] = {
            lab: {"ok": True, "rows": {b: {"decode_step_ms": fixed[b] + n * layer[b], "valid": (v, lab, b) not in invalid,
                                           "prefill_ms": 1.0, "decode_tokens_per_s": 1.0, "tokens_per_s": 1.0}
                                       for b in batch}}
            for lab, (fixed, layer) in arms.items()}
    return doc


def test_recovers_layer_and_fixed_cost_and_projects_real_depth():
    arms = {"K=0": ({1: 1.30, 8: 1.70}, {1: 0.300, 8: 0.420}),
            "K=1": ({1: 1.30, 8: 1.70}, {1: 0.250, 8: 0.400})}
    rows = e2e.per_layer(_doc(arms))
    assert len(rows) == 4
    for r in rows:
        fixed, layer = arms[r["config"]][0][r["batch"]], arms[r["config"]][1][r["batch"]]
        assert r["layer_ms"] == pytest.approx(layer) and r["fixed_ms"] == pytest.approx(fixed)
        assert r["projected_step_ms"] == pytest.approx(fixed + 30 * layer)
    b1 = next(r for r in rows if r["config"] == "K=1" and r["batch"] == 1)
    assert b1["layer_speedup"] == pytest.approx(0.300 / 0.250)
    assert b1["projected_step_speedup"] == pytest.approx((1.30 + 30 * 0.300) / (1.30 + 30 * 0.250))
    assert "layer_speedup" not in next(r for r in rows if r["config"] == "K=0")
    doc = _doc(arms)
    doc["per_layer"] = rows
    md = e2e._markdown(doc)
    assert "Per decoder layer" in md and "1.200x" in md


def test_invalid_or_missing_depth_gives_no_row():
    arms = {"A": ({1: 1.0}, {1: 0.3}), "B": ({1: 1.0}, {1: 0.2})}
    rows = e2e.per_layer(_doc(arms, batch=(1,), invalid={("moe26b_w8", "B", 1)}))
    assert [r["config"] for r in rows] == ["A"]
    doc = _doc(arms, batch=(1,))
    del doc["results"]["moe26b_w8"]
    assert e2e.per_layer(doc) == []
