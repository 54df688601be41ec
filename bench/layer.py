"""GPU time of SGLang 0.5.17's Gemma-4 decoder layers with the fused patches on vs off.

    python bench/layer.py --out runs/            # 26B-A4B MoE and E4B PLE shapes, T = 1, 8, 32, 128
    python bench/layer.py --out runs/ --quick    # fewer rounds

Why not only bench/e2e.py: at reduced depth the engine's decode step is bound by the
scheduler's CPU time (4 layers at 26B widths: ~2.4 ms/step at bs1 with CUDA graphs, and
the 8-layer model was no slower, H200 2026-12-02), so a few µs per layer drown in it.
Here a chain of real ``Gemma4DecoderLayer``s (distinct weights, so the L2 holds none of
the next layer's) runs in one CUDA graph and only GPU time counts. Every arm's graph is
alive at once and the arms are replayed in turn, round after round, so clock and
thermal drift hit all of them; per arm the median round and its p20-p80 are reported.

Real: SGLang's norms, dense MLP, router, MoE (SGLang's FusedMoE Triton experts where they
run outside an engine, else a torch stand-in reading the same expert bytes; the JSON
says which), the post-FF tail, PLE gate/projection. Not real: attention is its QKV and O
projections at the model's sizes; the attention kernel itself (a function of context
length) is left out, as are sampling and the scheduler. Projected step = real depth x
per-layer time + the lm_head GEMM, both measured here: a GPU-time lower bound of a
decode step, against which the saving is a fraction.

Writes runs/layer-<gpu>.json, .md and .png. Without a CUDA GPU it prints one line and
exits 0 (the CPU test drives :func:`build_chain` and :func:`run_chain` directly).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from typing import Dict, List, Optional

import torch

SHAPES = {
    # 26B-A4B: anchors.md / checkpoints.moe26b_w; real depth 30, 5 sliding : 1 full
    "moe26b": dict(
        hidden=2816, intermediate=2112, heads=16, swa_head_dim=256, full_head_dim=512, swa_kv=8, full_kv=2,
        experts=128, top_k=8, moe_intermediate=704, ple=0, vocab=262144, depth=30,
        # arm -> patch modules it turns on; "off" is SGLang 0.5.17 as shipped
        arms={"off": (), "routing": ("fused_routing",), "fused": ("fused_routing", "fused_triple_norm")},
    ),
    # E4B: PLE on every layer; real depth 42
    "e4b": dict(
        hidden=2560, intermediate=10240, heads=8, swa_head_dim=256, full_head_dim=512, swa_kv=2, full_kv=2,
        experts=0, top_k=0, moe_intermediate=0, ple=256, vocab=262144, depth=42,
        arms={"off": (), "fused": ("fused_ple",)},
    ),
}
CHAIN = 4  # layers per graph: 3 sliding + 1 full
FULL_T = [1, 8, 32, 128]


def _import_plugin():
    try:
        import sglang_gemma4  # noqa: F401
    except ImportError:  # a checkout without `pip install -e .`
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))


# ----------------------------------------------------------------------------- model pieces


class ProjAttention(torch.nn.Module):
    """Gemma4Attention's cost without its kernel: QKV and O projections at the model's sizes."""

    def __init__(self, layer_id, config, head_dim, **kwargs):
        super().__init__()
        full = config.layer_types[layer_id] == "full_attention"
        kv = config.num_key_value_heads if full else config.swa_num_key_value_heads
        self.q_size = config.num_attention_heads * head_dim
        self.qkv = torch.nn.Linear(config.hidden_size, self.q_size + 2 * kv * head_dim, bias=False)
        self.o = torch.nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(self, positions, hidden_states, forward_batch):
        return self.o(self.qkv(hidden_states)[:, : self.q_size])


class GatherExperts(torch.nn.Module):
    """Stand-in for FusedMoE's experts where they cannot run outside an engine: reads the picked
    experts' weights (gathered per token, so only small T: see ``GATHER_MAX_T``)."""

    def __init__(self, experts, hidden, inter, dtype):
        super().__init__()
        self.gate_up = torch.nn.Parameter(torch.empty(experts, 2 * inter, hidden, dtype=dtype))
        self.down = torch.nn.Parameter(torch.empty(experts, hidden, inter, dtype=dtype))

    def forward(self, hidden_states, topk_weights, topk_ids):
        ids = topk_ids.long()
        gu = torch.einsum("th,tkih->tki", hidden_states, self.gate_up[ids])
        g, u = gu.chunk(2, dim=-1)
        a = torch.nn.functional.gelu(g, approximate="tanh") * u
        out = torch.einsum("tki,tkhi->tkh", a, self.down[ids])
        return (topk_weights[..., None].to(out.dtype) * out).sum(1)


class MoEWithStandIn(torch.nn.Module):
    """Gemma4MoE with SGLang's own TopK (so the routing kernel is the real one) and stand-in experts."""

    def __init__(self, moe, experts):
        super().__init__()
        self.per_expert_scale = moe.per_expert_scale
        self.topk = moe.topk
        self.experts = experts

    def forward(self, hidden_states, router_logits):
        out = self.topk(hidden_states, router_logits)
        return self.experts(hidden_states, out.topk_weights, out.topk_ids)


GATHER_MAX_T = 8  # T x top_k gathered expert copies: 760 MB at T=8 for 26B widths


def text_config(shape: Dict, depth: int):
    from transformers import Gemma4TextConfig

    layer_types = ["sliding_attention"] * (depth - 1) + ["full_attention"]
    kw = dict(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=depth,
        num_attention_heads=shape["heads"], num_key_value_heads=shape["full_kv"],
        head_dim=shape["full_head_dim"], global_head_dim=shape["full_head_dim"],
        sliding_window=1024, layer_types=layer_types, vocab_size=shape["vocab"],
        hidden_size_per_layer_input=shape["ple"], rms_norm_eps=1e-6,
    )
    if shape["experts"]:
        kw.update(enable_moe_block=True, num_experts=shape["experts"], top_k_experts=shape["top_k"],
                  moe_intermediate_size=shape["moe_intermediate"])
    cfg = Gemma4TextConfig(**kw)
    # SGLang 0.5.17 derives these only for model types gemma4/gemma4_assistant, not gemma4_text
    cfg.swa_num_key_value_heads = shape["swa_kv"]
    cfg.swa_head_dim = shape["swa_head_dim"]
    cfg.swa_v_head_dim = shape["swa_head_dim"]
    cfg.v_head_dim = shape["full_head_dim"]
    return cfg


def _randomize_plain(module, seed: int) -> torch.Generator:
    """Every parameter ~ N(0, 1/fan_in); returns the generator so callers can draw on from it."""
    dev = next(module.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32) / max(1, p.shape[-1]) ** 0.5)
    return g


def _randomize(module, seed: int):
    """Scaled normal weights, norm weights near 1: activations stay O(1) through the chain."""
    from sglang.srt.layers.layernorm import Gemma4RMSNorm, RMSNorm

    g = _randomize_plain(module, seed)
    dev = g.device
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (RMSNorm, Gemma4RMSNorm)) and isinstance(getattr(m, "weight", None), torch.nn.Parameter):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, device=dev))
        if hasattr(module, "layer_scalar"):
            module.layer_scalar.fill_(0.7)
        if getattr(module, "router", None) is not None:
            module.router.scale.copy_(1 + 0.3 * torch.randn(module.router.scale.shape, generator=g, device=dev))
            pes = module.moe.per_expert_scale
            pes.copy_(0.5 + torch.rand(pes.shape, generator=g, device=dev))


def build_chain(shape: Dict, depth: int, device: str, dtype=torch.bfloat16, experts: str = "auto"):
    """``depth`` real Gemma4DecoderLayers (attention = ProjAttention). experts: auto|sglang|gather."""
    from sglang.srt.models import gemma4_causal

    cfg = text_config(shape, depth)
    real_attn = gemma4_causal.Gemma4Attention
    gemma4_causal.Gemma4Attention = ProjAttention
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            layers = [gemma4_causal.Gemma4DecoderLayer(i, cfg, prefix=f"model.layers.{i}") for i in range(depth)]
    finally:
        gemma4_causal.Gemma4Attention = real_attn
        torch.set_default_dtype(prev)
    for i, layer in enumerate(layers):
        layer.to(device=device, dtype=dtype)
        _randomize(layer, seed=i)
    kind = "none"
    if shape["experts"]:
        kind = "sglang-fusedmoe"
        if experts == "gather" or (experts == "auto" and not _fusedmoe_runs(layers[0], shape, device, dtype)):
            kind = "torch-gather"
            for i, layer in enumerate(layers):
                layer.moe.experts = None  # free FusedMoE's weights before the stand-in's
                stand_in = GatherExperts(shape["experts"], shape["hidden"], shape["moe_intermediate"], dtype).to(device)
                _randomize_plain(stand_in, seed=100 + i)
                layer.moe = MoEWithStandIn(layer.moe, stand_in)
    return layers, kind


_FUSEDMOE_ERROR: Optional[str] = None


def _fusedmoe_runs(layer, shape, device, dtype) -> bool:
    """SGLang's FusedMoE needs engine-level MoE config; try one call and keep the reason if it fails."""
    global _FUSEDMOE_ERROR
    if device != "cuda":
        _FUSEDMOE_ERROR = "no CUDA: FusedMoE's Triton experts run on GPU only"
        return False
    try:
        x = torch.randn(3, shape["hidden"], device=device, dtype=dtype)
        logits = torch.randn(3, shape["experts"], device=device, dtype=dtype)
        with torch.no_grad():
            out = layer.moe(x, logits)
        ok = tuple(out.shape) == (3, shape["hidden"]) and bool(torch.isfinite(out).all())
        if not ok:
            _FUSEDMOE_ERROR = f"FusedMoE returned shape {tuple(out.shape)} / non-finite values"
        return ok
    except Exception as e:  # noqa: BLE001 - any failure means "use the stand-in", recorded
        _FUSEDMOE_ERROR = f"{type(e).__name__}: {str(e)[:300]}"
        return False


@contextlib.contextmanager
def arm_applied(patches):
    """Apply these patches through HookRegistry (tests' helper restores SGLang on exit)."""
    import importlib

    from sglang_gemma4 import registry
    from sglang_gemma4.testing.hooks import patch_applied

    with contextlib.ExitStack() as stack:
        for name in patches:
            mod = importlib.import_module(f"sglang_gemma4.patches.{name}")
            status = stack.enter_context(patch_applied(mod.PATCH, {}))
            if status.state != registry.ACTIVE:
                raise RuntimeError(f"patch {name} is not active ({status.state}): {status.reason}")
        yield


# Our kernels' entry points, per patch: an arm whose chain never called them measured nothing.
PATCH_KERNELS = {
    "fused_routing": ("routing", ("gemma4_routing",)),
    "fused_triple_norm": ("triple_rmsnorm", ("gemma_post_attn_triple_rmsnorm",)),
    "fused_ple": ("ple_tail", ("gemma_rmsnorm_add", "gemma_gelu_tanh_mul", "gemma_rmsnorm_residual_scalar")),
}


@contextlib.contextmanager
def count_kernel_calls():
    """{patch: calls} of our kernels while inside (the hooks import them at call time)."""
    import importlib

    counts = {name: 0 for name in PATCH_KERNELS}
    saved = []
    for patch, (mod_name, fns) in PATCH_KERNELS.items():
        mod = importlib.import_module(f"sglang_gemma4.kernels.{mod_name}")
        for fn_name in fns:
            fn = getattr(mod, fn_name)

            def spy(*a, _fn=fn, _patch=patch, **k):
                counts[_patch] += 1
                return _fn(*a, **k)

            saved.append((mod, fn_name, fn))
            setattr(mod, fn_name, spy)
    try:
        yield counts
    finally:
        for mod, fn_name, fn in saved:
            setattr(mod, fn_name, fn)


def check_arm_ran(arm: str, patches, counts: Dict[str, int]) -> None:
    """Every patch of the arm ran its kernel and no other patch's kernel ran."""
    idle = [p for p in patches if counts[p] == 0]
    stray = [p for p, n in counts.items() if n and p not in patches]
    if idle or stray:
        raise RuntimeError(f"arm {arm!r}: patches {idle} never ran their kernels (the hook fell back to "
                           f"SGLang's code), kernels of {stray} ran uninvited; counts {counts}")


def run_chain(layers, x, ple: Optional[torch.Tensor]):
    """One pass through the chain; x is not modified (0.5.17 overwrites its input in place)."""
    h = x.clone()
    for i, layer in enumerate(layers):
        p = None if ple is None else ple[:, i, :]
        h, _ = layer(positions=None, hidden_states=h, per_layer_input=p, forward_batch=None)
    return h


# ----------------------------------------------------------------------------- timing


def _graph(fn, warmup: int = 3):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def _time_rounds(graphs: Dict[str, "torch.cuda.CUDAGraph"], replays: int, rounds: int) -> Dict[str, List[float]]:
    """µs per replay, one list per arm; the arms take turns within every round."""
    times = {k: [] for k in graphs}
    for g in graphs.values():  # warm
        for _ in range(3):
            g.replay()
    torch.cuda.synchronize()
    for r in range(rounds):
        order = list(graphs) if r % 2 == 0 else list(reversed(graphs))
        for k in order:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(replays):
                graphs[k].replay()
            b.record()
            b.synchronize()
            times[k].append(a.elapsed_time(b) * 1e3 / replays)
    return times


def _q(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(T: int, times: Dict[str, List[float]], arms: List[str], depth: int, chain: int) -> Dict:
    """One T's row: per arm the per-layer µs (chain time minus the input copy, / chain), the
    projected step (depth x layer + lm_head) and the ratios against "off"."""
    copy = _q(times["copy"], 0.5)
    row = {"T": T, "lm_head_us": _q(times["lm_head"], 0.5), "copy_us": copy, "arms": {}}
    for arm in arms:
        net = [t - copy for t in times[arm]]
        a = row["arms"][arm] = {
            "layer_us": _q(net, 0.5) / chain,
            "layer_p20_us": _q(net, 0.2) / chain,
            "layer_p80_us": _q(net, 0.8) / chain,
            "rounds_us": times[arm],
        }
        a["step_us"] = depth * a["layer_us"] + row["lm_head_us"]
    off = row["arms"]["off"]
    for arm in arms:
        a = row["arms"][arm]
        a["saved_per_layer_us"] = off["layer_us"] - a["layer_us"]
        a["layer_speedup"] = off["layer_us"] / a["layer_us"]
        a["step_speedup"] = off["step_us"] / a["step_us"]
    return row


def bench_shape(name: str, shape: Dict, t_values: List[int], replays: int, rounds: int, experts: str) -> Dict:
    dev, dt = "cuda", torch.bfloat16
    layers, kind = build_chain(shape, CHAIN, dev, dt, experts)
    arms = shape["arms"]
    lm_head = torch.randn(shape["vocab"], shape["hidden"], device=dev, dtype=dt) / shape["hidden"] ** 0.5
    rows, skipped, arm_errors = [], [], {}
    for T in t_values:
        if kind == "torch-gather" and T > GATHER_MAX_T:
            skipped.append(T)
            continue
        g = torch.Generator(device=dev).manual_seed(T)
        x = torch.randn(T, shape["hidden"], device=dev, dtype=dt, generator=g)
        ple = (torch.randn(T, CHAIN, shape["ple"], device=dev, dtype=dt, generator=g) if shape["ple"] else None)
        graphs, outs = {}, {}
        with torch.no_grad():
            for arm in arms:
                try:
                    with arm_applied(shape["arms"][arm]), count_kernel_calls() as calls:
                        graphs[arm], outs[arm] = _graph(lambda: run_chain(layers, x, ple))
                    check_arm_ran(arm, shape["arms"][arm], calls)
                except Exception as e:  # noqa: BLE001 - one arm's failure is reported, the others still run
                    if arm == "off":
                        raise
                    graphs.pop(arm, None)
                    outs.pop(arm, None)
                    arm_errors.setdefault(arm, f"T={T}: {type(e).__name__}: {str(e)[:400]}")
                    print(f"{name} T={T} arm {arm} failed: {arm_errors[arm]}", flush=True)
            graphs["copy"], _ = _graph(lambda: x.clone())  # run_chain's input copy, subtracted below
            graphs["lm_head"], _ = _graph(lambda: torch.nn.functional.linear(x, lm_head))
            for k in outs:
                graphs[k].replay()
            torch.cuda.synchronize()
            ref = outs["off"].float()
            check = {}
            for arm in outs:
                o = outs[arm].float()
                check[arm] = {"finite": bool(torch.isfinite(o).all()),
                              "rel_err_vs_off": float((o - ref).norm() / ref.norm().clamp_min(1e-30))}
            times = _time_rounds(graphs, replays, rounds)
        row = summarize(T, times, list(outs), shape["depth"], CHAIN)
        row["check"] = check
        rows.append(row)
        print(f"{name:7s} T={T:4d} " + "  ".join(
            f"{arm}: {row['arms'][arm]['layer_us']:7.2f} us/layer ({row['arms'][arm]['layer_speedup']:.3f}x, "
            f"step {row['arms'][arm]['step_speedup']:.3f}x)" for arm in row["arms"]), flush=True)
        del graphs, outs
        torch.cuda.empty_cache()
    del layers
    torch.cuda.empty_cache()
    return {"shape": shape, "experts": kind, "fusedmoe_error": _FUSEDMOE_ERROR if kind == "torch-gather" else None,
            "chain": CHAIN, "rows": rows, "skipped_T": skipped, "arm_errors": arm_errors}


# ----------------------------------------------------------------------------- output


def write_markdown(doc: Dict, path: str) -> None:
    lines = [
        f"# Decoder-layer GPU time, fused patches on vs off: {doc['gpu']}", "",
        f"{doc['versions']}, {doc['date']}. bf16; {doc['chain']} real SGLang `Gemma4DecoderLayer`s "
        f"(3 sliding + 1 full, distinct weights) in one CUDA graph, {doc['replays']} replays per timing, "
        f"{doc['rounds']} rounds with the arms in turn; median round (p20-p80) / {doc['chain']}. "
        "Attention = its QKV/O projections (no attention kernel). Arms: off = SGLang 0.5.17 as shipped; "
        "routing = our routing kernel; fused = routing + triple RMSNorm (MoE) or PLE tail (E4B). "
        "Projected step = real depth x layer + lm_head GEMM (GPU time only: no attention kernel, "
        "sampling or scheduler). x = off / arm. max rel err = an arm's chain output vs off's, both bf16: "
        "on MoE shapes it is top-8 expert flips between two bf16 roundings of the router input "
        "(test/bench/test_layer_bench.py: against an fp32 run the fused chain is as close as SGLang's own).", "",
    ]
    for name, res in doc["shapes"].items():
        sh = res["shape"]
        lines += [f"## {name} (hidden {sh['hidden']}, depth {sh['depth']}; experts: {res['experts']})", ""]
        if res.get("fusedmoe_error"):
            lines += [f"FusedMoE outside an engine failed ({res['fusedmoe_error']}); experts are the torch stand-in.", ""]
        for arm, err in (res.get("arm_errors") or {}).items():
            lines += [f"Arm `{arm}` not timed: {err}", ""]
        if res.get("skipped_T"):
            lines += [f"Not timed with the stand-in (gathered expert copies too large): T = {res['skipped_T']}.", ""]
        arms = sh["arms"]
        lines.append("| T | " + " | ".join(f"{a} µs/layer (p20-p80)" for a in arms)
                     + " | saved µs/layer | x layer | lm_head µs | step ms off -> fused | x step | max rel err |")
        lines.append("|---:|" + "---:|" * len(arms) + "---:|---:|---:|---|---:|---:|")
        for r in res["rows"]:
            A = r["arms"]
            last = [a for a in arms if a in A][-1]
            cells = [f"{A[a]['layer_us']:.2f} ({A[a]['layer_p20_us']:.2f}-{A[a]['layer_p80_us']:.2f})"
                     if a in A else "n/a" for a in arms]
            err = max(c["rel_err_vs_off"] for c in r["check"].values())
            lines.append(
                f"| {r['T']} | " + " | ".join(cells)
                + f" | {A[last]['saved_per_layer_us']:.2f} | {A[last]['layer_speedup']:.3f} | {r['lm_head_us']:.1f}"
                + f" | {A['off']['step_us'] / 1e3:.3f} -> {A[last]['step_us'] / 1e3:.3f} | {A[last]['step_speedup']:.3f} | {err:.1e} |"
            )
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(doc: Dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(doc["shapes"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        res = doc["shapes"][name]
        for arm in res["shape"]["arms"]:
            pts = [(r["T"], r["arms"][arm]) for r in res["rows"] if arm in r["arms"]]
            if not pts:
                continue
            ax.errorbar([t for t, _ in pts], [a["layer_us"] for _, a in pts],
                        yerr=[[a["layer_us"] - a["layer_p20_us"] for _, a in pts],
                              [a["layer_p80_us"] - a["layer_us"] for _, a in pts]],
                        marker="o", capsize=3, label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("µs per layer (GPU, CUDA graph)")
        ax.set_title(f"{name} ({res['experts']})")
        ax.legend()
    fig.suptitle(f"Gemma-4 decoder layer, fused on vs off - {doc['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _versions() -> str:
    import triton

    try:
        import sglang

        sv = sglang.__version__
    except Exception:  # noqa: BLE001
        sv = "n/a"
    return f"torch {torch.__version__}, triton {triton.__version__}, sglang {sv}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--t", default=",".join(map(str, FULL_T)), help="token counts (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and replays")
    ap.add_argument("--experts", choices=("auto", "sglang", "gather"), default="auto")
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"unknown shape(s) {bad}; known: {sorted(SHAPES)}")
    try:
        t_values = [int(t) for t in args.t.split(",") if t]
    except ValueError:
        ap.error(f"--t must be comma-separated integers, got {args.t!r}")
    if not t_values or min(t_values) < 1:
        ap.error(f"--t needs token counts >= 1, got {args.t!r}")
    if not torch.cuda.is_available():
        print("bench/layer.py: no CUDA GPU here, nothing to time")
        return 0
    _import_plugin()
    replays, rounds = (20, 9) if args.quick else (50, 21)
    gpu = torch.cuda.get_device_name()
    doc = {"gpu": gpu, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": _versions(), "chain": CHAIN, "replays": replays, "rounds": rounds, "shapes": {}}
    slug = gpu.lower().replace(" ", "-")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"layer-{slug}")
    from sglang_gemma4.testing.configs import sglang_tp1

    with sglang_tp1("cuda"):
        for name in shapes:
            doc["shapes"][name] = bench_shape(name, SHAPES[name], t_values, replays, rounds, args.experts)
            with open(base + ".json", "w") as f:  # after each shape: a cut-off run keeps what it measured
                json.dump(doc, f, indent=1)
    write_markdown(doc, base + ".md")
    png = write_plot(doc, base + ".png")
    print(f"wrote {base}.json, {base}.md" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
