"""Speculative vs plain decoding past the sliding window (issue #10), on the window probes.

The probes (``checkpoints.window_probe*``) emit x[p+1] = g(x[p - W + 1]): the
token ``sliding_window - 1`` positions back, copied through a sliding layer's
KV (``window_probe``: the KV-shared layer; ``window_probe_owner``: its owner).
Their greedy output is known in closed form (``window_continuation``), the
fp32 transformers model is checked to produce exactly it with a top-1 margin
of several logits at every position, and any path that keeps one key too few
(or too many) emits another token right where the window first fills.

Engines (triton, CUDA graphs on unless named eager, SGLang's pool checks on):
  nospec, nospec_eager, owner_nospec        plain decode
  spec_v2_{0,1}                             FROZEN_KV_MTP topk 1, SGLANG_FROZEN_KV_MTP_V2=0/1
  spec_v2_{0,1}_topk2                       FROZEN_KV_MTP topk 2 (tree verify)
Jobs: ``mixed`` (prompts shorter and longer than the window) and, on the
engines that serve it, ``prefix`` (run right after ``mixed`` without a cache
flush: prompts that extend earlier prompt+output, so the radix cache hits).

``python -m sglang_gemma4.testing.window_lossless --out DIR [--engines a,b] [--plugin-off]``
runs it without pytest and prints each engine's first divergence per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sglang_gemma4.testing import checkpoints as ck
from sglang_gemma4.testing.engine import EngineConfig, Job, mixed_prompts, run_many, spec_kwargs

PROBE, OWNER, DRAFT = "window_probe", "window_probe_owner", "window_probe_assistant"
MAX_NEW_TOKENS = 40
PREFIX_KEEP = 24  # output tokens of the first pass the prefix prompts reuse
MIN_MARGIN = 3.0  # fp32 top-1 margin every compared position must have (bf16 noise <= 0.95)
# tokens per verify the probe pair must reach: its first draft token is right,
# so ~2 with topk 1 (the bonus alone gives 1.0)
MIN_ACCEPT = 1.5
V2_KNOB = "SGLANG_FROZEN_KV_MTP_V2"
# tiny models: several engines share the GPU
ENGINE_BASE = {"mem_fraction_static": 0.08}
TOPK2 = {"speculative_num_steps": 3, "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 6}

ENGINES = ("nospec", "nospec_eager", "owner_nospec", "spec_v2_0", "spec_v2_1", "spec_v2_0_topk2", "spec_v2_1_topk2")
PREFIX_ENGINES = ("nospec", "spec_v2_0", "spec_v2_1", "spec_v2_1_topk2")
# Both engine paths that diverge on plain SGLang 0.5.17, and the patch fixing each:
# plain decode keeps sliding_window - 1 keys (triton_swa_window); tree verify
# (topk > 1) windows each draft token at its tree index, not its depth (tree_verify_swa).


def prompts() -> List[List[int]]:
    """Mixed lengths 3..300 plus lengths right at the window edge."""
    t = ck.spec(PROBE).text
    rng = random.Random(5)
    edge = [[ck.BOS_ID] + [rng.randrange(ck.FIRST_PROMPT_ID, t.vocab_size) for _ in range(n - 1)]
            for n in (4, t.sliding_window - 1, t.sliding_window, t.sliding_window + 1)]
    return mixed_prompts(16, t.vocab_size, seed=3) + edge


def expected(ps: Sequence[Sequence[int]], n: int = MAX_NEW_TOKENS) -> List[List[int]]:
    t = ck.spec(PROBE).text
    return [ck.window_continuation(p, n, t.sliding_window, t.vocab_size) for p in ps]


def prefix_prompts(ps: Sequence[Sequence[int]]) -> List[List[int]]:
    """Every other prompt + the first PREFIX_KEEP tokens of its output + 5 new tokens."""
    t = ck.spec(PROBE).text
    rng = random.Random(6)
    exp = expected(ps, PREFIX_KEEP)
    return [list(p) + e + [rng.randrange(ck.FIRST_PROMPT_ID, t.vocab_size) for _ in range(5)]
            for p, e in list(zip(ps, exp))[::2]]


def configs(names: Optional[Sequence[str]] = None, env: Optional[Dict[str, str]] = None,
            ckpt_root=None, timeout: float = 420.0) -> List[EngineConfig]:
    names = list(names or ENGINES)
    bad = sorted(set(names) - set(ENGINES))
    if bad:
        raise ValueError(f"unknown window_lossless engines {bad}; known: {', '.join(ENGINES)}")
    probe, owner, draft = (ck.build(v, ckpt_root) for v in (PROBE, OWNER, DRAFT))
    ps = prompts()
    base_env = dict(env or {})
    out = []
    for n in names:
        jobs = [Job("mixed", ps, MAX_NEW_TOKENS)]
        if n in PREFIX_ENGINES:
            jobs.append(Job("prefix", prefix_prompts(ps), MAX_NEW_TOKENS, flush_cache=False))
        kw = dict(ENGINE_BASE)
        e = dict(base_env)
        path = owner if n.startswith("owner") else probe
        if n.endswith("eager"):
            kw["disable_cuda_graph"] = True
        if n.startswith("spec"):
            e[V2_KNOB] = n.split("_")[2]
            kw.update(spec_kwargs(draft, **(TOPK2 if n.endswith("topk2") else {})))
        out.append(EngineConfig(n, str(path), jobs, env=e, engine_kwargs=kw, timeout=timeout))
    return out


def reference_check(ps: Sequence[Sequence[int]], ckpt_root=None) -> Dict[str, Any]:
    """fp32 transformers, teacher-forced on the closed-form chain, for both probes."""
    from sglang_gemma4.testing import reference

    exp = expected(ps)
    res = {}
    for v in (PROBE, OWNER):
        model, text = reference.load(v, ckpt_root)
        tf = reference.teacher_forced(model, text, ps, exp)
        res[v] = {
            "argmax_is_chain": [a == e for a, e in zip(tf["argmax"], exp)],
            "min_margin": min(min(m) for m in tf["margins"]),
        }
    return res


def emulate_short_decode(ps: Sequence[Sequence[int]], n: int = MAX_NEW_TOKENS, variant: str = PROBE,
                         ckpt_root=None) -> List[List[int]]:
    """fp32 greedy with the suspected bug: rows past the prompt see ``sliding_window - 1`` keys."""
    from sglang_gemma4.testing import reference

    model, text = reference.load(variant, ckpt_root)
    return reference.greedy(model, text, ps, n, decode_window=text.sliding_window - 1)["tokens"]


def evaluate(results: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per engine and job: first divergence from the chain per prompt (None = equal)."""
    from sglang_gemma4.testing.reference import first_difference

    ps = prompts()
    want = {"mixed": (ps, expected(ps))}
    pp = prefix_prompts(ps)
    want["prefix"] = (pp, expected(pp))
    out: Dict[str, Dict[str, Any]] = {}
    for name, r in results.items():
        row: Dict[str, Any] = {"ok": bool(r.get("ok")), "error": r.get("error"), "log": r.get("log_path"),
                               "checks_fired": r.get("checks_fired") or []}
        for job, (jp, je) in want.items():
            j = (r.get("jobs") or {}).get(job)
            if not j or not j.get("tokens"):
                continue
            meta = j.get("meta") or []
            row[job] = {
                "first_diff": [first_difference(t, e) for t, e in zip(j["tokens"], je)],
                "prompt_lens": [len(p) for p in jp],
                "accept_length": j.get("accept_length"),
                "cached_tokens": [m.get("cached_tokens") for m in meta],
                "tokens_per_s": (j.get("timings") or {}).get("tokens_per_s"),
            }
        out[name] = row
    return out


def run(out_dir: os.PathLike, names=None, env=None, parallel: int = 4, warm_first: bool = True) -> Dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfgs = configs(names, env)
    partial: Dict[str, Any] = {}
    lock = threading.Lock()

    def keep(name, r):  # a run killed by an outer timeout still leaves the engines that finished
        with lock:
            partial[name] = r
            (out_dir / "window-lossless.partial.json").write_text(
                json.dumps({"env": dict(env or {}), "engines": evaluate(partial), "raw": partial}, indent=1, default=str))

    res = run_many(cfgs, parallel=parallel, log_dir=out_dir / "logs", serialize_jobs=False, on_result=keep,
                   warm_first=warm_first)
    summary = {"env": dict(env or {}), "engines": evaluate(res), "raw": res}
    (out_dir / "window-lossless.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def table(summary: Dict[str, Any]) -> str:
    lines = []
    for name, row in summary["engines"].items():
        if not row["ok"] and "mixed" not in row:
            lines.append(f"{name:18s} FAILED: {row['error']} (log {row['log']})")
            continue
        for job in ("mixed", "prefix"):
            if job in row:
                j = row[job]
                fd = j["first_diff"]
                bad = sum(x is not None for x in fd)
                acc = "" if j["accept_length"] is None else f" accept {j['accept_length']:.2f}"
                lines.append(f"{name:18s} {job:6s} {len(fd) - bad}/{len(fd)} prompts equal to the chain{acc}; "
                             f"first diff {fd}; lens {j['prompt_lens']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out") + "/window-lossless")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--plugin-off", action="store_true", help="SGLANG_PLUGINS=none (plain SGLang)")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--no-warm-first", action="store_true", help="start every engine at once (warm JIT caches)")
    a = ap.parse_args(argv)
    env = {"SGLANG_PLUGINS": "none"} if a.plugin_off else {}
    s = run(a.out, [n for n in a.engines.split(",") if n], env, a.parallel, warm_first=not a.no_warm_first)
    print(table(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
