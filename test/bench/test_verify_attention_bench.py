"""bench/verify_attention.py on CPU: its SGLang baseline calls compute the same attention as ours (so a GPU
run compares like with like), and its report is written from synthetic rows."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_testutil import load_interpreted_bench  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(scope="module")
def bench():
    return load_interpreted_bench("verify_attention")


@pytest.mark.parametrize("window", [-1, 5])
def test_baselines_compute_the_same_attention(bench, window):
    pytest.importorskip("sglang.kernels.ops.attention.extend_attention")
    t = bench.case(4, 2, 16, window, 2, 20, dev="cpu", dtype=torch.float32)
    outs = {}
    for name, fn in bench.impls(t, window).items():
        t["o"].fill_(float("nan"))
        try:
            fn()
        except Exception as e:  # SGLang's split-KV kernel may refuse (its own can_handle); the bench records it
            outs[name] = e
            continue
        outs[name] = t["o"].clone()
    assert isinstance(outs["ours"], torch.Tensor) and isinstance(outs["sglang_extend"], torch.Tensor)
    for name in ("ours_grouped", "ours_per_head", "ours_merge_full", "sglang_extend"):
        torch.testing.assert_close(outs[name], outs["ours"], rtol=2e-5, atol=2e-5)


def test_report_from_rows(bench, tmp_path):
    rows = [
        {"width": "26b_full", "bs": 1, "prefix": 1000, "ours": {"us": 10.0}, "sglang_extend": {"us": 150.0,
         "max_abs_diff_vs_ours": 0.01}, "sglang_splitkv": {"us": None, "error": "RuntimeError: x"},
         "ours_splits4": {"us": 12.0}, "ours_splits8": {"us": 9.5}, "ours_merge_full": {"us": 13.0},
         "speedup_vs_sglang_extend": 15.0},
        {"width": "26b_sliding", "bs": 16, "prefix": 8000, "ours": {"us": 40.0}, "sglang_extend": {"us": None,
         "error": "x"}, "speedup_vs_sglang_extend": None},
    ]
    doc = {"date": "2026-12-04", "versions": {"gpu": "NVIDIA H200", "sglang": "0.5.17"}, "drafts": 4, "rows": rows}
    bench.write_report(doc, tmp_path / "verify-attention-nvidia-h200")
    md = (tmp_path / "verify-attention-nvidia-h200.md").read_text()
    assert "| 26b_full | 1 | 1000 | 10.0 | - / - | 13.0 | 150.0 | None | 15.0 | 0.01 |" in md
    assert "| 26b_sliding | 16 | 8000 | 40.0 | - / - | - | None | - | None | - |" in md
    assert "| 26b_full | 1 | 1000 | 12.0 | 9.5 |" in md and "S=4 | S=8" in md
    assert json.loads((tmp_path / "verify-attention-nvidia-h200.json").read_text())["rows"] == rows


def test_main_end_to_end_with_a_stub_timer(bench, tmp_path, monkeypatch):
    """main()'s loop, sweep and report on CPU (interpreter, fp32, tiny widths): a GPU call must not die on glue."""
    pytest.importorskip("sglang.kernels.ops.attention.extend_attention")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "DTYPE", torch.float32)
    monkeypatch.setattr(bench, "WIDTHS", {"tiny_sliding": (4, 2, 16, 5), "tiny_full": (2, 2, 16, -1)})
    monkeypatch.setattr(bench, "PREFIXES", (20,))
    monkeypatch.setattr(bench, "time_us", lambda fn, quick: 1.0)
    monkeypatch.setattr(bench, "versions", lambda: {"gpu": "Test GPU", "sglang": "x"})
    assert bench.main(["--out", str(tmp_path), "--quick", "--splits", "1,3", "--fp8", "--tiles", "16x4,32x8"]) == 0
    doc = json.loads((tmp_path / "verify-attention-test-gpu.json").read_text())
    assert len(doc["rows"]) == 8  # 2 widths x (bf16, fp8 pool) x 1 prefix x batches 1, 16
    doc["rows"] = [r for r in doc["rows"] if not r["width"].endswith("_fp8")]  # fp8: SGLang rounds q, p
    for r in doc["rows"]:  # the split sweep runs on the bf16 pool only
        assert r["ours"]["us"] == 1.0 and r["ours_splits3"]["us"] == 1.0 and r["ours_tile32x8"]["us"] == 1.0
        assert r["sglang_extend"]["max_abs_diff_vs_ours"] < 1e-4  # same attention, fp32
    md = (tmp_path / "verify-attention-test-gpu.md").read_text()
    assert "S=1 | S=3" in md and "| 16x4 | 32x8 |" in md
