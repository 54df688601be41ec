"""Re-evaluate a recorded ``gpu-suite.json`` offline (no GPU) with the current comparison rule.

The GPU tests skip without CUDA; this applies ``suite.comparisons`` (per-variant
thresholds ``engine.MIN_MARGIN``, see runs/numerics-calibration.md) to the
stored tokens/margins and prints each comparison's verdict the way
test/gpu/test_engine_plugin.py and test_engine_spec.py assert it.

``python bench/reevaluate_gpu_suite.py /tmp/r3/gpu-suite.json [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sglang_gemma4.testing import suite

MIN_STRICT_FRACTION = 0.35  # test_engine_plugin.MIN_STRICT_FRACTION / test_engine_spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite_json", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    doc = json.loads(a.suite_json.read_text())
    comps = suite.comparisons(doc.get("results") or {})
    rows, bad = {}, 0
    for key, c in comps.items():
        if "error" in c:
            verdict = f"ERROR {c['error']}"
        else:
            frac_ok = c["strict_fraction"] >= MIN_STRICT_FRACTION or key.startswith("agree")
            verdict = "PASS" if c["ok"] and frac_ok else ("FAIL mismatch" if not c["ok"] else "FAIL too few decisive tokens")
        bad += not verdict.startswith("PASS")
        rows[key] = {"verdict": verdict, **{k: c.get(k) for k in ("ref", "test", "min_margin", "compared", "total", "strict_fraction", "mismatches", "excused")}}
        print(f"{key:18s} {verdict:30s} min_margin={c.get('min_margin')} decisive compared "
              f"{c.get('compared')}/{c.get('total')} ({(c.get('strict_fraction') or 0):.1%})")
        for m in c.get("mismatches") or []:
            print(f"    mismatch {m}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
