"""bench/decode_attention.py on CPU: SGLang's decode kernel (at every split cap) and ours at one draft compute
the same attention as an fp32 reference, so a GPU run compares like with like; main() and its report run on
tiny widths with a stub timer."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_testutil import load_interpreted_bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("sglang.kernels.ops.attention.decode_attention")
    return load_interpreted_bench("decode_attention")


def _reference(t, scale):
    bs, Hq, D = t["q"].shape
    G = Hq // t["kb"].shape[1]
    out = []
    for b in range(bs):
        idx = t["indices"][int(t["indptr"][b]):int(t["indptr"][b + 1])].long()
        k = t["kb"][idx].float().repeat_interleave(G, 1)
        v = t["vb"][idx].float().repeat_interleave(G, 1)
        p = torch.softmax(torch.einsum("hd,jhd->hj", t["q"][b].float(), k) * scale, -1)
        out.append(torch.einsum("hj,jhd->hd", p, v))
    return torch.stack(out)


@pytest.mark.parametrize("Hq,Hkv,window", [(4, 2, 5), (2, 2, -1), (4, 1, -1)])
def test_sglang_and_ours_compute_the_same_decode_attention(bench, monkeypatch, Hq, Hkv, window):
    monkeypatch.setattr(bench, "SLIDING_KEYS", 6)
    t = bench.case(Hq, Hkv, 16, window, 3, 23, dev="cpu", dtype=torch.float32, seed=4)
    assert t["kept"] == (6 if window >= 0 else 23)
    scale = 16 ** -0.5
    expect = _reference(t, scale)
    for cap in (1, 2, 8):
        fn, splits = bench.sglang_call(t, cap, scale)
        fn()
        assert 1 <= int(splits.max()) <= cap
        torch.testing.assert_close(t["o"], expect, rtol=1e-4, atol=1e-4)
    for cap in (4, 32):  # decode_kv_splits' counts, the grid as wide as its cap
        t["o"].fill_(float("nan"))
        fn, splits = bench.sglang_call(t, cap, scale, policy=True)
        fn()
        assert 1 <= int(splits.min()) and int(splits.max()) <= cap
        torch.testing.assert_close(t["o"], expect, rtol=1e-4, atol=1e-4)
    t["o"].fill_(float("nan"))
    bench.ours_call(t, scale, window)()
    torch.testing.assert_close(t["o"], expect, rtol=1e-4, atol=1e-4)


def test_main_end_to_end_with_a_stub_timer(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "DTYPE", torch.float32)
    monkeypatch.setattr(bench, "WIDTHS", {"tiny_sliding": (4, 2, 16, 5), "tiny_full": (2, 1, 16, -1)})
    monkeypatch.setattr(bench, "CONTEXTS", (9, 20))
    monkeypatch.setattr(bench, "SLIDING_KEYS", 6)
    times = iter(range(1, 1000))
    monkeypatch.setattr(bench, "time_us", lambda fn, quick: float(next(times)))
    # the report writer is the verify bench's (imported by name)
    monkeypatch.setattr(sys.modules["verify_attention"], "versions", lambda: {"gpu": "Test GPU", "sglang": "x"})
    assert bench.main(["--out", str(tmp_path), "--quick", "--caps", "8,2"]) == 0
    doc = json.loads((tmp_path / "decode-attention-test-gpu.json").read_text())
    # sliding: one context (same 6 keys at any longer one), full: both; batches 1 and 16
    assert [(r["width"], r["keys"], r["bs"]) for r in doc["rows"]] == [
        ("tiny_sliding", 6, 1), ("tiny_sliding", 6, 16), ("tiny_full", 9, 1), ("tiny_full", 9, 16),
        ("tiny_full", 20, 1), ("tiny_full", 20, 16)]
    r = doc["rows"][0]  # stub times 1, 2, 3, 4 for S8, S2, decode_kv_splits, ours
    assert r["sglang_S8"]["us"] == 1.0 and r["sglang_S2"]["us"] == 2.0 and r["plugin"]["us"] == 3.0
    assert r["ours_l1"]["us"] == 4.0 and r["default_over_plugin"] == round(1 / 3, 3)
    assert r["default_over_best_cap"] == 1.0 and r["default_over_ours"] == round(1 / 4, 3)
    assert all(r["max_abs_diff"] < 1e-4 for r in doc["rows"])  # every cap and ours: the same attention
    md = (tmp_path / "decode-attention-test-gpu.md").read_text()
    assert "| SGLang S8 (us) | SGLang S2 (us) | decode_kv_splits (us) | ours L=1 (us) |" in md and "| tiny_full | 16 | 20 | " in md
    with pytest.raises(SystemExit, match="positive"):
        bench.main(["--out", str(tmp_path), "--caps", "0"])


def test_backlog_part_runs_the_bench(tmp_path):
    """scripts/gpu_backlog.sh decode-attn calls the bench with arguments it accepts (without a GPU it stops at
    its no-GPU line, rc 0): a typo cannot cost a device call."""
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("on a GPU this would run the whole bench")
    env = dict(os.environ, GPU_BACKLOG_READY="1", OUT=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # as on the device: the bench decides on CUDA alone
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_backlog.sh"), "decode-attn"], capture_output=True,
                       text=True, env=dict(env, PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"]),
                       timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-2000:]
    assert "decode_attention bench: no CUDA GPU, nothing measured" in (tmp_path / "decode-attn.txt").read_text()
