"""Serving soak (issue #18): run the serving suite and record it, or rewrite the report of a recorded run.

    python bench/soak.py --out gpu-out/soak                      # GPU: every arm, JSON + markdown
    python bench/soak.py --report runs/serving-robustness-nvidia-h200.json

The suite (servers, request mix, bad inputs, fresh-host first sampled request)
is :mod:`sglang_gemma4.testing.serving_suite`; ``test/gpu/test_serving_gpu.py``
asserts on the same JSON (``SERVING_REUSE=<json>``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))


def report(res: Dict[str, Any]) -> str:
    md = [f"# Serving robustness: `python -m sglang.launch_server` under load, faults and bad input ({res.get('gpu', '?')})",
          "", f"Date {res.get('date')}; SGLang {res.get('sglang', '0.5.17')}. {res['n_requests']} requests per server at "
          f"concurrency {res['concurrency']}, context {res['context']}. Produced by `bench/soak.py` / "
          "`test/gpu/test_serving_gpu.py` (`sglang_gemma4.testing.serving_suite`).", ""]
    for k, v in (res.get("provenance") or {}).items():
        md.append(f"- {k}: {v}")
    md += ["", "## Soak (every server stayed up; /health 200 after the soak and after the bad inputs)", "",
           "| server | ready (s) | done | hung up | aborted | 400 / stream error (over context) | unexpected errors | bad length/finish | greedy compared / mismatched | leak & invariant reports | p50 / p99 latency (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in res["arms"].items():
        if "kinds" not in a:
            continue
        k = a["kinds"]
        md.append(f"| {name} | {a.get('ready_s')} | {k.get('done', 0)} | {k.get('hung_up', 0)} | {k.get('aborted', 0)} | "
                  f"{k.get('http_error', 0)} / {k.get('stream_error', 0)} | {len(a['unexpected_http_errors'])} | "
                  f"{len(a['bad_finish'])} | {a['greedy_compared']} / {len(a['greedy_mismatch'])} | "
                  f"{len(a['checks_fired'])} | {a['latency_p50_s']} / {a['latency_p99_s']} |")
    cases = {}
    for name, a in res["arms"].items():
        for c in a.get("bad_input", []):
            cases.setdefault(c["case"], {})[name] = c
    if cases:
        names = [n for n, a in res["arms"].items() if a.get("bad_input")]
        md += ["", "## Bad input (status; every one followed by /health 200 and a served request)", "",
               "| case | " + " | ".join(names) + " | message (plain) |", "|---|" + "---|" * (len(names) + 1)]
        for case, by in cases.items():
            msg = next(iter(by.values()))["body"].replace("|", "/")[:140]
            cells = [str(by[n]["status"]) + ("" if by[n]["health_after"] == 200 and by[n]["next_request_ok"] else " (!)")
                     if n in by else "-" for n in names]
            md.append(f"| {case} | " + " | ".join(cells) + f" | {msg} |")
    off = res["arms"].get("plugin_off", {}).get("id_reference")
    if off:
        md += ["", "## SGLang 0.5.17 without the plugin (reference)", ""]
        md += [f"- `{c['case']}`: status {c['status']} ({c['body'][:120]}); server alive after: {c['alive_after']}, "
               f"/health {c['health_after']}" for c in off]
    on, offp = res["arms"].get("fresh_prewarm_on"), res["arms"].get("fresh_prewarm_off")
    if on and offp:
        md += ["", "## First sampled request on an empty flashinfer JIT cache (FROZEN_KV_MTP server)", "",
               "| jit_prewarm | ready after (s) | first sampled request (s) | second (s) | start-up log |", "|---|---|---|---|---|",
               f"| off | {offp['ready_s']} | {offp['first_sampled_s']} | {offp['second_sampled_s']} | - |",
               f"| on | {on['ready_s']} | {on['first_sampled_s']} | {on['second_sampled_s']} | `{on['log_prewarm_line']}` |"]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-out/soak"))
    ap.add_argument("--report", type=Path, help="only write the markdown of this recorded JSON")
    a = ap.parse_args(argv)
    if a.report:
        res, path = json.loads(a.report.read_text()), a.report
    else:
        from sglang_gemma4.testing.serving_suite import run_suite

        a.out.mkdir(parents=True, exist_ok=True)
        res, path = run_suite(a.out), a.out / "serving-robustness.json"
    path.with_suffix(".md").write_text(report(res))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
