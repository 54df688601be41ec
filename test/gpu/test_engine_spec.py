"""FROZEN_KV_MTP (NEXTN promoted for a Gemma4AssistantForCausalLM draft) vs no speculation.

Two pairs: the agree pair (target and assistant both implement next = pi(token)
with a ~10-logit margin, so every draft is accepted and greedy output is known
exactly: the pi chain) and the random pair (dense_ple + its random assistant:
drafts mostly rejected, output must equal the non-speculative engine where
the reference margin is decisive). Both under SGLANG_FROZEN_KV_MTP_V2=0
(synchronous) and =1 (overlap schedule).
"""

from __future__ import annotations

import pytest
import torch

from sglang_gemma4.testing.suite import describe, result_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

V2 = ["0", "1"]


def test_agree_target_alone_is_pi_chain(engine_suite):
    c = engine_suite["comparisons"]["agree_nospec"]
    assert "error" not in c, c["error"]
    assert c["ok"] and all(c["exact"]), c["mismatches"][:5]


@pytest.mark.parametrize("v2", V2)
def test_agree_pair_spec_matches_and_accepts(engine_suite, v2):
    name = f"agree_spec_v2_{v2}"
    r = result_of(engine_suite, name)
    c = engine_suite["comparisons"][name]
    assert "error" not in c, c["error"]
    assert c["ok"] and all(c["exact"]), c["mismatches"][:5]
    acc = r["jobs"]["mixed"]["accept_length"]
    assert acc is not None, f"no spec_accept_length in meta_info: {describe(r)}"
    # 3 draft steps + 1 bonus: every draft accepted gives 4 tokens per verify
    assert acc >= 3.0, f"{name}: accept length {acc:.2f} for drafts that always agree"


@pytest.mark.parametrize("v2", V2)
def test_random_pair_spec_matches_nospec(engine_suite, v2):
    name = f"random_spec_v2_{v2}"
    c = engine_suite["comparisons"][name]
    assert "error" not in c, c["error"]
    assert c["ok"], f"{name}: decisive mismatches vs dense_fixed {c['mismatches'][:5]}"
    assert c["strict_fraction"] >= 0.35, f"{name}: only {c['compared']}/{c['total']} decisive"
    r = result_of(engine_suite, name)
    assert r["jobs"]["mixed"]["accept_length"] is not None, describe(r)


def test_spec_throughput_recorded(engine_suite):
    s = engine_suite["summary"]
    for name in ("agree_spec_v2_0", "agree_spec_v2_1", "random_spec_v2_0", "random_spec_v2_1", "agree_nospec"):
        assert s[name]["tokens_per_s"] and s[name]["tokens_per_s"] > 0, (name, s[name])
