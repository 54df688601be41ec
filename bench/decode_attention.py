"""Plain decode attention at Gemma-4 widths: SGLang's triton decode kernel at several split caps vs ours at L=1.

    python bench/decode_attention.py --out runs/ [--quick] [--caps 8,16,32,64]

Why: the full-depth 26B-A4B decode step spends 0.85 ms (1k context) to 1.4 ms (8k) of its ~4.8 ms in
``_fwd_grouped_kernel_stage1`` + ``_fwd_kernel_stage2``, ~28 us per layer at batch 1 and 1k keys, where reading
the keys takes ~2 us (runs/decode-profile-26b-nvidia-h200.md). SGLang sizes a step's split count with
``get_num_kv_splits_triton``, capped by ``--triton-attention-num-kv-splits`` (default 8): at batch 1 the cap
binds, so each program walks 1/8 of the keys. This bench answers two questions side by side in one process:
- ``sglang_S<cap>``: SGLang 0.5.17's ``decode_attention_fwd`` with the split counts its backend would compute at
  that cap (``get_num_kv_splits_triton`` over the real sequence lengths, as ``TritonAttnBackend`` does once per
  step); ``sglang_S8`` is what a server runs today;
- ``plugin``: the same kernel with the split counts patch ``decode_kv_splits`` gives it (its AROUND hook over
  SGLang's own ``get_num_kv_splits`` on a backend raised to the patch's cap; the grid is that cap wide, as in a
  server);
- ``ours_l1``: :func:`sglang_gemma4.kernels.verify_attention.verify_attention_fwd` with one draft (the current
  token's K/V as the "draft", the rest of the window as the prefix: the same attention).
Widths: the target layers of 26B-A4B / E4B and the 26B assistant's (8 q heads over the target's KV). Sliding
layers attend 1024 keys (the plugin's ``triton_swa_window``), full layers the whole context. Timing as in
bench/verify_attention.py (calls captured back to back in a CUDA graph). Writes decode-attention-<gpu>.{json,md,png}.
Without a CUDA GPU it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_gemma4.kernels.verify_attention import _sm_count, verify_attention_fwd  # noqa: E402
from verify_attention import WIDTHS as TARGET_WIDTHS, record, time_us  # noqa: E402  (the verify bench's widths, timer, writer)

# + the 26B FROZEN_KV_MTP assistant (8 q heads) reading the target's KV: 1 q head per kv head on sliding layers,
# which SGLang serves with its non-grouped kernel (`_fwd_kernel_stage1`, 29 us per call in
# runs/mtp-26b-verify-nvidia-h200.md)
WIDTHS = dict(TARGET_WIDTHS, **{"26b_draft_sliding": (8, 8, 256, 1023), "26b_draft_full": (8, 2, 512, -1)})

CONTEXTS = (1000, 8000)
SLIDING_KEYS = 1024
DEVICE, DTYPE = "cuda", torch.bfloat16  # the CPU test of main() sets cpu / fp32, tiny WIDTHS / CONTEXTS, a stub timer


def case(Hq, Hkv, D, window, bs, ctx, dev=None, dtype=None, seed=0):
    """One decode step's tensors: q, a shuffled KV pool holding every sequence's kept keys (the current token's
    included, as SGLang stores it before attending), and the same keys split into prefix + the current token."""
    dev, dtype = dev or DEVICE, dtype or DTYPE
    g = torch.Generator(device=dev).manual_seed(seed)
    kept = min(ctx, SLIDING_KEYS) if window >= 0 else ctx
    slots = bs * kept
    idx = torch.randperm(slots, device=dev, generator=g).to(torch.int32).view(bs, kept)
    kb = torch.randn(slots, Hkv, D, device=dev, dtype=dtype, generator=g)
    vb = torch.randn(slots, Hkv, D, device=dev, dtype=dtype, generator=g)
    cur = idx[:, -1].long()
    return dict(q=torch.randn(bs, Hq, D, device=dev, dtype=dtype, generator=g), kb=kb, vb=vb, kept=kept,
                indptr=(torch.arange(bs + 1, device=dev) * kept).to(torch.int32), indices=idx.reshape(-1),
                seq_lens=torch.full((bs,), kept, dtype=torch.int32, device=dev),
                prefix_indptr=(torch.arange(bs + 1, device=dev) * (kept - 1)).to(torch.int32),
                prefix_indices=idx[:, :-1].reshape(-1).contiguous(),
                k_cur=kb[cur].contiguous(), v_cur=vb[cur].contiguous(), o=torch.empty(bs, Hq, D, device=dev, dtype=dtype))


def plugin_splits(t, cap=None, default=8):
    """The split counts patch decode_kv_splits makes SGLang's backend compute: its AROUND hook over SGLang's own
    ``TritonAttnBackend.get_num_kv_splits``, on a backend stand-in carrying the attributes that method reads."""
    import types

    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    from sglang_gemma4.patches import decode_kv_splits as dks

    bs, Hq, _ = t["q"].shape
    cap = cap or dks.split_cap()
    b = types.SimpleNamespace(static_kv_splits=False, device_core_count=_sm_count(t["q"].device),
                              enable_deterministic=False, split_tile_size=None, max_kv_splits=cap, num_head=Hq,
                              num_kv_head=t["kb"].shape[1], **{dks.MARK: default})
    splits = torch.empty(bs, dtype=torch.int32, device=t["q"].device)
    dks.around_get_num_kv_splits(TritonAttnBackend.get_num_kv_splits, b, splits, t["seq_lens"])
    return splits, cap


def sglang_call(t, cap, sm_scale, policy=False):
    """SGLang's decode kernel with the split counts its backend computes at this cap (once, outside the timing);
    ``policy``: the counts patch decode_kv_splits gives it instead, ``cap`` then the patch's raised cap."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

    bs, Hq, D = t["q"].shape
    Hkv = t["kb"].shape[1]
    dev = t["q"].device
    if policy:
        splits, cap = plugin_splits(t, cap)
    else:
        splits = torch.empty(bs, dtype=torch.int32, device=dev)
        get_num_kv_splits_triton[(1,)](splits, t["seq_lens"], bs, 1, Hq, Hkv, cap, _sm_count(dev), MAX_NUM_SEQ=256)
    logits = torch.empty(bs, Hq, cap, D, dtype=torch.float32, device=dev)
    lse = torch.empty(bs, Hq, cap, dtype=torch.float32, device=dev)

    def run():
        decode_attention_fwd(t["q"], t["kb"], t["vb"], t["o"], t["indptr"], t["indices"], logits, lse, splits, cap,
                             sm_scale, 1.0, 1.0)
    return run, splits


def ours_call(t, sm_scale, window):
    return lambda: verify_attention_fwd(t["q"], t["k_cur"], t["v_cur"], t["o"], t["kb"], t["vb"], t["prefix_indptr"],
                                        t["prefix_indices"], 1, sm_scale, window)


def write_report(doc, stem: Path) -> None:
    rows, v, caps = doc["rows"], doc["versions"], doc["caps"]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    md = [f"# Plain decode attention: SGLang's triton decode kernel by split cap vs ours at L=1 ({v.get('gpu')})", "",
          f"Date {doc['date']}; SGLang {v.get('sglang')}, torch {v.get('torch')}, triton {v.get('triton')}. bf16, "
          f"CUDA-graph timed (us per call). Sliding layers attend {SLIDING_KEYS} keys. `S<cap>`: "
          "`--triton-attention-num-kv-splits` (server default 8); the split count SGLang computed is in brackets.", "",
          "| width | bs | keys | " + " | ".join(f"SGLang S{c} (us)" for c in caps) + " | decode_kv_splits (us) "
          "| ours L=1 (us) | default / best SGLang cap | default / decode_kv_splits | default / ours | max abs diff |",
          "|---|---|---|" + "---|" * (len(caps) + 6)]
    for r in rows:
        cells = [f"{r[f'sglang_S{c}']['us']} [{r[f'sglang_S{c}']['splits']}]" for c in caps]
        cells.append(f"{r['plugin']['us']} [{r['plugin']['splits']}]")
        md.append(f"| {r['width']} | {r['bs']} | {r['keys']} | " + " | ".join(cells) + f" | {r['ours_l1']['us']} | "
                  f"{r['default_over_best_cap']} | {r['default_over_plugin']} | {r['default_over_ours']} | "
                  f"{r['max_abs_diff']} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.45), 4))
        x = range(len(rows))
        ax.bar([i - 0.27 for i in x], [r["default_over_best_cap"] for r in rows], 0.27, label="S8 / best cap")
        ax.bar([i for i in x], [r["default_over_plugin"] for r in rows], 0.27, label="S8 / decode_kv_splits")
        ax.bar([i + 0.27 for i in x], [r["default_over_ours"] for r in rows], 0.27, label="S8 / ours L=1")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(x), [f"{r['width']}\nbs{r['bs']} k{r['keys']}" for r in rows], fontsize=6, rotation=90)
        ax.set_ylabel("speed-up over SGLang's default")
        ax.legend(fontsize=7)
        ax.set_title(f"decode attention, {v.get('gpu')}")
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--caps", default="8,16,32,64", help="comma list of split caps (the first is the baseline)")
    a = ap.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("decode_attention bench: no CUDA GPU, nothing measured")
        return 0
    caps = [int(c) for c in a.caps.split(",") if c]
    if not caps or min(caps) < 1:
        raise SystemExit(f"--caps needs positive split caps, got {a.caps!r}")
    batches = [1, 16] if a.quick else [1, 8, 16, 48]
    rows = []
    for name, (Hq, Hkv, D, window) in WIDTHS.items():
        for ctx in CONTEXTS:
            if window >= 0 and ctx > CONTEXTS[0]:
                continue  # a sliding layer attends the same 1024 keys at any longer context
            for bs in batches:
                t = case(Hq, Hkv, D, window, bs, ctx)
                scale = D ** -0.5
                row = {"width": name, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "bs": bs, "keys": t["kept"]}
                outs = {}
                for c in caps:
                    fn, splits = sglang_call(t, c, scale)
                    fn()
                    outs[c] = t["o"].float().clone()
                    row[f"sglang_S{c}"] = {"us": time_us(fn, a.quick), "splits": int(splits.max())}
                fn, splits = sglang_call(t, None, scale, policy=True)
                fn()
                outs["plugin"] = t["o"].float().clone()
                row["plugin"] = {"us": time_us(fn, a.quick), "splits": int(splits.max())}
                fn = ours_call(t, scale, window)
                fn()
                mine = t["o"].float().clone()
                row["ours_l1"] = {"us": time_us(fn, a.quick)}
                row["max_abs_diff"] = round(max((o - mine).abs().max().item() for o in outs.values()), 4)
                base = row[f"sglang_S{caps[0]}"]["us"]
                row["default_over_best_cap"] = round(base / min(row[f"sglang_S{c}"]["us"] for c in caps), 3)
                row["default_over_ours"] = round(base / row["ours_l1"]["us"], 3)
                row["default_over_plugin"] = round(base / row["plugin"]["us"], 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del t
    record(a.out, "decode-attention", {"caps": caps}, rows, write_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
