"""Batched Gemma-4 encoder vs SGLang 0.5.17's one-by-one path, on CPU.

The vision parts are SGLang's own (``Gemma4VisionEncoder``,
``Gemma4MultimodalEmbedder``, the unified embedders) with random weights,
mounted on a ``Gemma4ForConditionalGeneration`` shell: the full model cannot be
built on CPU (its text RoPE imports vLLM there), and the feature methods only
read ``vision_tower``, ``embed_vision``, ``config`` and ``language_model``'s
dtype/device. The reference is the unpatched SGLang method on the same module.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sglang_gemma4 import registry
from sglang_gemma4.patches import batched_encoder as be
from sglang_gemma4.testing.configs import init_sglang_single_process
from sglang_gemma4.testing.hooks import patch_applied

PATCH = be.PATCH
TEXT_HIDDEN = 64
PATCH_SIZE = 4
PIX = 3 * PATCH_SIZE**2  # 48 != TEXT_HIDDEN: pixels are never taken for embeddings


@pytest.fixture(scope="module")
def sglang_cpu():
    init_sglang_single_process("cpu")


class _LanguageModelStub(nn.Module):
    """What the feature paths read from ``language_model``: dtype(), device, config."""

    def __init__(self, dtype):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=TEXT_HIDDEN)
        self.anchor = nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)

    def dtype(self):
        return self.anchor.dtype

    @property
    def device(self):
        return self.anchor.device


def _vision_config():
    from transformers import Gemma4VisionConfig

    return Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, position_embedding_size=32, patch_size=PATCH_SIZE,
        pooling_kernel_size=3,
    )


def _batchable(vt):
    """SGLang's CPU default (SDPA, flatten_batch=True) asserts bsz == 1; the CUDA
    backends take any batch. Swap in SGLang's SDPA with flatten_batch=False (same
    math, mask given explicitly) so batching itself can be tested on CPU."""
    from sglang.srt.layers.attention.vision import VisionSdpaAttention

    for layer in vt.encoder.layers:
        a = layer.self_attn
        a.qkv_backend = VisionSdpaAttention(
            head_dim=a.head_dim, num_heads=a.num_heads_per_partition,
            num_kv_heads=a.num_kv_heads_per_partition, dropout=0.0, flatten_batch=False,
            softmax_in_single_precision=False, softmax_scale=1.0,
        )
    return vt


def _build_model(dtype=torch.float32, batchable=True, seed=0):
    from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration, Gemma4MultimodalEmbedder
    from sglang.srt.models.gemma4_vision import Gemma4VisionEncoder
    from transformers import Gemma4TextConfig

    torch.manual_seed(seed)
    vc = _vision_config()
    tc = Gemma4TextConfig(hidden_size=TEXT_HIDDEN)
    m = Gemma4ForConditionalGeneration.__new__(Gemma4ForConditionalGeneration)
    nn.Module.__init__(m)
    m.config = SimpleNamespace(text_config=tc, vision_config=vc)
    m.vision_tower = Gemma4VisionEncoder(vc)
    m.embed_vision = Gemma4MultimodalEmbedder(vc, tc)
    m.language_model = _LanguageModelStub(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "language_model.anchor":
                continue
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0.0))
    m.to(dtype)
    if batchable:
        _batchable(m.vision_tower)
    return m.eval()


def _frame(h, w, max_patches, gen):
    """One patchified frame: h x w real patches, padded (pixels 0, positions -1)."""
    pv = torch.zeros(max_patches, PIX)
    pp = torch.full((max_patches, 2), -1, dtype=torch.long)
    pv[: h * w] = torch.rand(h * w, PIX, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pp[: h * w, 0] = xs.reshape(-1)
    pp[: h * w, 1] = ys.reshape(-1)
    return pv, pp


def _image(h, w, max_patches, seed):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    pv, pp = _frame(h, w, max_patches, torch.Generator().manual_seed(seed))
    item = MultimodalDataItem(modality=Modality.IMAGE, feature=pv.unsqueeze(0))
    item.image_position_ids = pp.unsqueeze(0)
    return item


def _video(frames, h, w, max_patches, seed, videos=1):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    gen = torch.Generator().manual_seed(seed)
    fr = [_frame(h, w, max_patches, gen) for _ in range(videos * frames)]
    pv = torch.stack([f[0] for f in fr]).reshape(videos, frames, max_patches, PIX)
    pp = torch.stack([f[1] for f in fr]).reshape(videos, frames, max_patches, 2)
    item = MultimodalDataItem(modality=Modality.VIDEO, feature=pv)
    item.video_position_ids = pp
    return item


def _embeds_item(n, seed, modality="IMAGE"):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    feat = torch.randn(n, TEXT_HIDDEN, generator=torch.Generator().manual_seed(seed))
    return MultimodalDataItem(modality=getattr(Modality, modality), feature=feat)


class _Calls:
    def __init__(self, *modules):
        self.n = 0
        self.handles = [m.register_forward_pre_hook(self._hit) for m in modules]

    def _hit(self, *_):
        self.n += 1

    def close(self):
        for h in self.handles:
            h.remove()


def _run(model, fn_name, items, env=None):
    """(reference, patched, tower calls ref/patched, embedder calls ref/patched)."""
    tower, emb = _Calls(model.vision_tower), _Calls(model.embed_vision)
    try:
        with torch.no_grad():
            ref = getattr(model, fn_name)(items)
            t_ref, e_ref = tower.n, emb.n
            tower.n = emb.n = 0
            with patch_applied(PATCH, env or {}) as st:
                assert st.state == registry.ACTIVE, st.reason
                out = getattr(model, fn_name)(items)
    finally:
        tower.close()
        emb.close()
    return ref, out, (t_ref, tower.n), (e_ref, emb.n)


FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)


def _assert_close(out, ref, tol):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, **tol)


# -- images -----------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_mixed_resolutions_match_one_by_one(sglang_cpu, dtype, tol):
    model = _build_model(dtype)
    # two padded sizes (36 and 81 patches), different real grids within each
    items = [
        _image(6, 6, 36, 1), _image(9, 9, 81, 2), _image(3, 6, 36, 3),
        _image(6, 9, 81, 4), _image(3, 3, 36, 5), _image(9, 6, 81, 6),
    ]
    ref, out, towers, embeds = _run(model, "get_image_feature", items)
    _assert_close(out, ref, tol)
    assert towers == (6, 2)  # one call per patch-count bucket
    assert embeds == (6, 1)


def test_single_image(sglang_cpu):
    model = _build_model()
    ref, out, towers, embeds = _run(model, "get_image_feature", [_image(6, 3, 36, 11)])
    _assert_close(out, ref, FP32)
    assert towers == (1, 1) and embeds == (1, 1)


def test_order_preserved(sglang_cpu):
    model = _build_model()
    items = [_image(6, 6, 36, 21), _image(9, 9, 81, 22), _image(3, 3, 36, 23)]
    sizes = [4, 9, 1]  # pooled tokens per image (3x3 pooling)
    with torch.no_grad(), patch_applied(PATCH, {}):
        fwd = model.get_image_feature(items)
        rev = model.get_image_feature(items[::-1])
    assert fwd.shape[0] == sum(sizes)
    a, b = list(torch.split(fwd, sizes)), list(torch.split(rev, sizes[::-1]))
    for x, y in zip(a, b[::-1]):
        torch.testing.assert_close(x, y, **FP32)
    # and blocks differ across images, so a swap would have been caught
    assert not torch.allclose(a[0][:1], a[2][:1])


def test_precomputed_embeddings_pass_through(sglang_cpu):
    model = _build_model()
    items = [_image(6, 6, 36, 31), _embeds_item(5, 32), _image(3, 3, 36, 33), _embeds_item(2, 34)]
    ref, out, towers, _ = _run(model, "get_image_feature", items)
    _assert_close(out, ref, FP32)
    torch.testing.assert_close(out[4:9], items[1].feature, rtol=0, atol=0)
    assert towers == (2, 1)


def test_only_precomputed_and_empty(sglang_cpu):
    model = _build_model()
    ref, out, towers, _ = _run(model, "get_image_feature", [_embeds_item(3, 41)])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert towers == (0, 0)
    ref, out, _, _ = _run(model, "get_image_feature", [])
    assert out.shape == ref.shape == (0, TEXT_HIDDEN) and out.dtype == ref.dtype


# -- video + images ---------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_video_and_images_of_one_request(sglang_cpu, dtype, tol):
    model = _build_model(dtype)
    videos = [_video(4, 6, 6, 36, 51), _video(3, 3, 6, 36, 52, videos=2), _video(2, 9, 9, 81, 53)]
    images = [_image(6, 6, 36, 54), _image(9, 9, 81, 55)]
    ref, out, towers, embeds = _run(model, "get_video_feature", videos)
    _assert_close(out, ref, tol)
    assert towers == (3, 2) and embeds == (4 + 6 + 2, 1)
    ref, out, towers, _ = _run(model, "get_image_feature", images)
    _assert_close(out, ref, tol)
    assert towers == (2, 2)


# -- budget -----------------------------------------------------------------
def _budget_env_for_rows(model, patches, rows):
    per = be.tower_bytes_per_patch(model.vision_tower.config, patches, 4)
    return str((rows * patches * per + per // 2) / (1 << 20))


def test_budget_chunks_a_bucket(sglang_cpu, monkeypatch):
    model = _build_model()
    items = [_image(6, 6, 36, 60 + i) for i in range(5)]
    monkeypatch.setenv(be.BUDGET_ENV, _budget_env_for_rows(model, 36, 2))
    ref, out, towers, embeds = _run(model, "get_image_feature", items)
    _assert_close(out, ref, FP32)
    assert towers == (5, 3)  # 2 + 2 + 1 rows
    assert embeds == (5, 1)


def test_item_larger_than_budget_is_encoded_alone(sglang_cpu, monkeypatch):
    model = _build_model()
    monkeypatch.setenv(be.BUDGET_ENV, "0.0001")  # smaller than one 36-patch frame
    videos = [_video(3, 6, 6, 36, 71)]
    ref, out, towers, _ = _run(model, "get_video_feature", videos)
    _assert_close(out, ref, FP32)
    assert towers == (1, 3)  # never split a frame, so one frame per call


def test_chunk_rows_rule():
    assert be.chunk_rows([4, 4, 4, 4, 4], 8) == [[0, 1], [2, 3], [4]]
    assert be.chunk_rows([10, 2, 2], 8) == [[0], [1, 2]]
    assert be.chunk_rows([], 8) == []


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "inf", "nan", "1e400"])
def test_budget_strict_parsing(raw):
    with pytest.raises(ValueError, match=be.BUDGET_ENV):
        be.parse_budget_mb(raw)


def test_budget_values():
    assert be.parse_budget_mb(None) == be.parse_budget_mb("  ") == be.DEFAULT_BUDGET_MB
    assert be.parse_budget_mb(" 512 ") == 512.0
    assert be.parse_budget_mb("0.5") == 0.5


def test_bad_budget_is_a_startup_error(sglang_cpu):
    from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration as M

    before = M.__dict__["get_image_feature"]
    with patch_applied(PATCH, {be.BUDGET_ENV: "lots"}) as st:
        assert st.state == registry.ERROR
        assert be.BUDGET_ENV in st.reason and "'lots'" in st.reason
        assert M.__dict__["get_image_feature"] is before


# -- eligibility --------------------------------------------------------------
def test_sdpa_flatten_batch_backend_gets_one_row_per_call(sglang_cpu):
    """SGLang's CPU default backend asserts bsz == 1: rows go one by one, the
    embedder is still batched."""
    model = _build_model(batchable=False)
    items = [_image(6, 6, 36, 81), _image(3, 6, 36, 82), _image(9, 9, 81, 83)]
    ref, out, towers, embeds = _run(model, "get_image_feature", items)
    _assert_close(out, ref, FP32)
    assert towers == (3, 3) and embeds == (3, 1)
    # 0.5.17's own video path sends all frames at once and trips that assert
    with torch.no_grad(), patch_applied(PATCH, {}):
        out = model.get_video_feature([_video(2, 6, 6, 36, 84)])
    assert out.shape == (2 * 4, TEXT_HIDDEN)


def test_missing_positions_raise_sglang_error(sglang_cpu):
    model = _build_model()
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    item = MultimodalDataItem(modality=Modality.IMAGE, feature=_image(6, 6, 36, 91).feature)
    with torch.no_grad(), patch_applied(PATCH, {}):
        with pytest.raises(ValueError, match="no matching image_position_ids"):
            model.get_image_feature([item])


def test_knob_off_keeps_sglang(sglang_cpu):
    from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration as M

    before = M.__dict__["get_image_feature"]
    with patch_applied(PATCH, {PATCH.knob: "0"}) as st:
        assert st.state == registry.DISABLED
        assert M.__dict__["get_image_feature"] is before
    with patch_applied(PATCH, {}) as st:
        assert M.__dict__["get_image_feature"] is not before
    assert M.__dict__["get_image_feature"] is before


def test_not_upstream_in_0517():
    assert PATCH.upstream() is None


# -- unified (encoder-free) model -------------------------------------------
def _build_unified(dtype=torch.float32, seed=0):
    from sglang.srt.models.gemma4_unified import (
        Gemma4UnifiedForConditionalGeneration as U,
        Gemma4UnifiedMultimodalEmbedder,
        Gemma4UnifiedVisionEmbedder,
    )

    torch.manual_seed(seed)
    vc = SimpleNamespace(model_patch_size=2, mm_embed_dim=16, mm_posemb_size=12,
                         output_proj_dims=16, rms_norm_eps=1e-6)
    tc = SimpleNamespace(hidden_size=TEXT_HIDDEN)
    m = U.__new__(U)
    nn.Module.__init__(m)
    m.config = SimpleNamespace(text_config=tc, vision_config=vc)
    m.vision_embedder = Gemma4UnifiedVisionEmbedder(vc)
    m.embed_vision = Gemma4UnifiedMultimodalEmbedder(vc, tc)
    m.language_model = _LanguageModelStub(dtype)
    with torch.no_grad():
        m.vision_embedder.pos_embedding.normal_()
    return m.to(dtype).eval()


def _unified_image(h, w, max_patches, seed, modality="IMAGE"):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    gen = torch.Generator().manual_seed(seed)
    pv = torch.zeros(max_patches, 12)
    pp = torch.full((max_patches, 2), -1, dtype=torch.long)
    pv[: h * w] = torch.rand(h * w, 12, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pp[: h * w, 0], pp[: h * w, 1] = xs.reshape(-1), ys.reshape(-1)
    item = MultimodalDataItem(modality=getattr(Modality, modality), feature=pv.unsqueeze(0))
    item.image_position_ids = pp.unsqueeze(0)
    return item


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_unified_matches_one_by_one(sglang_cpu, dtype, tol):
    model = _build_unified(dtype)
    items = [_unified_image(4, 4, 20, 1), _embeds_item(3, 2), _unified_image(2, 5, 30, 3),
             _unified_image(3, 3, 9, 4)]
    calls = _Calls(model.vision_embedder)
    try:
        with torch.no_grad():
            ref = model.get_image_feature(items)
            n_ref, calls.n = calls.n, 0
            with patch_applied(PATCH, {}):
                out = model.get_image_feature(items)
    finally:
        calls.close()
    _assert_close(out, ref, tol)
    assert out.shape[0] == 16 + 3 + 10 + 9
    assert (n_ref, calls.n) == (3, 1)


def test_no_cross_item_leakage(sglang_cpu):
    """Batched vs one-by-one differs only by GEMM blocking (~1e-6 in fp32); within
    one batch shape the math is deterministic, so changing one image (real and
    padding patches) must leave its neighbours bit-identical."""
    model = _build_model()
    items = [_image(6, 6, 36, 101), _image(3, 6, 36, 102), _image(6, 3, 36, 103)]
    other = _image(3, 6, 36, 104)
    other.feature[0, 18:] = 0.7  # padding pixels too: CUDA backends do not mask them
    sizes = [4, 2, 2]
    with torch.no_grad(), patch_applied(PATCH, {}):
        a = torch.split(model.get_image_feature(items), sizes)
        b = torch.split(model.get_image_feature([items[0], other, items[2]]), sizes)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.allclose(a[1], b[1])
