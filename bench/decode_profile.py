"""Kernel-time shares of a served decode step, from SGLang's torch-profiler traces.

bench/serve.py ``--profile`` asks a live server (``/start_profile``, GPU
activity, a fixed number of scheduler steps) to trace while a decode-heavy
workload runs; this module turns the trace (chrome JSON, ``.json`` or
``.json.gz``) into the table issue #20 asks for: shares of GEMMs, attention,
MoE experts and everything else, with every "else" kernel named.

    python bench/decode_profile.py TRACE [TRACE ...] --steps 30 --out table.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

# First match wins; patterns are matched against the lower-cased kernel name ("gemma" is not a GEMM).
CATEGORIES: Tuple[Tuple[str, str], ...] = (
    # norms first: sgl_kernel's are flashinfer's ("void flashinfer::norm::GemmaFusedAddRMSNormKernel<...>"),
    # which the attention rule's "flash" would take
    ("other", r"norm"),
    ("moe", r"fused_moe|moe_align|moe_sum|expert|silu_and_mul_moe|grouped_gemm|moe_"),
    # triton backend: _fwd_grouped_kernel_stage1/_fwd_kernel_stage2 (decode), get_num_kv_splits; KV writes
    ("attention", r"attn|attention|_fwd_kernel|_fwd_grouped_kernel|num_kv_splits|flash_fwd|flashattn|flash_attn|"
                  r"batchdecode|batchprefill|decode_grouped|extend|fmha|paged|_verify_prefix|_verify_merge|"
                  r"_verify_combine"),
    ("kv store", r"store_kvcache|set_kv_buffer"),
    ("gemm", r"gemm(?!a)|cutlass|xmma|cublas|nvjet|matmul|sm90_|splitk|ampere_|hopper_"),
    ("memcpy/memset", r"^memcpy|^memset|copy_kernel|cudamemcpy"),
)
# SGLang / plugin launch sites for the "other" kernels we know (name regex -> who launches it).
LAUNCHERS: Tuple[Tuple[str, str], ...] = (
    (r"triple_rmsnorm|_triple", "sglang-gemma4 fused_triple_norm"),
    (r"tail_next_norm", "sglang-gemma4 fused_next_input_norm"),
    (r"qkv_norm_rope", "sglang-gemma4 fused_qkv_norm_rope"),
    (r"rmsnorm|rms_norm|layernorm", "RMSNorm layers (Gemma4RMSNorm / sgl_kernel gemma_rmsnorm; plugin fused norms)"),
    (r"gelu|act_and_mul|silu", "MLP activation (sgl_kernel gelu_tanh_and_mul; plugin PLE tail)"),
    (r"rope|rotary", "rotary embedding (Gemma4 attention q/k)"),
    (r"routing|topk|softmax", "MoE routing / sampling softmax"),
    (r"softcap|tanh", "final logit soft-capping"),
    (r"argmax|sampling|sample", "sampler"),
    (r"triton_per_fused_copy__mul_sum", "MoE top-k sum (SGLang triton_utils/fused_moe.py moe_sum_reduce_torch_compile, Inductor; small batches)"),
    (r"elementwise|vectorized|unrolled|reduce_kernel|index|scatter|gather|cat", "torch elementwise/index ops"),
)


def load_events(path: Path) -> List[Dict[str, Any]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data.get("traceEvents", data) if isinstance(data, dict) else data


def _gpu_events(events: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The GPU kernel / memcpy / memset events of a chrome trace (what every table here counts)."""
    return [e for e in events
            if e.get("ph") == "X" and str(e.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset")]


def kernels(events: Iterable[Dict[str, Any]]) -> List[Tuple[str, float]]:
    """(name, duration us) of every GPU kernel / memcpy / memset event."""
    return [(str(e.get("name", "?")), float(e.get("dur", 0.0))) for e in _gpu_events(events)]


# One greedy sample per scheduler step ends every step's kernel stream (torch argmax over the logits).
STEP_END = r"argmax"
# A step that ran a prefill/extend chunk (triton backend's extend kernel, flashinfer's prefill).
PREFILL = r"^_fwd_kernel$|extend|prefill"


def split_steps(events: Iterable[Dict[str, Any]]) -> List[List[Tuple[str, float]]]:
    """The traced kernels cut into scheduler steps, each ending at its sampler argmax (time order).

    Kernels after the last argmax (a step cut off by the end of the trace) are dropped. No argmax
    at all (e.g. sampling without argmax) -> [] and callers fall back to the whole window.
    """
    ks = sorted((float(e.get("ts", 0.0)), str(e.get("name", "?")), float(e.get("dur", 0.0))) for e in _gpu_events(events))
    steps, cur = [], []
    for _, name, dur in ks:
        cur.append((name, dur))
        if re.search(STEP_END, name.lower()):
            steps.append(cur)
            cur = []
    return steps


def decode_only(steps: List[List[Tuple[str, float]]], top: int = 25) -> Dict[str, Any]:
    """The table over the steps that ran no prefill kernel (a mixed window's clean decode figure)."""
    dec = [st for st in steps if not any(re.search(PREFILL, n.lower()) for n, _ in st)]
    t = table([k for st in dec for k in st], len(dec), top) if dec else {}
    return t | {"decode_steps": len(dec), "prefill_steps": len(steps) - len(dec)}


def gpu_timeline(events: Iterable[Dict[str, Any]]) -> Dict[str, float]:
    """GPU span (first kernel start to last kernel end) and busy time (union of kernel intervals).

    Busy/span is how much of the traced window the GPU computed at all: at batch 1 the gaps are host
    time (scheduler, launches, syncs) that no kernel fusion recovers.
    """
    iv = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in _gpu_events(events) if "ts" in e)
    if not iv:
        return {"span_us": 0.0, "busy_us": 0.0, "busy_share": 0.0}
    busy, (cur_s, cur_e) = 0.0, iv[0]
    for s, e in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = cur_e - iv[0][0]  # groups end before the next starts, so the last group ends last
    return {"span_us": round(span, 1), "busy_us": round(busy, 1), "busy_share": round(busy / span, 4) if span else 0.0}


def _first(rules, name: str, default: str) -> str:
    n = name.lower()
    return next((label for rx, label in rules if re.search(rx, n)), default)


def category(name: str) -> str:
    return _first([(rx, cat) for cat, rx in CATEGORIES], name, "other")


def launcher(name: str) -> str:
    return _first(LAUNCHERS, name, "?")


def table(ks: List[Tuple[str, float]], steps: int, top: int = 25) -> Dict[str, Any]:
    total = sum(d for _, d in ks) or 1.0
    by_cat: Dict[str, float] = {}
    by_name: Dict[str, List[float]] = {}
    for name, d in ks:
        by_cat[category(name)] = by_cat.get(category(name), 0.0) + d
        by_name.setdefault(name, []).append(d)
    others = sorted(((n, sum(v), len(v)) for n, v in by_name.items() if category(n) == "other"),
                    key=lambda t: -t[1])
    return {
        "steps": steps, "kernel_us_total": round(total, 1), "kernel_us_per_step": round(total / max(steps, 1), 1),
        "shares": {c: round(v / total, 4) for c, v in sorted(by_cat.items(), key=lambda t: -t[1])},
        "other_kernels": [{"name": n[:160], "share": round(t / total, 4), "calls_per_step": round(c / max(steps, 1), 1),
                           "us_per_step": round(t / max(steps, 1), 2), "launched_by": launcher(n)}
                          for n, t, c in others[:top]],
        # the largest kernels of every other category too: what each rule caught is visible, so a
        # misfiled kernel (flashinfer's norms once counted as attention) shows in the report
        "top_by_category": {
            cat: [{"name": n[:160], "us_per_step": round(sum(v) / max(steps, 1), 2),
                   "calls_per_step": round(len(v) / max(steps, 1), 1)}
                  for n, v in sorted(((n, v) for n, v in by_name.items() if category(n) == cat),
                                     key=lambda t: -sum(t[1]))[:5]]
            for cat in by_cat if cat != "other"},
    }


# Target-verify attention (SGLang's prefill kernel on the triton backend, or the split-KV verify kernels, ours and
# SGLang's) and the draft's decode attention: the two phases of a speculative step.
VERIFY_ATTN = r"^_fwd_kernel$|_verify_prefix|_verify_merge|_verify_combine"
DRAFT_ATTN = r"^_fwd_kernel_stage1$|^_fwd_grouped_kernel_stage1$"


def spec_phases(events: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """A speculative window cut into target verify and draft: each kernel goes to the phase of the last
    attention kernel before it (so the target's last layer, lm_head and verify sampling count as verify, and
    the draft's seed input work as draft; the next forward's few pre-attention kernels land in the previous
    phase). One verify block (a run of verify attention) = one speculative step. A prefill in the window also
    runs ``_fwd_kernel`` and counts as a verify block. {} when the window has no verify or no draft phase."""
    ks = sorted((float(e.get("ts", 0.0)), str(e.get("name", "?")), float(e.get("dur", 0.0))) for e in _gpu_events(events))
    phase, blocks = None, 0
    got: Dict[str, List[Tuple[str, float]]] = {"verify": [], "draft": []}
    draft_attn = 0
    for _, name, dur in ks:
        if re.search(VERIFY_ATTN, name):
            blocks += phase != "verify"
            phase = "verify"
        elif re.search(DRAFT_ATTN, name):
            phase = "draft"
            draft_attn += 1
        if phase:
            got[phase].append((name, dur))
    if not blocks or not got["draft"]:
        return {}
    out = {"spec_steps": blocks, "draft_attention_calls_per_step": round(draft_attn / blocks, 1)}
    for ph, k in got.items():
        t = table(k, blocks, top=8)
        out[ph] = {"kernel_us_per_step": t["kernel_us_per_step"], "shares": t["shares"],
                   "top": [{"name": x["name"][:70], "us_per_step": x["us_per_step"]} for c in t["top_by_category"].values()
                           for x in c[:2]] + [{"name": x["name"][:70], "us_per_step": x["us_per_step"]}
                                               for x in t["other_kernels"][:3]]}
    return out


def reclassify(t: Dict[str, Any]) -> Dict[str, Any]:
    """Re-sort a recorded table's named "other" kernels under the current CATEGORIES (a table written
    before a pattern was added). Only the listed kernels move; unlisted small ones stay "other"."""
    shares = dict(t["shares"])
    keep = []
    for k in t["other_kernels"]:
        c = category(k["name"])
        if c == "other":
            keep.append(k | {"launched_by": launcher(k["name"])})
        else:
            shares["other"] = shares.get("other", 0.0) - k["share"]
            shares[c] = shares.get(c, 0.0) + k["share"]
    shares = {c: round(v, 4) for c, v in sorted(shares.items(), key=lambda kv: -kv[1])}
    return t | {"shares": shares, "other_kernels": keep}


def combine_timelines(tls: List[Dict[str, float]]) -> Dict[str, float]:
    """Several traces (one per rank/file) of the same steps: sum spans and busy times."""
    span, busy = sum(t["span_us"] for t in tls), sum(t["busy_us"] for t in tls)
    return {"span_us": round(span, 1), "busy_us": round(busy, 1), "busy_share": round(busy / span, 4) if span else 0.0}


def markdown(title: str, t: Dict[str, Any]) -> str:
    head = f"{t['steps']} steps traced, {t['kernel_us_per_step']} us of kernel time per step."
    d = t.get("decode_only")
    if d and d.get("decode_steps"):
        head += (f" Steps with no prefill kernel: {d['decode_steps']} (and {d['prefill_steps']} with one), "
                 f"{d['kernel_us_per_step']} us per decode step: " +
                 ", ".join(f"{c} {v * 100:.1f} %" for c, v in d["shares"].items()) + ".")
    if t.get("timeline"):
        tl = t["timeline"]
        head += (f" GPU span {tl['span_us'] / max(t['steps'], 1):.0f} us/step, busy {tl['busy_share'] * 100:.1f} % of it"
                 " (the rest is host time between launches).")
    sp = t.get("spec_phases")
    if sp:
        head += (f" Speculative steps: {sp['spec_steps']}; target verify {sp['verify']['kernel_us_per_step']} us/step, "
                 f"draft {sp['draft']['kernel_us_per_step']} us/step ({sp['draft_attention_calls_per_step']} draft "
                 "attention calls per step).")
    lines = [f"### {title}", "", head, "", "| category | share |", "|---|---|"]
    lines += [f"| {c} | {v * 100:.1f} % |" for c, v in t["shares"].items()]
    if t.get("top_by_category"):
        lines += ["", "| category | largest kernels (us/step, calls/step) |", "|---|---|"]
        lines += [f"| {c} | " + "; ".join(f"`{k['name'][:70]}` {k['us_per_step']} ({k['calls_per_step']})" for k in ks) + " |"
                  for c, ks in t["top_by_category"].items()]
    lines += ["", "| other kernel | share | calls/step | us/step | launched by |", "|---|---|---|---|---|"]
    lines += [f"| `{k['name']}` | {k['share'] * 100:.2f} % | {k['calls_per_step']} | {k['us_per_step']} | {k['launched_by']} |"
              for k in t["other_kernels"]]
    if sp:
        lines += ["", "| phase | us/step | shares | largest kernels (us/step) |", "|---|---|---|---|"]
        for ph in ("verify", "draft"):
            d = sp[ph]
            lines.append(f"| {ph} | {d['kernel_us_per_step']} | " + ", ".join(f"{c} {v * 100:.0f} %" for c, v in d["shares"].items())
                         + " | " + "; ".join(f"`{x['name']}` {x['us_per_step']}" for x in d["top"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    evs = [load_events(p) for p in a.traces]
    ks = [k for ev in evs for k in kernels(ev)]
    if not ks:
        print(f"no kernel events in {a.traces}", file=sys.stderr)
        return 1
    t = table(ks, a.steps)
    t["timeline"] = combine_timelines([gpu_timeline(ev) for ev in evs])
    if len(evs) == 1:
        t["decode_only"] = decode_only(split_steps(evs[0]))
    if a.out:
        a.out.write_text(json.dumps(t, indent=1))
    print(markdown(", ".join(p.name for p in a.traces), t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
