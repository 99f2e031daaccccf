"""Tokenizers trained offline on the world's own text, one per family (its special tokens, image tokens and
chat template come from the family adapter's `tiny_tokenizer`).

Digits and number words stay ordinary tokens: the families' pre-tokenizers split digits one by one (as
Qwen2 and Llama do) and `training.tokenizer.build_tokenizer` keeps the 32 number words whole.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..records import NUMBER_WORDS
from .build import CAPTIONS, load_world, read_records

VOCAB_SIZE = 1024


def _family_module(family: str):
    try:
        return importlib.import_module(f"training.families.{family}")
    except ModuleNotFoundError:
        from ..families import FAMILIES
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}") from None


def world_texts(world: str | os.PathLike) -> list[str]:
    """Every caption, instruction and answer of the world (captions and every target and held-out task, both
    splits). Transfer tasks are left out: their words are their targets' words, and leaving them out keeps the
    tokenizer (an input of the base model, PRETRAIN_VERSION) what it was before they existed."""
    info = load_world(world)
    files = [CAPTIONS] + [t[s] for t in info["tasks"].values() if t["kind"] != "transfer" for s in ("train", "test")]
    texts = []
    for rel in files:
        for rec in read_records(world, rel):
            for turn in rec["conversations"]:
                texts.append(turn["value"].replace("<image>\n", "").replace("<image>", ""))
    return texts


def world_tokenizer(family: str, world: str | os.PathLike, vocab_size: int = VOCAB_SIZE):
    """The family's tokenizer (special tokens, chat template) trained on the world's text."""
    # build_tokenizer seeds number words after a space; a caption may also start with one ("two red ..."),
    # so seed the bare forms too: every number word is one token with and without a leading space.
    bare = [v for w in NUMBER_WORDS for v in (w, w.capitalize())] * 20
    return _family_module(family).tiny_tokenizer(world_texts(Path(world)) + bare, vocab_size=vocab_size)
