"""``sglang-gemma4 demo``: a tiny Gemma-4 served by SGLang with the plugin, end to end.

Builds (or reuses) a random-weight checkpoint, starts ``sglang.Engine`` in a
subprocess with the plugin loaded, generates greedily and prints the tokens,
the timings and the patch matrix. ``--spec`` adds FROZEN_KV_MTP with the
matching assistant. Without a CUDA GPU it says so in one line and runs the
kernel self-test under the Triton interpreter instead.

Nothing here imports torch or triton at module level: ``sglang-gemma4 status``
imports this module, and the self-test path must set ``TRITON_INTERPRET=1``
before triton is first imported.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List


def add_parser(subparsers) -> None:
    d = subparsers.add_parser("demo", help="serve a tiny random-weight Gemma-4 with the plugin (GPU), else kernel self-test")
    d.add_argument("--variant", default="dense_ple", help="checkpoint variant (default dense_ple)")
    d.add_argument("--spec", action="store_true", help="FROZEN_KV_MTP with the variant's assistant draft")
    d.add_argument("--max-new-tokens", type=int, default=16)
    d.add_argument("--prompts", type=int, default=4, help="number of mixed-length prompts")
    d.add_argument("--ckpt-root", default=None, help="checkpoint cache (default ~/.cache/sglang-gemma4/ckpt)")
    d.add_argument("--no-cuda-graph", action="store_true", help="disable decode CUDA graphs")
    d.add_argument("--json", action="store_true", help="print the full result as JSON")
    d.set_defaults(fn=cmd_demo)


def _has_cuda() -> bool:
    # torch import does not import triton (checked for torch 2.11)
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _selftest() -> int:
    """Exit code 1 when any kernel fails (or the self-test cannot run at all)."""
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from sglang_gemma4.kernels.selftest import run_selftest
    except ImportError as e:
        print(f"kernel self-test unavailable: {e}", file=sys.stderr)
        return 1
    rows = run_selftest()
    from sglang_gemma4.cli import _table

    print(_table([[n, "ok" if ok else "FAIL", f"{err:.3g}"] for n, ok, err in rows], ["kernel", "result", "max |err|"]))
    failed = [n for n, ok, _ in rows if not ok]
    if failed or not rows:
        print(f"kernel self-test FAILED: {len(failed)} of {len(rows)} kernels", file=sys.stderr)
        return 1
    return 0


def _print_matrix() -> dict:
    from sglang_gemma4.cli import _selection_line, _table, patch_matrix, plugin_selection, versions

    print("  ".join(f"{k}={v}" for k, v in versions().items()))
    sel = plugin_selection()
    print(_selection_line(sel))
    rows = [[s.name, f"{s.knob}={s.value}", s.state, s.reason] for s in patch_matrix(sel)]
    print(_table(rows, ["patch", "knob", "state", "reason"]))
    return sel


def cmd_demo(args) -> int:
    if not _has_cuda():
        print("sglang-gemma4 demo: no CUDA GPU here; running the kernel self-test under the Triton interpreter instead")
        return _selftest()

    from sglang_gemma4.testing import checkpoints, engine

    target = checkpoints.build(args.variant, args.ckpt_root)
    draft = None
    if args.spec:
        if args.variant not in checkpoints.DRAFT_FOR:
            print(f"--spec needs a variant with an assistant: {', '.join(checkpoints.DRAFT_FOR)}", file=sys.stderr)
            return 2
        draft = checkpoints.build(checkpoints.DRAFT_FOR[args.variant], args.ckpt_root)
    kw = dict(checkpoints.ENGINE_KWARGS.get(args.variant, {}))
    if args.no_cuda_graph:
        kw["disable_cuda_graph"] = True
    vocab = checkpoints.spec(args.variant).text.vocab_size
    prompts = engine.mixed_prompts(args.prompts, vocab, seed=0)
    print(f"checkpoint {target}" + (f"\ndraft      {draft}" if draft else ""))
    print(f"starting sglang.Engine ({'FROZEN_KV_MTP, ' if draft else ''}{args.prompts} prompts, {args.max_new_tokens} new tokens) ...", flush=True)
    r = engine.greedy(
        target, prompts, args.max_new_tokens, engine_kwargs=kw, draft_model_path=draft,
        name=f"demo-{args.variant}{'-spec' if draft else ''}", checks="idle",
    )
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "log"}, indent=1, default=str))
    if not r["ok"]:
        print(f"engine failed: {r['error']}\n--- log tail ({r['log_path']}) ---\n{r['log']}", file=sys.stderr)
        return 1
    for p, t in zip(prompts, r["tokens"]):
        print(f"prompt[{len(p):3d} tok] ... {p[-4:]} -> {t}")
    tm = r["timings"]
    line = (
        f"engine start {tm.get('engine_start_s', 0):.1f}s, warmup {tm.get('warmup_s', 0):.1f}s, "
        f"generate {tm.get('best_wall_s', 0):.3f}s, {tm.get('tokens_per_s') or 0:.1f} tok/s"
    )
    if r.get("accept_length") is not None:
        line += f", accept length {r['accept_length']:.2f}"
    print(line)
    failures = []
    if r["checks_fired"]:
        print(f"SGLang checks fired: {r['checks_fired'][:3]}")
        failures.append(f"{len(r['checks_fired'])} SGLang check message(s)")
    plugin = r.get("plugin")
    active: List[str] = [s["name"] for s in plugin if s["state"] == "active"] if isinstance(plugin, list) else []
    print(f"plugin in engine: {'loaded, active: ' + ', '.join(active) if isinstance(plugin, list) else plugin}")
    sel = _print_matrix()
    if sel["loaded"] and not isinstance(plugin, list):
        failures.append(f"plugin not loaded in the engine ({plugin})")
    if failures:
        print(f"demo FAILED: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0
