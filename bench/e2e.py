"""End-to-end A/B on real SGLang engines: tokens/s, per-step decode and prefill time.

Configuration A vs B in one invocation, on the tiny and/or real-width
reduced-depth checkpoints (sglang_gemma4.testing.checkpoints):

    python bench/e2e.py --out runs                                  # plugin on vs off (SGLANG_PLUGINS)
    python bench/e2e.py --ab SGLANG_GEMMA4_YOCO=0,1 --variants e2b_w,e4b_w
    python bench/e2e.py --spec --variants agree_target,dense_ple    # FROZEN_KV_MTP off vs on
    python bench/e2e.py --with-spec --variants agree_target --ab SGLANG_FROZEN_KV_MTP_V2=0,1   # v1 vs v2
    python bench/e2e.py --quick --out $OUT/runs                     # e2b_w only, small sizes

Per (variant, config) one engine runs, for each batch size B, the same B
prompts of --prompt-len tokens as ONE generate call (a list of prompts) with
max_new_tokens = 1 (prefill), 1+N and 1+2N (N = --decode-tokens); each job
first runs one untimed pass of the same batch (Triton JIT for a new M, first
use of the bs-B decode graph), then --repeat timed passes (best kept), cache
flushed before each pass. prefill = t(1); decode step = (t(1+2N) - t(1+N)) / N,
a difference of two runs that share the prefill and the first N steps, so
prefill, the prefill->decode switch and pipeline fill cancel.

Validity (a row that fails is marked INVALID and the exit code is 1): the B
requests must really have been decoded together. Checked from the engine log
between the child's job markers (max ``#running-req`` of the scheduler's
decode lines == B, no "Retract requests", decode lines on the CUDA graph) and
from SGLang's per-request e2e latency (all B finish together). The KV pool is
sized so B requests fit: the SWA pool is max_total_tokens * swa_full_tokens_ratio,
and the plugin's swa_ratio patch sets 0.15 on MoE checkpoints, so
max_total_tokens is scaled by 1/0.15 (the 2026-11-29 H200 run had
max_total_tokens=10240 -> a 1536-token SWA pool that admitted 2 of 8
requests at a time: "decode step 161 ms at bs 8").

An empty knob value means "unset". The engines of one variant start
concurrently (--parallel) but generate one at a time (a shared lock), so every
timing is taken on an otherwise idle GPU. Writes e2e-<gpu>.json/.md/.png (GPU,
versions, date) under --out. Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sglang_gemma4.testing import checkpoints
from sglang_gemma4.patches.swa_ratio import MOE_RATIO
from sglang_gemma4.testing.engine import EngineConfig, Job, gpu_available, run_many, spec_kwargs

# The smallest swa_full_tokens_ratio any compared configuration may run with
# (the swa_ratio patch on MoE); SGLang's own default is 0.8.
SWA_RATIO_FLOOR = MOE_RATIO
# Per-request KV slack beyond prompt + generated tokens (pages, spec drafts).
KV_SLACK = 64
JOB_MARK = "[sglang-gemma4 job]"  # printed by sglang_gemma4.testing._engine_child
# all B requests of one generate call finish within this fraction of the slowest
MAX_LATENCY_SPREAD = 0.10

FULL_VARIANTS = ["dense_ple", "e2b_w", "e4b_w", "moe26b_w"]
QUICK_VARIANTS = ["e2b_w"]
# (deeper, shallower, real depth): same layer kinds at two depths, so the decode-step difference
# over the layer difference is the per-layer time and the rest is depth-independent (embedding,
# lm_head over 262k vocab, sampling, launches); real depth: 26B-A4B has 30 decoder layers.
DEPTH_PAIRS = [("moe26b_w8", "moe26b_w", 30)]


def per_layer(doc: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per-layer decode time, fixed cost and the step projected to real depth, per arm and batch,
    for every DEPTH_PAIRS pair present in ``doc``; with the arms' ratio at real depth."""
    out = []
    for deep, shallow, real in DEPTH_PAIRS:
        if deep not in doc["results"] or shallow not in doc["results"]:
            continue
        n_deep = len(checkpoints.spec(deep).text.layer_types)
        n_shallow = len(checkpoints.spec(shallow).text.layer_types)
        labels = [lab for lab in doc["results"][shallow] if lab in doc["results"][deep]]
        for b in doc["batch"]:
            rows = {}
            for lab in labels:
                d = (doc["results"][deep][lab]["rows"].get(b) or {})
                sh = (doc["results"][shallow][lab]["rows"].get(b) or {})
                sd, ss = d.get("decode_step_ms"), sh.get("decode_step_ms")
                if sd is None or ss is None or not (d.get("valid") and sh.get("valid")):
                    continue
                layer = (sd - ss) / (n_deep - n_shallow)
                fixed = ss - n_shallow * layer
                rows[lab] = {"layer_ms": layer, "fixed_ms": fixed, "projected_step_ms": fixed + real * layer}
            for i, lab in enumerate(labels):
                if lab not in rows:
                    continue
                r = dict(variant=f"{shallow}/{deep}", real_depth=real, batch=b, config=lab, **rows[lab])
                base = rows.get(labels[0])
                if i and base:
                    r["layer_speedup"] = base["layer_ms"] / r["layer_ms"] if r["layer_ms"] > 0 else None
                    r["projected_step_speedup"] = base["projected_step_ms"] / r["projected_step_ms"]
                out.append(r)
    return out


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
    kw.update(engine_sizes(args))
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
    if args.with_spec:  # both arms speculative: the A/B is the knob's, e.g. FROZEN_KV_MTP v2 vs v1
        if variant not in checkpoints.DRAFT_FOR:
            print(f"[e2e] {variant}: no assistant, skipped for --with-spec", flush=True)
            return []
        kw = {**kw, **spec_kwargs(str(checkpoints.build(checkpoints.DRAFT_FOR[variant], ckpt_root)))}
    knob, vals = parse_ab(args.ab)
    for v in vals:
        label = f"{knob}={v if v else 'unset'}"
        out.append((label, EngineConfig(f"{variant}:{label}", path, jobs, env={knob: v}, engine_kwargs=kw,
                                         timeout=args.timeout, checks=args.checks)))
    return out


def per_request_tokens(args) -> int:
    return args.prompt_len + 1 + 2 * args.decode_tokens + KV_SLACK


def engine_sizes(args) -> Dict[str, Any]:
    """Engine limits so that max(batch) requests are admitted and decoded together.

    SGLang admits a request only if its (sliding-window capped) tokens fit the
    SWA pool, max_total_tokens * swa_full_tokens_ratio; too small a pool does
    not fail, it serialises the batch and retracts requests mid-decode.
    """
    b = max(args.batch)
    need = b * per_request_tokens(args)
    total = max(8192, math.ceil(2 * need / SWA_RATIO_FLOOR / 1024) * 1024)
    return dict(
        max_running_requests=b,
        cuda_graph_max_bs_decode=b,
        context_length=max(1024, per_request_tokens(args)),
        max_total_tokens=total,
        chunked_prefill_size=max(8192, b * args.prompt_len),  # one prefill batch for the whole batch
    )


def _jobs(vocab: int, args) -> List[Job]:
    import random

    rng = random.Random(0)
    jobs = []
    n = args.decode_tokens
    for b in args.batch:
        prompts = [[checkpoints.BOS_ID] + [rng.randrange(checkpoints.FIRST_PROMPT_ID, vocab) for _ in range(args.prompt_len - 1)]
                   for _ in range(b)]
        for name, new in ((f"prefill_bs{b}", 1), (f"decode{n}_bs{b}", 1 + n), (f"decode{2 * n}_bs{b}", 1 + 2 * n)):
            jobs.append(Job(name, prompts, new, repeat=args.repeat, warmup=1))
    return jobs


_DECODE_RE = re.compile(r"Decode batch.*?#running-req: (\d+)")
_PREFILL_RE = re.compile(r"Prefill batch.*?#new-seq: (\d+)")
_GRAPH_RE = re.compile(r"cuda graph: (True|False)")


def job_log_stats(log_text: str) -> Dict[str, Dict[str, Any]]:
    """Scheduler evidence per job: the lines between the child's job markers."""
    out: Dict[str, Dict[str, Any]] = {}
    cur: Optional[Dict[str, Any]] = None
    for line in log_text.splitlines():
        if JOB_MARK in line:
            parts = line.split(JOB_MARK, 1)[1].split()
            if len(parts) >= 2 and parts[0] == "start":
                cur = out.setdefault(parts[1], {"decode_lines": 0, "max_running": 0, "prefill_batches": 0,
                                                 "max_new_seq": 0, "retractions": 0, "eager_decode_lines": 0})
            elif len(parts) >= 2 and parts[0] == "end":
                cur = None
            continue
        if cur is None:
            continue
        m = _DECODE_RE.search(line)
        if m:
            cur["decode_lines"] += 1
            cur["max_running"] = max(cur["max_running"], int(m.group(1)))
            g = _GRAPH_RE.search(line)
            if g and g.group(1) == "False":
                cur["eager_decode_lines"] += 1
        m = _PREFILL_RE.search(line)
        if m:
            cur["prefill_batches"] += 1
            cur["max_new_seq"] = max(cur["max_new_seq"], int(m.group(1)))
        if "Retract requests" in line:
            cur["retractions"] += 1
    return out


def _spread(lat: List[float]) -> Optional[float]:
    return (max(lat) - min(lat)) / max(lat) if lat and max(lat) > 0 else None


def _read_log(result: Dict[str, Any]) -> str:
    try:
        return Path(result.get("log_path") or "").read_text(errors="replace")
    except OSError:
        return result.get("log") or ""


def metrics(result: Dict[str, Any], batch: List[int], n: int, args=None) -> Dict[str, Any]:
    out: Dict[str, Any] = {"ok": result.get("ok"), "error": result.get("error"), "rows": {}}
    jobs = result.get("jobs") or {}
    stats = job_log_stats(_read_log(result))
    info = result.get("server_info") if isinstance(result.get("server_info"), dict) else {}
    swa_tokens = None
    if info.get("max_total_num_tokens") and info.get("swa_full_tokens_ratio"):
        swa_tokens = int(info["max_total_num_tokens"] * info["swa_full_tokens_ratio"])
    out["swa_pool_tokens"] = swa_tokens
    for b in batch:
        p, d1, d2 = (jobs.get(k) for k in (f"prefill_bs{b}", f"decode{n}_bs{b}", f"decode{2 * n}_bs{b}"))
        if not p or not d1 or not d2:
            continue
        tp, t1, t2 = (j["timings"]["best_wall_s"] for j in (p, d1, d2))
        step = (t2 - t1) / n if n else None
        problems = []
        for name, j in ((f"prefill_bs{b}", p), (f"decode{n}_bs{b}", d1), (f"decode{2 * n}_bs{b}", d2)):
            sp = _spread(j["timings"].get("e2e_latency_s") or [])
            if b > 1 and sp is not None and sp > MAX_LATENCY_SPREAD:
                problems.append(f"{name}: request latencies spread {100 * sp:.0f} %")
            st = stats.get(name)
            if st is None:
                continue
            if st["retractions"]:
                problems.append(f"{name}: {st['retractions']} retractions")
            if name != f"prefill_bs{b}" and st["decode_lines"] and st["max_running"] < b:
                problems.append(f"{name}: at most {st['max_running']} of {b} requests decoding")
            if st["eager_decode_lines"]:
                problems.append(f"{name}: {st['eager_decode_lines']} decode log lines without CUDA graph")
            if st["prefill_batches"] and st["max_new_seq"] < b:
                problems.append(f"{name}: at most {st['max_new_seq']} of {b} prompts per prefill batch")
        if swa_tokens is not None and args is not None and swa_tokens < b * per_request_tokens(args):
            problems.append(f"SWA pool {swa_tokens} tokens < {b} x {per_request_tokens(args)}")
        if step is not None and step <= 0:
            problems.append(f"non-positive decode step ({1e3 * step:.3f} ms): timing noise exceeds N steps")
        out["rows"][b] = {
            "prefill_ms": 1e3 * tp,
            "decode_step_ms": 1e3 * step if step is not None else None,
            "decode_tokens_per_s": b / step if step and step > 0 else None,
            "tokens_per_s": d2["timings"]["tokens_per_s"],  # end to end, 1+2N tokens per request
            "accept_length": d2.get("accept_length"),
            "valid": not problems,
            "problems": problems,
            "log_stats": {k: stats.get(k) for k in (f"prefill_bs{b}", f"decode{n}_bs{b}", f"decode{2 * n}_bs{b}")},
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
             f"prompt {doc['prompt_len']} tokens; decode step = (t(1+2N) - t(1+N)) / N, N = {doc['decode_tokens']}; "
             f"one warm-up pass per job, best of {doc['repeat']}; tok/s = decode tokens/s (B / step); "
             "e2e tok/s = B(1+2N) / t(1+2N)", "",
             "| variant | batch | config | prefill ms | decode step ms | tok/s | e2e tok/s | accept | B/A tok/s | valid |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, per in doc["results"].items():
        labels = list(per)
        for b in doc["batch"]:
            base = (per[labels[0]]["rows"].get(b) or {}).get("decode_tokens_per_s")
            for lab in labels:
                r = per[lab]
                row = r["rows"].get(b)
                if not row:
                    lines.append(f"| {variant} | {b} | {lab} | failed: {r.get('error')} | | | | | | |")
                    continue
                tps = row.get("decode_tokens_per_s")
                ratio = f"{tps / base:.3f}" if base and tps and lab != labels[0] else ""
                acc = f"{row['accept_length']:.2f}" if row.get("accept_length") else ""
                step = row.get("decode_step_ms")
                valid = "yes" if row.get("valid") else "INVALID: " + "; ".join(row.get("problems") or [])
                lines.append(f"| {variant} | {b} | {lab} | {row['prefill_ms']:.2f} | "
                             f"{'n/a' if step is None else format(step, '.3f')} | "
                             f"{'n/a' if tps is None else format(tps, '.1f')} | {row['tokens_per_s']:.1f} | "
                             f"{acc} | {ratio} | {valid} |")
    pl = doc.get("per_layer") or []
    if pl:
        lines += ["", "## Per decoder layer (difference of two depths) and the step projected to real depth", "",
                  "| layers | real depth | batch | config | per-layer ms | fixed ms | projected step ms "
                  "| A/B per layer | A/B projected step |", "|---|---|---|---|---|---|---|---|---|"]
        for r in pl:
            sp = r.get("layer_speedup")
            ps = r.get("projected_step_speedup")
            lines.append(f"| {r['variant']} | {r['real_depth']} | {r['batch']} | {r['config']} | {r['layer_ms']:.4f} "
                         f"| {r['fixed_ms']:.3f} | {r['projected_step_ms']:.3f} | {'' if sp is None else f'{sp:.3f}x'} "
                         f"| {'' if ps is None else f'{ps:.3f}x'} |")
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
    ap.add_argument("--with-spec", action="store_true",
                    help="FROZEN_KV_MTP on in both arms of --ab (e.g. --ab SGLANG_FROZEN_KV_MTP_V2=0,1)")
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
    if min(args.batch) < 1 or args.decode_tokens < 1 or args.prompt_len < 2 or args.repeat < 1:
        raise SystemExit("--batch values, --decode-tokens and --repeat must be >= 1, --prompt-len >= 2")
    variants = (args.variants.split(",") if args.variants else (QUICK_VARIANTS if args.quick else FULL_VARIANTS))
    for v in variants:
        checkpoints.spec(v)  # unknown names fail before any engine starts
    if args.spec and args.with_spec:
        raise SystemExit("--spec (spec off vs on) and --with-spec (spec on in both arms) exclude each other")
    ab = "FROZEN_KV_MTP off/on" if args.spec else (f"{args.ab} (FROZEN_KV_MTP on)" if args.with_spec else args.ab)
    if not args.spec:
        parse_ab(args.ab)

    if not gpu_available():
        print("[e2e] no CUDA: nothing to run")
        return 0

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
        doc["results"][v] = {lab: metrics(res[c.name], args.batch, args.decode_tokens, args) for lab, c in pairs}
        doc["raw"][v] = {lab: {k: x for k, x in res[c.name].items() if k not in ("log",)} for lab, c in pairs}
        for lab, c in pairs:
            if not res[c.name]["ok"]:
                print(f"[e2e] {c.name} failed: {res[c.name]['error']} (log {res[c.name]['log_path']})", flush=True)
        doc["per_layer"] = per_layer(doc)
        (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    md = _markdown(doc)
    (args.out / f"{stem}.md").write_text(md)
    plotted = _plot(doc, args.out / f"{stem}.png")
    print(md)
    print(f"[e2e] wrote {args.out / stem}.json/.md" + ("/.png" if plotted else " (no matplotlib: no .png)"))
    ok = all(r["ok"] for per in doc["results"].values() for r in per.values())
    invalid = [f"{v} {lab} bs{b}" for v, per in doc["results"].items() for lab, r in per.items()
               for b, row in r["rows"].items() if not row["valid"]]
    if invalid:
        print(f"[e2e] INVALID rows (batch not decoded together; see the .md): {', '.join(invalid)}")
    return 0 if ok and doc["results"] and not invalid else 1


if __name__ == "__main__":
    sys.exit(main())
