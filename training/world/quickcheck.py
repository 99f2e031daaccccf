"""QUICK CHECK ONLY (not the benchmark scorer: that is `probes/`): exact-match accuracy of a model on a
world task, used to validate the pretrained base model when it is built.

Teacher-forced and deterministic: an example counts as correct when the argmax at every answer position
and at the first end-of-turn position is the reference token (the EOS), which is exactly "greedy decoding returns the
reference answer and then stops". One forward pass per batch instead of a decoding loop.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from ..chat import answer_affixes, collate, encode
from ..families import family_of_model
from .build import load_world, read_records

MODEL_INPUT_DROP = ("answer_mask", "eot_mask")


def encode_records(processor, world: str | os.PathLike, records: list[dict]):
    images = Path(world) / load_world(world)["images"]
    affixes = answer_affixes(processor)
    out = []
    for r in records:
        human, gpt = r["conversations"][0]["value"], r["conversations"][1]["value"]
        with Image.open(images / r["image"]) as im:
            out.append(encode(processor, im.convert("RGB"), human.replace("<image>\n", ""), gpt, affixes=affixes))
    return out


@torch.no_grad()
def greedy_exact(model, processor, examples, batch_size: int = 64) -> list[bool]:
    """Per example: would greedy decoding produce exactly the reference answer, then end the turn?"""
    family = family_of_model(model)
    pad = processor.tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    ok: list[bool] = []
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], family, pad, padding_side="right")
        logits = model(**{k: v for k, v in b.items() if k not in MODEL_INPUT_DROP}).logits
        pred, tgt = logits[:, :-1].argmax(-1), b["input_ids"][:, 1:]
        eot = b["eot_mask"]
        first_eot = eot & ~torch.cat([torch.zeros_like(eot[:, :1]), eot[:, :-1]], 1)  # greedy stops at EOS
        scored = (b["answer_mask"] | first_eot)[:, 1:]
        ok += ((pred == tgt) | ~scored).all(1).tolist()
    model.train(was_training)
    return ok


def task_accuracy(model, processor, world: str | os.PathLike, task: str, split: str = "test",
                  limit: int | None = None) -> float:
    """Quick-check accuracy (0-100) on one world task split."""
    info = load_world(world)
    recs = read_records(world, info["tasks"][task][split])[:limit]
    ok = greedy_exact(model, processor, encode_records(processor, world, recs))
    return 100.0 * sum(ok) / max(1, len(ok))
