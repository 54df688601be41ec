"""YOCO prefill throughput, SGLANG_GEMMA4_YOCO=1 vs 0, on E2B- and E4B-shaped models.

Real widths, vocab, PLE, head dims and window (harness variants "e2b_w" and
"e4b_w"), depth cut to 7 layers with the real KV-shared ratio: E2B 35/20 ->
7/4, E4B 42/18 -> 7/3 (the harness variants keep 8/3 and 8/2, which would
understate YOCO). Random weights, bf16, triton attention, one engine per
(shape, knob), prefill CUDA graph off as for the real (multimodal) E2B/E4B
checkpoints. Each job sends N prompts of L tokens with max_new_tokens=1 and a
flushed radix cache; prefill tok/s = prompt tokens / best wall of 3 passes.
First tokens of on and off are compared as a sanity check.

    python bench/yoco.py [--lens 1024 7000] [--prompts 32 16] [--out runs]

Writes runs/yoco-<gpu>.json/.md/.png (png only if matplotlib is installed);
prints "no CUDA" and exits 0 on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import random
import re
import sys
from pathlib import Path

# shape -> checkpoint variant: 7 real-width layers at the real KV-shared ratio (checkpoints._variants)
SHAPES = {"e2b": "e2b_w_yoco", "e4b": "e4b_w_yoco"}
ENGINE = dict(
    context_length=8448,
    max_total_tokens=131072,
    max_running_requests=32,
    chunked_prefill_size=16384,
    mem_fraction_static=0.6,
    cuda_graph_max_bs_decode=32,
    disable_prefill_cuda_graph=True,
)


def ratio_checkpoint(shape: str) -> Path:
    from sglang_gemma4.testing import checkpoints

    return checkpoints.build(SHAPES[shape])


def prompts(n: int, length: int, seed: int):
    from sglang_gemma4.testing.checkpoints import BOS_ID, FIRST_PROMPT_ID

    rng = random.Random(seed)
    return [[BOS_ID] + [rng.randrange(FIRST_PROMPT_ID, 262144) for _ in range(length - 1)] for _ in range(n)]


def _versions():
    out = {}
    for pkg in ("sglang", "torch", "triton", "sglang-gemma4"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[1024, 7000])
    ap.add_argument("--prompts", type=int, nargs="+", default=[32, 16], help="prompts per length")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="runs")
    args = ap.parse_args(argv)
    if len(args.prompts) != len(args.lens):
        ap.error(f"--prompts needs one count per --lens value ({len(args.lens)}), got {len(args.prompts)}")

    import torch

    if not torch.cuda.is_available():
        print("no CUDA: bench/yoco.py needs a GPU; nothing measured")
        return 0
    from sglang_gemma4.testing import checkpoints, engine

    gpu = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "gpu"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    jobs = [engine.Job(f"p{L}", prompts(n, L, seed=L), max_new_tokens=1, repeat=args.repeat)
            for L, n in zip(args.lens, args.prompts)]
    cfgs, ckpts = [], {}
    for shape in args.shapes:
        ckpts[shape] = ratio_checkpoint(shape)
        for knob in ("0", "1"):
            cfgs.append(engine.EngineConfig(
                f"{shape}-yoco{knob}", str(ckpts[shape]), jobs, env={"SGLANG_GEMMA4_YOCO": knob},
                engine_kwargs=ENGINE, timeout=900, checks="none"))
    res = engine.run_many(cfgs, parallel=1, log_dir=out_dir / "logs-yoco")

    rows, failures = [], []
    for shape in args.shapes:
        off, on = res[f"{shape}-yoco0"], res[f"{shape}-yoco1"]
        for r in (off, on):
            if not r["ok"]:
                failures.append(f"{r['name']}: {r['error']}")
        if not (off["ok"] and on["ok"]):
            continue
        fired = "YOCO fast prefill active" in Path(on["log_path"]).read_text(errors="replace")
        for job in jobs:
            a, b = off["jobs"][job.name], on["jobs"][job.name]
            tps_off = a["timings"]["prompt_tokens"] / a["timings"]["best_wall_s"]
            tps_on = b["timings"]["prompt_tokens"] / b["timings"]["best_wall_s"]
            same = sum(x[:1] == y[:1] for x, y in zip(a["tokens"], b["tokens"]))
            rows.append(dict(shape=shape, prompt_len=len(job.prompts[0]), prompts=len(job.prompts),
                             tok_s_off=round(tps_off), tok_s_on=round(tps_on),
                             speedup=round(tps_on / tps_off, 3), wall_off=a["timings"]["wall_s"],
                             wall_on=b["timings"]["wall_s"], first_token_equal=f"{same}/{len(job.prompts)}",
                             yoco_fired=fired))

    record = dict(
        bench="yoco", gpu=gpu, time=datetime.datetime.now().isoformat(timespec="seconds"),
        versions=_versions(), engine_kwargs=dict(engine.DEFAULT_ENGINE_KWARGS, **ENGINE),
        shapes={s: dict(variant=SHAPES[s], layer_types=list(checkpoints.spec(SHAPES[s]).text.layer_types),
                        kv_shared=checkpoints.spec(SHAPES[s]).text.num_kv_shared_layers,
                        checkpoint=str(ckpts[s])) for s in args.shapes},
        rows=rows, failures=failures, command=" ".join(sys.argv),
    )
    stem = out_dir / f"yoco-{slug}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    md_lines = [
        f"# YOCO prefill throughput on {gpu}", "",
        f"{record['time']}, sglang {record['versions']['sglang']}, torch {record['versions']['torch']}; "
        "7-layer real-width E2B (4/7 KV-shared) and E4B (3/7) shapes, random weights, bf16, triton, "
        "prefill CUDA graph off, max_new_tokens=1, best of "
        f"{args.repeat}.", "",
        "| shape | prompt len | prompts | YOCO off tok/s | YOCO on tok/s | speedup | first token equal | fired |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md_lines.append(f"| {r['shape']} | {r['prompt_len']} | {r['prompts']} | {r['tok_s_off']} | "
                        f"{r['tok_s_on']} | {r['speedup']:.2f}x | {r['first_token_equal']} | {r['yoco_fired']} |")
    if failures:
        md_lines += ["", "Failures:"] + [f"- {f}" for f in failures]
    stem.with_suffix(".md").write_text("\n".join(md_lines) + "\n")
    print("\n".join(md_lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{r['shape']}\n{r['prompt_len']}" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["tok_s_off"] for r in rows], 0.4, label="YOCO off")
        ax.bar([i + 0.2 for i in x], [r["tok_s_on"] for r in rows], 0.4, label="YOCO on")
        for i, r in enumerate(rows):
            ax.text(i + 0.2, r["tok_s_on"], f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("prefill tok/s")
        ax.set_title(f"YOCO prefill, {gpu}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no png")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
