"""Real ``python -m sglang.launch_server`` processes for benchmarks and serving tests.

Why processes, not ``sglang.Engine``: users run the HTTP server, and what we
prove (start-up, /health, HTTP 400s, aborts, the plugin table in each
process) lives in its launcher, tokenizer manager and scheduler processes.
One server per configuration (plugin on, ``SGLANG_PLUGINS=none``, a knob
flipped), each in its own process group with its log on disk; several can
share one GPU.

GPU memory: SGLang 0.5.17 budgets its static memory (weights + KV pool) as
``free memory before load * mem_fraction_static``. :func:`fraction_for` turns
a wanted static budget in GiB into that fraction from the free memory seen
now, so servers started one after another get equal budgets
(``start_sequential``). Servers started at once must each cap their pool with
``--max-total-tokens`` instead (``start_parallel``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from sglang_gemma4.testing.engine import CHECK_ENVS, SPEC_KWARGS, alloc_port, scan_checks

# What SGLang 0.5.17 logs about its KV pools (hybrid SWA and plain).
_POOL_RES = {
    "max_total_num_tokens": re.compile(r"max_total_num_tokens=(\d+)"),
    "full_tokens": re.compile(r"full_layer_tokens=(\d+)|SWAKVPool mem usage: [\d.]+ GB, swa size: \d+, full size: (\d+)"),
    "swa_tokens": re.compile(r"swa_layer_tokens=(\d+)|SWAKVPool mem usage: [\d.]+ GB, swa size: (\d+)"),
    "swa_pool_gb": re.compile(r"SWAKVPool mem usage: ([\d.]+) GB"),
    "max_running_requests": re.compile(r"max_running_requests=(\d+)"),
}


def spec_args(draft: os.PathLike, steps: Optional[int] = None) -> List[str]:
    """FROZEN_KV_MTP server flags: the harness's SPEC_KWARGS (NEXTN, promoted for a Gemma-4
    assistant), optionally with ``steps`` draft steps (``steps + 1`` draft tokens)."""
    kw = dict(SPEC_KWARGS, speculative_draft_model_path=str(draft))
    if steps is not None:
        kw.update(speculative_num_steps=steps, speculative_num_draft_tokens=steps + 1)
    return [x for k, v in kw.items() for x in ("--" + k.replace("_", "-"), str(v))]


def gpu_free_gib(index: int = 0) -> float:
    """Free memory of GPU ``index`` (nvidia-smi: no CUDA context in this process)."""
    out = subprocess.run(
        ["nvidia-smi", f"--id={index}", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout
    return float(out.strip().splitlines()[0]) / 1024.0


def fraction_for(static_gib: float, free_gib: float) -> float:
    if not 0 < static_gib < free_gib:
        raise ValueError(f"static budget {static_gib} GiB does not fit in {free_gib:.1f} GiB free")
    return round(static_gib / free_gib, 4)


def http(url: str, payload: Any = None, timeout: float = 60.0, raw: Optional[bytes] = None) -> Tuple[int, Any]:
    """(status, parsed JSON or text). ``raw`` sends bytes as is (malformed-JSON tests)."""
    data = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    text = body.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@dataclasses.dataclass
class Server:
    name: str
    port: int
    log: Path
    cmd: List[str]
    env: Dict[str, str]  # what differs from the parent's environment
    proc: Optional[subprocess.Popen] = None
    t_launch: float = 0.0
    ready_s: Optional[float] = None  # launch -> /health 200

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self, timeout: float = 10.0) -> int:
        try:
            return http(self.base + "/health", timeout=timeout)[0]
        except (OSError, urllib.error.URLError):
            return -1

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def checks_fired(self) -> List[str]:
        return scan_checks(self.log_text())

    def pool_sizes(self) -> Dict[str, float]:
        text, out = self.log_text(), {}
        for k, rx in _POOL_RES.items():
            m = None
            for m in rx.finditer(text):
                pass
            if m:
                v = next(g for g in m.groups() if g is not None)
                out[k] = float(v) if "." in v else int(v)
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


def make_server(
    name: str,
    model_path: os.PathLike,
    log_dir: os.PathLike,
    args: Sequence[str] = (),
    env: Optional[Mapping[str, str]] = None,
    checks: str = "none",
    port: Optional[int] = None,
) -> Server:
    """A server description (not started). ``checks``: a :data:`CHECK_ENVS` level."""
    if checks not in CHECK_ENVS:
        raise ValueError(f"checks={checks!r}; one of {', '.join(CHECK_ENVS)}")
    port = port or alloc_port()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--host", "127.0.0.1", "--port", str(port), *map(str, args)]
    if "--nccl-port" not in args:  # SGLang's own pick (bind 0) can collide with a sibling's port
        cmd += ["--nccl-port", str(alloc_port())]
    e = dict(CHECK_ENVS[checks])
    e.update(env or {})
    log = Path(log_dir) / f"server-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"
    return Server(name, port, log, cmd, e)


def start(server: Server) -> Server:
    server.log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(server.env)
    fh = open(server.log, "w")
    fh.write(f"# {' '.join(server.cmd)}\n# env: {json.dumps(server.env)}\n")
    fh.flush()
    server.t_launch = time.time()
    server.proc = subprocess.Popen(server.cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    return server


def wait_ready(server: Server, timeout: float = 600.0) -> Server:
    """Block until /health is 200; raise with the log tail if the server died or timed out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not server.alive():
            raise RuntimeError(f"server {server.name} exited rc={server.proc.returncode}:\n{server.log_text()[-3000:]}")
        if server.health(timeout=5) == 200:
            server.ready_s = round(time.time() - server.t_launch, 1)
            return server
        time.sleep(1.0)
    server.stop()
    raise TimeoutError(f"server {server.name} not healthy after {timeout:.0f} s:\n{server.log_text()[-3000:]}")


def start_parallel(servers: Sequence[Server], timeout: float = 600.0) -> List[Server]:
    for s in servers:
        start(s)
    return [wait_ready(s, timeout) for s in servers]


def start_sequential(servers: Sequence[Server], static_gib: float, timeout: float = 600.0,
                     gpu: int = 0) -> List[Server]:
    """Start one after another, each with ``static_gib`` GiB of static memory (weights + KV)."""
    for s in servers:
        frac = fraction_for(static_gib, gpu_free_gib(gpu))
        s.cmd += ["--mem-fraction-static", str(frac)]
        wait_ready(start(s), timeout)
    return list(servers)


def stop_all(servers: Sequence[Server]) -> None:
    for s in servers:
        s.stop()
