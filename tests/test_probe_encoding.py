"""The probes' memoising Encoder gives exactly the tensors of `training.chat.encode`, the one definition."""
import random

import pytest
import torch
from PIL import Image

from probes.encoding import Encoder
from training.chat import encode

from .conftest import FAMILY_NAMES

INSTRUCTIONS = ["Describe the image.", "What is in the picture?"]
CAPTIONS = ["a red square", "there are 12 small dots and 3 large ones", "the clock shows 10:45", "Seventeen people"]


def items(n=24, seed=0):
    """Images of a few repeated sizes (memo hits) and some new ones, with and without answers, one text-only."""
    rng = random.Random(seed)
    sizes = [(30, 30), (20, 50), (64, 16)]
    out = []
    for i in range(n):
        size = sizes[i % 3] if i < n // 2 else (rng.randint(10, 90), rng.randint(10, 90))
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in "rgb"))
        out.append((image, rng.choice(INSTRUCTIONS), rng.choice(CAPTIONS) if i % 4 else None))
    out.append((None, "Describe the image.", "a cat"))
    return out


def assert_same(got, want):
    assert torch.equal(got.input_ids, want.input_ids) and got.input_ids.dtype == want.input_ids.dtype
    assert (got.prompt_len, got.answer_len, got.eot_len) == (want.prompt_len, want.answer_len, want.eot_len)
    assert got.image_inputs.keys() == want.image_inputs.keys()
    for k, v in want.image_inputs.items():
        assert torch.equal(got.image_inputs[k], v) and got.image_inputs[k].dtype == v.dtype, k
    assert got.token_type_ids.keys() == want.token_type_ids.keys()
    for k, v in want.token_type_ids.items():
        assert torch.equal(got.token_type_ids[k], v), k


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_encoder_equals_chat_encode(name, tiny_models):
    _, processor = tiny_models(name)
    enc = Encoder(processor)
    its = items()
    got = enc.encode_many(its[:10]) + enc.encode_many(its[10:])      # memo shared across calls
    for g, (image, instr, answer) in zip(got, its):
        assert_same(g, encode(processor, image, instr, answer))
    assert enc.fast and enc.stats["fast"] > 0 and enc.stats["full"] < len(its)
    assert enc._batched                                # one image-processor call per batch, split back


def test_encoder_falls_back_to_the_processor_when_the_image_only_call_differs(tiny_models, monkeypatch):
    """If calling the image processor alone ever disagreed with the processor's own call, every sample
    goes through the full call from then on: the outputs stay exactly `encode`'s."""
    _, processor = tiny_models("qwen2_5_vl")
    enc = Encoder(processor)
    real = enc._images_many
    monkeypatch.setattr(enc, "_images_many", lambda images: [{k: v + 1 if v.is_floating_point() else v
                                                              for k, v in out.items()} for out in real(images)])
    its = items(12)
    for g, (image, instr, answer) in zip(enc.encode_many(its), its):
        assert_same(g, encode(processor, image, instr, answer))
    assert not enc.fast


def test_encoder_names_the_text_key_by_the_placeholder_replacement(tiny_models):
    """Images of different sizes that expand to the same number of image tokens share one memo entry."""
    _, processor = tiny_models("llava_next")
    enc = Encoder(processor)
    ims = [Image.new("RGB", (40, 41 + i), (9, 9, 9)) for i in range(6)]
    enc.encode_many([(im, "Describe the image.", None) for im in ims])
    assert len(enc._text) < len(ims)
