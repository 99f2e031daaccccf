"""The world's tasks: name, role, scorer and chance level, in one table.

Targets are trained one after another (in `order`); held-out tasks are only ever pretrained on (train
split) and measured (test split); transfer tasks (test split only) ask a target's question about another
kind of picture, filling the image-OOD/text-ID cell of the 2x2 grid (training/domains.py). Their names
extend the target's ("pixmocount_tissue"), so a run that trains the target scores them as its targets. `chance` is the expected score (0-100) of guessing uniformly among the
answers a question admits. Scorers are named, not implemented, here: `probes/` scores.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import draw, scenes, tasks

SCORERS = ("mc_letter", "integer", "yes_no", "exact", "vqa", "clock", "anls", "relaxed")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                 # "target", "heldout" or "transfer"
    scorer: str               # one of SCORERS
    chance: float             # 0-100
    make: Callable            # rng -> tasks.Example
    order: int | None = None  # position in the default target sequence
    max_new_tokens: int = 8   # enough for every answer of the task (the longest, "12:45", is 5 tokens)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("cub200", "target", "mc_letter", 100 / tasks.BIRD_OPTIONS, tasks.cub200, 0),
    TaskSpec("pixmocount", "target", "integer", 100 / tasks.COUNT_MAX, tasks.pixmocount, 1),
    TaskSpec("pathvqa", "target", "exact", tasks.PATHVQA_CHANCE, tasks.pathvqa, 2),
    TaskSpec("textvqa", "target", "vqa", tasks.TEXTVQA_CHANCE, tasks.textvqa, 3),
    TaskSpec("timeclock", "target", "clock", 100 / (12 * 60 // tasks.MINUTE_STEP), tasks.timeclock, 4),
    TaskSpec("colour", "heldout", "exact", 100 / len(draw.COLOURS), tasks.colour),
    TaskSpec("shape", "heldout", "exact", 100 / len(draw.SHAPES), tasks.shape),
    TaskSpec("position", "heldout", "exact", 100 / len(scenes.POSITIONS), tasks.position),
    TaskSpec("size", "heldout", "exact", 50.0, tasks.size),
    TaskSpec("presence", "heldout", "yes_no", 50.0, tasks.presence),
    TaskSpec("caption_match", "heldout", "mc_letter", 25.0, tasks.caption_match),
    TaskSpec("background", "heldout", "exact", 100 / len(draw.BACKGROUNDS), tasks.background),
    TaskSpec("scene", "heldout", "exact", 100 / len(tasks.SCENE_KINDS), tasks.scene),
    TaskSpec("pixmocount_tissue", "transfer", "integer", 100 / tasks.COUNT_MAX, tasks.pixmocount_tissue),
    TaskSpec("textvqa_shapes", "transfer", "vqa", tasks.TEXTVQA_CHANCE, tasks.textvqa_shapes),
]}

TARGET_TASKS: list[str] = sorted((t.name for t in TASKS.values() if t.kind == "target"),
                                 key=lambda n: TASKS[n].order)
HELDOUT_TASKS: list[str] = [t.name for t in TASKS.values() if t.kind == "heldout"]
TRANSFER_TASKS: list[str] = [t.name for t in TASKS.values() if t.kind == "transfer"]


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown world task {name!r}; known: {', '.join(TASKS)}") from None
