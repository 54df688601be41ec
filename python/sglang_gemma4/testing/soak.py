"""Serving soak: mixed concurrent traffic, hang-ups, aborts and bad input against a real HTTP server.

Used by ``test/gpu/test_serving_gpu.py`` (assertions) and ``bench/soak.py``
(recorded results). The server runs with ``--skip-tokenizer-init`` so
requests carry ``input_ids`` and responses ``output_ids``: greedy outputs can
be compared token by token with the same request served alone.

Request mix (seeded): prompt lengths from 1 token to the context limit (a
few over it, which must get a 400), ``max_new_tokens`` 0 / 1 / small / large,
greedy and sampled (temperature, top_p, top_k, min_p, the three penalties,
seeds), stop token ids, streaming and not, ~25 % of streams hung up
mid-stream, a few requests cancelled with ``/abort_request``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from typing import Any, Dict, List, Optional, Sequence

from sglang_gemma4.testing import server as srv

EOS_ID = 1
BOS_ID = 2
FIRST_ID = 8


@dataclasses.dataclass
class Req:
    i: int
    input_ids: List[int]
    sampling: Dict[str, Any]
    stream: bool
    hangup_after: Optional[int] = None  # chunks read before the client closes
    abort_after_s: Optional[float] = None  # /abort_request after this delay
    expect_400: bool = False
    probe: Optional[int] = None  # index of a greedy probe (token-compared with its solo run)

    def payload(self) -> Dict[str, Any]:
        return {"input_ids": self.input_ids, "sampling_params": self.sampling, "stream": self.stream,
                "rid": f"soak-{self.i}"}


def greedy_probes(n: int, vocab: int, context: int, seed: int = 7) -> List[Req]:
    rng = random.Random(seed)
    out = []
    for j in range(n):
        L = rng.choice([1, 3, 17, 64, 200, 500, context - 80])
        ids = [BOS_ID] + [rng.randrange(FIRST_ID, vocab) for _ in range(max(0, L - 1))]
        out.append(Req(-1 - j, ids, {"temperature": 0.0, "max_new_tokens": rng.choice([1, 8, 32, 64]),
                                     "ignore_eos": True}, stream=False, probe=j))
    return out


def mixed_requests(n: int, vocab: int, context: int, probes: Sequence[Req], seed: int = 0) -> List[Req]:
    rng = random.Random(seed)
    reqs: List[Req] = []
    for i in range(n):
        stream = rng.random() < 0.6
        if rng.random() < 0.2 and probes:  # greedy probe, compared with its solo run
            p = rng.choice(probes)
            reqs.append(Req(i, list(p.input_ids), dict(p.sampling), stream, probe=p.probe))
            continue
        u = rng.random()
        mnt = 0 if u < 0.08 else 1 if u < 0.2 else rng.randint(2, 32) if u < 0.7 else rng.randint(33, 200)
        u = rng.random()
        over = u < 0.04
        if over:
            L = context + rng.randint(1, 500)
        elif u < 0.12:
            L = 1
        elif u < 0.45:
            L = rng.randint(2, 32)
        elif u < 0.8:
            L = rng.randint(33, 300)
        else:
            L = rng.randint(301, context - mnt - 1)
        # SGLang counts a few reserved tokens (speculative drafts) into the prompt length
        L = L if over else min(L, context - mnt - 8)
        ids = [BOS_ID] + [rng.randrange(FIRST_ID, vocab) for _ in range(max(0, L - 1))]
        sp: Dict[str, Any] = {"max_new_tokens": mnt, "ignore_eos": rng.random() < 0.5}
        if rng.random() < 0.4:
            sp["temperature"] = 0.0
        else:
            sp["temperature"] = round(rng.uniform(0.2, 1.5), 3)
            if rng.random() < 0.5:
                sp["top_p"] = round(rng.uniform(0.5, 1.0), 3)
            if rng.random() < 0.5:
                sp["top_k"] = rng.randint(1, 50)
            if rng.random() < 0.3:
                sp["min_p"] = round(rng.uniform(0.0, 0.2), 3)
            if rng.random() < 0.3:
                sp["sampling_seed"] = rng.randint(0, 2**31 - 1)
        if rng.random() < 0.2:
            sp["frequency_penalty"] = round(rng.uniform(-0.5, 1.0), 3)
        if rng.random() < 0.2:
            sp["presence_penalty"] = round(rng.uniform(-0.5, 1.0), 3)
        if rng.random() < 0.2:
            sp["repetition_penalty"] = round(rng.uniform(0.8, 1.3), 3)
        if rng.random() < 0.2:
            sp["stop_token_ids"] = [rng.randrange(FIRST_ID, vocab) for _ in range(rng.randint(1, 3))]
        r = Req(i, ids, sp, stream, expect_400=over)
        if stream and not over and rng.random() < 0.25:
            r.hangup_after = rng.randint(0, 4)
        elif stream and not over and rng.random() < 0.33:
            r.hangup_after = rng.randint(0, 4)
        elif not stream and not over and rng.random() < 0.08:
            r.abort_after_s = round(rng.uniform(0.02, 0.4), 3)
        reqs.append(r)
    return reqs


def _finish_check(r: Req, out_ids: List[int], meta: Dict[str, Any]) -> Optional[str]:
    """None if length and finish reason agree with the request's parameters, else why not."""
    fr = meta.get("finish_reason") or {}
    kind = fr.get("type") if isinstance(fr, dict) else fr
    mnt = r.sampling["max_new_tokens"]
    n = meta.get("completion_tokens")
    if n is not None and n != len(out_ids):
        return f"completion_tokens {n} != {len(out_ids)} output ids"
    if len(out_ids) > mnt:
        return f"{len(out_ids)} tokens > max_new_tokens {mnt}"
    if kind == "length":
        return None if len(out_ids) == mnt else f"finish length after {len(out_ids)} of {mnt} tokens"
    if kind == "stop":
        allowed = set(r.sampling.get("stop_token_ids") or [])
        if not r.sampling.get("ignore_eos"):
            allowed.add(EOS_ID)
        matched = fr.get("matched") if isinstance(fr, dict) else None
        if isinstance(matched, int) and matched not in allowed:
            return f"stopped on {matched}, not a stop id of the request ({sorted(allowed)})"
        if out_ids and isinstance(matched, int) and out_ids[-1] != matched:
            return f"stopped on {matched} but the last output id is {out_ids[-1]}"
        return None
    return f"unexpected finish reason {fr!r}"


async def _one(session, base: str, r: Req, rec: Dict[str, Any]) -> None:
    import aiohttp

    t0 = time.perf_counter()
    rec.update(i=r.i, stream=r.stream, expect_400=r.expect_400, probe=r.probe)
    try:
        if r.abort_after_s is not None:
            async def abort():
                await asyncio.sleep(r.abort_after_s)
                async with session.post(base + "/abort_request", json={"rid": f"soak-{r.i}"}) as a:
                    rec["abort_status"] = a.status
            asyncio.ensure_future(abort())
        async with session.post(base + "/generate", json=r.payload()) as resp:
            rec["status"] = resp.status
            if resp.status != 200:
                rec["body"] = (await resp.text())[:300]
                rec["kind"] = "http_error"
                return
            if not r.stream:
                body = await resp.json()
                out, meta = body.get("output_ids") or [], body.get("meta_info") or {}
            else:
                chunks, meta, out = 0, {}, []
                async for line in resp.content:
                    line = line.strip()
                    if not line.startswith(b"data:") or line == b"data: [DONE]":
                        continue
                    d = json.loads(line[5:])
                    if "error" in d:  # errors after the 200 header arrive in the stream
                        rec["kind"] = "stream_error"
                        rec["body"] = str(d["error"])[:300]
                        return
                    chunks += 1
                    if chunks == 1:
                        rec["ttft_s"] = time.perf_counter() - t0
                    meta = d.get("meta_info") or meta
                    ids = d.get("output_ids") or []
                    # cumulative (SGLang's default) or incremental chunks
                    out = ids if len(ids) >= len(out) and ids[: len(out)] == out else out + ids
                    if r.hangup_after is not None and chunks > r.hangup_after:
                        rec["kind"] = "hung_up"
                        resp.close()
                        return
            rec["n_out"] = len(out)
            rec["out"] = out
            fr = meta.get("finish_reason") or {}
            if (fr.get("type") if isinstance(fr, dict) else fr) == "abort":
                rec["kind"] = "aborted"
                return
            rec["kind"] = "done"
            rec["bad_finish"] = _finish_check(r, out, meta)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        rec["kind"] = "client_error"
        rec["body"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        rec["latency_s"] = time.perf_counter() - t0


async def _run(base: str, reqs: Sequence[Req], concurrency: int, timeout: float) -> List[Dict[str, Any]]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    recs: List[Dict[str, Any]] = [dict() for _ in reqs]
    tmo = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=tmo) as session:
        async def go(r, rec):
            async with sem:
                await _one(session, base, r, rec)
        await asyncio.gather(*(go(r, rec) for r, rec in zip(reqs, recs)))
    return recs


def run_requests(s: srv.Server, reqs: Sequence[Req], concurrency: int, timeout: float = 300.0) -> List[Dict[str, Any]]:
    return asyncio.run(_run(s.base, reqs, concurrency, timeout))


BAD_INPUTS = [
    ("oov_token_id", {"input_ids": [2, 99999999], "sampling_params": {"max_new_tokens": 4}}, "input_ids"),
    ("negative_token_id", {"input_ids": [2, -5], "sampling_params": {"max_new_tokens": 4}}, "input_ids"),
    ("string_token_id", {"input_ids": [2, "x"], "sampling_params": {"max_new_tokens": 4}}, "input_ids"),
    ("empty_input_ids", {"input_ids": [], "sampling_params": {"max_new_tokens": 4}}, "input_ids"),
    ("negative_max_new_tokens", {"input_ids": [2, 9], "sampling_params": {"max_new_tokens": -3}}, "max_new_tokens"),
    ("huge_max_new_tokens", {"input_ids": [2, 9], "sampling_params": {"max_new_tokens": 10**9}}, "tokens"),
    ("negative_temperature", {"input_ids": [2, 9], "sampling_params": {"max_new_tokens": 4, "temperature": -1}},
     "temperature"),
    ("top_p_out_of_range", {"input_ids": [2, 9], "sampling_params": {"max_new_tokens": 4, "top_p": 1.5}}, "top_p"),
    ("text_without_tokenizer", {"text": "hello", "sampling_params": {"max_new_tokens": 4}}, ""),
]


ID_CASES = ("oov_token_id", "negative_token_id", "string_token_id", "empty_input_ids")


def _bad_then_good(s: srv.Server, case: str, good: Dict[str, Any], n_good: int,
                   payload: Optional[Dict[str, Any]] = None, raw: Optional[bytes] = None,
                   timeout: float = 60) -> Dict[str, Any]:
    """One bad request, then /health and ``good`` (which must return ``n_good`` tokens)."""
    st, body = srv.http(s.base + "/generate", payload, timeout=timeout, raw=raw)
    rec = {"case": case, "status": st, "body": str(body)[:300], "health_after": s.health()}
    st2, body2 = srv.http(s.base + "/generate", good, timeout=timeout)
    rec["next_request_ok"] = st2 == 200 and len((body2 or {}).get("output_ids") or []) == n_good
    return rec


def bad_input_checks(s: srv.Server, context: int, vocab: int, skip: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Each bad request, then /health and one good request; what came back."""
    cases = [c for c in BAD_INPUTS if c[0] not in skip] + [
        ("prompt_over_context", {"input_ids": [2] + [9] * (context + 100), "sampling_params": {"max_new_tokens": 4}},
         "context length"),
    ]
    good = {"input_ids": [2, 9, 10], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    out = []
    for name, payload, needle in cases:
        rec = _bad_then_good(s, name, good, 2, payload)
        rec["needle"] = needle
        rec["names_field"] = needle.lower() in rec["body"].lower() if needle else None
        out.append(rec)
    out.append(_bad_then_good(s, "malformed_json", good, 2, raw=b'{"input_ids": [2, 3'))
    return out


def summarise(recs: List[Dict[str, Any]], solo: Dict[int, List[int]]) -> Dict[str, Any]:
    kinds: Dict[str, int] = {}
    for r in recs:
        kinds[r.get("kind", "?")] = kinds.get(r.get("kind", "?"), 0) + 1
    lat = sorted(r["latency_s"] for r in recs if r.get("kind") == "done")
    mismatches = [r["i"] for r in recs if r.get("kind") == "done" and r.get("probe") is not None
                  and r.get("out") != solo.get(r["probe"])]
    compared = sum(1 for r in recs if r.get("kind") == "done" and r.get("probe") is not None)
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None  # noqa: E731
    return {
        "requests": len(recs), "kinds": kinds,
        "unexpected_http_errors": [(r["i"], r.get("status"), r.get("body")) for r in recs
                                   if r.get("kind") in ("http_error", "stream_error") and not r.get("expect_400")],
        # a stream has sent its 200 before SGLang validates: the error (naming the length) comes in the stream
        "missing_400": [r["i"] for r in recs if r.get("expect_400") and not (
            r.get("status") == 400 or (r.get("kind") == "stream_error" and "context length" in r.get("body", "")))],
        "bad_finish": [(r["i"], r["bad_finish"]) for r in recs if r.get("bad_finish")],
        "client_errors": [(r["i"], r.get("body")) for r in recs if r.get("kind") == "client_error"],
        "greedy_compared": compared, "greedy_mismatch": mismatches,
        "latency_p50_s": pct(0.5), "latency_p99_s": pct(0.99),
    }


def soak(s: srv.Server, n: int, concurrency: int, vocab: int, context: int, seed: int = 0,
         n_probes: int = 16, skip_bad: Sequence[str] = ()) -> Dict[str, Any]:
    """Probes alone, then the mix, then bad input; the server must stay up throughout."""
    probes = greedy_probes(n_probes, vocab, context, seed=seed + 7)
    solo = {}
    for p in probes:
        rec = run_requests(s, [p], 1)[0]
        solo[p.probe] = rec.get("out")
    t0 = time.time()
    recs = run_requests(s, mixed_requests(n, vocab, context, probes, seed=seed), concurrency)
    res = summarise(recs, solo)
    res["soak_wall_s"] = round(time.time() - t0, 1)
    time.sleep(3.0)  # let the idle-time leak check run
    res["health_after_soak"] = s.health()
    res["bad_input"] = bad_input_checks(s, context, vocab, skip_bad)
    time.sleep(2.0)
    res["health_end"] = s.health()
    res["alive"] = s.alive()
    res["checks_fired"] = s.checks_fired()[:30]
    return res


def mm_bad_image_checks(s: srv.Server, work_dir) -> List[Dict[str, Any]]:
    """Multimodal server: a good image request, then broken images; each followed by /health and the good one."""
    import base64
    from pathlib import Path

    from sglang_gemma4.testing import checkpoints as ck

    d = Path(work_dir)
    d.mkdir(parents=True, exist_ok=True)
    good = d / "good.png"
    ck.synthetic_image(64, 96, seed=5).save(good)
    png = good.read_bytes()
    (d / "garbage.png").write_bytes(bytes(range(256)) * 8)
    (d / "truncated.png").write_bytes(png[: len(png) // 3])
    prompt = ck.image_prompt([[20, 21, 22, 23, 24, 25, 26, 27], ck.IMAGE, [30, 31]])

    def req(images, ids=prompt):
        return {"input_ids": ids, "image_data": images, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}

    cases = [
        ("garbage_bytes_file", req([str(d / "garbage.png")])),
        ("truncated_png_file", req([str(d / "truncated.png")])),
        ("garbage_data_url", req(["data:image/png;base64," + base64.b64encode(b"not an image" * 50).decode()])),
        ("missing_file", req([str(d / "does-not-exist.png")])),
        ("two_images_one_placeholder", req([str(good), str(good)])),
    ]
    st, body = srv.http(s.base + "/generate", req([str(good)]), timeout=300)
    out = [{"case": "good_image", "status": st, "body": str(body)[:300],
            "n_out": len((body or {}).get("output_ids") or []) if isinstance(body, dict) else 0}]
    out += [_bad_then_good(s, name, req([str(good)]), 4, payload, timeout=300) for name, payload in cases]
    return out


def id_reference(s: srv.Server) -> List[Dict[str, Any]]:
    """SGLang's own answer to each bad-id case, in order, until the server dies (plugin off)."""
    out = []
    for name, payload, _ in BAD_INPUTS:
        if name not in ID_CASES:
            continue
        try:
            st, body = srv.http(s.base + "/generate", payload, timeout=60)
        except OSError as e:
            st, body = None, f"{type(e).__name__}: {e}"
        time.sleep(5.0)
        out.append({"case": name, "status": st, "body": str(body)[:300], "alive_after": s.alive(),
                    "health_after": s.health()})
        if out[-1]["health_after"] != 200:
            break
    return out


def first_sampled_latency(s: srv.Server, n_tokens: int = 8) -> float:
    """Seconds for the first temperature > 0 request after start-up."""
    t0 = time.perf_counter()
    st, body = srv.http(s.base + "/generate", {"input_ids": [2, 9, 10, 11], "sampling_params": {
        "max_new_tokens": n_tokens, "temperature": 0.8, "top_p": 0.9, "top_k": 20}}, timeout=600)
    if st != 200:
        raise RuntimeError(f"first sampled request: HTTP {st}: {str(body)[:300]}")
    return time.perf_counter() - t0
