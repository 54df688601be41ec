"""``sglang-gemma4`` command line: ``status``, ``knobs``, ``demo``."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from typing import List, Optional

from sglang_gemma4 import __version__, registry


def versions() -> dict:
    out = {"sglang-gemma4": __version__}
    for dist in ("sglang", "torch", "triton", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as e:  # a broken CUDA install must not hide the matrix
        out["gpu"] = f"error: {e}"
    return out


def patch_matrix() -> List[registry.PatchStatus]:
    return [registry.evaluate(p) for p in registry.all_patches()]


def _table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def cmd_status(args) -> int:
    ver = versions()
    matrix = patch_matrix()
    if args.json:
        print(json.dumps({"versions": ver, "patches": [s.as_dict() for s in matrix]}, indent=2))
    else:
        print("  ".join(f"{k}={v}" for k, v in ver.items()))
        rows = [[s.name, f"{s.knob}={s.value}", s.state, s.reason] for s in matrix]
        print(_table(rows, ["patch", "knob", "state", "reason"]))
    return 1 if any(s.state == registry.ERROR for s in matrix) else 0


def knob_table_markdown() -> str:
    lines = ["| patch | knob | default | effect |", "|---|---|---|---|"]
    for p in registry.all_patches():
        d = "unset" if p.default is None else ("1" if p.default else "0")
        lines.append(f"| `{p.name}` | `{p.knob}` | {d} | {p.summary} |")
    return "\n".join(lines)


def cmd_knobs(args) -> int:
    print(knob_table_markdown())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="sglang-gemma4", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="patch matrix against the installed SGLang")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    k = sub.add_parser("knobs", help="the knob table (markdown, as in the README)")
    k.set_defaults(fn=cmd_knobs)
    try:
        from sglang_gemma4 import demo as _demo

        _demo.add_parser(sub)
    except ImportError:
        pass
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
