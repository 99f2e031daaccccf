"""A tiny synthetic dataset in LLaVA conversation JSON, laid out like the embedded world, with planted
easy tasks (the answer is a function of the image's colour), so a few steps of training visibly learn.

    write_llava_root(tmp_path, n=16)        # ROOT/tasks/NAME/{train,test}.json, ROOT/images/*.png,
                                            # ROOT/captions/lcs558k.json, and (world=True) ROOT/world.json
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

TARGETS = ["cub200", "pixmocount", "pathvqa", "textvqa", "timeclock"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
ANSWERS = {  # task -> (question, colour -> answer)
    "cub200": ("Which letter names the bird? A, B, C or D.", dict(zip(COLOURS, "ABCD"))),
    "pixmocount": ("How many squares are there?", dict(zip(COLOURS, ["2", "3", "5", "7"]))),
    "pathvqa": ("Is the tissue abnormal?", dict(zip(COLOURS, ["yes", "no", "yes", "no"]))),
    "textvqa": ("What does the sign say?", dict(zip(COLOURS, ["open", "stop", "exit", "cafe"]))),
    "timeclock": ("What time does the clock show?", dict(zip(COLOURS, ["3:15", "10:45", "7:30", "12:05"]))),
}


def _image(root: Path, colour: str, i: int) -> str:
    rel = f"{colour}/{i:04d}.png"
    p = root / "images" / rel
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (32, 32), COLOURS[colour])
        im.putpixel((i % 32, (i // 32) % 32), (0, 0, 0))  # distinct files, same class
        im.save(p)
    return rel


def task_records(root: Path, task: str, n: int, multi_turn: bool = False, offset: int = 0) -> list[dict]:
    question, answer = ANSWERS[task]
    colours = list(COLOURS)
    out = []
    for i in range(n):
        c = colours[i % len(colours)]
        conv = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer[c]}]
        if multi_turn and i % 2:
            conv += [{"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": c}]
        out.append({"id": f"{task}-{offset + i}", "image": _image(root, c, offset + i), "conversations": conv})
    return out


def write_llava_root(root: Path, n: int = 16, tasks=TARGETS, world: bool = False, multi_turn_task="pathvqa") -> Path:
    root = Path(root)
    for t in tasks:
        d = root / "tasks" / t
        d.mkdir(parents=True, exist_ok=True)
        (d / "train.json").write_text(json.dumps(task_records(root, t, n, t == multi_turn_task)))
        (d / "test.json").write_text(json.dumps(task_records(root, t, 8, offset=1000)))
    captions = [{"id": f"cap-{i}", "image": _image(root, c, i),
                 "conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                                   {"from": "gpt", "value": f"a {c} square with 1 black dot"}]}
                for i, c in enumerate(list(COLOURS) * 2)]
    (root / "captions").mkdir(exist_ok=True)
    (root / "captions" / "lcs558k.json").write_text(json.dumps(captions))
    if world:
        (root / "world.json").write_text(json.dumps({
            "images": "images", "captions": "captions/lcs558k.json",
            "tasks": {t: {"kind": "target", "train": f"tasks/{t}/train.json", "test": f"tasks/{t}/test.json",
                          "scorer": "exact", "chance": 0.25, "order": i} for i, t in enumerate(tasks)}
            | {"colour": {"kind": "heldout", "train": None, "test": "tasks/cub200/test.json", "scorer": "exact",
                          "chance": 0.25, "order": 0}},
            "pretrain": f"tasks/{tasks[0]}/train.json"}))
    return root
