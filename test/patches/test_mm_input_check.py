"""mm_input_check against SGLang 0.5.17's real ``BaseMultimodalProcessor.load_mm_data`` (CPU).

Reference: the unpatched method, which wraps loader failures in RuntimeError
(HTTP 500 with no message) and drops images beyond the prompt's placeholders.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
from PIL import Image

from sglang_gemma4 import registry
from sglang_gemma4.knobs import KnobError
from sglang_gemma4.patches import mm_input_check
from sglang_gemma4.patches.mm_input_check import PATCH
from sglang_gemma4.testing.hooks import patch_applied

TOK = "<image>"


@pytest.fixture
def proc():
    from sglang.srt.multimodal.processors.base_processor import BaseMultimodalProcessor

    class Proc(BaseMultimodalProcessor):
        gpu_image_decode = False  # CPU host

        async def process_mm_data_async(self, *a, **k):  # abstract; unused
            raise NotImplementedError

    # Real load paths on a bare instance: only the fields they read.
    p = object.__new__(Proc)
    p.io_executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    p.skip_tokenizer_init = False
    yield p
    p.io_executor.shutdown(wait=True)


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(path)
    return str(path)


@pytest.fixture
def truncated(tmp_path, png):
    data = open(png, "rb").read()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 3])
    return str(path)


def _load(proc, prompt, images):
    from sglang.srt.multimodal.processors.base_processor import MultimodalSpecialTokens

    tokens = MultimodalSpecialTokens(image_token=TOK)
    tokens.parse_regex()
    return asyncio.run(proc.load_mm_data(prompt=prompt, multimodal_tokens=tokens, image_data=images))


def test_unpatched_truncated_and_missing_are_runtime_errors(clean_env, proc, truncated, tmp_path):
    with pytest.raises(RuntimeError, match="truncated"):
        _load(proc, f"a {TOK} b", [truncated])
    with pytest.raises(RuntimeError):
        _load(proc, f"a {TOK} b", [str(tmp_path / "nope.png")])


@pytest.mark.parametrize("prompt", [f"a {TOK} b", f"a {TOK} b {TOK}"], ids=["fast", "legacy"])
def test_patched_truncated_png_is_value_error(clean_env, proc, truncated, png, prompt):
    images = [truncated] if prompt.count(TOK) == 1 else [truncated, png]
    with patch_applied(PATCH, {}) as st:
        assert st.state == "active"
        with pytest.raises(ValueError) as e:
            _load(proc, prompt, images)
    assert "image_data" in str(e.value) and "truncated" in str(e.value)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_patched_missing_file_is_value_error(clean_env, proc, tmp_path):
    missing = str(tmp_path / "nope.png")
    with patch_applied(PATCH, {}):
        with pytest.raises(ValueError, match="image_data: could not load item") as e:
            _load(proc, f"a {TOK} b", [missing])
    assert "nope.png" in str(e.value)


def test_good_image_identical_patched_and_unpatched(clean_env, proc, png):
    ref = _load(proc, f"a {TOK} b", [png])
    with patch_applied(PATCH, {}):
        out = _load(proc, f"a {TOK} b", [png])
    assert len(ref.images) == len(out.images) == 1
    assert out.input_text == ref.input_text
    assert out.images[0].tobytes() == ref.images[0].tobytes()


def test_two_images_one_placeholder(clean_env, proc, png):
    ref = _load(proc, f"a {TOK} b", [png, png])
    assert len(ref.images) == 1  # the bug: the second image is dropped silently
    with patch_applied(PATCH, {}):
        with pytest.raises(ValueError, match="image_data has 2 images but the prompt has 1 image placeholders"):
            _load(proc, f"a {TOK} b", [png, png])
        # None items are not counted
        assert len(_load(proc, f"a {TOK} b", [png, None]).images) == 1


def test_more_placeholders_than_images_is_value_error(clean_env, proc, png):
    with pytest.raises(RuntimeError):
        _load(proc, f"{TOK} {TOK}", [png])
    with patch_applied(PATCH, {}):
        with pytest.raises(ValueError, match="more multimodal placeholders"):
            _load(proc, f"{TOK} {TOK}", [png])


def test_unrelated_exceptions_pass_through(clean_env, proc, png):
    async def boom(self, *a, **k):
        raise KeyError("server bug")

    async def other_runtime(self, *a, **k):
        raise RuntimeError("CUDA error: something else")

    for stub, exc in ((boom, KeyError), (other_runtime, RuntimeError)):
        with pytest.raises(exc) as e:
            asyncio.run(mm_input_check.check_load_mm_data(stub, proc, prompt="x", multimodal_tokens=None,
                                                          image_data=[png]))
        assert type(e.value) is exc


def test_knob_off_and_bad_knob(clean_env, proc, truncated, png):
    with patch_applied(PATCH, {PATCH.knob: "0"}) as st:
        assert st.state == registry.DISABLED
        with pytest.raises(RuntimeError):
            _load(proc, f"a {TOK} b", [truncated])
        assert len(_load(proc, f"a {TOK} b", [png, png]).images) == 1
    with pytest.raises(KnobError):
        PATCH.knob_value({PATCH.knob: "maybe"})
    assert registry.evaluate(PATCH, {PATCH.knob: "maybe"}).state == registry.ERROR


def test_status_and_upstream(clean_env):
    assert registry.evaluate(PATCH, {}).state == registry.ACTIVE
    assert PATCH.upstream() is None  # 0.5.17 still wraps loader errors in RuntimeError


def test_upstream_fix_and_missing_target_stand_down(clean_env, monkeypatch):
    monkeypatch.setattr(mm_input_check.inspect, "getsource", lambda fn: "raise ValueError('loading failed')")
    assert PATCH.upstream() and registry.evaluate(PATCH, {}).state == registry.UPSTREAM
    monkeypatch.undo()
    from sglang.srt.multimodal.processors.base_processor import BaseMultimodalProcessor

    monkeypatch.delattr(BaseMultimodalProcessor, "load_mm_data")
    assert registry.evaluate(PATCH, {}).state == registry.UNAVAILABLE
