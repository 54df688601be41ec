"""The ``mm`` checkpoint serves images through SGLang 0.5.17's real Gemma-4 path (CPU).

Checks: the tokenizer/processor files load offline with ``AutoProcessor`` and
decode -> encode is the identity on ids; transformers' Gemma-4 processor turns
a 2-image prompt into patches/position ids whose soft-token counts match what
transformers' own fp32 model consumes (it raises on a mismatch), and the
model's greedy output depends on the image pixels (else an engine comparison
could not see an encoder bug); SGLang's ``Gemma4SGLangProcessor``, built the
way its TokenizerManager builds it with ``skip_tokenizer_init=True``, turns
``input_ids`` + 2 image files into the expanded ids and one image item per
image; ServerArgs/ModelConfig resolve the checkpoint as multimodal.
"""

from __future__ import annotations

import asyncio
import types

import pytest
import torch

from sglang_gemma4.testing import checkpoints as ck

SIZES = [(64, 64), (40, 130)]  # square; wide (the resize keeps aspect: fewer soft tokens)
TEXT = [[10, 11, 12, 300, 400, 500, 600, 700], ck.IMAGE, [13], ck.IMAGE, [14, 15]]


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    return ck.build("mm", tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def processor(mm):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(mm), local_files_only=True)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    paths = []
    for i, (h, w) in enumerate(SIZES):
        p = d / f"img{i}.png"
        ck.synthetic_image(h, w, seed=i + 1).save(p)
        paths.append(str(p))
    return paths


def _images(seeds):
    return [ck.synthetic_image(h, w, seed=s) for (h, w), s in zip(SIZES, seeds)]


def _hf_inputs(processor, prompt, images):
    """transformers' own text path: one ``<|image|>`` per image, expanded by the processor."""
    tok = processor.tokenizer
    text = tok.decode(prompt).replace(f"{tok.boi_token} {tok.image_token} {tok.eoi_token}", tok.image_token)
    return processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)


def test_files_and_config(mm, processor):
    import json

    cfg = json.loads((mm / "config.json").read_text())
    for field, tid in ck.spec("mm").mm_token_ids:
        assert cfg[field] == tid
        tok_str, attr = ck.MM_TOKEN_STRINGS[field]
        assert processor.tokenizer.convert_tokens_to_ids(tok_str) == tid
        assert getattr(processor.tokenizer, attr) == tok_str
    assert type(processor).__name__ == "Gemma4Processor"
    ip = processor.image_processor
    v = ck.spec("mm").vision
    assert (ip.patch_size, ip.max_soft_tokens, ip.pooling_kernel_size) == (
        v.patch_size, v.max_soft_tokens, v.pooling_kernel_size)
    assert cfg["vision_config"]["patch_size"] == ip.patch_size
    assert cfg["vision_config"]["pooling_kernel_size"] == ip.pooling_kernel_size
    assert len(processor.tokenizer) == cfg["text_config"]["vocab_size"]
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False


def test_decode_encode_identity(processor):
    import random

    tok = processor.tokenizer
    rng = random.Random(0)
    specials = {t for _, t in ck.spec("mm").mm_token_ids}
    ids = ck.image_prompt([[rng.randrange(ck.FIRST_PROMPT_ID, 2040) for _ in range(50)], ck.IMAGE, [9]])
    ids += [rng.choice(sorted(specials)) for _ in range(5)] + [ck.EOS_ID, ck.PAD_ID, 2047]
    text = tok.decode(ids)
    assert tok(text, add_special_tokens=False).input_ids == ids
    assert tok(text[len("<bos> "):]).input_ids == ids  # encode prepends exactly one <bos>


def test_image_prompt_rejects_specials():
    with pytest.raises(ValueError, match="ordinary vocab ids"):
        ck.image_prompt([[10, ck.mm_token_id("mm", "image_token_id")]])
    with pytest.raises(ValueError, match="2 counts"):
        ck.expand_image_prompt(ck.image_prompt([ck.IMAGE]), [3, 4])


def test_processor_feeds_the_vision_tower(mm, processor):
    """transformers' fp32 Gemma-4 consumes the processor output, and its greedy
    tokens change with the pixels (the images are informative)."""
    from safetensors.torch import load_file
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration(Gemma4Config.from_pretrained(str(mm))).float().eval()
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in load_file(str(mm / "model.safetensors")).items()}, strict=False
    )
    assert not missing and not unexpected
    prompt = ck.image_prompt(TEXT)
    outs = []
    for seeds in [(1, 2), (3, 2), (1, 4)]:
        r = _hf_inputs(processor, prompt, _images(seeds))
        v = ck.spec("mm").vision
        assert r["pixel_values"].shape == (2, v.max_soft_tokens * v.pooling_kernel_size**2, 3 * v.patch_size**2)
        valid = (r["image_position_ids"] != -1).all(-1).sum(-1).tolist()
        counts = [n // v.pooling_kernel_size**2 for n in valid]
        assert counts[0] != counts[1]  # mixed sizes -> different soft-token counts
        assert r["input_ids"][0].tolist() == ck.expand_image_prompt(prompt, counts)
        x, toks = r["input_ids"], []
        with torch.no_grad():
            for _ in range(4):
                tt = torch.zeros_like(x)
                tt[:, : r["mm_token_type_ids"].shape[1]] = r["mm_token_type_ids"]
                logits = model(
                    input_ids=x, pixel_values=r["pixel_values"],
                    image_position_ids=r["image_position_ids"], mm_token_type_ids=tt,
                ).logits[0, -1]
                toks.append(int(logits.argmax()))
                x = torch.cat([x, torch.tensor([[toks[-1]]])], dim=1)
        outs.append(toks)
    # changing either image changes the continuation
    assert outs[0] != outs[1] and outs[0] != outs[2], outs


@pytest.fixture(scope="module")
def sglang_processor(mm):
    """SGLang's Gemma-4 multimodal processor, built as TokenizerManager builds it."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers.multimodal_processor import get_mm_processor, import_processors
    from sglang.srt.managers.tokenizer_manager import _get_processor_wrapper
    from sglang.srt.server_args import ServerArgs

    sa = ServerArgs(model_path=str(mm), device="cpu", attention_backend="triton", skip_tokenizer_init=True,
                    **ck.IMAGE_ENGINE_KWARGS["mm"])
    mc = ModelConfig.from_server_args(sa)
    import_processors("sglang.srt.multimodal.processors")
    return sa, mc, get_mm_processor(mc.hf_config, sa, _get_processor_wrapper(sa), "default", model_config=mc)


def test_server_args_multimodal(sglang_processor):
    sa, mc, _ = sglang_processor
    assert mc.is_multimodal and mc.is_image_understandable_model
    assert mc.image_token_id == ck.mm_token_id("mm", "image_token_id")
    assert mc.hf_config.eoa_token_id == ck.mm_token_id("mm", "eoa_token_index")  # SGLang's alias
    assert mc.hf_config.architectures == ["Gemma4ForConditionalGeneration"]
    t = ck.spec("mm").text
    assert mc.head_dim == t.full_head_dim and mc.swa_head_dim == t.swa_head_dim


def test_sglang_processor_two_images(sglang_processor, processor, image_files, monkeypatch):
    from sglang.srt.managers.schedule_batch import Modality
    from sglang.srt.multimodal.processors import base_processor

    _, _, mp = sglang_processor
    assert type(mp).__name__ == "Gemma4SGLangProcessor"
    # the fast image processor would run on cuda:<gpu>; SGLang's CPU engine uses cpu
    monkeypatch.setattr(base_processor, "_is_cpu", True)
    prompt = ck.image_prompt(TEXT)
    out = asyncio.run(mp.process_mm_data_async(
        image_data=list(image_files), audio_data=None, input_text=list(prompt),
        request_obj=types.SimpleNamespace(video_data=None),
    ))
    ref = _hf_inputs(processor, prompt, _images((1, 2)))  # same pixels as the files (PNG is lossless)
    assert out.input_ids == ref["input_ids"][0].tolist()  # request ids kept, image tokens expanded
    img = ck.mm_token_id("mm", "image_token_id")
    assert len(out.mm_items) == 2
    for k, item in enumerate(out.mm_items):
        assert item.modality == Modality.IMAGE
        (start, end), = item.offsets
        assert set(out.input_ids[start:end + 1]) == {img}
        assert out.input_ids[start - 1] == ck.mm_token_id("mm", "boi_token_id")
        assert out.input_ids[end + 1] == ck.mm_token_id("mm", "eoi_token_id")
        assert torch.equal(item.feature.reshape(ref["pixel_values"][k].shape), ref["pixel_values"][k])
        assert torch.equal(item.image_position_ids.reshape(-1, 2), ref["image_position_ids"][k])
