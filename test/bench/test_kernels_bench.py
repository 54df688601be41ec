"""bench/kernels.py on CPU (Triton interpreter): every op's inputs, our kernel vs its fp32
reference through the bench's own sanity check, the default launch config it reports, every
--tune config accepted and bitwise equal to the default launch, and the report writers.
(A GPU run is the only place it times anything; this keeps the script itself from rotting.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).resolve().parents[2] / "bench" / "kernels.py")
kb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kb)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; the GPU runs the bench itself")


@pytest.fixture
def ops(monkeypatch):
    monkeypatch.setattr(kb, "DEV", "cpu")
    return kb._ops(kb._import_ours(), None)


@pytest.mark.parametrize("T", [1, 5])
def test_every_op_passes_the_bench_sanity_check(ops, T):
    assert set(ops) == {"routing", "rmsnorm_add", "rmsnorm_residual_scalar", "gelu_tanh_mul",
                        "post_attn_triple_rmsnorm", "moe_tail_next_norm", "qkv_norm_rope"}
    for name, op in ops.items():
        args = op["make"](T)
        ok, err = kb.sanity_check(name, op, args)
        assert ok, (name, err)
        assert op["bytes"](T) > 0
        cfg = kb._launch_config(name, T)
        assert cfg is None or all(v is not None for v in cfg.values())
        if name in ("moe_tail_next_norm", "qkv_norm_rope"):  # eager/Inductor baselines of the same contract
            ok, err = kb.sanity_check(name, {**op, "ours": op["eager"]}, args)
            assert ok, (name, "eager", err)


def test_sglang_baseline_of_the_tail_matches_ours(monkeypatch):
    """The SGLang arm of moe_tail_next_norm (its dual-norm tail + the next input norm) computes
    what ours does (SGLang's kernels run in the interpreter on CPU too)."""
    sgl, err = kb._import_sglang()
    if sgl is None:
        pytest.skip(err)
    monkeypatch.setattr(kb, "DEV", "cpu")
    op = kb._ops(kb._import_ours(), sgl)["moe_tail_next_norm"]
    assert op["sglang"] is not None
    args = op["make"](3)
    ok, e = kb._sanity("moe_tail_next_norm", op["sglang"](*args), op["ref"](*args))
    assert ok, e


@pytest.mark.parametrize("name,configs,call", [
    ("routing", kb._routing_configs, kb._routing_call),
    ("gelu_tanh_mul", kb._gelu_configs, kb._gelu_call),
])
def test_every_tune_config_runs_and_matches_the_default(ops, name, configs, call):
    k = kb._import_ours()
    args = ops[name]["make"](3)
    default = ops[name]["ours"](*args)
    cfgs = configs()
    assert len({json.dumps(c, sort_keys=True) for c in cfgs}) == len(cfgs) > 10
    for cfg in cfgs:
        out = call(k)(cfg)(*args)
        for a, b in zip(default if isinstance(default, tuple) else (default,), out if isinstance(out, tuple) else (out,)):
            assert torch.equal(a, b), cfg


def test_report_writers(tmp_path):
    row = {"op": "gelu_tanh_mul", "width": "H=256", "T": 8192, "ours_us": 4.56, "ours_p20": 4.5, "ours_p80": 4.6,
           "config": {"block_t": 8, "num_warps": 4, "layout": "rows"}, "eager_us": 7.47, "compile_us": 5.07,
           "sglang_us": None, "x_eager": 7.47 / 4.56, "x_compile": 5.07 / 4.56, "x_sglang": None,
           "gbps": 2760.0, "frac_copy": 0.66}
    doc = {"gpu": "GPU", "torch": "t", "triton": "tr", "sglang": "s", "sglang_kernels": "ok", "date": "d",
           "quick": False, "partial": True, "copy_gbps": 4180.0,
           "copy": {"memcpy": 2761.0, "kernel": 4180.0, "best": 4180.0}, "results": [row], "tune": None}
    kb.write_markdown(doc, tmp_path / "k.md")
    md = (tmp_path / "k.md").read_text()
    assert "Partial run" in md and "memcpy 2761" in md and "| 8192 | 4.56 |" in md and "| 1.64 |" in md
    pytest.importorskip("matplotlib")
    assert kb.write_plot(doc, tmp_path / "k.png") and (tmp_path / "k.png").stat().st_size > 0


def test_tune_t_parsing_and_tune_only_needs_tune(capsys):
    assert kb._t_list("8, 256,8192") == [8, 256, 8192]
    for bad in ("", "8,x", "0"):
        with pytest.raises(Exception, match="--tune-t"):
            kb._t_list(bad)
    with pytest.raises(SystemExit):
        kb.main(["--tune-only"])
    assert "--tune-only needs --tune" in capsys.readouterr().err
