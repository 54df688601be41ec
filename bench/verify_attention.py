"""Target-verify attention of a draft chain at Gemma-4 widths: sglang_gemma4's split-KV kernel vs SGLang's.

    python bench/verify_attention.py --out runs/ [--quick]

Side by side in one process, per layer width (q heads, kv heads, head dim; sliding layers with the
1024-key window), batch and prefix length, 4 drafts per sequence (3 draft steps, topk 1):
- ``ours``: :func:`sglang_gemma4.kernels.verify_attention.verify_attention_fwd` (patch ``verify_splitkv``);
- ``sglang_extend``: SGLang 0.5.17's ``extend_attention_fwd`` with the chain's tree mask, which its triton
  backend runs for target-verify on NVIDIA;
- ``sglang_splitkv``: SGLang's own split-KV verify kernel (gfx95-only in its backend, callable here), only for
  full-attention layers, the only ones it takes.
Each call is captured back to back in a CUDA graph (no launch gaps), the graph replayed; per-call time =
replay / calls, median of the replays. KV pool slots are shuffled so the prefix reads are scattered, as in a
serving pool. Writes verify-attention-<gpu>.json/.md/.png. Without a CUDA GPU it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from sglang_gemma4.cli import versions  # noqa: E402
from sglang_gemma4.kernels.verify_attention import verify_attention_fwd  # noqa: E402

WIDTHS = {"26b_sliding": (16, 8, 256, 1023), "26b_full": (16, 2, 512, -1),
          "e4b_sliding": (8, 2, 256, 1023), "e4b_full": (8, 2, 512, -1)}
L = 4
PREFIXES = (1000, 8000)
DEVICE, DTYPE = "cuda", torch.bfloat16  # the CPU test of main() sets cpu / fp32, tiny WIDTHS / PREFIXES, a stub timer


def case(Hq, Hkv, D, window, bs, P, dev=None, dtype=None, seed=0):
    dev, dtype = dev or DEVICE, dtype or DTYPE
    g = torch.Generator(device=dev).manual_seed(seed)
    kept = min(P, window) if window >= 0 else P
    slots = bs * P + bs * L
    perm = torch.randperm(slots, device=dev, generator=g)
    prefix = perm[: bs * P].view(bs, P)[:, P - kept:].reshape(-1).to(torch.int32)
    t = dict(q=torch.randn(bs * L, Hq, D, device=dev, dtype=dtype, generator=g),
             k=torch.randn(bs * L, Hkv, D, device=dev, dtype=dtype, generator=g),
             v=torch.randn(bs * L, Hkv, D, device=dev, dtype=dtype, generator=g),
             kb=torch.randn(slots, Hkv, D, device=dev, dtype=dtype, generator=g),
             vb=torch.randn(slots, Hkv, D, device=dev, dtype=dtype, generator=g),
             indptr=(torch.arange(bs + 1, device=dev) * kept).to(torch.int32), indices=prefix,
             qo=(torch.arange(bs + 1, device=dev) * L).to(torch.int32))
    m = torch.ones(L, P + L, dtype=torch.bool, device=dev)
    m[:, P:] = torch.tril(torch.ones(L, L, dtype=torch.bool, device=dev))
    t["mask"] = m.flatten().repeat(bs)
    t["mask_indptr"] = (torch.arange(bs + 1, device=dev) * m.numel()).to(torch.int64)
    t["offsets"] = torch.full((bs,), P - kept, dtype=torch.int32, device=dev)
    t["o"] = torch.empty_like(t["q"])
    return t


def ours(t, window, **kw):
    """Our kernel on case ``t`` with launcher options ``kw``, as a no-argument call."""
    return lambda: verify_attention_fwd(t["q"], t["k"], t["v"], t["o"], t["kb"], t["vb"], t["indptr"], t["indices"],
                                        L, 1.0, window, **kw)


def impls(t, window):
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    out = {
        "ours": ours(t, window),
        "sglang_extend": lambda: extend_attention_fwd(
            t["q"], t["k"], t["v"], t["o"], t["kb"], t["vb"], t["qo"], t["indptr"], t["indices"], t["mask"], True,
            t["mask_indptr"], L, 1.0, 1.0, 1.0, sliding_window_size=window, window_kv_offsets=t["offsets"]),
    }
    # the merge as one program per head over the whole width (its layout before 2026-12-04), vs 64-wide slices
    out["ours_merge_full"] = ours(t, window, merge_dv=t["v"].shape[2])
    if t["q"].shape[1] > t["k"].shape[1]:  # GQA: both program layouts, side by side with the default
        out["ours_grouped"], out["ours_per_head"] = ours(t, window, grouped=True), ours(t, window, grouped=False)
    if window < 0:
        try:
            from sglang.kernels.ops.attention.verify_splitkv import verify_splitkv_fwd

            def sglang_splitkv():
                if not verify_splitkv_fwd(t["q"], t["k"], t["v"], t["o"], t["kb"], t["vb"], t["qo"], t["indptr"],
                                          t["indices"], t["mask"], True, t["mask_indptr"], L, 1.0, 1.0, 1.0):
                    raise RuntimeError("verify_splitkv_fwd declined this shape (its can_handle)")  # not timed

            out["sglang_splitkv"] = sglang_splitkv
        except ImportError:
            pass
    return out


def time_us(fn, quick):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    n = 20 if quick else 50
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5 if quick else 15):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(1e3 * a.elapsed_time(b) / n)
    del g
    return round(statistics.median(times[1:]), 2)


def record(out: Path, name: str, extra: dict, rows: list, writer) -> Path:
    """The run's document (date, versions, ``extra``, rows) through ``writer`` to ``out/<name>-<gpu>``."""
    v = versions()
    doc = {"date": datetime.date.today().isoformat(), "versions": v, **extra, "rows": rows}
    stem = out / f"{name}-{(v.get('gpu') or 'gpu').lower().replace(' ', '-')}"
    writer(doc, stem)
    print(f"wrote {stem}.json/.md")
    return stem


def write_report(doc, stem: Path) -> None:
    """json, md (and png with matplotlib) from the measured rows."""
    rows, v = doc["rows"], doc["versions"]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    md = [f"# Target-verify attention, {L} drafts: split-KV (ours) vs SGLang ({v.get('gpu')})", "",
          f"Date {doc['date']}; SGLang {v.get('sglang')}, torch {v.get('torch')}, triton {v.get('triton')}. "
          "bf16, CUDA-graph timed (us per call, median of replays). Sliding widths: 1024-key window.", "",
          "| width | bs | prefix | ours (us) | ours grouped / per head (us) | ours, one-slice merge (us) | SGLang extend (us) "
          "| SGLang split-KV (us) | extend / ours | max abs diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sk = r.get("sglang_splitkv", {}).get("us", "-")
        gp = f"{r.get('ours_grouped', {}).get('us', '-')} / {r.get('ours_per_head', {}).get('us', '-')}"
        mf = r.get("ours_merge_full", {}).get("us", "-")
        md.append(f"| {r['width']} | {r['bs']} | {r['prefix']} | {r['ours']['us']} | {gp} | {mf} | {r['sglang_extend']['us']} | "
                  f"{sk} | {r['speedup_vs_sglang_extend']} | {r['sglang_extend'].get('max_abs_diff_vs_ours', '-')} |")
    sweep = [r for r in rows if any(k.startswith("ours_splits") for k in r)]
    if sweep:
        ns = sorted({int(k[len("ours_splits"):]) for r in sweep for k in r if k.startswith("ours_splits")})
        md += ["", "Split-count sweep of ours (us; `ours` above uses `num_splits`):", "",
               "| width | bs | prefix | " + " | ".join(f"S={n}" for n in ns) + " |", "|---|---|---|" + "---|" * len(ns)]
        md += [f"| {r['width']} | {r['bs']} | {r['prefix']} | " + " | ".join(
            str(r.get(f"ours_splits{n}", {}).get("us", "-")) for n in ns) + " |" for r in sweep]
    tiled = [r for r in rows if any(k.startswith("ours_tile") for k in r)]
    if tiled:
        ts = sorted({k[len("ours_tile"):] for r in tiled for k in r if k.startswith("ours_tile")})
        md += ["", "Prefix tile sweep of ours (BLOCK_N x warps, us; `ours` above uses the defaults):", "",
               "| width | bs | prefix | " + " | ".join(ts) + " |", "|---|---|---|" + "---|" * len(ts)]
        md += [f"| {r['width']} | {r['bs']} | {r['prefix']} | " + " | ".join(
            str(r.get(f"ours_tile{t}", {}).get("us", "-")) for t in ts) + " |" for r in tiled]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.45), 4))
        ax.bar(range(len(rows)), [r["speedup_vs_sglang_extend"] or 0 for r in rows])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(rows)), [f"{r['width']}\nbs{r['bs']} P{r['prefix']}" for r in rows], fontsize=6,
                      rotation=90)
        ax.set_ylabel("SGLang extend time / ours")
        ax.set_title(f"target-verify attention, {L} drafts, {v.get('gpu')}")
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fp8", action="store_true", help="also every shape over an fp8 (e4m3) KV pool")
    ap.add_argument("--tiles", default="", help="comma list of BLOCK_NxWARPS (e.g. 16x4,32x8): also time ours with "
                                                "these prefix tiles (batch 1 and 16, bf16 pool)")
    ap.add_argument("--splits", default="", help="comma list: also time ours at these split counts (batch 1 and 16)")
    a = ap.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("verify_attention bench: no CUDA GPU, nothing measured")
        return 0
    batches = [1, 16] if a.quick else [1, 8, 16, 48]
    rows = []
    sweep = [(f"ours_splits{n}", dict(splits=int(n))) for n in a.splits.split(",") if n]
    sweep += [(f"ours_tile{x}", dict(zip(("block_n", "num_warps"), map(int, x.split("x"))))) for x in a.tiles.split(",") if x]
    shapes = [(name, w, False) for name, w in WIDTHS.items()]
    if a.fp8:  # the same shapes over an fp8 pool (scales 1): ours widens the tiles, SGLang's rounds q and p
        shapes += [(name + "_fp8", w, True) for name, w in WIDTHS.items()]
    for name, (Hq, Hkv, D, window), fp8 in shapes:
        for P in PREFIXES:
            for bs in batches:
                t = case(Hq, Hkv, D, window, bs, P)
                if fp8:
                    t["kb"], t["vb"] = t["kb"].to(torch.float8_e4m3fn), t["vb"].to(torch.float8_e4m3fn)
                res = {}
                ref = None
                for impl, fn in impls(t, window).items():
                    try:
                        fn()
                        if DEVICE == "cuda":
                            torch.cuda.synchronize()
                        if ref is None:
                            ref = t["o"].float().clone()
                        err = (t["o"].float() - ref).abs().max().item()
                        res[impl] = {"us": time_us(fn, a.quick), "max_abs_diff_vs_ours": round(err, 4)}
                    except Exception as e:  # a baseline that cannot run this shape is recorded, not fatal
                        if impl == "ours":
                            raise
                        res[impl] = {"us": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                if bs in (1, 16) and not fp8:  # the sweeps: split counts, prefix tiles
                    for key, kw in sweep:
                        res[key] = {"us": time_us(ours(t, window, **kw), a.quick)}
                row = {"width": name, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "window": window, "bs": bs,
                       "prefix": P, "drafts": L, **res}
                ext = res["sglang_extend"].get("us")
                row["speedup_vs_sglang_extend"] = round(ext / res["ours"]["us"], 2) if ext else None
                rows.append(row)
                print(json.dumps(row), flush=True)
                del t
    record(a.out, "verify-attention", {"drafts": L}, rows, write_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
