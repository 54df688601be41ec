"""YOCO on a real Gemma-4 engine (harness "dense_ple": 8 layers, 4 KV-shared, PLE).

* greedy tokens, YOCO on vs off (``SGLANG_GEMMA4_YOCO=0``), 40 prompts of mixed
  lengths with chunked prefill (64-token chunks, mixed decode+extend batches),
  radix prefix hits (a second job re-sends shared prefixes without a flush),
  decode CUDA graphs on; a second pair with the prefill CUDA graph on, where
  large batches leave the graph for YOCO and small ones keep it;
* prompt logprobs: YOCO steps aside, the values equal YOCO off bit for bit;
* last-token hidden state (``return_hidden_states_mode="last"``, which keeps
  YOCO eligible): YOCO on vs off at bf16 tolerance.

Each engine's log proves whether YOCO fired. Run:
    python -m pytest test/gpu/test_yoco_gpu.py -q
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FIRED = "YOCO fast prefill active"
OFF = {"SGLANG_GEMMA4_YOCO": "0"}
ON = {"SGLANG_GEMMA4_YOCO": "1"}
CHUNKED = dict(chunked_prefill_size=64, enable_mixed_chunk=True)
# prefill graph on; buckets up to 2048 so a 1600-token batch could replay it
PREFILL_GRAPH = dict(disable_prefill_cuda_graph=False, cuda_graph_max_bs_prefill=2048,
                     chunked_prefill_size=4096)


@pytest.fixture(scope="module")
def ckpt():
    from sglang_gemma4.testing import checkpoints

    return checkpoints.build("dense_ple")


def _shared_prefix_prompts(n_families=4, per_family=3, prefix_len=150, seed=5):
    from sglang_gemma4.testing.checkpoints import BOS_ID, FIRST_PROMPT_ID

    rng = random.Random(seed)
    out = []
    for _ in range(n_families):
        prefix = [BOS_ID] + [rng.randrange(FIRST_PROMPT_ID, 2048) for _ in range(prefix_len - 1)]
        for _ in range(per_family):
            out.append(prefix + [rng.randrange(FIRST_PROMPT_ID, 2048) for _ in range(rng.randrange(1, 90))])
    return out


def _random_prompts(n, length, seed):
    from sglang_gemma4.testing.checkpoints import BOS_ID, FIRST_PROMPT_ID

    rng = random.Random(seed)
    return [[BOS_ID] + [rng.randrange(FIRST_PROMPT_ID, 2048) for _ in range(length - 1)] for _ in range(n)]


def _fired(res) -> bool:
    return FIRED in Path(res["log_path"]).read_text(errors="replace")


def _assert_same(ref, test, job):
    from sglang_gemma4.testing.engine import compare_greedy

    r, t = ref["jobs"][job], test["jobs"][job]
    cmp = compare_greedy(r["tokens"], t["tokens"], r.get("margins"))
    assert cmp["ok"], (job, cmp["mismatches"][:5])
    assert cmp["strict_fraction"] > 0.5, (job, cmp["strict_fraction"])  # the verdict rests on real tokens
    return cmp


def test_greedy_tokens_yoco_on_vs_off(ckpt):
    from sglang_gemma4.testing import engine

    mixed = engine.mixed_prompts(28, vocab_size=2048, seed=11, max_len=300)
    family = _shared_prefix_prompts()
    jobs = [
        engine.Job("mixed", mixed + family, max_new_tokens=12, margins=True),
        # no flush: the families' prefixes are in the radix cache now
        engine.Job("prefix_hits", [p[:150] + p[150:][::-1] + [9, 10] for p in family],
                   max_new_tokens=12, margins=True, flush_cache=False),
    ]
    # 8 x 400 tokens in one batch: YOCO saves > 1024 rows, so it leaves the prefill graph
    long_jobs = [engine.Job("long_batch", _random_prompts(8, 400, seed=3), max_new_tokens=8, margins=True)]
    cfgs = [
        engine.EngineConfig("yoco_off", str(ckpt), jobs, env=OFF, engine_kwargs=CHUNKED),
        engine.EngineConfig("yoco_on", str(ckpt), jobs, env=ON, engine_kwargs=CHUNKED),
        engine.EngineConfig("yoco_off_pgraph", str(ckpt), jobs + long_jobs, env=OFF, engine_kwargs=PREFILL_GRAPH),
        engine.EngineConfig("yoco_on_pgraph", str(ckpt), jobs + long_jobs, env=ON, engine_kwargs=PREFILL_GRAPH),
    ]
    res = engine.run_many(cfgs, parallel=2)
    for name, r in res.items():
        assert r["ok"], (name, r["error"], r["log"][-3000:])
        assert not r["checks_fired"], (name, r["checks_fired"][:5])
    assert len(mixed + family) >= 32
    assert sum((m.get("cached_tokens") or 0) for m in res["yoco_on"]["jobs"]["prefix_hits"]["meta"]) > 0
    assert _fired(res["yoco_on"]) and _fired(res["yoco_on_pgraph"])
    assert not _fired(res["yoco_off"]) and not _fired(res["yoco_off_pgraph"])
    for job in ("mixed", "prefix_hits"):
        _assert_same(res["yoco_off"], res["yoco_on"], job)
    for job in ("mixed", "prefix_hits", "long_batch"):
        _assert_same(res["yoco_off_pgraph"], res["yoco_on_pgraph"], job)
    # same tokens whichever prefill path ran (graph vs eager+YOCO)
    _assert_same(res["yoco_off"], res["yoco_on_pgraph"], "mixed")


# ------------------------------------------------------------------ probe child
PROBE = r"""
import json, sys
import sglang
kw = json.loads(sys.argv[1]); prompts = json.loads(sys.argv[2]); out = {}
llm = sglang.Engine(**kw)
sp = {"max_new_tokens": 1, "temperature": 0.0, "ignore_eos": True}
o = llm.generate(input_ids=prompts, sampling_params=sp, return_logprob=True, logprob_start_len=0)
out["input_logprobs"] = [[t[0] for t in x["meta_info"]["input_token_logprobs"]] for x in o]
print("PROBE-MARK logprobs done", flush=True)
llm.flush_cache()
o = llm.generate(input_ids=prompts, sampling_params=sp, return_hidden_states="last")  # True = full
out["hidden"] = [x["meta_info"]["hidden_states"] for x in o]
print("PROBE-MARK hidden done", flush=True)
json.dump(out, open(sys.argv[3], "w"))
llm.shutdown()
"""


def _probe(ckpt, env, tmp: Path, name: str):
    from sglang_gemma4.testing.engine import DEFAULT_ENGINE_KWARGS, mixed_prompts

    kw = dict(DEFAULT_ENGINE_KWARGS, model_path=str(ckpt), return_hidden_states_mode="last",
              chunked_prefill_size=128)
    prompts = mixed_prompts(10, 2048, seed=21, max_len=300)
    out, log = tmp / f"{name}.json", tmp / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_GEMMA4_")}
    full_env.update(env)
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-c", PROBE, json.dumps(kw), json.dumps(prompts), str(out)],
                           env=full_env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text(errors="replace")
    assert p.returncode == 0 and out.exists(), text[-4000:]
    return json.loads(out.read_text()), text


def _last_vector(h, hidden_size):
    t = torch.tensor(h, dtype=torch.float32).reshape(-1, hidden_size)
    return t[0]  # the prefill's last prompt token (decode rows follow, if any)


def test_prompt_logprobs_and_last_hidden_state(ckpt):
    from sglang_gemma4.testing.checkpoints import load_meta

    hidden_size = load_meta(ckpt)["spec"]["text"]["hidden_size"]
    with tempfile.TemporaryDirectory() as d:
        off, off_log = _probe(ckpt, OFF, Path(d), "off")
        on, on_log = _probe(ckpt, ON, Path(d), "on")
    # prompt logprobs: YOCO stood aside (it fired only after that pass) and changed nothing
    mark = on_log.index("PROBE-MARK logprobs done")
    assert FIRED not in on_log[:mark] and FIRED in on_log[mark:]
    assert FIRED not in off_log
    assert len(on["input_logprobs"]) == len(off["input_logprobs"]) == 10
    for a, b in zip(on["input_logprobs"], off["input_logprobs"]):
        assert len(a) == len(b) and a[1:] == b[1:]  # [0] is None (no logprob for BOS)
    # the final hidden state at each prompt's last token, bf16 tolerance
    for a, b in zip(on["hidden"], off["hidden"]):
        x, y = _last_vector(a, hidden_size), _last_vector(b, hidden_size)
        torch.testing.assert_close(x, y, rtol=5e-2, atol=5e-2)
        assert torch.nn.functional.cosine_similarity(x, y, dim=0) > 0.999
