"""triton_swa_window on a real engine: decode follows the exact model once the window is whole.

Engines (triton backend, dense_ple, the suite's 16 mixed prompts x 24 tokens):
``off`` (knob 0), ``on`` (knob 1, decode CUDA graphs), ``on_eager`` (knob 1,
``disable_cuda_graph``) and ``spec_on_v2_{0,1}`` (knob 1, FROZEN_KV_MTP with
the random assistant). Reference: every engine trajectory teacher-forced
through the fp32 transformers model with Gemma-4's sliding window
(``sliding_window`` keys, self included); "regret" = fp32 logit of the fp32
argmax minus that of the engine's token (bench/numerics_calibration.py).

Run: ``OUT=/tmp/swa python -m pytest test/gpu/test_triton_swa_window_gpu.py -q -s``
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KNOB = "SGLANG_GEMMA4_TRITON_SWA_WINDOW"
# bf16-vs-fp32 noise on dense_ple: max regret 2.7 over the CPU calibration
# (runs/numerics-calibration.md); the unpatched engine reached 22.7.
NOISE_REGRET = 3.0


@pytest.fixture(scope="module")
def runs():
    from sglang_gemma4.testing import checkpoints as ck
    from sglang_gemma4.testing import suite
    from sglang_gemma4.testing.engine import EngineConfig, Job, mixed_prompts, run_many, spec_kwargs

    dense = ck.build("dense_ple")
    assistant = ck.build("assistant")
    prompts = mixed_prompts(suite.N_PROMPTS, ck.spec("dense_ple").text.vocab_size, seed=0)

    def job(margins):
        return [Job("mixed", prompts, suite.MAX_NEW_TOKENS, margins=margins)]

    cfgs = [
        EngineConfig("on", str(dense), job(True), env={KNOB: "1"}, timeout=420),
        EngineConfig("off", str(dense), job(True), env={KNOB: "0"}),
        EngineConfig("on_eager", str(dense), job(False), env={KNOB: "1"},
                     engine_kwargs={"disable_cuda_graph": True}),
    ]
    for v in ("0", "1"):
        cfgs.append(EngineConfig(f"spec_on_v2_{v}", str(dense), job(False),
                                 env={KNOB: "1", suite.V2_KNOB: v}, engine_kwargs=spec_kwargs(assistant)))
    out = Path(os.environ.get("OUT", "gpu-out")) / "triton_swa_window"
    out.mkdir(parents=True, exist_ok=True)
    res = run_many(cfgs, parallel=3, log_dir=out)
    return {"prompts": prompts, "results": res}


def _tokens(runs, name):
    r = runs["results"][name]
    toks = ((r.get("jobs") or {}).get("mixed") or {}).get("tokens")
    assert toks, f"{name}: engine failed: {r.get('error')} (log {r.get('log_path')})"
    return toks


def _fp32_model():
    from sglang_gemma4.testing import reference

    model, text = reference.load("dense_ple", attn=None)
    return model, text.sliding_window


def _max_regret(model, window, prompts, toks):
    from sglang_gemma4.testing import reference

    worst = 0.0
    for p, t in zip(prompts, toks):
        n = len(p) + len(t)
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([p + t]), attention_mask=reference.masks(n, n, window)).logits[0].float()
        lg = lg[len(p) - 1: len(p) - 1 + len(t)]
        chosen = lg.gather(1, torch.tensor(t)[:, None])[:, 0]
        worst = max(worst, float((lg.max(dim=-1).values - chosen).max()))
    return worst


@pytest.fixture(scope="module")
def regrets(runs):
    model, window = _fp32_model()
    out = {}
    for name in runs["results"]:
        out[name] = _max_regret(model, window, runs["prompts"], _tokens(runs, name))
        print(f"[triton_swa_window] {name}: max fp32 regret {out[name]:.3f}", flush=True)
    return out


@pytest.mark.parametrize("name", ["on", "on_eager", "spec_on_v2_0", "spec_on_v2_1"])
def test_patched_engines_follow_fp32_model(regrets, name):
    assert regrets[name] <= NOISE_REGRET, f"{name}: max regret {regrets[name]:.2f} > bf16 noise {NOISE_REGRET}"


def test_unpatched_engine_shows_the_short_window(regrets):
    # if this fails SGLang fixed the window itself: the patch's upstream() check should say so
    assert regrets["off"] > NOISE_REGRET, f"off: max regret {regrets['off']:.2f}, bug not reproduced"


@pytest.mark.parametrize("v2", ["0", "1"])
def test_frozen_kv_mtp_matches_nospec_with_patch(runs, v2):
    from sglang_gemma4.testing.engine import aligned_margins, compare_greedy, min_margin_for

    ref = runs["results"]["on"]["jobs"]["mixed"]
    c = compare_greedy(_tokens(runs, "on"), _tokens(runs, f"spec_on_v2_{v2}"),
                       aligned_margins(ref), min_margin_for("dense_ple"))
    assert c["ok"], f"spec_on_v2_{v2}: decisive mismatches vs on {c['mismatches'][:5]}"
    assert c["strict_fraction"] >= 0.35, f"only {c['compared']}/{c['total']} decisive"


def test_cuda_graph_and_eager_decode_agree(runs):
    from sglang_gemma4.testing.engine import aligned_margins, compare_greedy, min_margin_for

    ref = runs["results"]["on"]["jobs"]["mixed"]
    c = compare_greedy(_tokens(runs, "on"), _tokens(runs, "on_eager"), aligned_margins(ref),
                       min_margin_for("dense_ple"))
    assert c["ok"], c["mismatches"][:5]
