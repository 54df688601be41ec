"""bf16 noise calibration of the tiny GPU-suite checkpoints, on CPU with transformers.

Why: the engine suite compares greedy tokens of two engines only up to the
first step whose reference top-1 margin is below a threshold
(``engine.compare_greedy``). That threshold must come from how far two valid
bf16 paths move a margin, measured independently of the engines under test.
This script measures it on the exact checkpoints and prompts the suite uses
(``checkpoints.build("dense_ple"|"moe")``, ``suite`` prompts, 24 new tokens):

* paths: fp32 (weights are bf16 values, so fp32 is the exact reference);
  bf16 one forward over the whole sequence ("full", like prefill/verify);
  bf16 prompt forward + token-by-token KV-cache decode ("decode").
* teacher-forced on the fp32 greedy trajectory: per step, the change of the
  fp32 top-1/top-2 logit gap under each bf16 path (and between the two bf16
  paths), the final-logit magnitude (softcap 30) and, for MoE, how often the
  router's top-k expert set differs from fp32.
* free-running bf16 greedy: first step that leaves the fp32 trajectory and
  the fp32 margin there.
* MoE routing (fp32 model): k-th vs (k+1)-th router score gap, top-1 share
  of the top-k weights, expert usage per layer, distinct top-k sets.
* the threshold rule (``min_margin_rule``) and ``comparison_estimate``: the
  decisive fraction ``engine.compare_greedy`` would report for two valid bf16
  paths standing in for plugin off/on (on dense_ple it predicts 67 % where the
  H200 plugin A/B measured 66 %).
* optionally (``--gpu-suite``), the recorded H200 runs teacher-forced through
  the fp32 model: at every step, is the engine's token the fp32 argmax, and if
  not by how much it is worse ("regret"); and |engine margin - fp32 margin|.
  Runs whose first tokens are mostly not the fp32 argmax (recorded on another
  checkpoint) are skipped.

``python bench/numerics_calibration.py --out runs/numerics-calibration.json
--gpu-suite /tmp/r3/gpu-suite.json`` (about 2 min per variant on 2 CPU cores,
4 for moe). ``--variants moe`` re-runs only moe and keeps the other variants'
recorded entries (and ``history``) of an existing ``--out`` file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from sglang_gemma4.testing import checkpoints as ck
from sglang_gemma4.testing import reference
from sglang_gemma4.testing import suite
from sglang_gemma4.testing.engine import mixed_prompts

PROMPT_SEED = {"dense_ple": 0, "moe": 1}  # as suite.suite_configs
GPU_RUNS = {"dense_ple": ["dense_off", "dense_on", "random_spec_v2_0", "random_spec_v2_1"], "moe": ["moe_off", "moe_on"]}


def fp32_router(model) -> None:
    """Run every MoE router in fp32 (as SGLang's fused top-k does) inside a bf16 model."""
    for name, mod in model.named_modules():
        if name.endswith(".router"):
            mod.float()
            inner = mod.forward

            def fwd(h, _inner=inner):
                probs, w, idx = _inner(h.float())
                return probs, w, idx

            mod.forward = fwd


def load(variant: str, dtype: torch.dtype):
    # transformers' default attention (sdpa), as the recorded calibration ran
    model, _ = reference.load(variant, dtype=dtype, attn=None)
    return model, model.config


class RouterTap:
    """Records each MoE router's top-k expert ids (and score gaps, top-k weights) per forward."""

    def __init__(self, model):
        self.handles = []
        self.routers = [m for n, m in model.named_modules() if n.endswith(".router")]
        for i, r in enumerate(self.routers):
            self.handles.append(r.register_forward_hook(self._hook(i)))
        self.cur: Dict[int, torch.Tensor] = {}
        self.extra: Dict[int, Dict[str, torch.Tensor]] = {}

    def _hook(self, i):
        def fn(mod, inp, out):
            probs, weights, ids = out
            self.cur[i] = ids.detach().sort(dim=-1).values.clone()
            # softmax is monotone: log p_k - log p_{k+1} is the raw score gap
            k = ids.shape[-1]
            lp = probs.detach().float().log().sort(dim=-1, descending=True).values
            w = weights.detach().float()
            self.extra[i] = {"gap": lp[:, k - 1] - lp[:, k], "w_max": (w / w.sum(-1, keepdim=True)).max(-1).values}

        return fn

    def take(self) -> Optional[torch.Tensor]:
        """[layers, tokens, k] of the last forward."""
        if not self.routers:
            return None
        t = torch.stack([self.cur[i] for i in range(len(self.routers))])
        self.cur = {}
        return t

    def take_extra(self) -> Dict[str, torch.Tensor]:
        """{"gap", "w_max"}: [layers, tokens] of the last forward."""
        out = {k: torch.stack([self.extra[i][k] for i in range(len(self.routers))]) for k in ("gap", "w_max")}
        self.extra = {}
        return out


@torch.no_grad()
def full_logits(model, seq: List[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([seq])).logits[0].float()


@torch.no_grad()
def decode_logits(model, prompt: List[int], cont: List[int]) -> torch.Tensor:
    """Logits predicting cont[0..n-1]: prompt forward, then one token per step with the KV cache."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    pkv, rows = out.past_key_values, [out.logits[0, -1].float()]
    for t in cont[:-1]:
        out = model(input_ids=torch.tensor([[t]]), past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        rows.append(out.logits[0, -1].float())
    return torch.stack(rows)


@torch.no_grad()
def greedy_decode(model, prompt: List[int], n: int) -> List[int]:
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    pkv, toks = out.past_key_values, []
    for _ in range(n):
        t = int(out.logits[0, -1].float().argmax())
        toks.append(t)
        if len(toks) == n:
            break
        out = model(input_ids=torch.tensor([[t]]), past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
    return toks


@torch.no_grad()
def greedy_full(model, prompt: List[int], n: int) -> List[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
    return seq[len(prompt):]


def margins_of(lg: torch.Tensor) -> torch.Tensor:
    top = lg.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def quantiles(xs: List[float]) -> Dict[str, float]:
    if not xs:
        return {}
    t = torch.tensor(xs, dtype=torch.float64).sort().values
    q = lambda p: float(t[min(len(t) - 1, int(math.ceil(p * len(t))) - 1)])
    return {"n": len(xs), "mean": float(t.mean()), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": float(t[-1])}


first_div = reference.first_difference


def calibrate(variant: str, n_new: int, router_fp32: bool = False) -> Dict[str, Any]:
    V = ck.spec(variant).text.vocab_size
    prompts = mixed_prompts(suite.N_PROMPTS, V, seed=PROMPT_SEED[variant])
    m32, cfg = load(variant, torch.float32)
    m16, _ = load(variant, torch.bfloat16)
    if router_fp32:
        fp32_router(m16)
    tap32, tap16 = RouterTap(m32), RouterTap(m16)
    rec: Dict[str, Any] = {"softcap": cfg.final_logit_softcapping, "router_fp32": router_fp32, "prompts": []}
    dgap = {"bf16_full_vs_fp32": [], "bf16_decode_vs_fp32": [], "bf16_decode_vs_bf16_full": [], "fp32_decode_vs_fp32_full": []}
    dmargin = {k: [] for k in dgap}
    top1_abs, expert_flip_frac, flip_dgap, noflip_dgap = [], [], [], []
    router_gap, router_wmax, topk_sets = [], [], set()
    n_exp = getattr(cfg, "num_experts", None) or 0
    usage = torch.zeros(cfg.num_hidden_layers, n_exp, dtype=torch.long)
    for i, p in enumerate(prompts):
        ref = greedy_decode(m32, p, n_new)  # fp32 trajectory
        seq = p + ref
        lo = len(p) - 1
        L = {
            "fp32": full_logits(m32, seq)[lo : lo + n_new],
        }
        r32 = tap32.take()
        if r32 is not None:
            ex = tap32.take_extra()
            router_gap += ex["gap"].flatten().tolist()
            router_wmax += ex["w_max"].flatten().tolist()
            for layer, ids in enumerate(r32):
                usage[layer] += torch.bincount(ids.flatten(), minlength=usage.shape[1])
            topk_sets.update(tuple(x) for x in r32[:, lo : lo + n_new].reshape(-1, r32.shape[-1]).tolist())
        L["bf16_full"] = full_logits(m16, seq)[lo : lo + n_new]
        r16 = tap16.take()
        L["bf16_decode"] = decode_logits(m16, p, ref)
        tap16.take()
        L["fp32_decode"] = decode_logits(m32, p, ref)
        tap32.take()
        top2 = L["fp32"].topk(2, dim=-1).indices
        a, b = top2[:, 0], top2[:, 1]
        gap = {k: (v.gather(1, a[:, None]) - v.gather(1, b[:, None]))[:, 0] for k, v in L.items()}
        marg = {k: margins_of(v) for k, v in L.items()}
        pairs = {
            "bf16_full_vs_fp32": ("bf16_full", "fp32"),
            "bf16_decode_vs_fp32": ("bf16_decode", "fp32"),
            "bf16_decode_vs_bf16_full": ("bf16_decode", "bf16_full"),
            "fp32_decode_vs_fp32_full": ("fp32_decode", "fp32"),
        }
        for key, (x, y) in pairs.items():
            dgap[key] += (gap[x] - gap[y]).abs().tolist()
            dmargin[key] += (marg[x] - marg[y]).abs().tolist()
        top1_abs += L["fp32"].max(dim=-1).values.abs().tolist()
        row: Dict[str, Any] = {"len": len(p), "fp32_tokens": ref, "fp32_margins": [round(x, 4) for x in marg["fp32"].tolist()]}
        if r32 is not None:
            # router decisions for the positions that predict output tokens (and the whole prompt)
            diff = (r32 != r16).any(dim=-1)  # [layers, tokens]
            expert_flip_frac.append((int(diff.sum()), diff.numel()))
            tok_flip = diff[:, lo : lo + n_new].any(dim=0)
            d = (gap["bf16_full"] - gap["fp32"]).abs()
            flip_dgap += d[tok_flip].tolist()
            noflip_dgap += d[~tok_flip].tolist()
            row["expert_set_flips"] = int(diff.sum())
            row["expert_set_decisions"] = diff.numel()
        for name, fn in (("bf16_decode", greedy_decode), ("bf16_full", greedy_full)):
            toks = fn(m16, p, n_new)
            k = first_div(ref, toks)
            row[f"{name}_first_div"] = k
            row[f"{name}_fp32_margin_at_div"] = None if k is None else round(float(marg["fp32"][k]), 4)
            row[f"{name}_tokens"] = toks
        # what an engine's logprob pass reports for its own (bf16 decode) trajectory
        own = full_logits(m16, p + row["bf16_decode_tokens"])[lo : lo + n_new]
        row["bf16_decode_margins"] = [round(x, 4) for x in margins_of(own).tolist()]
        if r32 is not None:
            tap16.take()
        rec["prompts"].append(row)
        print(f"[{variant}{' router_fp32' if router_fp32 else ''}] prompt {i} len {len(p)}: bf16 decode div {row['bf16_decode_first_div']} "
              f"(fp32 margin {row['bf16_decode_fp32_margin_at_div']}), full div {row['bf16_full_first_div']}", flush=True)
    for h in tap32.handles + tap16.handles:
        h.remove()
    rec["delta_gap"] = {k: quantiles(v) for k, v in dgap.items()}
    rec["delta_margin"] = {k: quantiles(v) for k, v in dmargin.items()}
    rec["top1_logit_abs"] = quantiles(top1_abs)
    divs = [r["bf16_decode_fp32_margin_at_div"] for r in rec["prompts"] if r["bf16_decode_fp32_margin_at_div"] is not None]
    divs += [r["bf16_full_fp32_margin_at_div"] for r in rec["prompts"] if r["bf16_full_fp32_margin_at_div"] is not None]
    rec["fp32_margin_at_bf16_divergence"] = {"count": len(divs), "max": max(divs) if divs else None, "values": sorted(divs)}
    if expert_flip_frac:
        f, n = map(sum, zip(*expert_flip_frac))
        rec["moe"] = {
            "expert_set_flips": f,
            "expert_set_decisions": n,
            "flip_rate": f / n,
            "delta_gap_output_steps_with_a_flip": quantiles(flip_dgap),
            "delta_gap_output_steps_without_flip": quantiles(noflip_dgap),
            # fp32 model, every (layer, token) of prompt + output: k-th minus (k+1)-th router score
            "router_score_gap_k_vs_k1": quantiles(router_gap),
            "top1_share_of_topk_weight": quantiles(router_wmax),
            "expert_usage_per_layer": usage.tolist(),
            "distinct_topk_sets_at_output_steps": len(topk_sets),
        }
    return rec


def min_margin_rule(rec: Dict[str, Any]) -> float:
    """p99.9 of |Δgap| bf16 decode vs bf16 full, rounded up to 0.05 (see runs/numerics-calibration.md)."""
    return math.ceil(round(rec["delta_gap"]["bf16_decode_vs_bf16_full"]["p999"] / 0.05, 6)) * 0.05


def comparison_estimate(rec: Dict[str, Any], min_margin: float) -> Dict[str, Any]:
    """What an engine A/B comparison (``engine.compare_greedy``) would get on this model.

    Two valid bf16 paths stand in for plugin off/on: the reference is bf16
    KV-cache decode with the margins of its own trajectory (a prefill over it,
    like the engine's logprob pass); the test is bf16 full-sequence greedy.
    Also fp32 (its margins) vs bf16 decode.
    """
    from sglang_gemma4.testing.engine import compare_greedy

    rows = rec["prompts"]
    out = {"min_margin": round(min_margin, 4)}
    pairs = {
        "bf16_decode_vs_bf16_full": ([r["bf16_decode_tokens"] for r in rows], [r["bf16_full_tokens"] for r in rows], [r["bf16_decode_margins"] for r in rows]),
        "fp32_vs_bf16_decode": ([r["fp32_tokens"] for r in rows], [r["bf16_decode_tokens"] for r in rows], [r["fp32_margins"] for r in rows]),
    }
    for key, (ref, test, m) in pairs.items():
        c = compare_greedy(ref, test, m, min_margin)
        out[key] = {k: c[k] for k in ("ok", "compared", "total", "strict_fraction")}
        out[key]["mismatches"] = c["mismatches"]
        out[key]["excused"] = len(c["excused"])
    out["ref_margin_decisive_fraction"] = sum(x >= min_margin for r in rows for x in r["bf16_decode_margins"]) / sum(len(r["bf16_decode_margins"]) for r in rows)
    return out


def window_masks(n: int, plen: int, window: int, decode_window: int) -> Dict[str, torch.Tensor]:
    """Additive masks: prompt rows see ``window`` keys (self included), generated rows ``decode_window``."""
    return reference.masks(n, plen, window, decode_window)


def gpu_crosscheck(variant: str, doc: Dict[str, Any], decode_window_delta: int = 0) -> Dict[str, Any]:
    """Each recorded engine trajectory through the fp32 model: regret and margin error per step.

    ``decode_window_delta=-1`` emulates SGLang 0.5.17's triton decode, whose
    sliding window holds ``sliding_window - 1`` keys (self included) while
    extend/verify holds ``sliding_window``: the rows of generated tokens get
    the shorter window.
    """
    V = ck.spec(variant).text.vocab_size
    W = ck.spec(variant).text.sliding_window
    prompts = mixed_prompts(suite.N_PROMPTS, V, seed=PROMPT_SEED[variant])
    m32, _ = load(variant, torch.float32)
    out: Dict[str, Any] = {"decode_window": W + decode_window_delta, "window": W}
    for name in GPU_RUNS[variant]:
        job = ((doc["results"].get(name) or {}).get("jobs") or {}).get("mixed") or {}
        toks, gm = job.get("tokens"), job.get("margins")
        mt = job.get("margin_pass_tokens")
        if not toks:
            continue
        regrets, merr, worst, first_off = [], [], [], 0
        for i, p in enumerate(prompts):
            t = toks[i]
            seq = p + t
            with torch.no_grad():
                lg = m32(input_ids=torch.tensor([seq]), attention_mask=window_masks(len(seq), len(p), W, W + decode_window_delta)).logits[0].float()
            lg = lg[len(p) - 1 : len(p) - 1 + len(t)]
            best = lg.max(dim=-1)
            chosen = lg.gather(1, torch.tensor(t)[:, None])[:, 0]
            reg = (best.values - chosen).tolist()
            first_off += reg[0] > 0
            regrets += reg
            fm = margins_of(lg).tolist()
            for k, r in enumerate(reg):
                if r > 0:
                    worst.append({"prompt": i, "pos": k, "regret": round(r, 4), "fp32_margin_prefix": round(fm[k], 4),
                                  "token": t[k], "fp32_argmax": int(best.indices[k])})
            if gm and mt:
                for k in range(len(t)):
                    if k < len(mt[i]) and mt[i][:k + 1] == t[:k + 1] and gm[i][k] is not None:
                        merr.append(abs(gm[i][k] - fm[k]))
        if first_off > len(prompts) // 2:
            # the run's first tokens are not this model's: recorded on another checkpoint
            out[name] = {"skipped": f"{first_off}/{len(prompts)} first tokens are not the fp32 argmax: suite run of a different checkpoint"}
            print(f"[gpu {name}] skipped: {out[name]['skipped']}", flush=True)
            continue
        worst.sort(key=lambda w: -w["regret"])
        out[name] = {
            "steps": len(regrets),
            "steps_not_fp32_argmax": sum(r > 0 for r in regrets),
            "regret": quantiles([r for r in regrets if r > 0]),
            "worst": worst[:12],
            "engine_margin_vs_fp32_margin": quantiles(merr),
        }
        print(f"[gpu {name} decode window {W + decode_window_delta}] not-argmax steps {out[name]['steps_not_fp32_argmax']}/{len(regrets)}, "
              f"max regret {out[name]['regret'].get('max')}, |margin err| {out[name]['engine_margin_vs_fp32_margin']}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/numerics-calibration.json"))
    ap.add_argument("--gpu-suite", type=Path, default=None, help="gpu-suite.json to cross-check against fp32")
    ap.add_argument("--variants", nargs="+", default=["dense_ple", "moe"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    doc: Dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "setup": "CPU, transformers fp32 vs bf16 (Gemma4ForCausalLM, sdpa attention)",
        "torch": torch.__version__,
        "max_new_tokens": suite.MAX_NEW_TOKENS,
        "variants": {},
    }
    import transformers

    doc["transformers"] = transformers.__version__
    gdoc = json.loads(a.gpu_suite.read_text()) if a.gpu_suite else None
    if a.out.exists():
        # re-running some variants keeps the others' recorded numbers (and the history)
        old = json.loads(a.out.read_text())
        for k in ("variants", "history"):
            doc.setdefault(k, {}).update({n: r for n, r in (old.get(k) or {}).items() if n.split("+")[0] not in a.variants})
    for v in a.variants:
        doc["variants"][v] = calibrate(v, suite.MAX_NEW_TOKENS)
        if ck.spec(v).text.num_experts:
            doc["variants"][v + "+router_fp32"] = calibrate(v, suite.MAX_NEW_TOKENS, router_fp32=True)
        # threshold rule: the fp32-router model for MoE (SGLang routes in fp32)
        base = doc["variants"].get(v + "+router_fp32") or doc["variants"][v]
        mm = min_margin_rule(base)
        doc["variants"][v]["min_margin_rule"] = round(mm, 4)
        for name in (v, v + "+router_fp32"):
            if name in doc["variants"]:
                doc["variants"][name]["comparison_estimate"] = comparison_estimate(doc["variants"][name], mm)
        if gdoc is not None:
            doc["variants"][v]["gpu_vs_fp32"] = gpu_crosscheck(v, gdoc)
            doc["variants"][v]["gpu_vs_fp32_decode_window_minus_1"] = gpu_crosscheck(v, gdoc, -1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    for v, r in doc["variants"].items():
        print(v, "delta_gap", json.dumps(r["delta_gap"]))
        print(v, "fp32 margin at bf16 divergence", r["fp32_margin_at_bf16_divergence"]["values"])
        if "moe" in r:
            print(v, json.dumps({k: x for k, x in r["moe"].items() if k != "expert_usage_per_layer"}))
            print(v, "expert usage per layer", r["moe"]["expert_usage_per_layer"])
        if "comparison_estimate" in r:
            print(v, "min_margin", r.get("min_margin_rule"), "estimate", json.dumps(r["comparison_estimate"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
