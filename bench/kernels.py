"""Time the sglang_gemma4 Triton kernels against eager torch, torch.compile and SGLang.

    python bench/kernels.py --out runs/            # full sweep
    python bench/kernels.py --out runs/ --quick    # smoke run: fewer T, shorter reps
    python bench/kernels.py --out runs/ --tune     # also sweep routing tile configs

Per op and T it reports the median time (µs), the speed-up of our kernel over each
baseline, the achieved bandwidth (each input read once + each output written once)
and that bandwidth as a fraction of a device-to-device copy measured in the same run.
Small T (<= 1024) is timed inside a CUDA graph (triton.testing.do_bench_cudagraph) so
launch overhead is the GPU's, not Python's; larger T with do_bench (L2 flushed).
Inputs are rotated over several buffer sets so small working sets do not sit in L2.

Writes runs/kernels-<gpu>.json, .md and .png (plot skipped without matplotlib).
Without a CUDA GPU it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
from typing import Callable, Dict, List, Optional

import torch

FULL_T = [1, 8, 32, 128, 256, 1024, 8192, 32768]
QUICK_T = [1, 256, 8192]
GRAPH_MAX_T = 1024  # at or below: CUDA-graph timing
TUNE_T, TUNE_T_QUICK = [1, 256, 8192, 32768], [256, 8192]
E, K = 128, 8
H_NORM, H_PLE, H_TRIPLE = 2560, 256, 2816
EPS = 1e-6
DEV = "cuda"
ROTATE_BYTES = 256 << 20  # rotate input sets until this many bytes are touched (> 4x L2)


def _import_ours():
    try:
        import sglang_gemma4.kernels as k
    except ImportError:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        import sglang_gemma4.kernels as k
    return k


def _import_sglang():
    """SGLang 0.5.17's own kernels, or (None, reason)."""
    try:
        from sglang.kernels.ops.layernorm.gemma4_fused_ops import (
            gemma4_fused_routing,
            gemma_rmsnorm_residual_scalar,
        )

        return {"routing": gemma4_fused_routing, "rmsnorm_residual_scalar": gemma_rmsnorm_residual_scalar}, None
    except Exception as e:  # noqa: BLE001 - any import failure means "n/a"
        return None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- eager baselines


def _rms(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).to(x.dtype)


def routing_eager(logits, scale, k):
    vals, ids = torch.topk(logits, k, dim=-1)
    return torch.softmax(vals.float(), dim=-1) * scale[ids].float(), ids.to(torch.int32)


def rmsnorm_add_eager(x, w, r):
    return _rms(x, w) + r


def rmsnorm_residual_scalar_eager(x, w, r, s):
    return (_rms(x, w) + r) * s


def gelu_mul_eager(g, p):
    return torch.nn.functional.gelu(g, approximate="tanh") * p


def triple_eager(a, r, w_post, w_ff, w_ff2, router):
    post = _rms(a, w_post) + r
    return post, _rms(post, w_ff), _rms(post, router), _rms(post, w_ff2)


# ----------------------------------------------------------------------------- op table


def _ops(k, sgl):
    """name -> dict(make(T) -> args, bytes(T), ours, eager, sglang or None, width)."""
    dt = torch.bfloat16
    dev = DEV

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, device=dev).mul_(scale).to(dt)

    def routing_args(T):
        return (rn(T, E, scale=2.0), torch.rand(E, device=dev) + 0.5)

    def norm_args(T):
        return (rn(T, H_NORM), rn(H_NORM), rn(T, H_NORM))

    def norm_s_args(T):
        return norm_args(T) + (torch.tensor([0.8], device=dev, dtype=dt),)

    def gelu_args(T):
        return (rn(T, H_PLE, scale=2.0), rn(T, H_PLE))

    def triple_args(T):
        return (rn(T, H_TRIPLE), rn(T, H_TRIPLE)) + tuple(rn(H_TRIPLE) for _ in range(4))

    ops = {
        "routing": dict(
            width=f"E={E} K={K}",
            make=routing_args,
            bytes=lambda T: T * E * 2 + E * 4 + T * K * 8,
            ref=lambda a, s: k.gemma4_routing_ref(a, s, K),
            ours=lambda a, s: k.gemma4_routing(a, s, K),
            eager=lambda a, s: routing_eager(a, s, K),
            sglang=(lambda a, s: sgl["routing"](a, s, K)) if sgl else None,
        ),
        "rmsnorm_add": dict(
            width=f"H={H_NORM}",
            make=norm_args,
            bytes=lambda T: 3 * T * H_NORM * 2 + H_NORM * 2,
            ref=lambda x, w, r: k.gemma_rmsnorm_add_ref(x, w, r, EPS),
            ours=lambda x, w, r: k.gemma_rmsnorm_add(x, w, r, EPS),
            eager=rmsnorm_add_eager,
            sglang=None,
        ),
        "rmsnorm_residual_scalar": dict(
            width=f"H={H_NORM}",
            make=norm_s_args,
            bytes=lambda T: 3 * T * H_NORM * 2 + H_NORM * 2 + 2,
            ref=lambda x, w, r, s: k.gemma_rmsnorm_residual_scalar_ref(x, w, r, s, EPS),
            ours=lambda x, w, r, s: k.gemma_rmsnorm_residual_scalar(x, w, r, s, EPS),
            eager=rmsnorm_residual_scalar_eager,
            sglang=(lambda x, w, r, s: sgl["rmsnorm_residual_scalar"](x, w, r, s, EPS)) if sgl else None,
        ),
        "gelu_tanh_mul": dict(
            width=f"H={H_PLE}",
            make=gelu_args,
            bytes=lambda T: 3 * T * H_PLE * 2,
            ref=k.gemma_gelu_tanh_mul_ref,
            ours=k.gemma_gelu_tanh_mul,
            eager=gelu_mul_eager,
            sglang=None,
        ),
        "post_attn_triple_rmsnorm": dict(
            width=f"H={H_TRIPLE}",
            make=triple_args,
            bytes=lambda T: 6 * T * H_TRIPLE * 2 + 4 * H_TRIPLE * 2,
            ref=lambda *a: k.gemma_post_attn_triple_rmsnorm_ref(*a, EPS),
            ours=lambda *a: k.gemma_post_attn_triple_rmsnorm(*a, EPS),
            eager=triple_eager,
            sglang=None,
        ),
    }
    return ops


# ----------------------------------------------------------------------------- timing


def _rotating(fn: Callable, sets: List[tuple]) -> Callable:
    state = {"i": 0}

    def call():
        args = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*args)

    return call


def _time_us(fn: Callable, T: int, quick: bool) -> float:
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    if T <= GRAPH_MAX_T:
        ms = tt.do_bench_cudagraph(fn, rep=5 if quick else 25, return_mode="median")
    else:
        ms = tt.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100, return_mode="median")
    return ms * 1e3


def _copy_gbps(quick: bool) -> float:
    import triton.testing as tt

    n = 512 << 20  # 512 MiB, far beyond L2
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = tt.do_bench(lambda: dst.copy_(src), warmup=5, rep=20 if quick else 100, return_mode="median")
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _sanity(name, ours_out, ref_out):
    """Check ours against the fp32 reference (same tie/rounding contract) before timing."""
    if _first(ref_out).numel() == 0:
        return True, 0.0
    if name == "routing":
        same = torch.equal(ours_out[1], ref_out[1])
        err = (ours_out[0] - ref_out[0]).abs().max().item() if same else float("inf")
        return same and err < 1e-5, err
    outs = ours_out if isinstance(ours_out, tuple) else (ours_out,)
    refs = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    err = max(((o.float() - r.float()).abs() / (r.float().abs() + 1e-2)).max().item() for o, r in zip(outs, refs))
    return err < 2e-2, err


def _compile(fn):
    import torch._dynamo as dynamo

    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 512))
    return torch.compile(fn, dynamic=False)


def bench(args) -> Dict:
    k = _import_ours()
    sgl, sgl_err = _import_sglang()
    ops = _ops(k, sgl)
    if args.ops:
        ops = {n: o for n, o in ops.items() if n in args.ops}
    t_values = QUICK_T if args.quick else FULL_T
    copy_gbps = _copy_gbps(args.quick)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s")
    if sgl is None:
        print(f"sglang kernels: n/a ({sgl_err})")

    results = []
    for name, op in ops.items():
        compiled = _compile(op["eager"])
        for T in t_values:
            per_call = op["bytes"](T)
            n_sets = max(1, min(64, math.ceil(ROTATE_BYTES / max(per_call, 1))))
            sets = [op["make"](T) for _ in range(n_sets)]
            ok, err = _sanity(name, op["ours"](*sets[0]), op["ref"](*sets[0]))
            if not ok:
                print(f"WARNING {name} T={T}: ours vs reference max err {err:.3g}")
            row = {"op": name, "width": op["width"], "T": T, "bytes": per_call, "sanity_err": err,
                   "timing": "cudagraph" if T <= GRAPH_MAX_T else "do_bench"}
            for impl in ("ours", "eager", "compile", "sglang"):
                fn = {"ours": op["ours"], "eager": op["eager"], "compile": compiled, "sglang": op["sglang"]}[impl]
                if fn is None:
                    row[f"{impl}_us"] = None
                    continue
                try:
                    row[f"{impl}_us"] = _time_us(_rotating(fn, sets), T, args.quick)
                except Exception as e:  # noqa: BLE001 - report, keep going
                    print(f"  {name} T={T} {impl}: failed: {type(e).__name__}: {str(e)[:200]}")
                    row[f"{impl}_us"] = None
            us = row["ours_us"]
            for impl in ("eager", "compile", "sglang"):
                other = row[f"{impl}_us"]
                row[f"x_{impl}"] = (other / us) if (other and us) else None
            row["gbps"] = per_call / (us * 1e-6) / 1e9 if us else None
            row["frac_copy"] = row["gbps"] / copy_gbps if row["gbps"] else None
            results.append(row)
            print(_fmt_row(row))
            del sets
            torch.cuda.empty_cache()

    tune = _tune_routing(k, args.quick) if args.tune else None
    import triton

    try:
        import sglang

        sgl_version = getattr(sglang, "__version__", "?")
    except Exception:  # noqa: BLE001
        sgl_version = None
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "sglang": sgl_version,
        "sglang_kernels": "ok" if sgl else f"n/a ({sgl_err})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "copy_gbps": copy_gbps,
        "results": results,
        "routing_tune": tune,
    }


def _tune_routing(k, quick):
    """Sweep (method, BLOCK_T, num_warps) for routing; prints the best per T."""
    import triton.testing  # noqa: F401

    out = []
    for T in (TUNE_T if not quick else TUNE_T_QUICK):
        sets = [(torch.randn(T, E, device=DEV).to(torch.bfloat16), torch.rand(E, device=DEV) + 0.5)
                for _ in range(max(1, min(64, math.ceil(ROTATE_BYTES / (T * E * 2)))))]
        best = None
        for method in ("argmax", "bitonic"):
            for bt in (1, 2, 4, 8, 16, 32):
                for nw in (1, 2, 4, 8):
                    if bt * E // nw < 32:
                        continue
                    fn = _rotating(lambda a, s: k.gemma4_routing(a, s, K, block_t=bt, num_warps=nw, method=method), sets)
                    try:
                        us = _time_us(fn, T, True)
                    except Exception as e:  # noqa: BLE001
                        print(f"  tune T={T} {method} bt={bt} nw={nw}: {type(e).__name__}")
                        continue
                    out.append({"T": T, "method": method, "block_t": bt, "num_warps": nw, "us": us})
                    if best is None or us < best[0]:
                        best = (us, method, bt, nw)
        if best is None:
            print(f"routing tune T={T}: every config failed")
            continue
        default_us = _time_us(_rotating(lambda a, s: k.gemma4_routing(a, s, K), sets), T, True)
        print(f"routing tune T={T}: best {best[1]} block_t={best[2]} num_warps={best[3]} "
              f"{best[0]:.2f} us (default {default_us:.2f} us)")
    return out


# ----------------------------------------------------------------------------- reporting


def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def _fmt_row(r):
    return (f"{r['op']:26s} T={r['T']:6d}  ours {_f(r['ours_us'], '8.2f')} us  eager {_f(r['eager_us'], '8.2f')}"
            f"  compile {_f(r['compile_us'], '8.2f')}  sglang {_f(r['sglang_us'], '8.2f')}"
            f"  {_f(r['gbps'], '6.0f')} GB/s ({_f(r['frac_copy'] and 100 * r['frac_copy'], '.0f')}% of copy)")


def write_markdown(data, path):
    lines = [
        f"# Kernel benchmark: {data['gpu']}",
        "",
        f"torch {data['torch']}, triton {data['triton']}, sglang {data['sglang']} "
        f"(kernels: {data['sglang_kernels']}), {data['date']}{' (quick)' if data['quick'] else ''}.",
        f"Device-to-device copy: {data['copy_gbps']:.0f} GB/s. bf16. µs = median; T <= {GRAPH_MAX_T} "
        "timed in a CUDA graph. ×X = X's time / ours (higher is better for us).",
        "",
    ]
    ops = []
    for r in data["results"]:
        if r["op"] not in ops:
            ops.append(r["op"])
    for op in ops:
        rows = [r for r in data["results"] if r["op"] == op]
        lines += [f"## {op} ({rows[0]['width']})", "",
                  "| T | ours µs | eager µs | compile µs | sglang µs | ×eager | ×compile | ×sglang | GB/s | % copy |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(
                f"| {r['T']} | {_f(r['ours_us'], '.2f')} | {_f(r['eager_us'], '.2f')} | {_f(r['compile_us'], '.2f')} "
                f"| {_f(r['sglang_us'], '.2f')} | {_f(r['x_eager'], '.2f')} | {_f(r['x_compile'], '.2f')} "
                f"| {_f(r['x_sglang'], '.2f')} | {_f(r['gbps'], '.0f')} "
                f"| {_f(r['frac_copy'] and 100 * r['frac_copy'], '.0f')} |"
            )
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(data, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; skipping the plot")
        return False
    ops = []
    for r in data["results"]:
        if r["op"] not in ops:
            ops.append(r["op"])
    fig, axes = plt.subplots(1, len(ops), figsize=(4.5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        rows = [r for r in data["results"] if r["op"] == op]
        for impl in ("ours", "eager", "compile", "sglang"):
            pts = [(r["T"], r[f"{impl}_us"]) for r in rows if r[f"{impl}_us"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("µs")
        ax.set_title(f"{op} ({rows[0]['width']})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data['gpu']} (bf16)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/", help="output directory (default runs/)")
    p.add_argument("--quick", action="store_true", help=f"T in {QUICK_T}, shorter reps")
    p.add_argument("--tune", action="store_true", help="also sweep routing BLOCK_T/num_warps/method")
    p.add_argument("--ops", nargs="*", help="subset of ops to run")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("no CUDA GPU; nothing to time")
        return 0

    data = bench(args)
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", data["gpu"]).strip("-").lower()
    base = os.path.join(args.out, f"kernels-{slug}")
    with open(base + ".json", "w") as f:
        json.dump(data, f, indent=2)
    write_markdown(data, base + ".md")
    wrote_png = write_plot(data, base + ".png")
    print(f"wrote {base}.json, {base}.md" + (f", {base}.png" if wrote_png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
