"""Run every kernel once at small shapes against its fp32 torch reference.

``run_selftest()`` uses CUDA when available; otherwise the kernels must run under
the Triton interpreter, which Triton only honours if ``TRITON_INTERPRET=1`` is in
the environment before ``triton`` is first imported. A CPU caller should therefore
do::

    import os; os.environ.setdefault("TRITON_INTERPRET", "1")   # before any triton import
    from sglang_gemma4.kernels.selftest import run_selftest

``run_selftest`` sets the variable itself when Triton has not been imported yet
(importing ``sglang_gemma4.kernels`` does not import Triton); if Triton was already
imported without it, each entry reports ``ok=False`` with the reason instead of
raising. ``python -m sglang_gemma4.kernels.selftest`` prints a table.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import List, Tuple

import torch


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cases(device: str):
    from . import (
        gemma4_routing,
        gemma4_routing_ref,
        gemma_gelu_tanh_mul,
        gemma_gelu_tanh_mul_ref,
        gemma_post_attn_triple_rmsnorm,
        gemma_post_attn_triple_rmsnorm_ref,
        gemma_rmsnorm_add,
        gemma_rmsnorm_add_ref,
        gemma_rmsnorm_residual_scalar,
        gemma_rmsnorm_residual_scalar_ref,
    )

    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16

    def rnd(*shape, dtype=dt):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    T, H, E, K = 5, 96, 24, 4
    logits, scale = rnd(T, E), (torch.rand(E, generator=g) + 0.5).to(device)
    x, r, w = rnd(T, H), rnd(T, H), rnd(H)
    layer_scalar = torch.tensor([0.75], device=device)
    gate, ple = rnd(T, 32), rnd(T, 32)
    ws = [rnd(H) for _ in range(4)]

    def routing():
        with warnings.catch_warnings():
            # T=5 < the 16-row tile: the padding rows (masked, never stored) decode
            # to NaN and the interpreter's numpy max warns about them; real rows are checked below
            warnings.filterwarnings("ignore", "All-NaN slice encountered", RuntimeWarning)
            wk, ik = gemma4_routing(logits, scale, K)
        wr, ir = gemma4_routing_ref(logits, scale, K)
        if not torch.equal(ik, ir):
            return float("inf")
        return (wk - wr).abs().max().item()

    def pair(fn, ref, *args):
        return lambda: (fn(*args).float() - ref(*args).float()).abs().max().item()

    def triple():
        outs = gemma_post_attn_triple_rmsnorm(x, r, *ws)
        refs = gemma_post_attn_triple_rmsnorm_ref(x, r, *ws)
        return max((o.float() - q.float()).abs().max().item() for o, q in zip(outs, refs))

    def verify():  # a draft chain of 3 over scattered prefixes, sliding window shorter than one of them
        from .verify_attention import verify_attention_fwd, verify_attention_ref

        kb, vb = rnd(20, 2, 16), rnd(20, 2, 16)
        q, kd, vd = rnd(6, 4, 16), rnd(6, 2, 16), rnd(6, 2, 16)
        indptr = torch.tensor([0, 9, 13], dtype=torch.int32, device=device)
        idx = torch.randperm(20, generator=g)[:13].to(device=device, dtype=torch.int32)
        o = torch.empty_like(q)
        verify_attention_fwd(q, kd, vd, o, kb, vb, indptr, idx, 3, 0.25, 5)
        return (o.float() - verify_attention_ref(q, kd, vd, kb, vb, indptr, idx, 3, 0.25, 5).float()).abs().max().item()

    # (name, fn returning max abs error, tolerance): bf16 outputs may differ by one
    # bf16 rounding (~0.4% of |value|, values here are O(1..10)).
    return [
        ("gemma4_routing", routing, 1e-5),
        ("gemma_rmsnorm_add", pair(gemma_rmsnorm_add, gemma_rmsnorm_add_ref, x, w, r), 0.1),
        (
            "gemma_rmsnorm_residual_scalar",
            pair(gemma_rmsnorm_residual_scalar, gemma_rmsnorm_residual_scalar_ref, x, w, r, layer_scalar),
            0.1,
        ),
        ("gemma_gelu_tanh_mul", pair(gemma_gelu_tanh_mul, gemma_gelu_tanh_mul_ref, gate, ple), 0.1),
        ("gemma_post_attn_triple_rmsnorm", triple, 0.1),
        ("verify_attention", verify, 0.05),  # bf16 probabilities before p @ v, as SGLang's kernel
    ]


_NAMES = [
    "gemma4_routing",
    "gemma_rmsnorm_add",
    "gemma_rmsnorm_residual_scalar",
    "gemma_gelu_tanh_mul",
    "gemma_post_attn_triple_rmsnorm",
    "verify_attention",
]


def run_selftest() -> List[Tuple[str, bool, float]]:
    """Return ``[(op name, ok, max abs error vs reference), ...]``; never raises.

    Without CUDA, turns the Triton interpreter on itself if Triton has not been
    imported yet; if Triton was already imported without it, reports why.
    """
    device = _device()
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            reason = "no CUDA, and triton was imported before TRITON_INTERPRET=1 was set"
            return [(f"{n} ({reason})", False, float("nan")) for n in _NAMES]
        os.environ["TRITON_INTERPRET"] = "1"
    results = []
    try:
        cases = _cases(device)
    except Exception as e:
        return [(f"{n} ({type(e).__name__}: {e})", False, float("nan")) for n in _NAMES]
    for name, fn, tol in cases:
        try:
            err = fn()
            results.append((name, bool(err <= tol), float(err)))
        except Exception as e:  # report, don't crash the CLI
            results.append((f"{name} ({type(e).__name__}: {e})", False, float("nan")))
    return results


def main() -> int:
    rows = run_selftest()
    for name, ok, err in rows:
        print(f"{'ok  ' if ok else 'FAIL'} {name:40s} max_err={err:.3g}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
