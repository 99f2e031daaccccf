"""Build a small Hugging Face tokenizer offline, in either marker style the real families use.

`bytelevel` is GPT-2 / Qwen2 style ("Ġ" marks a leading space, digits split one by one as Qwen2 does);
`metaspace` is SentencePiece / Llama / Mistral style ("▁" marks a leading space, digits split).
The result is a `PreTrainedTokenizerFast`, saved and loaded like any hub tokenizer.
"""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .records import NUMBER_WORDS  # must exist as whole tokens whatever the corpus (the counting probe)


def _pre_tokenizer(style: str):
    if style == "bytelevel":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if style == "metaspace":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(r"[^\w▁]"), behavior="isolated"),
        ])
    raise ValueError(f"unknown tokenizer style {style!r}; expected 'bytelevel' or 'metaspace'")


def build_tokenizer(texts: Iterable[str], *, vocab_size: int, style: str, special_tokens: list[str],
                    eos_token: str, pad_token: str, chat_template: str, extra_words: Iterable[str] = (),
                    bos_token: str | None = None, model_max_length: int = 4096,
                    named_tokens: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on `texts` and wrap it as a PreTrainedTokenizerFast.

    Special tokens get the first ids (in the order given); number words and `extra_words` are seeded
    into the corpus often enough that BPE keeps them whole, with and without a leading space.
    `named_tokens` ({"image_token": "<image>", ...}) become tokenizer attributes with their `*_id`, as
    multimodal processors expect.
    """
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(style)
    if style == "bytelevel":
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = [chr(c) for c in range(32, 127)] + ["▁"]
    words = list(NUMBER_WORDS) + [w.capitalize() for w in NUMBER_WORDS] + list(extra_words)
    seed = [" ".join(words)] * 50

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=alphabet, show_progress=False, min_frequency=2)
    tok.train_from_iterator(_chain(seed, texts), trainer=trainer)
    kwargs = dict(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token,
                  model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    if named_tokens:
        kwargs["extra_special_tokens"] = dict(named_tokens)
    fast = PreTrainedTokenizerFast(**kwargs)
    fast.chat_template = chat_template
    return fast


def _chain(*iterables):
    for it in iterables:
        yield from it
