"""Time the sglang_gemma4 Triton kernels against eager torch, torch.compile and SGLang.

    python bench/kernels.py --out runs/            # full sweep
    python bench/kernels.py --out runs/ --quick    # smoke run: fewer T, shorter reps
    python bench/kernels.py --out runs/ --tune     # also sweep routing and gelu_tanh_mul tile configs

Per op and T it reports the median time (µs) with its p20/p80, the speed-up of our
kernel over each baseline, the achieved bandwidth (each input read once + each
output written once) and that bandwidth as a fraction of a device-to-device copy
measured the same way in the same run.

One measurement for every T, every implementation and the --tune sweeps
(:func:`_measure`): calls are captured back to back in a CUDA graph, rotating over
input sets that together span >= 256 MiB (> 4x the H200's L2) whenever 64 sets
suffice, so every call reads cold inputs (T >= 8192 for all ops here); smaller
working sets stay L2-resident, as a router's or an MLP's output is when the next
kernel reads it. The graph is replayed several times; per-call time = replay time /
calls. No launch overhead, no host sync, and no L2-flush memset in the timed
stream. (Until 2026-11-29 T > 1024 used triton's do_bench, which zeroes a 256 MiB
buffer before every call and times the call right after it: the timed kernel
then starts on an L2 full of dirty lines and a memory system still draining
them, and the --tune sweep ran with other reps and another input generator than
the table, so the two disagreed 2x for routing at T=32768.)

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
TUNE_T, TUNE_T_QUICK = [1, 256, 8192, 32768], [256, 8192]
MAX_SETS = 64
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
            gemma_dual_rmsnorm_residual_scalar,
            gemma_rmsnorm_residual_scalar,
        )

        ops = {"routing": gemma4_fused_routing, "rmsnorm_residual_scalar": gemma_rmsnorm_residual_scalar,
               "dual_tail": gemma_dual_rmsnorm_residual_scalar}
        try:  # the attention input as SGLang runs it on CUDA: its qkv norm, then the RoPE kernel
            from sglang.kernels.ops.attention.rope import apply_rope_with_cos_sin_cache_inplace
            from sglang.kernels.ops.layernorm.gemma4_fused_ops import gemma_qkv_rmsnorm

            ops["qkv_rmsnorm"], ops["rope"] = gemma_qkv_rmsnorm, apply_rope_with_cos_sin_cache_inplace
        except Exception:  # noqa: BLE001
            pass
        try:  # the next layer's input norm as SGLang runs it on CUDA (RMSNorm.forward_cuda)
            from sgl_kernel import rmsnorm as sgl_rmsnorm

            ops["rmsnorm"] = sgl_rmsnorm
        except Exception:  # noqa: BLE001
            pass
        return ops, None
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


# 26B sliding layer: 16 q heads, 8 kv heads of 256 (the profile's fused_rope_kernel<..., 256, ...>)
QKV_NQ, QKV_NKV, QKV_D = 16, 8, 256


def _sglang_qkv_norm_rope(sgl):
    """SGLang 0.5.17's two launches on the same in-place buffer (CUDA only)."""
    if not sgl or "qkv_rmsnorm" not in sgl:
        return None

    def run(qkv, pos, wq, wk, cache, nq, nkv, d):
        q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
        sgl["qkv_rmsnorm"](q, k, v, wq, wk, num_q_heads=nq, num_kv_heads=nkv, head_dim=d, eps=EPS)
        sgl["rope"](positions=pos, q=q.view(-1, nq, d), k=k.view(-1, nkv, d), cos_sin_cache=cache, is_neox=True)
        return qkv

    return run


def _sglang_tail_next_norm(sgl):
    """SGLang 0.5.17 at a MoE layer boundary: its dual-norm tail, then the next input norm."""
    if not sgl or "dual_tail" not in sgl:
        return None
    norm = sgl.get("rmsnorm")

    def run(h1, w1, h2, w2, w3, r, s, w_in):
        out = sgl["dual_tail"](h1, w1, h2, w2, w3, r, s, EPS, EPS, EPS)
        return out, (norm(out, w_in, EPS) if norm and out.is_cuda else _rms(out, w_in))

    return run


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

    def qkv_args(T):
        d = QKV_D
        inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float, device=dev) / d)
        f = torch.outer(torch.arange(8192, dtype=torch.float, device=dev), inv)
        return (rn(T, (QKV_NQ + 2 * QKV_NKV) * d), torch.randint(0, 8192, (T,), device=dev), rn(d), rn(d),
                torch.cat([f.cos(), f.sin()], -1), QKV_NQ, QKV_NKV, d)

    def tail_args(T):
        return (rn(T, H_TRIPLE), rn(H_TRIPLE), rn(T, H_TRIPLE), rn(H_TRIPLE), rn(H_TRIPLE), rn(T, H_TRIPLE),
                torch.tensor([0.8], device=dev, dtype=dt), rn(H_TRIPLE))

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
        # issue #20: per-head q/k/v norm + RoPE, in place (2 launches in SGLang, 1 here)
        "qkv_norm_rope": dict(
            width=f"{QKV_NQ}q+{QKV_NKV}kv x {QKV_D}",
            make=qkv_args,
            inplace=True,
            bytes=lambda T: 2 * T * (QKV_NQ + 2 * QKV_NKV) * QKV_D * 2 + T * (8 + QKV_D * 4),
            ref=lambda *a: k.gemma_qkv_norm_rope_ref(*a, EPS),
            ours=lambda *a: k.gemma_qkv_norm_rope_(*a, EPS),
            eager=lambda *a: a[0].copy_(k.gemma_qkv_norm_rope_ref(*a, EPS)),
            sglang=_sglang_qkv_norm_rope(sgl),
        ),
        # issue #20: the 26B MoE tail + the next layer's input norm (2 launches in SGLang, 1 here)
        "moe_tail_next_norm": dict(
            width=f"H={H_TRIPLE}",
            make=tail_args,
            bytes=lambda T: 5 * T * H_TRIPLE * 2 + 4 * H_TRIPLE * 2 + 2,
            ref=lambda *a: k.gemma_moe_tail_next_norm_ref(*a),
            ours=lambda *a: k.gemma_moe_tail_next_norm(*a),
            # torch in fp32 with one rounding per output (the kernel's contract); Inductor compiles it
            eager=lambda *a: k.gemma_moe_tail_next_norm_ref(*a),
            sglang=_sglang_tail_next_norm(sgl),
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


def _n_sets(per_call_bytes: int) -> int:
    return max(1, min(MAX_SETS, math.ceil(ROTATE_BYTES / max(per_call_bytes, 1))))


def _make_sets(op, T):
    return [op["make"](T) for _ in range(_n_sets(op["bytes"](T)))]


def _measure(fn: Callable, sets: List[tuple], quick: bool) -> Dict[str, float]:
    """Per-call µs of ``fn`` over ``sets``: median and p20/p80 over graph replays.

    The graph holds k * len(sets) calls (each set used k times, in turn), k
    chosen so one replay lasts >= 2 ms (quick) / 5 ms; replays fill ~20 / 100 ms.
    """
    call = _rotating(fn, sets)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # JIT, cuBLAS handles, torch.compile: before capture
        for _ in range(min(3, len(sets)) + 1):
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(n):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                call()
        torch.cuda.synchronize()
        return g

    def replay_ms(g):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    target_ms, rep_ms = (2.0, 20.0) if quick else (5.0, 100.0)
    n = len(sets)
    g = capture(n)
    replay_ms(g)
    t = replay_ms(g)
    if t < target_ms:
        k = min(max(1, 4096 // n), math.ceil(target_ms / max(t, 1e-3)))
        if k > 1:
            del g
            n *= k
            g = capture(n)
            replay_ms(g)
            t = replay_ms(g)
    reps = max(5, min(200, math.ceil(rep_ms / max(t, 1e-3))))
    per_call = sorted(1e3 * replay_ms(g) / n for _ in range(reps))
    del g

    def q(f):
        return per_call[min(len(per_call) - 1, int(f * len(per_call)))]

    return {"us": q(0.5), "p20": q(0.2), "p80": q(0.8), "calls_per_graph": n, "replays": reps}


def _copy_gbps(quick: bool) -> Dict[str, float]:
    """Copy bandwidth two ways; the reference is the faster. Captured in a CUDA graph,
    ``copy_`` becomes a memcpy node, which the H200 ran at only 2761 GB/s (2026-12-02)
    while our kernels streamed 4010 GB/s: an elementwise copy kernel is the fair roof."""
    n = 256 << 20  # bf16 elements: 512 MiB per buffer, far beyond L2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    out = {}
    for name, fn in (("memcpy", lambda d, s_: d.copy_(s_)), ("kernel", lambda d, s_: torch.neg(s_, out=d))):
        us = _measure(fn, [(dst, src)], quick)["us"]
        out[name] = 2 * 2 * n / (us * 1e-6) / 1e9
    del src, dst
    out["best"] = max(out["memcpy"], out["kernel"])
    return out


def _launch_config(name: str, T: int) -> Optional[Dict]:
    """The tile config our launcher picks by default (reported next to each time)."""
    try:
        if name == "routing":
            from sglang_gemma4.kernels import routing

            bt, nw = routing._launch_config(T, max(2, 1 << (E - 1).bit_length()))
            return {"block_t": bt, "num_warps": nw, "method": "argmax" if K <= 16 else "bitonic"}
        if name == "gelu_tanh_mul":
            from sglang_gemma4.kernels import ple_tail

            bt, nw = ple_tail._gelu_launch_config(T, max(1, 1 << (H_PLE - 1).bit_length()))
            return {"block_t": bt, "num_warps": nw, "layout": "rows"}
    except (ImportError, AttributeError):
        return None
    return None


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
    if name == "qkv_norm_rope":
        # RoPE mixes a rounded head: outputs near zero carry one ulp of |head| ~ 3 (not of themselves);
        # judge against the output scale
        err = max(((o.float() - r.float()).abs().max() / r.float().abs().max()).item() for o, r in zip(outs, refs))
        return err < 2e-2, err
    err = max(((o.float() - r.float()).abs() / (r.float().abs() + 1e-2)).max().item() for o, r in zip(outs, refs))
    return err < 2e-2, err


def sanity_check(name, op, args):
    """Ours vs the reference on one input set; in-place ops get the reference first, ours on a copy."""
    if op.get("inplace"):
        ref = op["ref"](*args)
        return _sanity(name, op["ours"](*[a.clone() if torch.is_tensor(a) else a for a in args]), ref)
    return _sanity(name, op["ours"](*args), op["ref"](*args))


def _compile(fn):
    import torch._dynamo as dynamo

    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 512))
    return torch.compile(fn, dynamic=False)


def bench(args, on_progress: Optional[Callable[[Dict], None]] = None) -> Dict:
    k = _import_ours()
    sgl, sgl_err = _import_sglang()
    ops = _ops(k, sgl)
    if args.ops:
        ops = {n: o for n, o in ops.items() if n in args.ops}
    t_values = [] if args.tune_only else (QUICK_T if args.quick else FULL_T)
    copy = _copy_gbps(args.quick)
    copy_gbps = copy["best"]
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (memcpy {copy['memcpy']:.0f}, kernel {copy['kernel']:.0f})")
    if sgl is None:
        print(f"sglang kernels: n/a ({sgl_err})")

    results = []
    for name, op in ops.items():
        compiled = _compile(op["eager"])
        for T in t_values:
            per_call = op["bytes"](T)
            sets = _make_sets(op, T)
            ok, err = sanity_check(name, op, sets[0])
            if not ok:
                print(f"WARNING {name} T={T}: ours vs reference max err {err:.3g}")
            row = {"op": name, "width": op["width"], "T": T, "bytes": per_call, "sanity_err": err,
                   "timing": "cudagraph-rotate", "n_sets": len(sets), "config": _launch_config(name, T)}
            for impl in ("ours", "eager", "compile", "sglang"):
                fn = {"ours": op["ours"], "eager": op["eager"], "compile": compiled, "sglang": op["sglang"]}[impl]
                row[f"{impl}_us"] = row[f"{impl}_p20"] = row[f"{impl}_p80"] = None
                if fn is None:
                    continue
                try:
                    m = _measure(fn, sets, args.quick)
                    row[f"{impl}_us"], row[f"{impl}_p20"], row[f"{impl}_p80"] = m["us"], m["p20"], m["p80"]
                except Exception as e:  # noqa: BLE001 - report, keep going
                    print(f"  {name} T={T} {impl}: failed: {type(e).__name__}: {str(e)[:200]}")
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
        if on_progress:  # a run cut short by a time limit still leaves its finished ops on disk
            on_progress(_doc(args, sgl, sgl_err, copy, results, None, partial=True))

    all_ops = _ops(k, sgl)
    tune = None
    if args.tune:
        tune = {}
        if not args.ops or "routing" in args.ops:
            tune["routing"] = _tune(all_ops["routing"], "routing", _routing_configs(), _routing_call(k), args.quick,
                                    args.tune_t)
        if not args.ops or "gelu_tanh_mul" in args.ops:
            tune["gelu_tanh_mul"] = _tune(all_ops["gelu_tanh_mul"], "gelu_tanh_mul", _gelu_configs(),
                                          _gelu_call(k), args.quick, args.tune_t)
    return _doc(args, sgl, sgl_err, copy, results, tune)


def _doc(args, sgl, sgl_err, copy, results, tune, partial: bool = False) -> Dict:
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
        "partial": partial,
        "copy_gbps": copy["best"],
        "copy": copy,
        "timing": "CUDA graph of back-to-back calls over rotating input sets (see module doc)",
        "results": results,
        "tune": tune,
    }


def _routing_configs():
    return [{"method": m, "block_t": bt, "num_warps": nw}
            for m in ("argmax", "bitonic") for bt in (1, 2, 4, 8, 16, 32) for nw in (1, 2, 4, 8)
            if bt * E // nw >= 32]


def _routing_call(k):
    return lambda cfg: (lambda a, s: k.gemma4_routing(a, s, K, **cfg))


def _gelu_configs():
    # rows per program x warps; >= 1 element per thread, tiles up to 32768 elements
    return [{"block_t": bt, "num_warps": nw, "layout": lay}
            for lay in ("rows", "flat") for bt in (1, 2, 4, 8, 16, 32, 64, 128) for nw in (1, 2, 4, 8, 16)
            if bt * H_PLE >= 32 * nw]


def _gelu_call(k):
    return lambda cfg: (lambda g, p: k.gemma_gelu_tanh_mul(g, p, **cfg))


def _same(a, b):
    """Exact for ids / elementwise ops; float sums may reassociate with the tile."""
    if a.dtype.is_floating_point:
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    return torch.equal(a, b)


def _tune(op, name, configs, call_for, quick, t_values=None):
    """Sweep tile configs with the table's own inputs and :func:`_measure`.

    Each T also re-times the default launch (``default_us``) in the same
    sweep, so the table and the sweep can be checked against each other.
    """
    rows, summary = [], []
    for T in t_values or (TUNE_T if not quick else TUNE_T_QUICK):
        sets = _make_sets(op, T)
        ref = op["ours"](*sets[0])
        best = None
        for cfg in configs:
            fn = call_for(cfg)
            try:
                out = fn(*sets[0])
                same = all(_same(a, b) for a, b in zip(
                    out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)))
                if not same:
                    print(f"  tune {name} T={T} {cfg}: output differs from the default launch; skipped")
                    continue
                m = _measure(fn, sets, quick)
            except Exception as e:  # noqa: BLE001
                print(f"  tune {name} T={T} {cfg}: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append({"T": T, **cfg, "us": m["us"], "p20": m["p20"], "p80": m["p80"]})
            if best is None or m["us"] < best[0]:
                best = (m["us"], cfg)
        default = _measure(op["ours"], sets, quick)
        if best is None:
            print(f"{name} tune T={T}: every config failed")
            continue
        summary.append({"T": T, "best": best[1], "best_us": best[0], "default_us": default["us"],
                        "default_config": _launch_config(name, T)})
        print(f"{name} tune T={T}: best {best[1]} {best[0]:.2f} us; default {_launch_config(name, T)} "
              f"{default['us']:.2f} us (p20-p80 {default['p20']:.2f}-{default['p80']:.2f})")
        del sets
        torch.cuda.empty_cache()
    return {"configs": rows, "summary": summary}


# ----------------------------------------------------------------------------- reporting


def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def _cfg(c):
    return "" if not c else " ".join(f"{k}={v}" for k, v in c.items())


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
        ("**Partial run** (cut short): only the ops below finished. " if data.get("partial") else "")
        + f"Device-to-device copy: {data['copy_gbps']:.0f} GB/s"
        + (f" (faster of memcpy {data['copy']['memcpy']:.0f} and copy kernel {data['copy']['kernel']:.0f})"
           if data.get("copy") else "")
        + ". bf16. µs = median per call (p20-p80 for ours) "
        "in a CUDA graph of back-to-back calls over rotating input sets (cold inputs from T = 8192). "
        "×X = X's time / ours (higher is better for us).",
        "",
    ]
    ops = []
    for r in data["results"]:
        if r["op"] not in ops:
            ops.append(r["op"])
    for op in ops:
        rows = [r for r in data["results"] if r["op"] == op]
        lines += [f"## {op} ({rows[0]['width']})", "",
                  "| T | ours µs | ours p20-p80 | config | eager µs | compile µs | sglang µs | ×eager | ×compile "
                  "| ×sglang | GB/s | % copy |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(
                f"| {r['T']} | {_f(r['ours_us'], '.2f')} | {_f(r.get('ours_p20'), '.2f')}-{_f(r.get('ours_p80'), '.2f')} "
                f"| {_cfg(r.get('config'))} | {_f(r['eager_us'], '.2f')} | {_f(r['compile_us'], '.2f')} "
                f"| {_f(r['sglang_us'], '.2f')} | {_f(r['x_eager'], '.2f')} | {_f(r['x_compile'], '.2f')} "
                f"| {_f(r['x_sglang'], '.2f')} | {_f(r['gbps'], '.0f')} "
                f"| {_f(r['frac_copy'] and 100 * r['frac_copy'], '.0f')} |"
            )
        lines.append("")
    for name, t in (data.get("tune") or {}).items():
        lines += [f"## --tune {name}", "", "| T | best config | best µs | default config | default µs |",
                  "|---:|---|---:|---|---:|"]
        for r in t["summary"]:
            lines.append(f"| {r['T']} | {_cfg(r['best'])} | {r['best_us']:.2f} | {_cfg(r['default_config'])} "
                         f"| {r['default_us']:.2f} |")
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


def _t_list(text: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tune-t wants comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"--tune-t wants integers >= 1, got {text!r}")
    return vals


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/", help="output directory (default runs/)")
    p.add_argument("--quick", action="store_true", help=f"T in {QUICK_T}, shorter reps")
    p.add_argument("--tune", action="store_true",
                   help="also sweep routing (block_t/num_warps/method) and gelu_tanh_mul (block_t/num_warps) tiles")
    p.add_argument("--ops", nargs="*", help="subset of ops to run")
    p.add_argument("--tune-t", type=_t_list, default=None,
                   help=f"comma-separated T values for --tune (default {TUNE_T})")
    p.add_argument("--tune-only", action="store_true", help="skip the main table (with --tune)")
    args = p.parse_args(argv)
    if args.tune_only and not args.tune:
        p.error("--tune-only needs --tune")

    if not torch.cuda.is_available():
        print("no CUDA GPU; nothing to time")
        return 0

    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    base = os.path.join(args.out, f"kernels-{slug}")

    def save(doc):
        with open(base + ".json", "w") as f:
            json.dump(doc, f, indent=2)
        write_markdown(doc, base + ".md")

    data = bench(args, on_progress=save)
    save(data)
    wrote_png = write_plot(data, base + ".png")
    print(f"wrote {base}.json, {base}.md" + (f", {base}.png" if wrote_png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
