"""Gemma-4 vision encoder throughput: batched (our patch) vs SGLang 0.5.17 one-by-one.

SGLang's own ``Gemma4VisionEncoder`` + ``Gemma4MultimodalEmbedder`` at the
transformers-default Gemma-4 vision width (768 hidden, 16 layers, 12 heads,
random weights, bf16, SGLang's default CUDA attention backend), mounted on a
``Gemma4ForConditionalGeneration`` shell (the text model is not needed to time
``get_image_feature``). Images as SGLang receives them: 480x480 px -> a 48x48
patch grid (2304 patches) padded to 2520 (``max_soft_tokens=280``), one item
per image. Both paths run in the same process, interleaved per size.

    python bench/encoder.py [--images 1 6 16] [--iters 20] [--out runs]
    python bench/encoder.py --quick --out runs      # 1 warm-up + 3 timed calls per point

Cost model (H200, 2026-11-29: ~19-20 ms per 2520-patch image either way): a
point of n images costs n x (warm-up + iters) calls per path, x 2 paths. The
default (3 warm-ups + 20 iters; the result of the last timed call is the one
compared) is 23 x 23 x 2 x 20 ms = 21 s of encoder work for 1/6/16 images, on
top of the fixed costs printed as "[encoder] phase" lines: importing SGLang
(~15 s on that host), building the 168 M-parameter tower (random init on the
CPU in the default mode, on the GPU in --quick), first-call Triton JIT. --quick
(1 warm-up + 3 iters) is 23 x 4 x 2 x 20 ms = 3.7 s of work.

Writes runs/encoder-<gpu>.json/.md/.png (png only if matplotlib is installed).
Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata as md
import json
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

TEXT_HIDDEN = 1536  # E2B
MAX_PATCHES = 2520
GRID = 48


def _setup(mm_attention_backend=None):
    from sglang_gemma4.testing.configs import init_sglang_single_process

    kw = {"mm_attention_backend": mm_attention_backend} if mm_attention_backend else {}
    init_sglang_single_process("cuda", **kw)


class _LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=TEXT_HIDDEN)
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16), requires_grad=False)

    def dtype(self):
        return self.anchor.dtype

    @property
    def device(self):
        return self.anchor.device


def _phase(name, t0):
    print(f"[encoder] phase {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return time.perf_counter()


def _model(device="cuda", init_on_device=False):
    """Random-weight tower + embedder; ``init_on_device`` builds and fills the
    parameters on ``device`` (seconds less than a CPU fill, other random values)."""
    from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration, Gemma4MultimodalEmbedder
    from sglang.srt.models.gemma4_vision import Gemma4VisionEncoder
    from transformers import Gemma4TextConfig, Gemma4VisionConfig

    torch.manual_seed(0)
    vc, tc = Gemma4VisionConfig(), Gemma4TextConfig(hidden_size=TEXT_HIDDEN)
    m = Gemma4ForConditionalGeneration.__new__(Gemma4ForConditionalGeneration)
    torch.nn.Module.__init__(m)
    m.config = SimpleNamespace(text_config=tc, vision_config=vc)
    with torch.device(device) if init_on_device else contextlib.nullcontext():
        m.vision_tower = Gemma4VisionEncoder(vc)
        m.embed_vision = Gemma4MultimodalEmbedder(vc, tc)
        m.language_model = _LM()
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name != "language_model.anchor":
                    p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return m.to(device=device, dtype=torch.bfloat16).eval(), vc


def _items(n):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    gen = torch.Generator().manual_seed(n)
    ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    out = []
    for _ in range(n):
        pv = torch.zeros(1, MAX_PATCHES, 3 * 16 * 16)
        pp = torch.full((1, MAX_PATCHES, 2), -1, dtype=torch.long)
        pv[0, : GRID * GRID] = torch.rand(GRID * GRID, 3 * 16 * 16, generator=gen)
        pp[0, : GRID * GRID, 0], pp[0, : GRID * GRID, 1] = xs.reshape(-1), ys.reshape(-1)
        item = MultimodalDataItem(modality=Modality.IMAGE, feature=pv.cuda())  # SGLang moves features first
        item.image_position_ids = pp.cuda()
        out.append(item)
    return out


def _time(fn, iters, warmup=3):
    """Median ms of ``iters`` timed calls after ``warmup`` untimed ones, peak MiB,
    and the last call's output (the one the two paths' results are compared on)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms, out = [], None
    for _ in range(iters):
        out = None  # the previous output must not count towards this call's peak
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b))
    return statistics.median(ms), (torch.cuda.max_memory_allocated() - base) / 2**20, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[1, 6, 16])
    ap.add_argument("--iters", type=int, default=None, help="timed calls per point (default 20; --quick: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per point (default 3; --quick: 1)")
    ap.add_argument("--quick", action="store_true",
                    help="1 warm-up + 3 timed calls per point, tower built on the GPU (1/6/16 images in ~4 s of work)")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--mm-attention-backend", default=None,
                    help="vision attention backend (SGLang's default when omitted; e.g. triton_attn "
                         "where the FA3 kernels are not installed)")
    args = ap.parse_args(argv)
    args.iters = args.iters if args.iters is not None else (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.iters < 1 or args.warmup < 1 or min(args.images) < 1:
        raise SystemExit("--iters, --warmup and --images must be >= 1 (one warm-up keeps first-call JIT out)")
    if not torch.cuda.is_available():
        print("no CUDA")
        return 0

    t0 = time.perf_counter()
    from sglang_gemma4.patches import batched_encoder as be
    from sglang_gemma4.testing.hooks import patch_applied

    _setup(args.mm_attention_backend)
    t0 = _phase("import + setup", t0)
    model, vc = _model("cuda", init_on_device=args.quick)
    torch.cuda.synchronize()
    t0 = _phase("model build", t0)
    backend = type(model.vision_tower.encoder.layers[0].self_attn.qkv_backend).__name__
    budget = be.budget_mb()
    per_patch = be.tower_bytes_per_patch(vc, MAX_PATCHES, 2)
    rows = []
    for n in args.images:
        items = _items(n)
        with torch.no_grad():
            base_ms, base_mb, ref = _time(lambda: model.get_image_feature(items), args.iters, args.warmup)
            with patch_applied(be.PATCH, {}) as st:
                assert st.state == "active", st.reason
                ms, mb, out = _time(lambda: model.get_image_feature(items), args.iters, args.warmup)
        max_diff = (out.float() - ref.float()).abs().max().item()
        rows.append(dict(
            images=n, one_by_one_ms=round(base_ms, 3), batched_ms=round(ms, 3),
            speedup=round(base_ms / ms, 3), one_by_one_images_per_s=round(1e3 * n / base_ms, 1),
            batched_images_per_s=round(1e3 * n / ms, 1), one_by_one_peak_mib=round(base_mb, 1),
            batched_peak_mib=round(mb, 1), max_abs_diff_bf16=max_diff,
        ))
        print(json.dumps(rows[-1]), flush=True)
        t0 = _phase(f"{n} images", t0)

    gpu = torch.cuda.get_device_name()
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    env = dict(gpu=gpu, torch=torch.__version__, sglang=md.version("sglang"),
               transformers=md.version("transformers"), python=sys.version.split()[0],
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               attention_backend=backend, dtype="bfloat16", budget_mib=budget,
               iters=args.iters, warmup=args.warmup, quick=bool(args.quick),
               estimated_mib_per_image=round(per_patch * MAX_PATCHES / 2**20, 1),
               vision=dict(hidden=vc.hidden_size, layers=vc.num_hidden_layers,
                           heads=vc.num_attention_heads, patches_per_image=MAX_PATCHES,
                           real_patches=GRID * GRID), text_hidden=TEXT_HIDDEN)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"encoder-{tag}"
    stem.with_suffix(".json").write_text(json.dumps(dict(env=env, results=rows), indent=2))
    md_lines = [
        f"# Gemma-4 vision encoder: batched vs one-by-one ({gpu})", "",
        f"{env['date']} | torch {env['torch']} | SGLang {env['sglang']} | transformers "
        f"{env['transformers']} | backend {backend} | bf16 | budget {budget:g} MiB "
        f"(estimate {env['estimated_mib_per_image']} MiB per 2520-patch image)", "",
        "| images | one-by-one ms | batched ms | speedup | img/s before | img/s after "
        "| peak MiB before | peak MiB after | max abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md_lines.append(
            f"| {r['images']} | {r['one_by_one_ms']} | {r['batched_ms']} | {r['speedup']}x "
            f"| {r['one_by_one_images_per_s']} | {r['batched_images_per_s']} "
            f"| {r['one_by_one_peak_mib']} | {r['batched_peak_mib']} | {r['max_abs_diff_bf16']:.3g} |"
        )
    stem.with_suffix(".md").write_text("\n".join(md_lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = [str(r["images"]) for r in rows]
        w = 0.38
        idx = range(len(rows))
        ax.bar([i - w / 2 for i in idx], [r["one_by_one_images_per_s"] for r in rows], w, label="one-by-one (0.5.17)")
        ax.bar([i + w / 2 for i in idx], [r["batched_images_per_s"] for r in rows], w, label="batched")
        ax.set_xticks(list(idx), xs)
        ax.set_xlabel("images per prompt")
        ax.set_ylabel("images / s")
        ax.set_title(f"Gemma-4 vision encoder, {gpu}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no png")
    print(f"wrote {stem}.json/.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
