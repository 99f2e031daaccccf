"""Shape scenes (objects on a 3x3 grid) and how people would caption them.

A scene is a background plus 1-4 objects, each with a shape, a colour, a size and a grid cell. The
captions read like LCS-558K's short BLIP captions (lower case, no full stop). Numbers appear only where
a caption would naturally use one: a group of identical objects ("two small blue squares").
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import ImageDraw

from . import draw

POSITIONS = {(0, 0): "top left", (1, 0): "top", (2, 0): "top right", (0, 1): "left", (1, 1): "center",
             (2, 1): "right", (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right"}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
          "cross": "crosses"}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
CELL = draw.IMAGE_SIZE // 3


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self, with_size: bool = True) -> str:
        return " ".join(([self.size] if with_size else []) + [self.colour, self.shape])


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def render(self, rng: random.Random):
        img = draw.canvas(draw.jitter(rng, draw.BACKGROUNDS[self.background], 5))
        d = ImageDraw.Draw(img)
        for o in self.objects:
            cx = o.cell[0] * CELL + CELL / 2 + rng.uniform(-1, 1)
            cy = o.cell[1] * CELL + CELL / 2 + rng.uniform(-1, 1)
            r = draw.SIZE_RADIUS[o.size] + rng.uniform(-0.5, 0.5)
            draw.shape(d, o.shape, cx, cy, r, draw.jitter(rng, draw.COLOURS[o.colour]))
        return img


def sample_scene(rng: random.Random, n_objects: int | None = None, *, group_p: float = 0.0,
                 background: str | None = None) -> Scene:
    """Objects in distinct cells. With probability `group_p`, 2-3 of them are identical but for position
    (a group a caption counts)."""
    bg = background or rng.choices(list(draw.BACKGROUNDS), weights=[6, 2, 2])[0]
    n = n_objects or rng.choice([1, 1, 2, 2, 3])
    cells = rng.sample(sorted(POSITIONS), k=n + 3)
    objs: list[Obj] = []
    if rng.random() < group_p:
        k = rng.choice([2, 2, 3])
        proto = (rng.choice(draw.SHAPES), rng.choice(list(draw.COLOURS)), rng.choice(list(draw.SIZE_RADIUS)))
        objs = [Obj(*proto, cells.pop()) for _ in range(k)]
        n = max(0, n - 1)
    for _ in range(n):
        o = Obj(rng.choice(draw.SHAPES), rng.choice(list(draw.COLOURS)), rng.choice(list(draw.SIZE_RADIUS)),
                cells.pop())
        if any((o.shape, o.colour, o.size) == (p.shape, p.colour, p.size) for p in objs):
            continue  # identical objects only arise as a deliberate group
        objs.append(o)
    return Scene(bg, tuple(objs))


def _groups(scene: Scene) -> list[list[Obj]]:
    groups: dict[tuple, list[Obj]] = {}
    for o in scene.objects:
        groups.setdefault((o.shape, o.colour, o.size), []).append(o)
    return list(groups.values())


def _where(rng: random.Random, pos: str) -> str:
    if pos == "center":
        return rng.choice(["in the center", "in the middle"])
    if " " in pos:
        return rng.choice([f"in the {pos} corner", f"at the {pos}"])
    return rng.choice([f"on the {pos}", f"at the {pos}"]) if pos in ("left", "right") else f"at the {pos}"


def describe(scene: Scene, rng: random.Random, *, digits_p: float = 0.3) -> str:
    """A short caption of the whole scene."""
    parts = []
    for g in _groups(scene):
        o = g[0]
        if len(g) == 1:
            parts.append(f"a {o.phrase()} {_where(rng, o.position)}")
        else:
            k = str(len(g)) if rng.random() < digits_p else COUNT_WORDS[len(g)]
            parts.append(f"{k} {o.size} {o.colour} {PLURAL[o.shape]}")
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    template = rng.choice(["{b} on a {bg} background", "{b}", "a picture of {b}", "{b} against a {bg} background",
                           "an illustration with {b}", "simple shapes: {b}"])
    return template.format(b=body, bg=scene.background)
