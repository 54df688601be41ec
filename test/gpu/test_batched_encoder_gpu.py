"""Batched Gemma-4 encoder on CUDA: SGLang's own vision tower with its CUDA attention
backend (fa3 on Hopper, triton on Blackwell; triton_attn where sgl_kernel has no FA3,
as in the offline GPU bundle), batched vs 0.5.17's one-by-one path.

Engine-level greedy comparison lives in test_mm_engine_gpu.py. fp32 is not here:
SGLang's CUDA RMSNorm (sgl_kernel) has no fp32 kernel; the fp32-tight comparison
runs on CPU (test/patches/test_batched_encoder.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

_spec = importlib.util.spec_from_file_location(
    "_batched_encoder_cpu_tests", Path(__file__).resolve().parents[1] / "patches" / "test_batched_encoder.py"
)
cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu)


def _mm_backend():
    """None = SGLang's own pick (fa3 on Hopper) when FA3 is importable, else triton_attn."""
    try:
        from sgl_kernel import flash_ops  # noqa: F401

        return None
    except ImportError:
        return "triton_attn"


@pytest.fixture(scope="module")
def sglang_cpu():
    from sglang_gemma4.testing.configs import init_sglang_single_process

    init_sglang_single_process("cpu", mm_attention_backend=_mm_backend())


def _cuda_model(dtype, default_backend):
    m = cpu._build_model(dtype, batchable=not default_backend)
    return m.to("cuda")


def _images():
    return [cpu._image(6, 6, 36, 1), cpu._image(9, 9, 81, 2), cpu._image(3, 6, 36, 3),
            cpu._image(6, 9, 81, 4), cpu._image(3, 3, 36, 5), cpu._image(9, 6, 81, 6)]


def _videos():
    return [cpu._video(4, 6, 6, 36, 51), cpu._video(3, 3, 6, 36, 52, videos=2), cpu._video(2, 9, 9, 81, 53)]


def test_default_backend_bf16_images_and_video(sglang_cpu):
    model = _cuda_model(torch.bfloat16, default_backend=True)
    backend = type(model.vision_tower.encoder.layers[0].self_attn.qkv_backend).__name__
    ref, out, towers, embeds = cpu._run(model, "get_image_feature", _images())
    cpu._assert_close(out, ref, cpu.BF16)
    assert towers == (6, 2) and embeds == (6, 1), backend
    ref, out, towers, embeds = cpu._run(model, "get_video_feature", _videos())
    cpu._assert_close(out, ref, cpu.BF16)
    assert towers == (3, 2) and embeds == (12, 1), backend


def test_budget_and_single_item(sglang_cpu, monkeypatch):
    model = _cuda_model(torch.bfloat16, default_backend=True)
    ref, out, towers, _ = cpu._run(model, "get_image_feature", [cpu._image(6, 3, 36, 9)])
    cpu._assert_close(out, ref, cpu.BF16)
    assert towers == (1, 1)
    monkeypatch.setenv(cpu.be.BUDGET_ENV, "0.0001")
    ref, out, towers, _ = cpu._run(model, "get_image_feature", _images())
    cpu._assert_close(out, ref, cpu.BF16)
    assert towers == (6, 6)


def test_no_cross_item_leakage_default_backend(sglang_cpu):
    """fa3/triton attend over padding (``cu_seqlens=None``): changing one image,
    padding included, must not move its batch neighbours by a single bit."""
    model = _cuda_model(torch.bfloat16, default_backend=True)
    items = [cpu._image(6, 6, 36, 101), cpu._image(3, 6, 36, 102), cpu._image(6, 3, 36, 103)]
    other = cpu._image(3, 6, 36, 104)
    other.feature[0, 18:] = 0.7
    sizes = [4, 2, 2]
    with torch.no_grad(), cpu.patch_applied(cpu.PATCH, {}):
        a = torch.split(model.get_image_feature(items), sizes)
        b = torch.split(model.get_image_feature([items[0], other, items[2]]), sizes)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.allclose(a[1], b[1])
