"""PIL drawing for the embedded world: flat shapes, bird glyphs, analog clocks, tissue textures, signs.

Everything is drawn without anti-aliasing and with the bitmap font bundled in Pillow, so the same
arguments give the same pixels on every machine (no FreeType, no system fonts).
"""
from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 48

COLOURS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (240, 205, 30), "purple": (140, 60, 180), "orange": (245, 135, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (185, 185, 185), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")

# Radii (half-extent in pixels) of the two object sizes on a 48-pixel image. Objects much smaller than
# this take a tiny vision tower far longer to tell apart (measured: radius 4 vs 8, see docs/world.md).
SIZE_RADIUS = {"small": 6, "large": 8}


def jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    """Perturb a colour a little, so colour words name a region of colour space, not one value."""
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def canvas(rgb: tuple[int, int, int], size: int = IMAGE_SIZE) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif kind == "cross":
        w = max(1.0, r / 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


# -- birds: species differ in body colour, crest, wing bar, beak length and tail shape -----------------
BIRD_BODY = {"brown": (130, 85, 45), "slate": (95, 105, 125), "yellow": (230, 195, 40), "red": (200, 45, 40)}


def bird(img: Image.Image, rng: random.Random, *, body: str, crest: bool, wingbar: bool, long_beak: bool,
         forked_tail: bool) -> None:
    d = ImageDraw.Draw(img)
    s = rng.uniform(0.85, 1.1)
    cx, cy = 22 + rng.randint(-3, 3), 27 + rng.randint(-3, 3)
    col = jitter(rng, BIRD_BODY[body], 10)
    # tail (left), body, head (right), beak, eye
    if forked_tail:
        d.polygon([(cx - 8 * s, cy), (cx - 19 * s, cy - 6 * s), (cx - 15 * s, cy), (cx - 19 * s, cy + 6 * s)],
                  fill=col)
    else:
        d.polygon([(cx - 8 * s, cy - 2 * s), (cx - 18 * s, cy - 5 * s), (cx - 18 * s, cy + 5 * s),
                   (cx - 8 * s, cy + 2 * s)], fill=col)
    d.ellipse([cx - 11 * s, cy - 7 * s, cx + 9 * s, cy + 7 * s], fill=col)
    hx, hy = cx + 10 * s, cy - 7 * s
    d.ellipse([hx - 5 * s, hy - 5 * s, hx + 5 * s, hy + 5 * s], fill=col)
    if crest:
        d.polygon([(hx - 3 * s, hy - 4 * s), (hx - 1 * s, hy - 11 * s), (hx + 2 * s, hy - 4 * s)], fill=col)
    beak = 9 if long_beak else 4
    d.polygon([(hx + 4 * s, hy - 2 * s), (hx + (4 + beak) * s, hy), (hx + 4 * s, hy + 2 * s)], fill=(235, 150, 20))
    d.rectangle([hx + 1 * s, hy - 2 * s, hx + 2 * s, hy - 1 * s], fill=(10, 10, 10))
    if wingbar:
        d.rectangle([cx - 6 * s, cy - 1 * s, cx + 4 * s, cy + 2 * s], fill=(250, 250, 250))
    # legs
    d.line([(cx - 2 * s, cy + 7 * s), (cx - 3 * s, cy + 13 * s)], fill=(60, 40, 20))
    d.line([(cx + 3 * s, cy + 7 * s), (cx + 4 * s, cy + 13 * s)], fill=(60, 40, 20))


# -- clocks ----------------------------------------------------------------------------------------
def clock(img: Image.Image, rng: random.Random, hour: int, minute: int) -> None:
    d = ImageDraw.Draw(img)
    c = IMAGE_SIZE / 2 + rng.uniform(-1.5, 1.5)
    r = 21
    d.ellipse([c - r, c - r, c + r, c + r], fill=jitter(rng, (245, 245, 235), 8), outline=(20, 20, 20), width=2)
    for t in range(12):
        a = math.radians(t * 30)
        r0 = r - (5 if t % 3 == 0 else 3)
        d.line([(c + r0 * math.sin(a), c - r0 * math.cos(a)), (c + (r - 2) * math.sin(a), c - (r - 2) * math.cos(a))],
               fill=(20, 20, 20), width=1)
    am = math.radians(minute * 6)
    ah = math.radians((hour % 12) * 30 + minute * 0.5)
    d.line([(c, c), (c + 17 * math.sin(am), c - 17 * math.cos(am))], fill=(20, 20, 20), width=1)
    d.line([(c, c), (c + 10 * math.sin(ah), c - 10 * math.cos(ah))], fill=(20, 20, 20), width=3)
    d.ellipse([c - 1.5, c - 1.5, c + 1.5, c + 1.5], fill=(200, 30, 30))


# -- tissue textures ("pathology") -------------------------------------------------------------------
STAINS = {"pink": ((238, 180, 200), (175, 60, 120)), "purple": ((200, 170, 225), (95, 45, 150))}
PATTERNS = ("fibrous", "granular", "reticular", "smooth")


def tissue(img: Image.Image, rng: random.Random, *, pattern: str, stain: str, lesion: bool) -> None:
    d = ImageDraw.Draw(img)
    base, ink = STAINS[stain]
    d.rectangle([0, 0, IMAGE_SIZE, IMAGE_SIZE], fill=jitter(rng, base, 8))
    ink = jitter(rng, ink, 10)
    n = IMAGE_SIZE
    if pattern == "fibrous":  # parallel diagonal fibres
        off = rng.randint(0, 5)
        for k in range(-n, n, 6):
            d.line([(k + off, 0), (k + off + n, n)], fill=ink, width=1)
    elif pattern == "granular":  # scattered granules
        for _ in range(55):
            x, y = rng.uniform(0, n), rng.uniform(0, n)
            d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=ink)
    elif pattern == "reticular":  # a net of crossing lines
        off = rng.randint(0, 7)
        for k in range(off, n, 8):
            d.line([(k, 0), (k, n)], fill=ink, width=1)
            d.line([(0, k), (n, k)], fill=ink, width=1)
    elif pattern != "smooth":
        raise ValueError(f"unknown tissue pattern {pattern!r}; expected one of {PATTERNS}")
    if lesion:  # a dark irregular blob
        x, y = rng.uniform(12, n - 12), rng.uniform(12, n - 12)
        pts = [(x + rng.uniform(5, 9) * math.cos(a), y + rng.uniform(5, 9) * math.sin(a))
               for a in [i * 2 * math.pi / 9 for i in range(9)]]
        d.polygon(pts, fill=(45, 20, 40))


# -- signs with text -----------------------------------------------------------------------------------
_FONT = None


def _font():
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default_imagefont()  # Pillow's bundled bitmap font: identical everywhere
    return _FONT


def sign(img: Image.Image, rng: random.Random, text: str, *, scale: int = 2) -> None:
    """A plain sign with `text` in the bitmap font, scaled up `scale` times (nearest neighbour)."""
    mask = _font().getmask(text)
    w, h = mask.size
    glyph = Image.frombytes("L", (w, h), bytes(mask)).resize((w * scale, h * scale), Image.NEAREST)
    gw, gh = glyph.size
    if gw > IMAGE_SIZE - 4:
        raise ValueError(f"sign text {text!r} is too wide ({gw} px) for a {IMAGE_SIZE}-pixel image")
    d = ImageDraw.Draw(img)
    x0 = (IMAGE_SIZE - gw) // 2 + rng.randint(-2, 2)
    y0 = (IMAGE_SIZE - gh) // 2 + rng.randint(-4, 4)
    board = jitter(rng, rng.choice([(250, 250, 250), (250, 225, 90), (150, 210, 150)]), 6)
    d.rectangle([x0 - 3, y0 - 3, x0 + gw + 2, y0 + gh + 2], fill=board, outline=(40, 40, 40))
    img.paste((15, 15, 15), (x0, y0), glyph)
