"""Multimodal (``mm``) checkpoint files and image requests.

Images (``mm``): SGLang 0.5.17 builds image items only through the Hugging
Face processor loaded from the model path (``AutoProcessor``), even with
``skip_tokenizer_init=True``: it decodes the request's ``input_ids`` with the
processor's tokenizer, runs the processor on that text and the images (pixel
patches, position ids, soft-token counts) and keeps the request's own ids,
expanding each image token to the image's soft-token count
(``SGLANG_MM_AVOID_RETOKENIZE``, on by default). So the ``mm`` directory also
holds a tiny tokenizer (a word-level vocabulary ``t<id>`` over the
checkpoint's 2048 ids plus Gemma-4's special tokens at their config ids,
decode/encode an identity on ids; :mod:`sglang_gemma4.testing.ckpt_tokenizer`)
and transformers' Gemma-4 processor configuration with ``max_soft_tokens=70``
(every image padded to 630 patches of 16 px, at most 70 soft tokens).
:func:`image_prompt` writes a request the way Gemma-4 lays one out.
``ENGINE_KWARGS["mm"]`` keeps the text-only setting
(``enable_multimodal=False``); ``IMAGE_ENGINE_KWARGS`` serves images.
"""

from __future__ import annotations

import os
from typing import Any, List, Sequence

from sglang_gemma4.testing.ckpt_specs import BOS_ID, EOS_ID, PAD_ID, CheckpointSpec
from sglang_gemma4.testing.ckpt_tokenizer import UNK_ID, _mm_tokenizer
from sglang_gemma4.testing.ckpt_variants import spec

IMAGE = "<image>"  # placeholder in :func:`image_prompt` parts


def mm_token_id(variant: str, field: str) -> int:
    """The id of ``field`` (e.g. ``"image_token_id"``) in an mm variant's vocab."""
    ids = dict(spec(variant).mm_token_ids)
    if field not in ids:
        raise ValueError(f"{variant}: no {field!r}; known: {', '.join(ids)}")
    return ids[field]


def write_mm_processor(s: CheckpointSpec, out_dir: os.PathLike) -> None:
    """Tokenizer + transformers ``Gemma4Processor`` files (what ``AutoProcessor`` loads).

    Needs torchvision (transformers' Gemma-4 image/video processors).
    """
    from transformers.models.gemma4 import (
        Gemma4AudioFeatureExtractor,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    v = s.vision
    if v is None:
        raise ValueError(f"{s.name}: mm processor files need a vision spec")
    # the tower's position table must cover the widest patch grid the resize can produce
    max_side = v.max_soft_tokens * v.pooling_kernel_size  # patches (transformers' resize rule)
    if max_side > v.position_embedding_size:
        raise ValueError(f"{s.name}: position_embedding_size {v.position_embedding_size} < max patch side {max_side}")
    geometry = dict(
        patch_size=v.patch_size, max_soft_tokens=v.max_soft_tokens, pooling_kernel_size=v.pooling_kernel_size
    )
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(**geometry),
        tokenizer=_mm_tokenizer(s),
        video_processor=Gemma4VideoProcessor(**geometry),
        image_seq_length=v.max_soft_tokens,
    )
    processor.save_pretrained(str(out_dir))


def image_prompt(parts: Sequence[Any], variant: str = "mm") -> List[int]:
    """A BOS-led prompt: ``parts`` are lists of text ids or :data:`IMAGE`.

    Each image is written as Gemma-4 lays it out (``<|image> <|image|> <image|>``);
    SGLang expands the middle token to the image's soft-token count.
    """
    boi, img, eoi = (mm_token_id(variant, f) for f in ("boi_token_id", "image_token_id", "eoi_token_id"))
    specials = {PAD_ID, EOS_ID, BOS_ID, UNK_ID} | {t for _, t in spec(variant).mm_token_ids}
    out = [BOS_ID]
    for p in parts:
        if isinstance(p, str) and p == IMAGE:
            out += [boi, img, eoi]
            continue
        ids = [int(t) for t in p]
        bad = [t for t in ids if t in specials or not 0 <= t < spec(variant).text.vocab_size]
        if bad:
            raise ValueError(f"text ids must be ordinary vocab ids, got {bad}")
        out += ids
    return out


def expand_image_prompt(prompt: Sequence[int], soft_tokens: Sequence[int], variant: str = "mm") -> List[int]:
    """``prompt`` with its i-th image token repeated ``soft_tokens[i]`` times (what the model sees)."""
    img = mm_token_id(variant, "image_token_id")
    n = sum(1 for t in prompt if t == img)
    if n != len(soft_tokens):
        raise ValueError(f"prompt has {n} image tokens, {len(soft_tokens)} counts given")
    out, k = [], 0
    for t in prompt:
        if t == img:
            out += [img] * int(soft_tokens[k])
            k += 1
        else:
            out.append(int(t))
    return out


def synthetic_image(height: int, width: int, seed: int):
    """A deterministic RGB PIL image: smooth random field plus noise (not constant patches)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [np.sin(xx * rng.uniform(0.02, 0.2) + yy * rng.uniform(0.02, 0.2) + rng.uniform(0, 6.3)) for _ in range(3)],
        axis=-1,
    )
    px = 127.5 * (1.0 + 0.8 * base) + rng.normal(0.0, 20.0, (height, width, 3))
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))
