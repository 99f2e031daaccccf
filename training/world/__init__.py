"""The embedded world: a procedural, seeded multimodal miniature of the study (data, tokenizers, base model).

    from training.world.build import ensure_world, load_world
    from training.world.base import base_checkpoint
    world = ensure_world()                       # .cache/world/v3 (or $LMM_DRIFT_CACHE/world/vN), built once
    info = load_world(world)                     # world.json: tasks, splits, scorers, chance levels
    ckpt = base_checkpoint("qwen2_5_vl", "toy", train=training.run.run_in_processes)   # the pretrained base, built once

Modules: build (the data on disk), registry (TARGET_TASKS, HELDOUT_TASKS, TRANSFER_TASKS, TASKS), tasks /
scenes / draw (the generators), tokenizers, models (init_checkpoint), base (the pretrained base),
quickcheck. The package itself imports none of them, so they may import each other (`from . import draw`)
without an import circle through it.

`TARGET_TASKS` are the five skills taught in sequence (in their default order); `HELDOUT_TASKS` are
general abilities the base model is pretrained on and no stage trains; `TRANSFER_TASKS` ask a target's
question about other pictures (evaluation only: the 2x2 grid's image-OOD/text-ID cell).
"""
