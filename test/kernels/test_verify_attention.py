"""verify_attention_fwd (split-KV target verify of a draft chain) vs its fp32 reference and SGLang's
extend_attention_fwd with the chain's tree mask (what SGLang's triton backend runs for target-verify)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_testutil import DEVICE, HAS_CUDA  # noqa: E402

from sglang_gemma4.kernels.verify_attention import (  # noqa: E402
    num_splits, verify_attention_fwd, verify_attention_ref,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# bf16: probabilities are rounded to bf16 before p @ v (as SGLang's kernel does), the output once more
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}


def make(prefix_lens, L, Hq, Hkv, D, Dv=None, dtype=torch.float32, window=-1, seed=0, slots=None,
         idx_dtype=torch.int32, device=DEVICE):
    """A verify batch: each sequence's full prefix of P keys lives at random pool slots; for a sliding
    layer (window W >= 0) kv_indices keep the last min(P, W) of them, as SGLang's window buffers do."""
    Dv = Dv or D
    g = torch.Generator().manual_seed(seed)
    bs, total = len(prefix_lens), sum(prefix_lens)
    slots = slots or total + 7
    perm = torch.randperm(slots, generator=g)
    full, kept, at = [], [], 0
    for P in prefix_lens:
        s = perm[at:at + P]
        at += P
        full.append(s)
        kept.append(s[max(0, P - window):] if window >= 0 else s)
    lens = [k.numel() for k in kept]
    t = dict(
        q=torch.randn(bs * L, Hq, D, generator=g), k_draft=torch.randn(bs * L, Hkv, D, generator=g),
        v_draft=torch.randn(bs * L, Hkv, Dv, generator=g), k_buffer=torch.randn(slots, Hkv, D, generator=g),
        v_buffer=torch.randn(slots, Hkv, Dv, generator=g),
    )
    t = {k: v.to(dtype).to(device) for k, v in t.items()}
    t["kv_indptr"] = torch.tensor([0] + lens).cumsum(0).to(idx_dtype).to(device)
    t["kv_indices"] = (torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)).to(idx_dtype).to(device)
    return t, full


def run(t, L, scale, window=-1, **kw):
    o = torch.full((t["q"].shape[0], t["q"].shape[1], t["v_draft"].shape[2]), float("nan"),
                   dtype=t["q"].dtype, device=t["q"].device)  # poisoned: every row must be written
    return verify_attention_fwd(t["q"], t["k_draft"], t["v_draft"], o, t["k_buffer"], t["v_buffer"],
                                t["kv_indptr"], t["kv_indices"], L, scale, window, **kw)


def ref(t, L, scale, window=-1):
    return verify_attention_ref(t["q"], t["k_draft"], t["v_draft"], t["k_buffer"], t["v_buffer"],
                                t["kv_indptr"], t["kv_indices"], L, scale, window)


def close(out, expect, dtype):
    rtol, atol = TOL[dtype]
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float().cpu(), expect.float().cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,L,Hq,Hkv,D,window", [
    ([37, 5], 4, 4, 2, 32, -1),
    ([37, 5], 4, 4, 2, 32, 6),      # window shorter than the prefix: drafts shift the window
    ([0, 70, 1], 3, 2, 2, 16, -1),  # an empty prefix
    ([70], 1, 2, 1, 16, 9),         # one draft (plain decode shape)
    ([19, 64], 5, 4, 1, 16, 2),     # window shorter than the drafts: draft-draft keys masked too
    ([33], 16, 2, 1, 16, -1),       # the widest chain
])
@pytest.mark.parametrize("grouped", [False, True])
def test_matches_fp32_reference(dtype, lens, L, Hq, Hkv, D, window, grouped):
    t, _ = make(lens, L, Hq, Hkv, D, dtype=dtype, window=window, seed=sum(lens) + L)
    close(run(t, L, 0.3, window, grouped=grouped), ref(t, L, 0.3, window), dtype)


@pytest.mark.parametrize("splits", [1, 2, 5, 8, 9, 17, 32])  # the merge unrolls 8 splits at a time
@pytest.mark.parametrize("grouped", [False, True])
def test_split_count_does_not_change_the_result(splits, grouped):
    t, _ = make([61, 3, 40], 4, 4, 1, 16, window=20, seed=5)
    close(run(t, 4, 0.25, 20, splits=splits, grouped=grouped), ref(t, 4, 0.25, 20), torch.float32)


def test_merge_slices_wide_heads():
    """The merge runs one 64-wide output slice per program and sums the draft scores over 64-wide D chunks:
    D = 96 (a masked second chunk), Dv = 160 (three slices, the last one partial)."""
    t, _ = make([50, 7], 4, 4, 2, 96, Dv=160, window=30, seed=13)
    close(run(t, 4, 0.1, 30, splits=3, merge_dv=64), ref(t, 4, 0.1, 30), torch.float32)


@pytest.mark.parametrize("lens,sliced", [([50], True), ([50, 7, 33, 2], False)])
def test_merge_layout_follows_occupancy(lens, sliced):
    """The default launch slices the merge while bs x q heads programs leave most SMs idle (the CPU counts 8), one
    whole-width program per (sequence, head) otherwise; both equal the reference and the explicit layout."""
    from sglang_gemma4.kernels.verify_attention import merge_slices_wanted

    assert merge_slices_wanted(len(lens), 2, torch.device("cpu")) is sliced
    t, _ = make(lens, 3, 2, 1, 96, Dv=160, window=-1, seed=len(lens))
    out = run(t, 3, 0.2)
    close(out, ref(t, 3, 0.2), torch.float32)
    torch.testing.assert_close(out, run(t, 3, 0.2, merge_dv=64 if sliced else 160), rtol=0, atol=0)


FP8 = getattr(torch, "float8_e4m3fn", None)


@pytest.mark.skipif(FP8 is None, reason="no float8_e4m3fn")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_pool_with_scales(dtype):
    """An fp8 pool holding k / k_scale, v / v_scale: attention over the dequantised pool (draft K/V unscaled)."""
    t, _ = make([37, 5], 4, 4, 2, 32, dtype=dtype, window=6, seed=21)
    t["k_buffer"], t["v_buffer"] = (t["k_buffer"].float() / 0.5).to(FP8), (t["v_buffer"].float() / 2.0).to(FP8)
    out = run(t, 4, 0.3, 6, k_scale=0.5, v_scale=2.0)
    expect = verify_attention_ref(t["q"], t["k_draft"], t["v_draft"], t["k_buffer"], t["v_buffer"], t["kv_indptr"],
                                  t["kv_indices"], 4, 0.3, 6, k_scale=0.5, v_scale=2.0)
    close(out, expect, dtype)
    with pytest.raises(ValueError, match="KV pool dtype"):
        run(dict(t, k_buffer=t["k_buffer"].to(torch.float16)), 4, 0.3, 6)


def test_value_dim_differs_from_key_dim_and_int64_indices():
    t, _ = make([45, 12], 4, 4, 2, 32, Dv=16, idx_dtype=torch.int64, seed=9)
    close(run(t, 4, 0.2), ref(t, 4, 0.2), torch.float32)


def test_split_count_is_a_function_of_the_shapes():
    cpu = torch.device("cpu")  # 8 "SMs": 16 programs wanted
    assert num_splits(1, 4, cpu) == 4 and num_splits(1, 16, cpu) == 1
    assert num_splits(64, 16, cpu) == 1 and num_splits(1, 1, cpu) == 16  # capped
    assert num_splits(1, 3, cpu) == 6 and num_splits(1, 3, cpu, whole_waves=True) == 5  # 18 > 16 slots: 15
    assert num_splits(64, 16, cpu, whole_waves=True) == 1


def _sglang_extend(t, full, L, scale, window):
    """SGLang 0.5.17's extend_attention_fwd as its triton backend calls it for target-verify: the tree
    mask of a chain (prefix visible, drafts causal), rows as long as the untrimmed sequence."""
    ext = pytest.importorskip("sglang.kernels.ops.attention.extend_attention")
    dev = t["q"].device
    bs = len(full)
    masks, offsets = [], []
    for P in (f.numel() for f in full):
        m = torch.ones(L, P + L, dtype=torch.bool)
        m[:, P:] = torch.tril(torch.ones(L, L, dtype=torch.bool))
        masks.append(m.flatten())
        offsets.append(P - min(P, window) if window >= 0 else 0)
    mask = torch.cat(masks).to(dev)
    mask_indptr = torch.tensor([0] + [m.numel() for m in masks]).cumsum(0).to(torch.int64).to(dev)
    qo_indptr = (torch.arange(bs + 1) * L).to(torch.int32).to(dev)
    o = torch.empty_like(t["q"][..., : t["v_draft"].shape[2]])
    ext.extend_attention_fwd(
        t["q"], t["k_draft"], t["v_draft"], o, t["k_buffer"], t["v_buffer"], qo_indptr, t["kv_indptr"],
        t["kv_indices"], mask, True, mask_indptr, L, 1.0, 1.0, scale,
        sliding_window_size=window, window_kv_offsets=torch.tensor(offsets, dtype=torch.int32).to(dev))
    return o


@pytest.mark.parametrize("window", [-1, 6])
def test_matches_sglang_verify_kernel(window):
    """fp32 on CPU (the interpreter cannot run SGLang's bf16 tl.dot); bf16 at real widths is a GPU test. Compiled,
    both kernels' fp32 tl.dot multiply in TF32 (10-bit mantissa), so the GPU bound is TF32's."""
    t, full = make([37, 5, 12], 4, 4, 2, 32, window=window, seed=11)
    out, expect = run(t, 4, 0.3, window), _sglang_extend(t, full, 4, 0.3, window)
    if t["q"].is_cuda:
        torch.testing.assert_close(out.cpu(), expect.cpu(), rtol=1e-2, atol=1e-2)
    else:
        close(out, expect, torch.float32)


def test_bad_input_is_named():
    t, _ = make([8], 4, 4, 2, 16)
    with pytest.raises(ValueError, match="needs 4"):
        run(dict(t, q=t["q"][:2]), 4, 0.1)
    with pytest.raises(ValueError, match="num_draft"):
        run(t, 0, 0.1)
    with pytest.raises(ValueError, match="not a multiple"):
        run(dict(t, q=t["q"][:, :3]), 4, 0.1)
    with pytest.raises(ValueError, match="KV pool"):
        run(dict(t, k_buffer=t["k_buffer"][:, :1]), 4, 0.1)
    with pytest.raises(ValueError, match="int32 or int64"):
        run(dict(t, kv_indices=t["kv_indices"].float()), 4, 0.1)


# Gemma-4 layer widths (q heads, kv heads, head dim) and the 1024-key window (SGLang radius 1023)
WIDTHS = {"26b_sliding": (16, 8, 256), "26b_full": (16, 2, 512), "e4b_sliding": (8, 2, 256), "e2b_full": (8, 1, 512)}


@gpu
@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("lens", [[1000], [8000], [1000] * 16, [3, 2100, 700, 0, 1500, 64, 1, 999]])
def test_gpu_real_widths_vs_sglang_and_reference(width, lens):
    Hq, Hkv, D = WIDTHS[width]
    window = 1023 if "sliding" in width else -1
    L = 4
    t, full = make(lens, L, Hq, Hkv, D, dtype=torch.bfloat16, window=window, seed=len(lens) + D)
    out = run(t, L, 1.0, window)
    close(out, ref(t, L, 1.0, window), torch.bfloat16)
    # SGLang's kernel rounds its bf16 probabilities against its own running max: within two roundings
    torch.testing.assert_close(out.float(), _sglang_extend(t, full, L, 1.0, window).float(), rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("width", list(WIDTHS))
def test_gpu_grouped_and_per_head_programs_agree(width, grouped):
    Hq, Hkv, D = WIDTHS[width]
    window = 1023 if "sliding" in width else -1
    t, _ = make([1000, 3, 4100], 4, Hq, Hkv, D, dtype=torch.bfloat16, window=window, seed=D)
    close(run(t, 4, 1.0, window, grouped=grouped), ref(t, 4, 1.0, window), torch.bfloat16)


@gpu
@pytest.mark.skipif(FP8 is None, reason="no float8_e4m3fn")
@pytest.mark.parametrize("width", list(WIDTHS))
def test_gpu_fp8_pool_real_widths(width):
    Hq, Hkv, D = WIDTHS[width]
    window = 1023 if "sliding" in width else -1
    t, _ = make([1000, 4100], 4, Hq, Hkv, D, dtype=torch.bfloat16, window=window, seed=7)
    t["k_buffer"], t["v_buffer"] = (t["k_buffer"].float() / 0.5).to(FP8), (t["v_buffer"].float() / 2.0).to(FP8)
    out = run(t, 4, 1.0, window, k_scale=0.5, v_scale=2.0)
    expect = verify_attention_ref(t["q"], t["k_draft"], t["v_draft"], t["k_buffer"], t["v_buffer"], t["kv_indptr"],
                                  t["kv_indices"], 4, 1.0, window, k_scale=0.5, v_scale=2.0)
    close(out, expect, torch.bfloat16)


@gpu
@pytest.mark.parametrize("L", [1, 2, 3, 5, 8])
def test_gpu_draft_counts_and_fresh_inputs(L):
    for seed in range(3):
        t, _ = make([517, 1030, 2], L, 16, 8, 256, dtype=torch.bfloat16, window=1023, seed=seed)
        close(run(t, L, 1.0, 1023), ref(t, L, 1.0, 1023), torch.bfloat16)
