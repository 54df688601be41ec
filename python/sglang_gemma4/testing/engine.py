"""Run a real ``sglang.Engine`` on a checkpoint in a fresh subprocess, greedily.

Why a subprocess per engine: SGLang loads plugins, reads env knobs and applies
hooks once per process, so "plugin on" vs "plugin off" (``SGLANG_PLUGINS``)
or ``SGLANG_GEMMA4_*=0/1`` are only comparable across processes; a crashed or
hung engine must not take the test session with it (timeout + process-group
kill, log kept on disk); and the parent (pytest) never imports SGLang.

One engine serves a list of :class:`Job` s (engine start is 30-50 s, the first
request on a fresh host ~80 s of JIT). :func:`greedy` is the one-job
shorthand with the documented return keys; :func:`run_engine` the general one;
:func:`run_many` runs several engine configurations, a few concurrently on
one GPU.

SGLang's own consistency checks are switched on through env (``checks=``,
see :data:`CHECK_ENVS`): ``full`` (default) = the idle-time KV/req pool leak
check, set to *warn* so one leak does not kill the remaining jobs, plus the
async NaN/OOB asserts; ``strict`` adds the per-iteration pool accounting and
physical KV page invariants. Any of their messages in the child's log is
returned in ``checks_fired``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

# Settings seen working with SGLang 0.5.17 on an H200 (gpu-bundle README),
# with decode CUDA graphs on.
DEFAULT_ENGINE_KWARGS: Dict[str, Any] = dict(
    skip_tokenizer_init=True,
    attention_backend="triton",
    sampling_backend="pytorch",
    grammar_backend="none",
    # GPU_ENGINE_MEM_FRACTION lowers it when several test files share one GPU at once.
    mem_fraction_static=float(os.environ.get("GPU_ENGINE_MEM_FRACTION", "0.3")),
    max_total_tokens=8192,
    max_running_requests=8,
    context_length=1024,
    disable_cuda_graph=False,
    cuda_graph_max_bs_decode=8,
    disable_prefill_cuda_graph=True,
    random_seed=0,
)

# FROZEN_KV_MTP as the project benchmarks it (NEXTN is promoted for a
# Gemma4AssistantForCausalLM draft).
SPEC_KWARGS: Dict[str, Any] = dict(
    speculative_algorithm="NEXTN",
    speculative_num_steps=3,
    speculative_eagle_topk=1,
    speculative_num_draft_tokens=4,
)

CHECK_ENVS: Dict[str, Dict[str, str]] = {
    "none": {},
    # near-free: idle-time pool accounting, warn instead of crash
    "idle": {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "0"},
    "full": {
        "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "0",
        "SGLANG_ENABLE_ASYNC_ASSERT": "1",  # NaN / OOB index probes (device-side asserts)
        "SGLANG_INVARIANT_CHECK": "1",  # WARN
    },
    # + per-iteration pool accounting (asserts: kills the engine on the first
    # mismatch) and physical KV page invariants (owner pages not free, no
    # double free); not the suite default until seen clean on this setup
    "strict": {
        "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "0",
        "SGLANG_ENABLE_ASYNC_ASSERT": "1",
        "SGLANG_INVARIANT_CHECK": "1",
        "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
        "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
    },
}

# Messages SGLang's checks emit (scheduler_components/invariant_checker.py,
# utils/async_probe.py, utils/invariants.py in 0.5.17).
CHECK_PATTERNS = (
    r"memory leak detected",
    r"Mem Leak Detected",
    r"KV double free",
    r"KV page use-after-free",
    r"NaN detected",
    r"Inf detected",
    r"index < -?\d+ \(negative",
    r"index >= \d+ \(out of range",
    r"invariant-check",
    r"device-side assert",
)
_CHECK_RE = re.compile("|".join(CHECK_PATTERNS))
OWN_LOG_PREFIX = "[sglang-gemma4]"

OUTPUT_ROOT_ENV = "OUT"
CHILD_MODULE = "sglang_gemma4.testing._engine_child"
_PORT_LOCK = threading.Lock()
_NEXT_PORT = [0]
_ACTIVE: Dict[int, subprocess.Popen] = {}  # engines we started and have not reaped
_CLEANUP_INSTALLED = [False]
# Set by SIGTERM: run_many's worker threads outlive the main thread's SystemExit until the executor
# drains, and must not start the queued engines (a killed test part once kept launching them beside
# the next part).
_TERMINATING = threading.Event()


def _kill_active(*_args) -> None:
    for proc in list(_ACTIVE.values()):
        _kill_group(proc)


def _install_cleanup() -> None:
    """Engines live in their own process groups; if we are terminated (pytest
    killed by an outer ``timeout``), take them down instead of orphaning them
    on the GPU."""
    if _CLEANUP_INSTALLED[0] or threading.current_thread() is not threading.main_thread():
        return
    import atexit

    atexit.register(_kill_active)
    prev = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        _TERMINATING.set()
        _kill_active()
        if callable(prev):
            prev(signum, frame)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    _CLEANUP_INSTALLED[0] = True


@dataclasses.dataclass
class Job:
    """One batch of prompts served by an engine.

    ``margins``: after the timed pass, flush the cache and run the prompts
    again with ``top_logprobs_num=2`` to record each output position's top-1
    minus top-2 logprob (= logit gap). Separate pass so the timed/compared
    pass takes exactly the production path (logprobs change eligibility of
    some fast paths). ``repeat``: timed passes (tokens from the first).
    ``image_data``: per prompt, a list of image file paths / data URLs (or
    None), passed to ``Engine.generate(image_data=...)``; the prompt's ids
    hold one image token per image (see ``checkpoints.image_prompt``).
    ``warmup``: untimed passes of the same batch before the timed ones, so
    one-off costs of a new shape (Triton JIT for a new M, first use of a
    decode graph) stay out of the timings.
    """

    name: str
    prompts: List[List[int]]
    max_new_tokens: int = 16
    margins: bool = False
    repeat: int = 1
    flush_cache: bool = True
    image_data: Optional[List[Optional[List[str]]]] = None
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.image_data is not None and len(self.image_data) != len(self.prompts):
            raise ValueError(
                f"Job {self.name!r}: image_data has {len(self.image_data)} entries for {len(self.prompts)} prompts"
            )

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def spec_kwargs(draft_model_path: os.PathLike, **overrides) -> Dict[str, Any]:
    kw = dict(SPEC_KWARGS, speculative_draft_model_path=str(draft_model_path))
    kw.update(overrides)
    return kw


def mixed_prompts(n: int = 16, vocab_size: int = 2048, seed: int = 0, max_len: int = 300) -> List[List[int]]:
    """``n`` BOS-led prompts of mixed lengths (short, around the sliding window, long).

    Deterministic; ids avoid the special tokens (< 8).
    """
    import random

    from sglang_gemma4.testing.checkpoints import BOS_ID, FIRST_PROMPT_ID

    rng = random.Random(seed)
    base = [3, 5, 9, 17, 31, 33, 48, 64, 95, 128, 161, 200, 256, 300]
    lengths = [min(base[i % len(base)] + (i // len(base)) * 7, max_len) for i in range(n)]
    rng.shuffle(lengths)
    return [[BOS_ID] + [rng.randrange(FIRST_PROMPT_ID, vocab_size) for _ in range(L - 1)] for L in lengths]


def _out_root() -> Path:
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or "./gpu-out")


def alloc_port() -> int:
    """A port no other engine/server of this process holds, below Linux's ephemeral range (32768+).

    Servers started together bind their ports tens of seconds after we pick them; a port taken from
    the ephemeral range (bind to 0) can meanwhile be handed to another server's own free-port probe
    (SGLang's nccl port): EADDRINUSE at start. Picking from 20000-32767 keeps the two sources apart.
    """
    with _PORT_LOCK:
        if not _NEXT_PORT[0]:
            _NEXT_PORT[0] = 20000 + (os.getpid() * 37) % 12000
        for _ in range(2000):
            _NEXT_PORT[0] = 20000 + (_NEXT_PORT[0] + 11 - 20000) % 12768  # wrap inside 20000-32767
            port = _NEXT_PORT[0]
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise RuntimeError("no free port in 20000-32767 for an engine/server")


def _tail(path: Path, max_lines: int = 80) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 200_000))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-max_lines:])
    except OSError:
        return ""


def scan_checks(log_text: str) -> List[str]:
    """Lines of an engine log where SGLang's leak/invariant checks fired."""
    # our own lines (patch table, summaries) may name what a check catches; they are never one
    return [ln.strip()[:400] for ln in log_text.splitlines() if _CHECK_RE.search(ln) and OWN_LOG_PREFIX not in ln]


def run_engine(
    model_path: os.PathLike,
    jobs: Sequence[Job],
    env: Optional[Mapping[str, str]] = None,
    engine_kwargs: Optional[Mapping[str, Any]] = None,
    draft_model_path: Optional[os.PathLike] = None,
    *,
    name: Optional[str] = None,
    timeout: float = 480.0,
    checks: str = "full",
    log_dir: Optional[os.PathLike] = None,
    warmup: bool = True,
    lock_path: Optional[os.PathLike] = None,
) -> Dict[str, Any]:
    """Start one engine in a subprocess, run ``jobs``, return everything.

    ``lock_path``: engines given the same lock file start concurrently but run
    their warmup + jobs one at a time (``flock``), so timings of engines
    sharing a GPU are not taken under each other's load.

    Returns ``{"ok", "error", "name", "jobs": {job: {...}}, "timings",
    "plugin", "checks_fired", "log", "log_path", "engine_kwargs", "env"}``;
    each job has ``tokens``, ``timings`` (wall, tokens/s, per-request e2e),
    ``accept_length`` (speculative only), ``margins`` (if asked),
    ``meta`` (SGLang's meta_info per request, trimmed).
    """
    if checks not in CHECK_ENVS:
        raise ValueError(f"checks must be one of {sorted(CHECK_ENVS)}, got {checks!r}")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique: {names}")
    name = name or Path(model_path).name
    log_dir = Path(log_dir) if log_dir is not None else _out_root() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)  # no "=": GPU-run collectors drop such names
    log_path = log_dir / f"{safe}.log"
    kwargs = dict(DEFAULT_ENGINE_KWARGS)
    kwargs.update(engine_kwargs or {})
    if draft_model_path is not None:
        for k, v in SPEC_KWARGS.items():
            kwargs.setdefault(k, v)
        kwargs["speculative_draft_model_path"] = str(draft_model_path)
    kwargs["model_path"] = str(model_path)
    kwargs.setdefault("nccl_port", alloc_port())

    child_env = dict(os.environ)
    child_env.update(CHECK_ENVS[checks])
    child_env.update({k: str(v) for k, v in (env or {}).items()})
    child_env.setdefault("PYTHONUNBUFFERED", "1")

    _install_cleanup()
    if _TERMINATING.is_set():
        raise RuntimeError(f"engine {name} not started: this process is terminating (SIGTERM)")
    work = Path(tempfile.mkdtemp(prefix="sgl-g4-engine-"))
    req_path, res_path = work / "request.json", work / "result.json"
    req_path.write_text(
        json.dumps(
            {
                "engine_kwargs": kwargs,
                "jobs": [j.as_dict() for j in jobs],
                "warmup": warmup,
                "lock_path": None if lock_path is None else str(lock_path),
            }
        )
    )
    result: Dict[str, Any] = {}
    t0 = time.time()
    with open(log_path, "wb") as log:
        log.write(f"# engine {name}\n# env overrides {dict(env or {})} checks={checks}\n".encode())
        log.write(f"# kwargs {json.dumps(kwargs)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", CHILD_MODULE, str(req_path), str(res_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,  # own process group: a timeout kills the whole engine tree
        )
        _ACTIVE[proc.pid] = proc
        error = None
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            error = f"timeout after {timeout:.0f}s"
            _kill_group(proc)
        finally:
            _ACTIVE.pop(proc.pid, None)
    wall = time.time() - t0
    if res_path.exists():
        try:
            result = json.loads(res_path.read_text())
        except json.JSONDecodeError as e:
            error = error or f"unreadable result: {e}"
    if rc not in (0, None) and not error:
        error = f"engine process exited with {rc}"
    if not result.get("ok") and not error:
        error = result.get("error") or "engine did not finish"
    log_text = _tail(log_path, 100_000)
    result.update(
        ok=bool(result.get("ok")) and error is None,
        error=error or result.get("error"),
        name=name,
        returncode=rc,
        wall_s=round(wall, 2),
        checks=checks,
        checks_fired=scan_checks(log_text),
        log=_tail(log_path, 60),
        log_path=str(log_path),
        engine_kwargs=kwargs,
        env=dict(env or {}),
    )
    result.setdefault("jobs", {})
    result.setdefault("timings", {})
    # Next to the log: a test that fails on the GPU can be re-judged on CPU from these.
    result["result_path"] = str(log_dir / f"{safe}.result.json")
    try:
        Path(result["result_path"]).write_text(json.dumps({k: v for k, v in result.items() if k != "log"}, default=str))
    except (OSError, TypeError, ValueError) as e:
        result["result_path"] = f"not written: {e}"
    try:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    except OSError:
        pass
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group of the engine we started."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def greedy(
    model_path: os.PathLike,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 16,
    env: Optional[Mapping[str, str]] = None,
    engine_kwargs: Optional[Mapping[str, Any]] = None,
    draft_model_path: Optional[os.PathLike] = None,
    *,
    margins: bool = False,
    name: Optional[str] = None,
    timeout: float = 480.0,
    checks: str = "full",
    log_dir: Optional[os.PathLike] = None,
) -> Dict[str, Any]:
    """Greedy-generate ``prompts`` on one fresh engine.

    Returns ``tokens`` (list of lists of ints), ``timings``, ``accept_length``
    (mean over requests, speculative only, else None), ``margins`` (if asked),
    ``log`` (tail of the child's log), plus ``ok``/``error``/``checks_fired``/
    ``plugin``/``log_path``. Never raises for an engine failure: check ``ok``.
    """
    job = Job("greedy", [list(map(int, p)) for p in prompts], max_new_tokens, margins=margins)
    res = run_engine(
        model_path, [job], env, engine_kwargs, draft_model_path,
        name=name, timeout=timeout, checks=checks, log_dir=log_dir,
    )
    j = res.get("jobs", {}).get("greedy", {})
    out = {k: v for k, v in res.items() if k != "jobs"}
    out.update(
        tokens=j.get("tokens"),
        timings={**res.get("timings", {}), **j.get("timings", {})},
        accept_length=j.get("accept_length"),
        margins=j.get("margins"),
        meta=j.get("meta"),
    )
    return out


@dataclasses.dataclass
class EngineConfig:
    """One engine configuration for :func:`run_many`."""

    name: str
    model_path: str
    jobs: List[Job]
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    engine_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    draft_model_path: Optional[str] = None
    timeout: float = 480.0
    checks: str = "full"


def run_many(
    configs: Sequence[EngineConfig],
    parallel: int = 3,
    warm_first: bool = True,
    log_dir: Optional[os.PathLike] = None,
    on_result=None,
    serialize_jobs: bool = True,
) -> Dict[str, Dict[str, Any]]:
    """Run engine configurations, ``parallel`` at a time on the one GPU.

    ``warm_first``: run the first configuration alone, so its one-off kernel
    JIT fills the on-disk caches before the others start (concurrent cold
    compiles would each pay it and fight for CPU). ``serialize_jobs``: engine
    start-ups overlap, but generation runs one engine at a time (a shared
    ``flock``), so tokens/s are measured on an otherwise idle GPU.
    """
    configs = list(configs)
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique: {names}")
    results: Dict[str, Dict[str, Any]] = {}
    lock_dir = Path(tempfile.mkdtemp(prefix="sgl-g4-lock-"))
    lock = lock_dir / "gpu.lock" if serialize_jobs else None
    _install_cleanup()  # here, on the calling thread: the workers cannot install a signal handler

    def one(c: EngineConfig) -> None:
        r = run_engine(
            c.model_path, c.jobs, c.env, c.engine_kwargs, c.draft_model_path,
            name=c.name, timeout=c.timeout, checks=c.checks, log_dir=log_dir, lock_path=lock,
        )
        results[c.name] = r
        if on_result is not None:
            on_result(c.name, r)

    rest = configs
    if warm_first and configs:
        one(configs[0])
        rest = configs[1:]
    ex = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        for f in [ex.submit(one, c) for c in rest]:
            f.result()
    except BaseException:  # SIGTERM's SystemExit, or one engine's error: queued engines must not start
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    try:
        for p in lock_dir.iterdir():
            p.unlink()
        lock_dir.rmdir()
    except OSError:
        pass
    return {n: results[n] for n in names}


# --------------------------------------------------------------------------
# Comparing greedy outputs
# --------------------------------------------------------------------------

# Decisiveness thresholds (logits) per checkpoint variant, from the CPU bf16
# calibration in runs/numerics-calibration.md (bench/numerics_calibration.py):
# the p99.9 of |change of the top-1/top-2 logit gap| between two valid bf16
# paths (one forward over the sequence vs prompt + KV-cache decode), rounded
# up to 0.05; for MoE with the router in fp32 (as SGLang routes). The moe
# checkpoint (v2, "routed" init) has a k-th/(k+1)-th router score gap >= 2.2,
# so bf16 never changes its expert sets; v1's near-tied random router flipped
# ~10 % of them and needed 5.75.
MIN_MARGIN: Dict[str, float] = {"dense_ple": 0.95, "moe": 1.4}
DEFAULT_MIN_MARGIN = MIN_MARGIN["dense_ple"]


def min_margin_for(variant: str) -> float:
    return MIN_MARGIN.get(variant, DEFAULT_MIN_MARGIN)


def compare_greedy(
    ref_tokens: Sequence[Sequence[int]],
    test_tokens: Sequence[Sequence[int]],
    ref_margins: Optional[Sequence[Sequence[Optional[float]]]] = None,
    min_margin: float = DEFAULT_MIN_MARGIN,
) -> Dict[str, Any]:
    """Token equality, position by position, while both runs share a prefix.

    Greedy step ``k`` depends only on the prefix, so every position up to the
    first difference is a fair comparison. The first difference is a mismatch
    (must not happen) if the reference's top-1 margin there is at least
    ``min_margin``; below it, a different but correct bf16 kernel may flip the
    near-tie (``excused``), and everything after is conditioned on the flip.
    Without margins every position is decisive. ``compared``/``per_prompt``
    count the decisive positions checked; ``strict_fraction`` tells how much
    of the output the verdict rests on.
    """
    if len(ref_tokens) != len(test_tokens):
        raise ValueError(f"prompt count differs: {len(ref_tokens)} vs {len(test_tokens)}")
    mismatches, excused, per_prompt = [], [], []
    compared = total = 0
    for i, (r, t) in enumerate(zip(ref_tokens, test_tokens)):
        m = ref_margins[i] if ref_margins is not None else None
        total += len(r)
        n_cmp = 0
        for k, rt in enumerate(r):
            margin = None if m is None or k >= len(m) else m[k]
            decisive = margin is None or margin >= min_margin
            if k >= len(t) or t[k] != rt:
                entry = {"prompt": i, "pos": k, "ref": rt, "test": t[k] if k < len(t) else None, "margin": margin}
                (mismatches if decisive or k >= len(t) else excused).append(entry)
                break
            n_cmp += decisive
        compared += n_cmp
        per_prompt.append(n_cmp)
    return {
        "ok": not mismatches,
        "mismatches": mismatches,
        "excused": excused,
        "compared": compared,
        "total": total,
        "strict_fraction": compared / total if total else 1.0,
        "per_prompt": per_prompt,
        "min_margin": min_margin,
        "exact": [list(r) == list(t) for r, t in zip(ref_tokens, test_tokens)],
    }


def aligned_margins(job: Mapping[str, Any]) -> Optional[List[List[float]]]:
    """A job's margins, valid only while the margin pass reproduced the timed tokens.

    From the first position where the logprob pass chose another token (itself
    a sign of a near-tie) the margins belong to a different continuation: they
    become 0.0, i.e. not decisive.
    """
    margins, mtoks, toks = job.get("margins"), job.get("margin_pass_tokens"), job.get("tokens")
    if margins is None:
        return None
    out = []
    for i, row in enumerate(margins):
        t = toks[i] if toks and i < len(toks) else []
        mt = mtoks[i] if mtoks and i < len(mtoks) else t
        fixed, diverged = [], False
        for k, m in enumerate(row):
            diverged = diverged or k >= len(t) or k >= len(mt) or mt[k] != t[k]
            fixed.append(0.0 if diverged or m is None else float(m))
        out.append(fixed)
    return out


def gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False
