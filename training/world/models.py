"""Model sizes for the embedded world and the random-init checkpoint (world tokenizer + processor).

Sizes follow EMBEDDED_WORLD_FACTS.md: `toy` (the demo: text hidden 128, 3 layers, about 1M parameters)
and `tiny` (tests: text hidden 64, 2 layers). Images are 48x48 pixels: Qwen2.5-VL sees 9 merged image
tokens (patch 4, merge 4); the LLaVA families see 21 (patch 16: a 3x3 base view, a 3x3 crop, newlines).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from ..checkpoints import save_full
from ..families import get_family
from .draw import IMAGE_SIZE
from .tokenizers import world_tokenizer

MODEL_SIZES: dict[str, dict] = {
    "toy": dict(hidden=128, layers=3, heads=4, kv_heads=2, intermediate=344, vision_hidden=64, vision_depth=2),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_depth=1),
}
# Vision patching per family at IMAGE_SIZE (keeps image-token counts small).
PATCH = {"qwen2_5_vl": dict(patch_size=4, merge_size=4), "llava_onevision": dict(patch_size=16),
         "llava_next": dict(patch_size=16)}
# The world each model size is pretrained on.
WORLD_OF_SIZE = {"toy": "toy", "tiny": "tiny"}


def model_size(size: str) -> dict:
    try:
        return MODEL_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown model size {size!r}; known: {', '.join(MODEL_SIZES)}") from None


def build_init(family: str, size: str, world: str | os.PathLike, seed: int = 0):
    """(random-init model, processor) with the world's tokenizer; deterministic given `seed`."""
    fam = get_family(family)
    if family not in PATCH:
        raise ValueError(f"no embedded-world model settings for family {family!r}")
    mod = importlib.import_module(f"training.families.{family}")
    tok = world_tokenizer(family, world)
    patch = PATCH[family]
    processor = mod.make_processor(tok, image_size=IMAGE_SIZE, **patch)
    kwargs = dict(model_size(size), **patch)
    if family != "qwen2_5_vl":
        kwargs["image_size"] = IMAGE_SIZE
    torch.manual_seed(seed)
    model = fam.model_class(mod.tiny_config(tok, **kwargs))
    return model.eval(), processor


def init_checkpoint(family: str = "qwen2_5_vl", size: str = "toy", out: str | os.PathLike | None = None, *,
                    world: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Write the random-init checkpoint (model + world tokenizer/processor) to `out`, atomically."""
    from .build import ensure_world

    if out is None:
        raise ValueError("init_checkpoint: give `out`, the folder to write")
    model_size(size)
    world = world or ensure_world(size=WORLD_OF_SIZE[size])
    model, processor = build_init(family, size, world, seed=seed)
    return save_full(model, processor, out)
