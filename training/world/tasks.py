"""One generator per task: `make(rng) -> Example(image, instruction, answer)`.

Captions (the LCS-558K stand-in) cover every kind of image in the world, but never state what a target
skill must read off the image (a bird's species, a clock's time); the held-out tasks ask general
questions about shape scenes; the five targets mirror the paper's CUB200, PixmoCount, PathVQA, TextVQA
and TimeClock.
"""
from __future__ import annotations

import itertools
import random
import string
from dataclasses import dataclass

from PIL import Image

from . import draw
from .scenes import PLURAL, POSITIONS, Obj, Scene, describe, sample_scene

# The "brief description" instructions LLaVA's pretraining pairs with LCS-558K captions.
CAPTION_INSTRUCTIONS = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]
SHORT = "Answer with a single word or phrase."
LETTER = "Answer with the option's letter."


@dataclass
class Example:
    """One generated item of a task: the world writes it as a LLaVA record (build.py)."""
    image: Image.Image
    instruction: str
    answer: str


def _background(rng: random.Random) -> tuple[int, int, int]:
    return draw.jitter(rng, rng.choice([(250, 250, 250), (225, 235, 245), (240, 235, 215)]), 5)


# -- birds -----------------------------------------------------------------------------------------
BIRD_NAMES = ["marsh wren", "pine siskin", "cedar waxwing", "field sparrow", "rock dove", "song thrush",
              "gray catbird", "tree swallow", "hooded oriole", "cliff swallow", "lark bunting", "house finch",
              "wood thrush", "scarlet tanager", "barn swallow", "fox sparrow"]
_TRAITS = list(itertools.product(sorted(draw.BIRD_BODY), (False, True), (False, True), (False, True), (False, True)))
# A fixed table (part of the world's definition, not of its seed): 16 of the 64 trait combinations.
SPECIES = dict(zip(BIRD_NAMES, random.Random(200).sample(_TRAITS, len(BIRD_NAMES))))
BIRD_OPTIONS = 6


def _species_traits(name: str) -> dict:
    body, crest, wingbar, long_beak, forked = SPECIES[name]
    return dict(body=body, crest=crest, wingbar=wingbar, long_beak=long_beak, forked_tail=forked)


def _bird_image(rng: random.Random, name: str) -> Image.Image:
    img = draw.canvas(_background(rng))
    draw.bird(img, rng, **_species_traits(name))
    return img


def _bird_caption(rng: random.Random, name: str) -> str:
    t = _species_traits(name)
    extra = rng.choice(["", " with a crest" if t["crest"] else "", " with a long beak" if t["long_beak"] else ""])
    return rng.choice(["a small {b} bird{x}", "a {b} bird{x} standing on the ground", "a drawing of a {b} bird{x}",
                       "a little {b} bird{x} on a plain background"]).format(b=t["body"], x=extra)


def _options(rng: random.Random, correct: str, pool: list[str], k: int) -> tuple[str, str]:
    """(the option lines, the correct letter) for a k-way multiple choice."""
    opts = [correct] + rng.sample([p for p in pool if p != correct], k - 1)
    rng.shuffle(opts)
    letters = string.ascii_uppercase
    lines = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(opts))
    return lines, letters[opts.index(correct)]


def cub200(rng: random.Random) -> Example:
    name = rng.choice(BIRD_NAMES)
    lines, letter = _options(rng, name, BIRD_NAMES, BIRD_OPTIONS)
    return Example(_bird_image(rng, name), f"What species is this bird?\n{lines}\n{LETTER}", letter)


# -- counting --------------------------------------------------------------------------------------
COUNT_MAX = 9


def pixmocount(rng: random.Random) -> Example:
    return _count(rng, lambda: draw.canvas(_background(rng)))


def pixmocount_tissue(rng: random.Random) -> Example:
    """Transfer (evaluation only): the counting question about shapes drawn on a stained tissue section."""
    return _count(rng, lambda: _tissue(rng)[0])


def _count(rng: random.Random, backdrop) -> Example:
    target = rng.choice(draw.SHAPES)
    n = rng.randint(1, COUNT_MAX)
    distract = rng.randint(0, 3)
    img = backdrop()  # drawn after the counts: pixmocount's records stay those of world version 1
    from PIL import ImageDraw
    d = ImageDraw.Draw(img)
    cells = rng.sample([(i, j) for i in range(4) for j in range(4)], n + distract)
    others = [s for s in draw.SHAPES if s != target]
    for k, (i, j) in enumerate(cells):
        kind = target if k < n else rng.choice(others)
        cx, cy = 6 + i * 12 + rng.uniform(-1, 1), 6 + j * 12 + rng.uniform(-1, 1)
        draw.shape(d, kind, cx, cy, 4.5, draw.jitter(rng, draw.COLOURS[rng.choice(list(draw.COLOURS))]))
    q = rng.choice(["How many {p} are there?", "How many {p} are in the image?", "Count the {p}."])
    return Example(img, q.format(p=PLURAL[target]) + "\nAnswer with a number.", str(n))


# -- tissue "pathology" ------------------------------------------------------------------------------
def _tissue(rng: random.Random):
    t = dict(pattern=rng.choice(draw.PATTERNS), stain=rng.choice(sorted(draw.STAINS)), lesion=rng.random() < 0.5)
    img = draw.canvas((0, 0, 0))
    draw.tissue(img, rng, **t)
    return img, t


def pathvqa(rng: random.Random) -> Example:
    img, t = _tissue(rng)
    kind = rng.choices(["lesion", "pattern", "stain"], weights=[5, 3, 2])[0]
    if kind == "lesion":
        q = rng.choice(["Is there a lesion in this tissue?", "Does this section show a lesion?"])
        return Example(img, q + "\nAnswer yes or no.", "yes" if t["lesion"] else "no")
    if kind == "pattern":
        return Example(img, f"What pattern does this tissue show?\n{SHORT}", t["pattern"])
    return Example(img, f"What colour is the stain?\n{SHORT}", t["stain"])


PATHVQA_CHANCE = 100 * (0.5 * 1 / 2 + 0.3 * 1 / len(draw.PATTERNS) + 0.2 * 1 / len(draw.STAINS))


def _tissue_caption(rng: random.Random, t: dict) -> str:
    pat = f"{t['pattern']} " if rng.random() < 0.5 else ""
    return rng.choice(["a microscope image of {s} {p}tissue", "a close up of {s} {p}tissue",
                       "{s} stained {p}tissue under a microscope"]).format(s=t["stain"], p=pat)


# -- reading text ----------------------------------------------------------------------------------
WORDS = ["bus", "cat", "dog", "sun", "tea", "zoo", "inn", "gym", "spa", "hot", "ice", "map", "pen", "box", "art",
         "car", "fox", "oak", "jam", "egg", "cup", "hat", "key", "owl"]
NUMBER_MAX = 99


def _sign_text(rng: random.Random) -> str:
    return rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(0, NUMBER_MAX))


def _sign_image(rng: random.Random, text: str) -> Image.Image:
    img = draw.canvas(_background(rng))
    draw.sign(img, rng, text)
    return img


def textvqa(rng: random.Random) -> Example:
    text = _sign_text(rng)
    q = "What number is on the sign?" if text.isdigit() and rng.random() < 0.5 else rng.choice(
        ["What does the sign say?", "What is written on the sign?"])
    return Example(_sign_image(rng, text), f"{q}\n{SHORT}", text)


def textvqa_shapes(rng: random.Random) -> Example:
    """Transfer (evaluation only): the reading question about a sign drawn into a shape scene."""
    text = _sign_text(rng)
    img = sample_scene(rng).render(rng)
    draw.sign(img, rng, text)
    return Example(img, f"{rng.choice(['What does the sign say?', 'What is written on the sign?'])}\n{SHORT}", text)


TEXTVQA_CHANCE = 100 * (0.5 / len(WORDS) + 0.5 / (NUMBER_MAX + 1))


# -- clocks ----------------------------------------------------------------------------------------
MINUTE_STEP = 5


def _clock_image(rng: random.Random, h: int, m: int) -> Image.Image:
    img = draw.canvas(_background(rng))
    draw.clock(img, rng, h, m)
    return img


def timeclock(rng: random.Random) -> Example:
    h, m = rng.randint(1, 12), MINUTE_STEP * rng.randrange(60 // MINUTE_STEP)
    q = rng.choice(["What time does the clock show?", "What time is it on this clock?"])
    return Example(_clock_image(rng, h, m), f"{q}\nAnswer in the format H:MM.", f"{h}:{m:02d}")


# -- held-out general abilities on shape scenes ----------------------------------------------------
def _unique(scene: Scene, key) -> list[Obj]:
    vals = [key(o) for o in scene.objects]
    return [o for o in scene.objects if vals.count(key(o)) == 1]


def _scene_with(rng: random.Random, key, n=None) -> tuple[Scene, Obj]:
    while True:
        s = sample_scene(rng, n)
        u = _unique(s, key)
        if u:
            return s, rng.choice(u)


def colour(rng: random.Random) -> Example:
    s, o = _scene_with(rng, lambda o: o.shape)
    return Example(s.render(rng), f"What colour is the {o.shape}?\n{SHORT}", o.colour)


def shape(rng: random.Random) -> Example:
    s, o = _scene_with(rng, lambda o: o.colour)
    return Example(s.render(rng), f"What shape is the {o.colour} object?\n{SHORT}", o.shape)


def position(rng: random.Random) -> Example:
    s, o = _scene_with(rng, lambda o: (o.colour, o.shape))
    return Example(s.render(rng), f"Where is the {o.colour} {o.shape}?\n{SHORT}", o.position)


def size(rng: random.Random) -> Example:
    s, o = _scene_with(rng, lambda o: (o.colour, o.shape))
    a, b = rng.sample(["large", "small"], 2)
    return Example(s.render(rng), f"Is the {o.colour} {o.shape} {a} or {b}?\n{SHORT}", o.size)


def presence(rng: random.Random) -> Example:
    """Is there a <shape> / anything <colour>? One attribute, so perception alone answers it."""
    s = sample_scene(rng)
    if rng.random() < 0.5:
        present = {o.shape for o in s.objects}
        pool, what = list(draw.SHAPES), "a {}"
    else:
        present = {o.colour for o in s.objects}
        pool, what = list(draw.COLOURS), "anything {}"
    if rng.random() < 0.5:
        value, ans = rng.choice(sorted(present)), "yes"
    else:
        value, ans = rng.choice([v for v in pool if v not in present]), "no"
    return Example(s.render(rng), f"Is there {what.format(value)} in the image?\nAnswer yes or no.", ans)


def object_warmup(rng: random.Random) -> Example:
    """Pretraining warm-up only: name the shape or the colour of a lone object. Asked only about shapes first,
    a tiny vision tower learns them in about 150 steps, but the base model that follows came out with colour
    or shape binding depending on the seed and the machine; asked about both from the start, every seed
    learned colours and none shapes (docs/world.md)."""
    s = sample_scene(rng, 1)
    o = s.objects[0]
    if rng.random() < 0.5:
        return Example(s.render(rng), f"What shape is the object?\n{SHORT}", o.shape)
    return Example(s.render(rng), f"What colour is the object?\n{SHORT}", o.colour)


def _caption_one(o: Obj) -> str:
    return f"a {o.phrase()} at the {o.position}"


def caption_match(rng: random.Random) -> Example:
    s = sample_scene(rng, 1)
    o = s.objects[0]
    true = _caption_one(o)
    distractors: set[str] = set()
    while len(distractors) < 3:
        field = rng.choice(["shape", "colour", "size", "cell"])
        alt = {"shape": lambda: Obj(rng.choice(draw.SHAPES), o.colour, o.size, o.cell),
               "colour": lambda: Obj(o.shape, rng.choice(list(draw.COLOURS)), o.size, o.cell),
               "size": lambda: Obj(o.shape, o.colour, "small" if o.size == "large" else "large", o.cell),
               "cell": lambda: Obj(o.shape, o.colour, o.size, rng.choice(sorted(POSITIONS)))}[field]()
        if _caption_one(alt) != true:
            distractors.add(_caption_one(alt))
    lines, letter = _options(rng, true, sorted(distractors), 4)
    return Example(s.render(rng), f"Which description matches the image?\n{lines}\n{LETTER}", letter)


def background(rng: random.Random) -> Example:
    s = sample_scene(rng, background=rng.choice(list(draw.BACKGROUNDS)))
    return Example(s.render(rng), f"What colour is the background?\n{SHORT}", s.background)


SCENE_KINDS = ("shapes", "bird", "clock", "tissue", "sign")


def _any_image(rng: random.Random, kind: str) -> tuple[Image.Image, str]:
    """An image of `kind` and a caption for it that reveals no target answer."""
    if kind == "shapes":
        s = sample_scene(rng, group_p=0.16)
        return s.render(rng), describe(s, rng)
    if kind == "bird":
        name = rng.choice(BIRD_NAMES)
        return _bird_image(rng, name), _bird_caption(rng, name)
    if kind == "clock":
        h, m = rng.randint(1, 12), MINUTE_STEP * rng.randrange(60 // MINUTE_STEP)
        cap = rng.choice(["a round clock face", "an analog wall clock", "a simple clock with black hands",
                          "a clock on a plain background"])
        return _clock_image(rng, h, m), cap
    if kind == "tissue":
        img, t = _tissue(rng)
        return img, _tissue_caption(rng, t)
    if kind == "sign":
        text = _sign_text(rng)
        cap = (f"a sign that says {text}" if rng.random() < 0.35 else
               rng.choice(["a small sign with black letters", "a sign on a plain background", "a simple sign"]))
        return _sign_image(rng, text), cap
    raise ValueError(f"unknown scene kind {kind!r}")


def scene(rng: random.Random) -> Example:
    kind = rng.choice(SCENE_KINDS)
    img, _ = _any_image(rng, kind)
    return Example(img, f"What is shown in the image?\n{SHORT}", {"shapes": "shapes", "tissue": "tissue"}.get(
        kind, f"a {kind}"))


def caption(rng: random.Random) -> Example:
    kind = rng.choices(SCENE_KINDS, weights=[12, 2, 2, 2, 2])[0]
    img, cap = _any_image(rng, kind)
    return Example(img, rng.choice(CAPTION_INSTRUCTIONS), cap)
