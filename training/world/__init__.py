"""The embedded world: a procedural, seeded multimodal miniature of the study (data, tokenizers, base model).

    world = ensure_world()                       # .cache/world/v2 (or $LMM_DRIFT_CACHE/world/vN), built once
    info = load_world(world)                     # world.json: tasks, splits, scorers, chance levels
    ckpt = base_checkpoint("qwen2_5_vl", "toy", train=training.run.run)   # the pretrained base, built once

`TARGET_TASKS` are the five skills taught in sequence (in their default order); `HELDOUT_TASKS` are
general abilities the base model is pretrained on and no stage trains; `TRANSFER_TASKS` ask a target's
question about other pictures (evaluation only: the 2x2 grid's image-OOD/text-ID cell).
"""
from .base import base_checkpoint, pretrain
from .build import WORLD_SIZES, cache_root, ensure_world, load_world, read_records, write_world
from .models import MODEL_SIZES, init_checkpoint
from .registry import HELDOUT_TASKS, TARGET_TASKS, TASKS, TRANSFER_TASKS, get_task

__all__ = ["HELDOUT_TASKS", "MODEL_SIZES", "TARGET_TASKS", "TASKS", "TRANSFER_TASKS",
           "WORLD_SIZES", "base_checkpoint", "cache_root",
           "ensure_world", "get_task", "init_checkpoint", "load_world", "pretrain", "read_records", "write_world"]
