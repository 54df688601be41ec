"""Real ``python -m sglang.launch_server`` under load, faults and bad input (issue #18).

One module fixture starts every server at once on the one GPU (tiny margin-checked
``agree`` pair with SGLang's leak/invariant checks on; a full-depth E4B on dummy
weights), soaks each with >= 500 mixed requests at concurrency 48, sends the bad
inputs, and records everything in ``$OUT/serving-robustness.json``
(``SERVING_REUSE=<json>`` re-asserts a recorded run, also on CPU).

Greedy outputs are compared with the same request served alone only on the agree
pair: its next token is a fixed map with a ~10-logit margin, so batching noise
cannot flip it. The dummy-weight model has near-tie logits and is checked for
liveness, lengths, finish reasons and leaks only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def serving():
    reuse = os.environ.get("SERVING_REUSE")
    if reuse:
        return json.loads(Path(reuse).read_text())
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = Path(os.environ.get("OUT") or "gpu-out") / "serving"
    out.mkdir(parents=True, exist_ok=True)
    from sglang_gemma4.testing.serving_suite import run_suite

    return run_suite(out)


def _arm(serving, arm):
    if arm not in serving["arms"]:
        pytest.skip(f"{arm} not run in this call (SERVING_ARMS)")
    return serving["arms"][arm]


SOAK_ARMS = ["plain", "plain_no_radix", "mtp_v2_unset", "mtp_v2_0", "mtp_v2_1", "mtp_v2_1_nosync", "mtp_v2_1_verify",
             "plugin_off", "e4b_full_dummy"]


@pytest.mark.gpu
@pytest.mark.parametrize("arm", SOAK_ARMS)
def test_soak_server_stays_up_and_answers_consistently(serving, arm):
    r = _arm(serving, arm)
    assert "error" not in r and "start_error" not in r, r
    assert r["alive"] and r["health_end"] == 200 and r["health_after_soak"] == 200
    assert r["requests"] >= 500 and r["kinds"].get("done", 0) >= 300, r["kinds"]
    # ~25 % of requests plan a hang-up; one planned on a stream that ends first completes normally
    assert r["kinds"].get("hung_up", 0) >= 60, r["kinds"]
    assert not r["unexpected_http_errors"], r["unexpected_http_errors"][:5]
    assert not r["missing_400"], r["missing_400"][:5]
    assert not r["client_errors"], r["client_errors"][:5]
    assert not r["bad_finish"], r["bad_finish"][:5]
    assert not r["checks_fired"], r["checks_fired"][:5]


@pytest.mark.gpu
@pytest.mark.parametrize("arm", [a for a in SOAK_ARMS if not a.startswith("e4b")])
def test_greedy_under_load_equals_greedy_alone(serving, arm):
    r = _arm(serving, arm)
    assert r["greedy_compared"] >= 50, r["greedy_compared"]
    assert not r["greedy_mismatch"], r["greedy_mismatch"][:10]


@pytest.mark.gpu
@pytest.mark.parametrize("arm", SOAK_ARMS)
def test_bad_input_gets_4xx_naming_the_field_and_server_serves_on(serving, arm):
    r = _arm(serving, arm)
    cases = {c["case"] for c in r["bad_input"]}
    from sglang_gemma4.testing.soak import ID_CASES

    # plugin off skips the id cases (SGLang's reference answer is recorded apart)
    assert cases >= ({"malformed_json", "prompt_over_context"} | (set() if arm == "plugin_off" else set(ID_CASES)))
    for case in r["bad_input"]:
        assert 400 <= case["status"] < 500, case
        assert case["health_after"] == 200 and case["next_request_ok"], case
        if case.get("needle"):
            assert case["names_field"], case


@pytest.mark.gpu
def test_first_sampled_request_waits_on_no_compiler(serving):
    on, off = _arm(serving, "fresh_prewarm_on"), _arm(serving, "fresh_prewarm_off")
    assert "error" not in on and "error" not in off, (on, off)
    # the module was built during start-up (before /health), on a cache nobody had filled
    assert on["log_prewarm_line"], on
    assert off["log_prewarm_line"] is None, off


@pytest.mark.gpu
def test_corrupt_images_get_4xx_and_the_mm_server_serves_on(serving):
    r = _arm(serving, "mm_images")
    assert "error" not in r, r
    good, *bad = r["bad_image"]
    assert good["status"] == 200 and good["n_out"] == 4, good
    for case in bad:
        assert 400 <= case["status"] < 500, case
        assert case["health_after"] == 200 and case["next_request_ok"], case
    assert r["alive"] and not r["checks_fired"], r
