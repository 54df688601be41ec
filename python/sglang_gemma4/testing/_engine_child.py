"""Child process of :mod:`sglang_gemma4.testing.engine`: one ``sglang.Engine``, many jobs.

``python -m sglang_gemma4.testing._engine_child REQUEST.json RESULT.json``.
The result file is rewritten after every stage, so a crash or a timeout
still leaves what finished (and the stage it died in) for the parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from typing import Any, Dict, List

JOB_MARK = "[sglang-gemma4 job]"
META_KEYS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "e2e_latency",
    "spec_accept_length",
    "spec_accept_rate",
    "spec_verify_ct",
    "spec_num_correct_drafts",
    "spec_num_proposed_drafts",
    "finish_reason",
)


def _write(path: str, obj: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _sampling(max_new_tokens: int) -> Dict[str, Any]:
    # ignore_eos: every request yields exactly max_new_tokens (random weights emit EOS too)
    return {"max_new_tokens": int(max_new_tokens), "temperature": 0.0, "ignore_eos": True}


def _margins(outputs: List[Dict[str, Any]]) -> List[List[Any]]:
    out = []
    for o in outputs:
        tops = o.get("meta_info", {}).get("output_top_logprobs") or []
        row = []
        for pos in tops:
            if pos and len(pos) >= 2 and pos[0][0] is not None and pos[1][0] is not None:
                row.append(float(pos[0][0]) - float(pos[1][0]))
            else:
                row.append(None)
        out.append(row)
    return out


def _run_job(llm, job: Dict[str, Any]) -> Dict[str, Any]:
    prompts = job["prompts"]
    sp = _sampling(job["max_new_tokens"])
    mm = {"image_data": job["image_data"]} if job.get("image_data") is not None else {}
    res: Dict[str, Any] = {"n_prompts": len(prompts), "max_new_tokens": job["max_new_tokens"]}
    walls, outputs = [], None
    for _ in range(max(0, int(job.get("warmup", 0)))):
        if job.get("flush_cache", True):
            llm.flush_cache()
        llm.generate(input_ids=prompts, sampling_params=sp, **mm)
    # markers in the engine log: bench/e2e.py reads the scheduler's batch lines between them
    print(f"{JOB_MARK} start {job['name']}", flush=True)
    for r in range(max(1, int(job.get("repeat", 1)))):
        if job.get("flush_cache", True):
            llm.flush_cache()
        t = time.perf_counter()
        outs = llm.generate(input_ids=prompts, sampling_params=sp, **mm)
        walls.append(time.perf_counter() - t)
        if outputs is None:
            outputs = outs
    print(f"{JOB_MARK} end {job['name']}", flush=True)
    tokens = [list(map(int, o["output_ids"])) for o in outputs]
    n_out = sum(len(t) for t in tokens)
    best = min(walls)
    res["tokens"] = tokens
    res["meta"] = [{k: o.get("meta_info", {}).get(k) for k in META_KEYS if k in o.get("meta_info", {})} for o in outputs]
    lat = [m.get("e2e_latency") for m in res["meta"] if m.get("e2e_latency") is not None]
    res["timings"] = {
        "wall_s": walls,
        "best_wall_s": best,
        "output_tokens": n_out,
        "prompt_tokens": sum(len(p) for p in prompts),
        "tokens_per_s": n_out / best if best > 0 else None,
        "e2e_latency_s": lat,
    }
    acc = [m["spec_accept_length"] for m in res["meta"] if m.get("spec_accept_length") is not None]
    res["accept_length"] = sum(acc) / len(acc) if acc else None
    if acc:
        verify = sum(m.get("spec_verify_ct") or 0 for m in res["meta"])
        res["accept_length_tokens_weighted"] = n_out / verify if verify else None
    if job.get("margins"):
        llm.flush_cache()
        outs = llm.generate(
            input_ids=prompts, sampling_params=sp, return_logprob=True, top_logprobs_num=2, **mm
        )
        res["margins"] = _margins(outs)
        res["margin_pass_tokens"] = [list(map(int, o["output_ids"])) for o in outs]
    return res


@contextlib.contextmanager
def _gpu_turn(lock_path):
    """Exclusive turn on the GPU among engines sharing ``lock_path`` (no-op without)."""
    if not lock_path:
        yield 0.0
        return
    import fcntl

    t = time.perf_counter()
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - t
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: List[str]) -> int:
    req_path, res_path = argv[1], argv[2]
    req = json.loads(open(req_path).read())
    result: Dict[str, Any] = {"ok": False, "stage": "import", "jobs": {}, "timings": {}, "pid": os.getpid()}
    _write(res_path, result)
    llm = None
    try:
        t = time.perf_counter()
        import sglang

        result["timings"]["import_s"] = time.perf_counter() - t
        result["stage"] = "engine_start"
        _write(res_path, result)
        t = time.perf_counter()
        llm = sglang.Engine(**req["engine_kwargs"])
        result["timings"]["engine_start_s"] = time.perf_counter() - t
        try:
            from sglang_gemma4 import plugin

            st = plugin.statuses()
            result["plugin"] = None if st is None else [s.as_dict() for s in st]
        except Exception as e:  # the plugin may be absent from this env on purpose
            result["plugin"] = f"unavailable: {type(e).__name__}: {e}"
        try:
            info = llm.get_server_info()
            keep = ("speculative_algorithm", "max_total_num_tokens", "swa_full_tokens_ratio", "version")
            result["server_info"] = {k: info.get(k) for k in keep if k in info}
        except Exception as e:
            result["server_info"] = f"unavailable: {type(e).__name__}: {e}"
        _write(res_path, result)
        result["stage"] = "waiting_for_gpu_turn"
        _write(res_path, result)
        with _gpu_turn(req.get("lock_path")) as waited:
            result["timings"]["gpu_turn_wait_s"] = waited
            if req.get("warmup", True):
                # one short request: kernel JIT / first-graph costs stay out of job timings
                result["stage"] = "warmup"
                _write(res_path, result)
                t = time.perf_counter()
                first = req["jobs"][0]["prompts"][0] if req["jobs"] and req["jobs"][0]["prompts"] else [2, 10, 11]
                llm.generate(input_ids=[first[:8]], sampling_params=_sampling(4))
                result["timings"]["warmup_s"] = time.perf_counter() - t
            for job in req["jobs"]:
                result["stage"] = f"job:{job['name']}"
                _write(res_path, result)
                result["jobs"][job["name"]] = _run_job(llm, job)
                _write(res_path, result)
        # let the scheduler run its idle-time pool checks before shutdown
        time.sleep(1.0)
        result["stage"] = "done"
        result["ok"] = True
    except BaseException as e:  # report, then exit non-zero
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-6000:]
        print(result["traceback"], file=sys.stderr, flush=True)
    finally:
        _write(res_path, result)
        if llm is not None:
            try:
                t = time.perf_counter()
                llm.shutdown()
                result["timings"]["shutdown_s"] = time.perf_counter() - t
                _write(res_path, result)
            except Exception as e:
                print(f"shutdown failed: {e}", file=sys.stderr, flush=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    rc = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # leftover non-daemon threads of a dead engine must not keep us alive
    os._exit(rc)
