"""The procedural world behind the synthetic data: scenes of coloured shapes, rendered with PIL,
described by templated captions with paraphrases.

A :class:`Scene` is a tuple of :class:`Obj` (shape, colour, size, position, texture). It renders
deterministically to an image and is described by many different captions (``caption`` draws a
paraphrase with an ``rng``). ``perturb`` changes exactly one attribute of one object: the
near-miss used for hard candidates and for "change X to Y" composed queries.

Only lists and tuples are iterated (never sets or dict-of-set views), so everything built from
this module is byte-identical across processes regardless of ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
TEXTURES = ("solid", "striped", "dotted")
ATTRIBUTES = ("shape", "color", "size", "position", "texture")
VALUES = {
    "shape": SHAPES,
    "color": COLORS,
    "size": SIZES,
    "position": POSITIONS,
    "texture": TEXTURES,
}

RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}
BACKGROUNDS = {"gray": (90, 90, 90), "dark": (30, 30, 40), "brown": (110, 80, 60)}

# paraphrases (first entry is the canonical word)
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "four-sided block"),
    "triangle": ("triangle", "three-sided shape", "wedge"),
    "star": ("star", "five-point star", "starburst"),
    "cross": ("cross", "plus sign", "plus shape"),
    "diamond": ("diamond", "rhombus", "tilted square"),
}
POS_WORDS = {
    "top left": ("top left", "upper left", "upper-left corner"),
    "top right": ("top right", "upper right", "upper-right corner"),
    "bottom left": ("bottom left", "lower left", "lower-left corner"),
    "bottom right": ("bottom right", "lower right", "lower-right corner"),
    "center": ("center", "middle", "centre"),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
TEXTURE_WORDS = {
    "solid": ("solid", "plain", "filled"),
    "striped": ("striped", "lined", "banded"),
    "dotted": ("dotted", "spotted", "speckled"),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str
    texture: str = "solid"

    def get(self, attr: str) -> str:
        return getattr(self, attr)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "gray"

    @property
    def key(self) -> str:
        """Canonical identity string (two scenes with the same key render the same picture)."""
        objs = sorted(
            f"{o.color}-{o.texture}-{o.size}-{o.shape}@{o.position}" for o in self.objects
        )
        return f"{self.background}|" + ";".join(objs)


def sample_scene(
    rng: random.Random,
    n_objects: int | None = None,
    *,
    textures: bool = True,
    background: str | None = None,
) -> Scene:
    """Random scene with 1-3 objects in distinct positions."""
    n = n_objects if n_objects is not None else rng.choice((1, 2, 2, 3))
    positions = rng.sample(POSITIONS, n)
    objs = tuple(
        Obj(
            rng.choice(SHAPES),
            rng.choice(COLORS),
            rng.choice(SIZES),
            p,
            rng.choice(TEXTURES) if textures else "solid",
        )
        for p in positions
    )
    return Scene(objs, background or rng.choice(tuple(BACKGROUNDS)))


def perturb(
    scene: Scene, rng: random.Random, attr: str | None = None, index: int | None = None
) -> tuple[Scene, dict]:
    """Change exactly one attribute of one object. Returns the new scene and what changed."""
    i = rng.randrange(len(scene.objects)) if index is None else index
    o = scene.objects[i]
    attr = attr or rng.choice(("shape", "color", "size", "position", "texture"))
    if attr == "position":
        used = [x.position for x in scene.objects]
        choices = [p for p in POSITIONS if p not in used]
        if not choices:  # five objects: swap nothing, change colour instead
            attr = "color"
    if attr != "position":
        choices = [v for v in VALUES[attr] if v != o.get(attr)]
    new_val = rng.choice(choices)
    objs = list(scene.objects)
    objs[i] = replace(o, **{attr: new_val})
    return Scene(tuple(objs), scene.background), {
        "index": i,
        "attr": attr,
        "old": o.get(attr),
        "new": new_val,
    }


# ---- rendering ---------------------------------------------------------------------------------
_CENTERS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}


def _polygon(shape, cx, cy, r):
    import math

    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.38
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(shape)


def render(scene: Scene, size: int = 56, *, jitter_seed: int | None = None) -> Image.Image:
    """Draw the scene. ``jitter_seed`` moves objects by a few pixels (same scene, different photo)."""
    rng = random.Random(jitter_seed) if jitter_seed is not None else None
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    mask = Image.new("L", (size, size), 0)
    for o in scene.objects:
        fx, fy = _CENTERS[o.position]
        r = size * (0.17 if o.size == "large" else 0.10)
        cx, cy = fx * size, fy * size
        if rng is not None:
            cx += rng.uniform(-0.04, 0.04) * size
            cy += rng.uniform(-0.04, 0.04) * size
        layer = Image.new("L", (size, size), 0)
        d = ImageDraw.Draw(layer)
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            d.polygon(_polygon(o.shape, cx, cy, r), fill=255)
        col = Image.new("RGB", (size, size), RGB[o.color])
        if o.texture != "solid":
            tex = Image.new("L", (size, size), 255)
            td = ImageDraw.Draw(tex)
            step = max(3, size // 14)
            if o.texture == "striped":
                for x in range(0, size, step):
                    td.line([(x, 0), (x, size)], fill=0, width=max(1, step // 3))
            else:
                for y in range(step // 2, size, step):
                    for x in range(step // 2, size, step):
                        td.ellipse([x - 1, y - 1, x + 1, y + 1], fill=0)
            dark = Image.new("RGB", (size, size), tuple(c // 3 for c in RGB[o.color]))
            col = Image.composite(col, dark, tex)
        img.paste(col, (0, 0), layer)
        mask.paste(layer, (0, 0), layer)
    return img


# ---- captions ----------------------------------------------------------------------------------
def _w(rng, table, key):
    return rng.choice(table[key]) if rng is not None else table[key][0]


def describe_object(
    o: Obj, rng: random.Random | None = None, *, texture: bool = True, size: bool = True
) -> str:
    parts = []
    if size:
        parts.append(_w(rng, SIZE_WORDS, o.size))
    if texture and o.texture != "solid":
        parts.append(_w(rng, TEXTURE_WORDS, o.texture))
    parts.append(o.color)
    parts.append(_w(rng, SHAPE_WORDS, o.shape))
    return " ".join(parts)


_TEMPLATES = (
    "a {obj} in the {pos}",
    "{pos}: a {obj}",
    "there is a {obj} at the {pos}",
    "the {pos} shows a {obj}",
)
_JOINERS = ("; ", ", and ", ". also ", " while ")


def caption(
    scene: Scene, rng: random.Random | None = None, *, with_background: bool | None = None
) -> str:
    """A caption naming every object's attributes and position. ``rng=None`` gives the canonical one."""
    objs = list(scene.objects)
    if rng is not None:
        rng.shuffle(objs)
    pieces = []
    for o in objs:
        t = rng.choice(_TEMPLATES) if rng is not None else _TEMPLATES[0]
        pieces.append(t.format(obj=describe_object(o, rng), pos=_w(rng, POS_WORDS, o.position)))
    joiner = rng.choice(_JOINERS) if rng is not None else _JOINERS[0]
    text = joiner.join(pieces)
    n = len(scene.objects)
    lead = f"{NUMBER_WORDS[n]} object{'s' if n > 1 else ''} on a {scene.background} background: "
    if with_background is None:
        with_background = rng is None or rng.random() < 0.5
    return (lead + text) if with_background else text


def canonical_caption(scene: Scene) -> str:
    return caption(scene, None, with_background=True)
