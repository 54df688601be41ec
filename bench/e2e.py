"""End-to-end A/B on real SGLang engines: tokens/s, per-step decode and prefill time.

Configuration A vs B in one invocation, on the tiny and/or real-width
reduced-depth checkpoints (sglang_gemma4.testing.checkpoints):

    python bench/e2e.py --out runs                                  # plugin on vs off (SGLANG_PLUGINS)
    python bench/e2e.py --ab SGLANG_GEMMA4_YOCO=0,1 --variants e2b_w,e4b_w
    python bench/e2e.py --spec --variants agree_target,dense_ple    # FROZEN_KV_MTP off vs on
    python bench/e2e.py --quick --out $OUT/runs                     # e2b_w only, small sizes

Per (variant, config) one engine runs, for each batch size B: B prompts of
--prompt-len tokens with max_new_tokens=1 (prefill) and 1+N (prefill + N
decode steps), best of --repeat, cache flushed before each pass. Decode step
time = (t(1+N) - t(1)) / N. An empty knob value means "unset". The engines
of one variant start concurrently (--parallel) but generate one at a time
(a shared lock), so every timing is taken on an otherwise idle GPU. Writes
e2e-<gpu>.json/.md/.png (GPU, versions, date) under --out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from sglang_gemma4.testing import checkpoints
from sglang_gemma4.testing.engine import EngineConfig, Job, run_many, spec_kwargs

FULL_VARIANTS = ["dense_ple", "e2b_w", "e4b_w", "moe26b_w"]
QUICK_VARIANTS = ["e2b_w"]


def parse_ab(text: str) -> Tuple[str, List[str]]:
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", text or "")
    if not m:
        raise SystemExit(f"--ab must look like KNOB=a,b (got {text!r})")
    vals = m.group(2).split(",")
    if len(vals) != 2:
        raise SystemExit(f"--ab needs exactly two comma-separated values (got {vals})")
    return m.group(1), vals


def configs_for(variant: str, args, ckpt_root) -> List[Tuple[str, EngineConfig]]:
    path = str(checkpoints.build(variant, ckpt_root))
    vocab = checkpoints.spec(variant).text.vocab_size
    jobs = _jobs(vocab, args)
    kw = dict(checkpoints.ENGINE_KWARGS.get(variant, {}))
    kw.update(max_running_requests=max(args.batch), cuda_graph_max_bs_decode=max(args.batch))
    kw.update(context_length=max(1024, args.prompt_len + args.decode_tokens + 64))
    kw.update(max_total_tokens=max(8192, max(args.batch) * (args.prompt_len + args.decode_tokens + 64) * 2))
    out = []
    if args.spec:
        if variant not in checkpoints.DRAFT_FOR:
            print(f"[e2e] {variant}: no assistant, skipped for --spec", flush=True)
            return []
        draft = str(checkpoints.build(checkpoints.DRAFT_FOR[variant], ckpt_root))
        for label, extra in (("spec off", {}), ("spec on", spec_kwargs(draft))):
            out.append((label, EngineConfig(f"{variant}:{label}", path, jobs, engine_kwargs={**kw, **extra},
                                             timeout=args.timeout, checks=args.checks)))
        return out
    knob, vals = parse_ab(args.ab)
    for v in vals:
        label = f"{knob}={v if v else 'unset'}"
        out.append((label, EngineConfig(f"{variant}:{label}", path, jobs, env={knob: v}, engine_kwargs=kw,
                                         timeout=args.timeout, checks=args.checks)))
    return out


def _jobs(vocab: int, args) -> List[Job]:
    import random

    rng = random.Random(0)
    jobs = []
    for b in args.batch:
        prompts = [[checkpoints.BOS_ID] + [rng.randrange(checkpoints.FIRST_PROMPT_ID, vocab) for _ in range(args.prompt_len - 1)]
                   for _ in range(b)]
        jobs.append(Job(f"prefill_bs{b}", prompts, 1, repeat=args.repeat))
        jobs.append(Job(f"decode_bs{b}", prompts, 1 + args.decode_tokens, repeat=args.repeat))
    return jobs


def metrics(result: Dict[str, Any], batch: List[int], n: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {"ok": result.get("ok"), "error": result.get("error"), "rows": {}}
    jobs = result.get("jobs") or {}
    for b in batch:
        p, d = jobs.get(f"prefill_bs{b}"), jobs.get(f"decode_bs{b}")
        if not p or not d:
            continue
        tp, td = p["timings"]["best_wall_s"], d["timings"]["best_wall_s"]
        out["rows"][b] = {
            "prefill_ms": 1e3 * tp,
            "decode_step_ms": 1e3 * (td - tp) / n if n else None,
            "tokens_per_s": d["timings"]["tokens_per_s"],
            "accept_length": d.get("accept_length"),
        }
    return out


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


def _markdown(doc: Dict[str, Any]) -> str:
    lines = [f"# e2e A/B: {doc['ab']}", "", f"{doc['gpu']} | {doc['date']} | "
             + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if k != "gpu"), "",
             f"prompt {doc['prompt_len']} tokens, {doc['decode_tokens']} decode steps, best of {doc['repeat']}", "",
             "| variant | batch | config | prefill ms | decode step ms | tok/s | accept | B/A tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, per in doc["results"].items():
        labels = list(per)
        for b in doc["batch"]:
            base = (per[labels[0]]["rows"].get(b) or {}).get("tokens_per_s")
            for lab in labels:
                r = per[lab]
                row = r["rows"].get(b)
                if not row:
                    lines.append(f"| {variant} | {b} | {lab} | failed: {r.get('error')} | | | | |")
                    continue
                ratio = f"{row['tokens_per_s'] / base:.3f}" if base and lab != labels[0] else ""
                acc = f"{row['accept_length']:.2f}" if row.get("accept_length") else ""
                lines.append(f"| {variant} | {b} | {lab} | {row['prefill_ms']:.2f} | {row['decode_step_ms']:.3f} | "
                             f"{row['tokens_per_s']:.1f} | {acc} | {ratio} |")
    return "\n".join(lines) + "\n"


def _plot(doc: Dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = list(doc["results"])
    fig, axes = plt.subplots(1, max(1, len(variants)), figsize=(4.5 * max(1, len(variants)), 3.6), squeeze=False)
    for ax, v in zip(axes[0], variants):
        per = doc["results"][v]
        width = 0.8 / max(1, len(per))
        for i, (lab, r) in enumerate(per.items()):
            xs = [j + i * width for j, b in enumerate(doc["batch"])]
            ys = [(r["rows"].get(b) or {}).get("decode_step_ms") or 0 for b in doc["batch"]]
            ax.bar(xs, ys, width, label=lab)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(doc["batch"]))], [f"bs {b}" for b in doc["batch"]])
        ax.set_title(v)
        ax.set_ylabel("decode step (ms)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{doc['ab']} on {doc['gpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--variants", default=None, help=f"comma list (default {','.join(FULL_VARIANTS)}; --quick: {','.join(QUICK_VARIANTS)})")
    ap.add_argument("--ab", default="SGLANG_PLUGINS=,none", help="KNOB=a,b (empty = unset); default: plugin on vs off")
    ap.add_argument("--spec", action="store_true", help="A/B = FROZEN_KV_MTP off/on (variants with an assistant)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=2, help="engines of one variant run concurrently")
    ap.add_argument("--timeout", type=float, default=420)
    ap.add_argument("--checks", default="none", choices=("none", "idle", "full", "strict"))
    ap.add_argument("--quick", action="store_true", help="e2b_w only, 256-token prompts, 32 steps, best of 2")
    ap.add_argument("--ckpt-root", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.prompt_len, args.decode_tokens, args.repeat = 256, 32, 2
    args.batch = [int(b) for b in args.batch.split(",")]
    variants = (args.variants.split(",") if args.variants else (QUICK_VARIANTS if args.quick else FULL_VARIANTS))
    for v in variants:
        checkpoints.spec(v)  # unknown names fail before any engine starts
    ab = "FROZEN_KV_MTP off/on" if args.spec else args.ab
    if not args.spec:
        parse_ab(args.ab)

    from sglang_gemma4.cli import versions

    gpu = _gpu_name()
    args.out.mkdir(parents=True, exist_ok=True)
    doc: Dict[str, Any] = {
        "ab": ab, "gpu": gpu, "date": _dt.datetime.now().isoformat(timespec="seconds"), "versions": versions(),
        "batch": args.batch, "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
        "repeat": args.repeat, "results": {}, "raw": {},
    }
    stem = "e2e-" + re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    for v in variants:
        pairs = configs_for(v, args, args.ckpt_root)
        if not pairs:
            continue
        print(f"[e2e] {v}: {', '.join(l for l, _ in pairs)}", flush=True)
        res = run_many([c for _, c in pairs], parallel=args.parallel, warm_first=False, log_dir=args.out / "e2e-logs")
        doc["results"][v] = {lab: metrics(res[c.name], args.batch, args.decode_tokens) for lab, c in pairs}
        doc["raw"][v] = {lab: {k: x for k, x in res[c.name].items() if k not in ("log",)} for lab, c in pairs}
        for lab, c in pairs:
            if not res[c.name]["ok"]:
                print(f"[e2e] {c.name} failed: {res[c.name]['error']} (log {res[c.name]['log_path']})", flush=True)
        (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    md = _markdown(doc)
    (args.out / f"{stem}.md").write_text(md)
    plotted = _plot(doc, args.out / f"{stem}.png")
    print(md)
    print(f"[e2e] wrote {args.out / stem}.json/.md" + ("/.png" if plotted else " (no matplotlib: no .png)"))
    ok = all(r["ok"] for per in doc["results"].values() for r in per.values())
    return 0 if ok and doc["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
