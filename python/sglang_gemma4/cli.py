"""``sglang-gemma4`` command line: ``status``, ``knobs``, ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import os
import sys
import warnings
from typing import List, Mapping, Optional

from sglang_gemma4 import __version__, plugin, registry

# What importing SGLang says on a machine without CUDA: about SGLang's own
# optional paths, not about this plugin (filtered in this CLI only).
_FOREIGN_WARNINGS = (
    r"Only CUDA, .* support (AWQ|GGUF)",
    r"Triton is not supported on current platform",
)
_FOREIGN_LOGS = {"torch.utils.cpp_extension": "No CUDA runtime is found"}


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_foreign_import_noise() -> None:
    for pattern in _FOREIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for name, text in _FOREIGN_LOGS.items():
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in lg.filters):
            lg.addFilter(_DropMessage(text))


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


def plugin_selection(environ: Optional[Mapping[str, str]] = None) -> dict:
    """Would SGLang 0.5.17's ``load_plugins()`` run our entry point in this environment?

    Same rules as ``sglang.srt.plugins.load_plugins_by_group``: a non-empty
    ``SGLANG_PLUGINS`` is an allow-list of entry-point names (comma-separated,
    spaces stripped; ``none`` is no special word, just a name nothing has), and
    ``SGLANG_PLATFORM`` skips the distributions of the other platform plugins.
    """
    env = os.environ if environ is None else environ
    found = list(importlib.metadata.entry_points(group=plugin.ENTRY_POINT_GROUP))
    ours = [ep for ep in found if ep.name == plugin.ENTRY_POINT_NAME]
    dists = sorted({ep.dist.name for ep in ours if ep.dist is not None})
    out = {
        "group": plugin.ENTRY_POINT_GROUP,
        "name": plugin.ENTRY_POINT_NAME,
        "value": plugin.ENTRY_POINT_VALUE,
        "installed": any(ep.value == plugin.ENTRY_POINT_VALUE for ep in ours),
        "installed_values": sorted({ep.value for ep in ours}),
        "dists": dists,
        "SGLANG_PLUGINS": env.get("SGLANG_PLUGINS"),
        "loaded": False,
        "reason": "",
    }
    raw = env.get("SGLANG_PLUGINS") or ""
    allowed = {x.strip() for x in raw.split(",") if x.strip()} if raw else None
    selected = env.get("SGLANG_PLATFORM") or ""
    if selected:
        platform = importlib.metadata.entry_points(group="sglang.srt.platforms")
        skipped = {ep.dist.name for ep in platform if ep.dist is not None and ep.name != selected}
    else:
        skipped = set()
    name = plugin.ENTRY_POINT_NAME
    shown = raw if raw.strip() == raw else repr(raw)
    if allowed is not None and name not in allowed:
        others = sorted({ep.name for ep in found if ep.name in allowed})
        loads = f"SGLang loads only {', '.join(others)}" if others else "SGLang loads no plugin"
        if allowed == {"none"} and not others:
            out["reason"] = f"SGLANG_PLUGINS={shown}: {loads}"
        else:
            out["reason"] = f"SGLANG_PLUGINS={shown} does not name {name!r}: {loads}"
    elif not ours:
        out["reason"] = (f"entry point {name!r} is not installed in group {plugin.ENTRY_POINT_GROUP}: "
                         "SGLang cannot load the plugin (pip install sglang-gemma4)")
    elif not out["installed"]:
        out["reason"] = (f"installed entry point {name!r} is {', '.join(out['installed_values'])}, "
                         f"not {plugin.ENTRY_POINT_VALUE}: SGLang would run that instead")
    elif skipped and set(dists) <= skipped:
        out["reason"] = f"SGLANG_PLATFORM={selected} skips the distribution {', '.join(dists)}"
    else:
        out["loaded"] = True
        out["reason"] = ("SGLANG_PLUGINS unset: SGLang loads every installed plugin" if allowed is None
                         else f"SGLANG_PLUGINS={shown} names {name!r}")
    return out


def patch_matrix(selection: Optional[dict] = None) -> List[registry.PatchStatus]:
    """Every patch as a launch in this environment would decide it."""
    matrix = [registry.evaluate(p) for p in registry.all_patches()]
    if selection is None or selection["loaded"]:
        return matrix
    out = []
    for s in matrix:
        why = selection["reason"]
        if s.state == registry.ERROR:  # nothing would run the check that refuses start-up
            why += f"; would be an error, but SGLang would not refuse start-up either: {s.reason}"
        out.append(dataclasses.replace(s, state=registry.EXCLUDED, reason=why))
    return out


def _selection_line(sel: dict) -> str:
    inst = (f"installed ({', '.join(sel['dists'])})" if sel["installed"] else "NOT installed")
    verdict = "loaded" if sel["loaded"] else "NOT loaded"
    return (f"entry point: group {sel['group']}, {sel['name']} = {sel['value']}: {inst}; "
            f"{verdict} by SGLang ({sel['reason']})")


def _table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def cmd_status(args) -> int:
    ver = versions()
    sel = plugin_selection()
    matrix = patch_matrix(sel)
    if args.json:
        print(json.dumps({"versions": ver, "entry_point": sel, "patches": [s.as_dict() for s in matrix]},
                         indent=2))
    else:
        print("  ".join(f"{k}={v}" for k, v in ver.items()))
        print(_selection_line(sel))
        rows = [[s.name, f"{s.knob}={s.value}", s.state, s.reason] for s in matrix]
        print(_table(rows, ["patch", "knob", "state", "reason"]))
    # excluded rows never carry ERROR: SGLang would not refuse to start
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
    _quiet_foreign_import_noise()  # before anything imports sglang
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
