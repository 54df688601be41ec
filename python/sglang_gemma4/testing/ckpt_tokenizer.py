"""The ``mm`` checkpoint's tokenizer: word-level ``t<id>`` over the vocab, specials at their config ids.

Decode -> encode is the identity on ids, which is what SGLang 0.5.17 needs: it
decodes a request's ``input_ids`` with the processor's tokenizer before running
the processor on the text and images (see :mod:`sglang_gemma4.testing.ckpt_mm`).
"""

from __future__ import annotations

from typing import Dict, Tuple

from sglang_gemma4.testing.ckpt_specs import BOS_ID, EOS_ID, FIRST_PROMPT_ID, PAD_ID, CheckpointSpec

# Gemma-4's special-token strings (the ones SGLang's Gemma-4 processor matches)
# for each id field of the mm config, and the tokenizer attribute naming each.
MM_TOKEN_STRINGS: Dict[str, Tuple[str, str]] = {
    "image_token_id": ("<|image|>", "image_token"),
    "boi_token_id": ("<|image>", "boi_token"),
    "eoi_token_id": ("<image|>", "eoi_token"),
    "video_token_id": ("<|video|>", "video_token"),
    "audio_token_id": ("<|audio|>", "audio_token"),
    "boa_token_id": ("<|audio>", "boa_token"),
    "eoa_token_index": ("<audio|>", "eoa_token"),
}
UNK_ID = 3


def mm_vocab(s: CheckpointSpec) -> Dict[str, int]:
    """Token string -> id over the whole vocab: specials at their config ids, ``t<id>`` elsewhere."""
    special = {PAD_ID: "<pad>", EOS_ID: "<eos>", BOS_ID: "<bos>", UNK_ID: "<unk>"}
    for field, tid in s.mm_token_ids:
        if field not in MM_TOKEN_STRINGS:
            raise ValueError(f"{s.name}: no token string known for {field!r}")
        if not (FIRST_PROMPT_ID <= tid < s.text.vocab_size) or tid in special:
            raise ValueError(f"{s.name}: {field}={tid} must be a free id in [{FIRST_PROMPT_ID}, {s.text.vocab_size})")
        special[tid] = MM_TOKEN_STRINGS[field][0]
    return {special.get(i, f"t{i}"): i for i in range(s.text.vocab_size)}


def _mm_tokenizer(s: CheckpointSpec):
    """A word-level fast tokenizer whose decode -> encode is the identity on ids.

    Words are ``t<id>`` split on whitespace; specials are added tokens (matched
    before splitting, so ``<|image><|image|>...`` written without spaces
    tokenizes too); encode prepends ``<bos>`` like Gemma's tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = mm_vocab(s)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [w for w in vocab if not w.startswith("t")]
    tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    extra = {MM_TOKEN_STRINGS[f][1]: MM_TOKEN_STRINGS[f][0] for f, _ in s.mm_token_ids}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=extra,
        model_max_length=s.text.max_position_embeddings,
    )
