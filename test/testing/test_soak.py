"""The soak's request mix and its answer checks (CPU; the GPU test drives real servers)."""

from __future__ import annotations

from sglang_gemma4.testing import soak

V, CTX = 2048, 1024


def test_mix_covers_what_the_issue_asks_and_stays_in_bounds():
    probes = soak.greedy_probes(16, V, CTX)
    reqs = soak.mixed_requests(600, V, CTX, probes, seed=3)
    lens = [len(r.input_ids) for r in reqs]
    mnt = [r.sampling["max_new_tokens"] for r in reqs]
    assert min(lens) == 1 and any(L > CTX for L in lens)
    assert all(L + m <= CTX - 8 for r, L, m in zip(reqs, lens, mnt) if not r.expect_400)
    assert all(r.expect_400 == (len(r.input_ids) > CTX) for r in reqs)
    assert {0, 1} <= set(mnt) and max(mnt) > 100
    keys = set().union(*(r.sampling for r in reqs))
    assert {"temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
            "repetition_penalty", "sampling_seed", "stop_token_ids"} <= keys
    streams = [r for r in reqs if r.stream]
    assert 0.5 < len(streams) / len(reqs) < 0.7
    hung = sum(r.hangup_after is not None for r in streams)
    assert 0.2 < hung / len(reqs) < 0.3  # ~25 % of all requests hang up mid-stream
    assert any(r.abort_after_s for r in reqs) and sum(r.probe is not None for r in reqs) > 80
    assert all(0 <= t < V for r in reqs for t in r.input_ids)
    # deterministic: the recorded run can be re-created
    assert [r.payload() for r in soak.mixed_requests(50, V, CTX, probes, seed=3)] == [r.payload() for r in reqs[:50]]


def _r(**sp):
    base = {"max_new_tokens": 4, "ignore_eos": False}
    base.update(sp)
    return soak.Req(0, [2, 9], base, stream=False)


def test_finish_checks():
    ok_len = {"finish_reason": {"type": "length", "length": 4}, "completion_tokens": 4}
    assert soak._finish_check(_r(), [9, 9, 9, 9], ok_len) is None
    assert "after 3 of 4" in soak._finish_check(_r(), [9, 9, 9], dict(ok_len, completion_tokens=3))
    assert "!=" in soak._finish_check(_r(), [9, 9, 9, 9], dict(ok_len, completion_tokens=5))
    stop = {"finish_reason": {"type": "stop", "matched": 1}, "completion_tokens": 2}
    assert soak._finish_check(_r(), [9, 1], stop) is None  # EOS allowed unless ignore_eos
    assert "not a stop id" in soak._finish_check(_r(ignore_eos=True), [9, 1], stop)
    assert soak._finish_check(_r(ignore_eos=True, stop_token_ids=[77]), [9, 77],
                              {"finish_reason": {"type": "stop", "matched": 77}, "completion_tokens": 2}) is None
    assert "last output id" in soak._finish_check(_r(stop_token_ids=[77]), [77, 9],
                                                  {"finish_reason": {"type": "stop", "matched": 77}})
    assert "> max_new_tokens" in soak._finish_check(_r(max_new_tokens=1), [9, 9], ok_len | {"completion_tokens": 2})
    assert "unexpected" in soak._finish_check(_r(), [], {"finish_reason": None})


def test_summary_counts_mismatch_and_missing_400():
    recs = [
        {"i": 0, "kind": "done", "probe": 0, "out": [5, 6], "latency_s": 0.1},
        {"i": 1, "kind": "done", "probe": 0, "out": [5, 7], "latency_s": 0.2},
        {"i": 2, "kind": "http_error", "status": 400, "expect_400": True, "latency_s": 0.0},
        {"i": 3, "kind": "done", "expect_400": True, "status": 200, "latency_s": 0.3, "bad_finish": "x"},
        {"i": 4, "kind": "http_error", "status": 500, "body": "boom", "latency_s": 0.0},
        {"i": 5, "kind": "stream_error", "status": 200, "expect_400": True, "latency_s": 0.0,
         "body": "{'message': \"The input (1100 tokens) is longer than the model's context length (1024 tokens).\"}"},
        {"i": 6, "kind": "stream_error", "status": 200, "body": "other", "latency_s": 0.0},
    ]
    s = soak.summarise(recs, {0: [5, 6]})
    assert s["greedy_compared"] == 2 and s["greedy_mismatch"] == [1]
    assert s["missing_400"] == [3] and s["unexpected_http_errors"] == [(4, 500, "boom"), (6, 200, "other")]
    assert s["bad_finish"] == [(3, "x")] and s["kinds"] == {"done": 3, "http_error": 2, "stream_error": 2}


def test_serving_suite_arms_cover_the_issue():
    from sglang_gemma4.testing.serving_suite import serving_arms

    arms = serving_arms("T", "D", "E", "M")
    envs = {n: a[2] for n, a in arms.items()}
    assert {envs[n].get("SGLANG_FROZEN_KV_MTP_V2") for n in ("mtp_v2_unset", "mtp_v2_0", "mtp_v2_1")} == {None, "0", "1"}
    assert envs["mtp_v2_1_nosync"] == {"SGLANG_FROZEN_KV_MTP_V2": "1", "SGLANG_GEMMA4_MTP_DRAFT_NO_SYNC": "1"}
    assert arms["mtp_v2_1_nosync"][1] == arms["mtp_v2_1"][1] == arms["mtp_v2_1_verify"][1]
    assert envs["mtp_v2_1_verify"] == {"SGLANG_FROZEN_KV_MTP_V2": "1", "SGLANG_GEMMA4_VERIFY_SPLITKV": "1"}
    assert "--disable-radix-cache" in arms["plain_no_radix"][1] and envs["plugin_off"] == {"SGLANG_PLUGINS": "none"}
    assert arms["e4b_full_dummy"][0] == "E" and "dummy" in arms["e4b_full_dummy"][1]
    assert arms["mm_images"][0] == "M" and "--enable-multimodal" in arms["mm_images"][1]
    assert all(a[3] == "full" for n, a in arms.items() if n.startswith(("plain", "mtp", "mm")))
    assert envs["fresh_prewarm_off"]["SGLANG_GEMMA4_JIT_PREWARM"] == "0"
    assert envs["fresh_prewarm_on"]["FLASHINFER_WORKSPACE_BASE"] != envs["fresh_prewarm_off"]["FLASHINFER_WORKSPACE_BASE"]
