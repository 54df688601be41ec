"""Serving benchmark: full-size Gemma-4 through ``python -m sglang.launch_server``, plugin on vs off.

Every arm is a real HTTP server on dummy weights (``--load-format dummy``),
all arms alive at once, driven by SGLang's own ``sglang.bench_serving``
(``random-ids`` dataset: random token ids, no download; ``--tokenize-prompt``
so prompt lengths are exact). Arms are interleaved per workload and repeat
(rep 0: on, off; rep 1: off, on; ...), so drift hits both; every repeat uses
its own seed and flushes the radix cache first.

Arms: ``on`` (plugin), ``off`` (``SGLANG_PLUGINS=none``), ``spec`` / ``spec-off``
(the same with FROZEN_KV_MTP and the real-width dummy assistant),
``KNOB=V`` (plugin on, one knob flipped, e.g. ``SGLANG_GEMMA4_SWA_RATIO=0``).

Memory: ``--static-gib G`` starts the servers one after another, each with G
GiB of static memory (weights + KV), so pool-sizing patches (``swa_ratio``)
act as in production; otherwise they start at once, each capped by
``--max-total-tokens``.

    python bench/serve.py --model e4b --arms on,off,spec --workloads chat_c1,tpot_3000_100 --out gpu-out/serve
    python bench/serve.py --report runs/serve-e4b-nvidia-h200.json      # md + png from a recorded JSON

With dummy weights the draft's accept length is ~1, so speculative arms report
the speculative step time (TPOT x accept length) over the plain step time:
the break-even accept length.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

from sglang_gemma4.testing import fullsize, server as srv  # noqa: E402

# name: (input len, output len, prompts, max concurrency or None = all at once)
WORKLOADS: Dict[str, tuple] = {
    "chat_c1": (1000, 256, 4, 1),
    "chat_c32": (1000, 256, 64, 32),
    "ttft_c16": (1000, 256, 48, 16),
    "summ_8000_200": (8000, 200, 40, None),
    "tpot_3000_100": (3000, 100, 30, None),
    "yoco_7000_10": (7000, 10, 30, None),
    "long_ttft_c1": (7000, 4, 4, 1),
    "decode_100_500": (100, 500, 32, 32),
    # FROZEN_KV_MTP batch sweep (issue #19): 1000/256 at concurrency 8 / 16 / 48
    "chat_c8": (1000, 256, 16, 8),
    "chat_c16": (1000, 256, 32, 16),
    "chat_c48": (1000, 256, 96, 48),
    # decode at 8k context (issue #20's profile points)
    "ctx8k_c1": (8000, 256, 2, 1),
    "ctx8k_c16": (8000, 256, 16, 16),
}
# The seed's full sizes, for --full (too long for one 10-minute device call per model).
FULL_WORKLOADS: Dict[str, tuple] = {
    "chat_c1": (1000, 1000, 80, 1),
    "chat_c32": (1000, 1000, 80, 32),
    "summ_8000_200": (8000, 1000, 80, None),
    "tpot_3000_100": (3000, 100, 30, None),
    "yoco_7000_10": (7000, 10, 30, None),
    "decode_100_500": (100, 1000, 80, 32),
}
METRICS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms",
           "output_throughput", "total_throughput", "duration", "accept_length", "completed")
LOWER_IS_BETTER = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
                   "p99_itl_ms", "duration")


BENCH_LOCK = [None]


class _Deadline(Exception):
    pass


def arm_config(arm: str, draft: Path) -> tuple:
    """(env, extra server args) of an arm name.

    ``on`` | ``off`` | ``spec`` | ``spec-off`` | ``SGLANG_<KNOB>=<v>`` (plugin on, one knob), and any of
    them followed by ``+SGLANG_<KNOB>=<v>`` env items and, for spec arms, ``+steps=N`` (draft steps,
    N+1 draft tokens), e.g. ``spec+SGLANG_FROZEN_KV_MTP_V2=0+steps=2``.
    """
    base, *items = arm.split("+")
    env: Dict[str, str] = {}
    args: List[str] = []
    if base == "off" or base == "spec-off":
        env["SGLANG_PLUGINS"] = "none"
    elif base.startswith("SGLANG_") and "=" in base:
        items.insert(0, base)
    elif base not in ("on", "spec"):
        raise ValueError(f"unknown arm {arm!r}: on, off, spec, spec-off or SGLANG_<KNOB>=<value>, then +KNOB=V / +steps=N")
    steps = 3
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise ValueError(f"arm {arm!r}: {it!r} is not KEY=VALUE")
        if k == "steps":
            if not base.startswith("spec") or not v.isdigit() or not 1 <= int(v) <= 8:
                raise ValueError(f"arm {arm!r}: steps=N (1..8) needs a spec arm")
            steps = int(v)
        elif k.startswith("SGLANG_"):
            env[k] = v
        else:
            raise ValueError(f"arm {arm!r}: {k!r} is neither an SGLANG_ knob nor steps")
    if base.startswith("spec"):
        args = srv.spec_args(draft, steps)
    return env, args


def _stub_hf_datasets() -> None:
    """sglang.benchmark imports HF ``datasets`` at module level for its MMMU/LongBench loaders; the
    offline GPU bundle has no ``datasets``, and random-ids never calls it. A stub that refuses loudly."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        import types

        mod = types.ModuleType("datasets")

        def load_dataset(*a, **k):
            raise ImportError("HF datasets is not installed (sglang-gemma4 bench stub); random-ids needs none")

        mod.load_dataset = load_dataset
        sys.modules["datasets"] = mod


def patient_flush(flush, wait_s: float = 15.0, poll_s: float = 0.25):
    """``flush`` (bench_serving's flush_server_cache), retried while the server answers 400.

    Seen on the H200 (session 11): an overlap-schedule FROZEN_KV_MTP server still counts
    bench_serving's just-finished warmup request as running for a moment ("Cache not flushed
    because there are pending requests. #running-req: 1") and answers 400, which failed every
    run on both V2=1 arms. The synchronous arm never did. Any other error, or a 400 that lasts
    past ``wait_s``, is raised as before.
    """
    def call(base_url, backend):
        import requests

        t_end = time.time() + wait_s
        while True:
            try:
                return flush(base_url, backend)
            except requests.HTTPError as e:
                status = getattr(e.response, "status_code", None)
                if status != 400 or time.time() >= t_end:
                    raise
            time.sleep(poll_s)

    return call


class _ThreadStdout:
    """sys.stdout per thread. contextlib.redirect_stdout swaps the process-wide stream, so a bench_serving
    thread left hanging past its timeout kept our own prints in its log, and the next run's redirect saved and
    later restored that (closed) log: serve.py's final print raised "I/O operation on closed file" (H200,
    2026-12-04). Each bench thread now writes to its own log; every other thread to the real stdout."""

    def __init__(self, real):
        self.real, self.local = real, threading.local()

    def __getattr__(self, name):  # write, flush, ...: this thread's target
        return getattr(getattr(self.local, "target", None) or self.real, name)


def _thread_stdout() -> _ThreadStdout:
    if not isinstance(sys.stdout, _ThreadStdout):
        sys.stdout = _ThreadStdout(sys.stdout)
    return sys.stdout


def bench_once(s: srv.Server, tok: Path, wl: tuple, seed: int, out: Path, timeout: float) -> Dict[str, Any]:
    """One ``sglang.bench_serving`` run, in this process (its import costs ~15 s; runs here cost none)."""
    _stub_hf_datasets()
    from sglang.benchmark import serving as bench_serving

    if not getattr(bench_serving.flush_server_cache, "_patient", False):
        bench_serving.flush_server_cache = patient_flush(bench_serving.flush_server_cache)
        bench_serving.flush_server_cache._patient = True

    inp, outp, n, conc = wl
    f = out.with_suffix(".jsonl")
    argv = ["--backend", "sglang", "--host", "127.0.0.1",
            "--port", str(s.port), "--dataset-name", "random-ids", "--tokenize-prompt", "--tokenizer", str(tok),
            "--random-input-len", str(inp), "--random-output-len", str(outp), "--random-range-ratio", "1.0",
            "--num-prompts", str(n), "--request-rate", "inf", "--seed", str(seed), "--flush-cache",
            "--output-file", str(f), "--disable-tqdm"]
    if conc:
        argv += ["--max-concurrency", str(conc)]
    # Dummy weights emit special tokens, which detokenize to "" by default, and bench_serving times
    # only chunks with text: TTFT/ITL read 0 and TPOT becomes E2E/(n-1). Keep specials in the text.
    # (The random dataset gives every request the same output length, so one sampling_params fits all.)
    argv += ["--extra-request-body", json.dumps({"sampling_params": {
        "temperature": 0.0, "max_new_tokens": outp, "ignore_eos": True, "skip_special_tokens": False}})]
    lock = None
    if BENCH_LOCK[0]:  # several serve.py on one GPU: one load at a time, servers stay up
        import fcntl

        lock = open(BENCH_LOCK[0], "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
    t0 = time.time()
    saved = sys.argv
    sys.argv = ["sglang.bench_serving", *argv]
    box: Dict[str, Any] = {}

    stdout = _thread_stdout()

    def go():
        try:
            with open(out.with_suffix(".log"), "w") as log:
                stdout.local.target = log
                try:
                    bench_serving.cli_main()
                finally:
                    stdout.local.target = None
        except BaseException as e:  # SystemExit on its own errors
            box["error"] = e

    th = threading.Thread(target=go, daemon=True)  # a hung server must not hang the whole benchmark
    th.start()
    th.join(timeout)
    sys.argv = saved
    if lock is not None:
        lock.close()
    if th.is_alive():
        raise TimeoutError(f"bench_serving on {s.name} still running after {timeout:.0f} s")
    if "error" in box:
        raise RuntimeError(f"bench_serving failed on {s.name}: {box['error']!r}; see {out.with_suffix('.log')}")
    if not f.exists():
        raise RuntimeError(f"bench_serving wrote no result on {s.name}; see {out.with_suffix('.log')}")
    row = json.loads(f.read_text().strip().splitlines()[-1])
    res = {k: row.get(k) for k in METRICS}
    if not res.get("median_ttft_ms"):
        raise RuntimeError(f"bench_serving on {s.name} timed no first token (TTFT 0): no streamed text; "
                           f"see {out.with_suffix('.log')}")
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def _abandon_trace(s: srv.Server, d: Path) -> None:
    """A trace that never completed: stop the profiler (on the H200 a server whose trace did not finish then
    answered no timed run within 60 s) and drop the partial files (200 MB of them did not fit the result tarball)."""
    try:
        srv.http(s.base + "/stop_profile", {})
    except Exception:
        pass
    for p in sorted(d.rglob("*"), reverse=True):
        try:
            p.unlink() if p.is_file() else p.rmdir()
        except OSError:
            pass


def profile_once(s: srv.Server, tok: Path, wl: tuple, out: Path, steps: int, delay_s: float,
                 timeout: float, activities: Optional[List[str]] = None) -> Dict[str, Any]:
    """Trace ``steps`` scheduler steps of a live load (started ``delay_s`` in, past the prefills)."""
    import decode_profile

    d = out.parent / f"{out.name}-trace"
    d.mkdir(parents=True, exist_ok=True)
    box: Dict[str, Any] = {}
    th = threading.Thread(target=lambda: box.update(r=bench_once(s, tok, wl, 4242, out, timeout)))
    th.start()
    time.sleep(delay_s)
    st, body = srv.http(s.base + "/start_profile", {"output_dir": str(d), "num_steps": steps, "activities": activities or ["GPU"]})
    th.join()
    if st != 200:
        raise RuntimeError(f"/start_profile: HTTP {st}: {str(body)[:300]}")
    deadline = time.time() + 90
    traces: List[Path] = []
    while time.time() < deadline and not traces:
        time.sleep(2)
        traces = sorted(p for p in d.rglob("*") if p.suffix in (".json", ".gz") and p.stat().st_size > 0)
    if not traces:
        _abandon_trace(s, d)
        raise RuntimeError(f"no trace written under {d}")
    evs = None
    while evs is None:  # the server may still be writing (a gz read early ends in EOFError)
        sizes = [p.stat().st_size for p in traces]
        time.sleep(3)
        try:
            if sizes == [p.stat().st_size for p in traces]:
                evs = [decode_profile.load_events(p) for p in traces]
        except (EOFError, json.JSONDecodeError, OSError, zlib.error):
            evs = None
        if evs is None and time.time() > deadline + 60:
            _abandon_trace(s, d)
            raise RuntimeError(f"trace under {d} still incomplete after 150 s")
    t = decode_profile.table([k for ev in evs for k in decode_profile.kernels(ev)], steps)
    t["timeline"] = decode_profile.combine_timelines([decode_profile.gpu_timeline(ev) for ev in evs])
    if len(evs) == 1:  # one rank: cut into steps, and the decode-only table beside the window's
        t["decode_only"] = decode_profile.decode_only(decode_profile.split_steps(evs[0]))
        t["spec_phases"] = decode_profile.spec_phases(evs[0])  # {} unless the window is speculative
    t["traces"] = [p.name for p in traces]
    t["load"] = box.get("r")
    for p in traces:
        p.unlink()
    return t


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k in METRICS:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        if vals:
            med = statistics.median(vals)
            out[k] = {"median": med, "min": min(vals), "max": max(vals), "n": len(vals),
                      "spread": (max(vals) - min(vals)) / med if med else 0.0}
    return out


def compare(result: Dict[str, Any], base: str = "off") -> Dict[str, Any]:
    """Per workload: each arm's median / the base arm's, and whether it is worse beyond spread."""
    cmp: Dict[str, Any] = {}
    for wl, arms in result["summary"].items():
        if base not in arms:
            continue
        b = arms[base]
        for arm, m in arms.items():
            # spec arms against a plain base are a step-cost question (spec_breakeven), not a ratio
            if arm == base or (arm.startswith("spec") and not base.startswith("spec")):
                continue
            row = {}
            for k in LOWER_IS_BETTER + ("output_throughput",):
                if k in m and k in b and b[k]["median"]:
                    ratio = m[k]["median"] / b[k]["median"]
                    noise = max(m[k]["spread"], b[k]["spread"])
                    worse = ratio > 1 + noise if k in LOWER_IS_BETTER else ratio < 1 - noise
                    row[k] = {"ratio": round(ratio, 4), "spread": round(noise, 4), "worse_beyond_spread": worse}
            cmp.setdefault(wl, {})[f"{arm}/{base}"] = row
    return cmp


def spec_breakeven(result: Dict[str, Any]) -> Dict[str, Any]:
    """spec step / plain step = TPOT_spec * accept_length / TPOT_plain (the break-even accept length)."""
    out: Dict[str, Any] = {}
    for wl, arms in result["summary"].items():
        for spec_arm in [a for a in arms if a.startswith("spec")]:
            plain_arm = "off" if spec_arm.startswith("spec-off") else "on"
            if plain_arm in arms and "median_tpot_ms" in arms[spec_arm]:
                acc = arms[spec_arm].get("accept_length", {}).get("median") or 1.0
                step = arms[spec_arm]["median_tpot_ms"]["median"] * acc
                plain = arms[plain_arm]["median_tpot_ms"]["median"]
                out.setdefault(wl, {})[spec_arm] = {
                    "accept_length": acc, "spec_step_ms": round(step, 3), "plain_step_ms": round(plain, 3),
                    "break_even_accept_length": round(step / plain, 3)}
    return out


def versions() -> Dict[str, Any]:
    import importlib.metadata as md

    v = {}
    for d in ("sglang", "torch", "triton", "flashinfer-python", "sglang-gemma4"):
        try:
            v[d] = md.version(d)
        except md.PackageNotFoundError:
            v[d] = None
    try:
        v["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        v["gpu"] = None
    return v


def write_report(result: Dict[str, Any], json_path: Path) -> None:
    """Markdown (+ PNG when matplotlib is there) next to the JSON."""
    md = [f"# Serving benchmark: {result['model']} ({result['versions'].get('gpu')})", "",
          f"Date {result['date']}; SGLang {result['versions'].get('sglang')}, torch {result['versions'].get('torch')}, "
          f"triton {result['versions'].get('triton')}. `python -m sglang.launch_server --load-format dummy` per arm "
          f"(all alive), `sglang.bench_serving --dataset-name random-ids`, {result['repeat']} interleaved repeats; "
          f"median over repeats, spread = (max-min)/median. Model: {json.dumps(result['model_summary'])}.",
          "", f"Server args: `{' '.join(result['server_args'])}`; memory: {result['memory']}; "
          f"environment of every arm: `{json.dumps(result.get('common_env', {}))}`.", ""]
    if result.get("note"):
        md += [result["note"], ""]
    md += ["## Servers", "", "| arm | env | ready after (s) | pools (from the server log) |", "|---|---|---|---|"]
    for arm, s in result["servers"].items():
        md.append(f"| {arm} | `{json.dumps(s['env'])}` | {s['ready_s']} | {json.dumps(s['pools'])} |")
    md += ["", "## Results (median over repeats)", "",
           "| workload (in/out x n, conc) | arm | TTFT med / p99 (ms) | TPOT med / p99 (ms) | ITL med (ms) | out tok/s | duration (s) | accept | spread TPOT |",
           "|---|---|---|---|---|---|---|---|---|"]
    for wl, arms in result["summary"].items():
        i, o, n, c = result["workloads"][wl]
        for arm, m in arms.items():
            g = lambda k, f="{:.1f}": f.format(m[k]["median"]) if k in m else "-"  # noqa: E731
            md.append(f"| {wl} ({i}/{o} x {n}, {c or 'all'}) | {arm} | {g('median_ttft_ms')} / {g('p99_ttft_ms')} | "
                      f"{g('median_tpot_ms', '{:.2f}')} / {g('p99_tpot_ms', '{:.2f}')} | {g('median_itl_ms', '{:.2f}')} | "
                      f"{g('output_throughput', '{:.0f}')} | {g('duration', '{:.2f}')} | {g('accept_length', '{:.2f}')} | "
                      f"{m['median_tpot_ms']['spread']:.3f} |" if "median_tpot_ms" in m else f"| {wl} | {arm} | (failed) |")
    md += ["", f"## Ratios (arm / {result.get('base', 'off')}; < 1 is faster for times)", "",
           "| workload | arms | TTFT med | TTFT p99 | TPOT med | duration | out tok/s | worse beyond spread |", "|---|---|---|---|---|---|---|---|"]
    for wl, rows in result["compare"].items():
        for pair, r in rows.items():
            g = lambda k: f"{r[k]['ratio']:.3f}" if k in r else "-"  # noqa: E731
            worse = [k for k, v in r.items() if v["worse_beyond_spread"]]
            md.append(f"| {wl} | {pair} | {g('median_ttft_ms')} | {g('p99_ttft_ms')} | {g('median_tpot_ms')} | "
                      f"{g('duration')} | {g('output_throughput')} | {', '.join(worse) or 'none'} |")
    if result.get("spec"):
        md += ["", "## FROZEN_KV_MTP step cost (dummy assistant, accept ~1)", "",
               "| workload | arm | accept | spec step (ms) | plain step (ms) | break-even accept length |", "|---|---|---|---|---|---|"]
        for wl, rows in result["spec"].items():
            for arm, r in rows.items():
                md.append(f"| {wl} | {arm} | {r['accept_length']:.2f} | {r['spec_step_ms']:.2f} | {r['plain_step_ms']:.2f} | "
                          f"{r['break_even_accept_length']:.2f} |")
    if result.get("profiles"):
        import decode_profile

        md += ["", "## Decode-step kernel profile (torch profiler on the live server)", ""]
        for item, t in result["profiles"].items():
            md.append(decode_profile.markdown(item, decode_profile.reclassify(t)))
    if result.get("errors"):
        md += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    json_path.with_suffix(".md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    pairs = [(wl, pair, r) for wl, rows in result["compare"].items() for pair, r in rows.items()]
    steps = [(wl, arm, r) for wl, rows in (result.get("spec") or {}).items() for arm, r in rows.items()]
    if not pairs and steps:  # spec arms against plain only: plot the step costs (the break-even accept length)
        fig, ax = plt.subplots(figsize=(max(6, len(steps) * 1.3), 4))
        xs = range(len(steps))
        ax.bar([x - 0.2 for x in xs], [r["plain_step_ms"] for *_, r in steps], 0.4, label="plain decode step")
        ax.bar([x + 0.2 for x in xs], [r["spec_step_ms"] for *_, r in steps], 0.4, label="speculative step")
        for x, (*_, r) in zip(xs, steps):
            ax.text(x + 0.2, r["spec_step_ms"], f"{r['break_even_accept_length']:.2f}x", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs), [f"{wl}\n{arm}" for wl, arm, _ in steps], fontsize=7)
        ax.set_ylabel("ms per step (label: spec / plain)")
        ax.set_title(f"{result['model']} FROZEN_KV_MTP step cost, {result['versions'].get('gpu')}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(json_path.with_suffix(".png"), dpi=110)
        return
    if not pairs:
        return
    fig, ax = plt.subplots(figsize=(max(6, len(pairs) * 1.1), 4))
    xs = range(len(pairs))
    for j, k in enumerate(("median_ttft_ms", "median_tpot_ms", "duration")):
        ax.bar([x + j * 0.27 for x in xs], [r.get(k, {}).get("ratio", 0) for _, _, r in pairs], 0.27, label=k)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + 0.27 for x in xs], [f"{wl}\n{pair}" for wl, pair, _ in pairs], fontsize=7)
    ax.set_ylabel("arm / off (lower = faster)")
    ax.set_title(f"{result['model']} serving, {result['versions'].get('gpu')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(json_path.with_suffix(".png"), dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(fullsize.TARGETS))
    ap.add_argument("--arms", default="on,off")
    ap.add_argument("--workloads", default="chat_c1,chat_c32,tpot_3000_100,yoco_7000_10,decode_100_500")
    ap.add_argument("--full", action="store_true", help="the seed's prompt counts and output lengths")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("gpu-out/serve"))
    ap.add_argument("--static-gib", type=float, help="start servers one after another with this static budget")
    ap.add_argument("--max-total-tokens", type=int, default=200000)
    ap.add_argument("--mem-fraction-static", type=float, default=0.85, help="parallel start only")
    ap.add_argument("--context-length", type=int, default=10240)
    ap.add_argument("--cuda-graph-max-bs", type=int, default=64)
    ap.add_argument("--extra-server-args", default="")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="stop starting new runs after this many seconds")
    ap.add_argument("--bench-timeout", type=float, default=240)
    ap.add_argument("--note", default="")
    ap.add_argument("--profile", default="", help="ARM:WORKLOAD[,...]: one extra, untimed, traced pass each")
    ap.add_argument("--profile-steps", type=int, default=30)
    ap.add_argument("--profile-delay-s", type=float, default=2.0)
    ap.add_argument("--profile-activities", default="GPU", help="CPU,GPU also records host gaps and syncs")
    ap.add_argument("--profiles-first", action="store_true",
                    help="trace before the timed workloads, so a deadline cuts repeats rather than profiles")
    ap.add_argument("--only", action="append", default=[], metavar="WORKLOAD=ARM|ARM",
                    help="run WORKLOAD on these arms only (repeatable), e.g. chat_c8=on|spec+SGLANG_FROZEN_KV_MTP_V2=1")
    ap.add_argument("--base", default="off", help="the arm every other arm's ratios are taken against")
    ap.add_argument("--bench-lock", help="file lock shared by serve.py processes on one GPU")
    ap.add_argument("--report", type=Path, help="only rewrite md/png from this JSON")
    ap.add_argument("--dry-run", action="store_true", help="validate everything, print the plan, start nothing "
                    "(also SERVE_DRY_RUN=1)")
    a = ap.parse_args(argv)
    if a.report:
        write_report(json.loads(a.report.read_text()), a.report)
        return 0
    if not a.model:
        ap.error("--model is required")
    BENCH_LOCK[0] = a.bench_lock
    t_start = time.time()
    table = FULL_WORKLOADS if a.full else WORKLOADS
    wls = [w for w in a.workloads.split(",") if w]
    bad = [w for w in wls if w not in table]
    if bad:
        ap.error(f"unknown workloads {bad}; known: {', '.join(table)}")
    arms = [x for x in a.arms.split(",") if x]
    if a.base not in arms and a.base != "off":
        ap.error(f"--base {a.base!r} is not one of the arms {arms}")
    profiles = []  # (item, arm, workload, delay s): fail before any server starts
    for item in [x for x in a.profile.split(",") if x]:
        parm, _, pw = item.rpartition(":")
        pw, _, delay = pw.partition("@")  # WORKLOAD@S: start tracing S s in (past long prefills)
        try:
            d = float(delay) if delay else a.profile_delay_s
        except ValueError:
            d = -1.0
        if parm not in arms or pw not in table or d < 0:
            ap.error(f"--profile {item!r}: want ARM:WORKLOAD[@DELAY_S] with ARM in {arms} and WORKLOAD in {list(table)}")
        profiles.append((item, parm, pw, d))
    only: Dict[str, List[str]] = {}
    for item in a.only:
        w, sep, rest = item.partition("=")
        sel = [x for x in rest.split("|") if x]
        if not sep or w not in table or not sel or any(x not in arms for x in sel):
            ap.error(f"--only {item!r}: want WORKLOAD=ARM|ARM with WORKLOAD in {wls} and every ARM in {arms}")
        if w not in wls:  # a part's fixed --only list, with SERVE_WORKLOADS choosing fewer workloads
            print(f"--only {item!r}: workload {w} is not run (--workloads {','.join(wls)}); entry unused", flush=True)
            continue
        only[w] = sel
    for arm in arms:  # every arm name parses before anything is written or started
        try:
            arm_config(arm, Path("draft"))
        except ValueError as e:
            ap.error(str(e))
    if a.dry_run or os.environ.get("SERVE_DRY_RUN") == "1":
        # device time is scarce: scripts/gpu_backlog.sh parts are checked on CPU with this (test_serve_bench)
        plan = {"model": a.model, "arms": arms, "base": a.base, "workloads": {w: only.get(w, arms) for w in wls},
                "profiles": [item for item, *_ in profiles], "profiles_first": a.profiles_first,
                "extra_server_args": a.extra_server_args.split(), "static_gib": a.static_gib}
        print("serve.py dry run: " + json.dumps(plan))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    target, draft = fullsize.write_model(a.model, a.out / "models")
    base_args = ["--load-format", "dummy", "--attention-backend", "triton", "--context-length", str(a.context_length),
                 "--cuda-graph-max-bs", str(a.cuda_graph_max_bs), *a.extra_server_args.split()]
    if a.static_gib:
        memory = f"sequential start, {a.static_gib} GiB static (weights + KV) per server"
    else:
        base_args += ["--max-total-tokens", str(a.max_total_tokens), "--mem-fraction-static", str(a.mem_fraction_static)]
        memory = f"parallel start, --max-total-tokens {a.max_total_tokens}"
    servers = {}
    for arm in arms:
        env, extra = arm_config(arm, draft)
        servers[arm] = srv.make_server(arm, target, a.out / "logs", [*base_args, *extra], env=env)
    result: Dict[str, Any] = {
        "model": a.model, "model_summary": fullsize.summary(a.model), "date": datetime.date.today().isoformat(),
        "versions": versions(), "repeat": a.repeat, "server_args": base_args, "memory": memory,
        "workloads": {w: table[w] for w in wls}, "runs": {}, "servers": {}, "errors": [], "note": a.note,
        "base": a.base,
        # knobs every arm inherits (arms' own env is per server below)
        "common_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SGLANG_") or k.startswith("SGL_")},
    }
    json_path = a.out / f"serve-{a.model}.json"

    def save():
        result["summary"] = {w: {arm: summarise(rs) for arm, rs in by.items() if rs} for w, by in result["runs"].items()}
        result["compare"] = compare(result, result["base"])
        result["spec"] = spec_breakeven(result)
        for arm, s in servers.items():
            result["servers"][arm] = {"env": s.env, "ready_s": s.ready_s, "pools": s.pool_sizes(),
                                      "checks_fired": s.checks_fired()[:20], "alive": s.alive()}
        json_path.write_text(json.dumps(result, indent=1))
        write_report(result, json_path)

    def run_profiles():
        for item, arm, w, delay in profiles:
            if time.time() - t_start > a.deadline_s:
                result["errors"].append(f"deadline: profile {item} not run")
                break
            try:
                result.setdefault("profiles", {})[item] = profile_once(
                    servers[arm], target, table[w], a.out / "logs" / f"profile-{w}-{arm}", a.profile_steps,
                    delay, a.bench_timeout, a.profile_activities.split(","))
            except Exception as e:
                result["errors"].append(f"profile {item}: {type(e).__name__}: {str(e)[:400]}")
            save()

    try:
        if a.static_gib:
            srv.start_sequential(list(servers.values()), a.static_gib)
        else:
            srv.start_parallel(list(servers.values()))
        print(f"servers ready: {[(k, s.ready_s) for k, s in servers.items()]}", flush=True)
        if a.profiles_first:
            run_profiles()
        for w in wls:
            for rep in range(a.repeat):
                wl_arms = only.get(w, arms)
                order = wl_arms if rep % 2 == 0 else wl_arms[::-1]
                for arm in order:
                    if time.time() - t_start > a.deadline_s:
                        result["errors"].append(f"deadline: {w} rep {rep} {arm} and later runs not started")
                        raise _Deadline
                    s = servers[arm]
                    try:
                        r = bench_once(s, target, table[w], 1000 + rep, a.out / "logs" / f"{w}-{arm}-{rep}", a.bench_timeout)
                        result["runs"].setdefault(w, {}).setdefault(arm, []).append(r)
                        print(f"{w} rep{rep} {arm}: TTFT {r['median_ttft_ms']:.1f} TPOT {r['median_tpot_ms']:.2f} "
                              f"dur {r['duration']:.2f} accept {r['accept_length']}", flush=True)
                    except Exception as e:
                        result["errors"].append(f"{w} rep {rep} {arm}: {type(e).__name__}: {str(e)[:400]}")
                        print(result["errors"][-1], flush=True)
                save()
        if not a.profiles_first:
            run_profiles()
    except _Deadline:
        pass
    except Exception as e:
        result["errors"].append(f"{type(e).__name__}: {str(e)[:1500]}")
    finally:
        save()
        srv.stop_all(list(servers.values()))
        save()
    print(json_path.with_suffix(".md").read_text())
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
