"""What each synthetic mini-M-BEIR row's queries and candidates are: scenes drawn into examples.

Each row mirrors one M-BEIR row (same dataset id in qid/did prefixes, same task id and modalities),
so the reader, the R@5/R@10 rule and the evaluator apply unchanged. Each row has its own character:

=====================  =========================================================================
row                    what a query and its positive are
=====================  =========================================================================
visualnews_task0/3     long news-style caption <-> image (multi-object scenes)
mscoco_task0/3         short caption <-> image
fashion200k_task0/3    one textured object; fine-grained (texture/size/colour) caption <-> image
webqa_task1            question-style text -> passage describing the scene
webqa_task2            question -> image + a caption naming one object
edis_task2             headline -> image + a headline naming only the first object
nights_task4           image -> the same scene photographed again (jittered) among near-duplicates
oven_task6/8           image + "what is the object at <pos>?" -> entity text (/ entity image+text)
infoseek_task6/8       image + "the <colour> object: what is it?" -> entity text (/ image+text)
fashioniq_task7        object image + "change <attr> to <value>" -> edited image
cirr_task7             scene image + "replace the <shape> with a <value>" -> edited image
=====================  =========================================================================

Every query brings near-miss candidates (one attribute of one object changed) in the candidate's
modality, so a pool never saturates on easy differences, and a false negative (an unlabelled
near-duplicate of its positive) that the writer plants for a documented fraction of queries.

**One item set per dataset, several task rows (M-BEIR's construction).** M-BEIR builds the task rows
of one dataset from the same source items: MSCOCO's task-0 pool holds the test images whose captions
are the task-3 pool, a task-0 query is one of those captions and a task-3 query is one of those images;
VisualNews 0/3 and Fashion200K 0/3 are built alike from one set of (image, caption) pairs each, and
OVEN 6/8 and INFOSEEK 6/8 from one set of (query image, asked entity) items each, the entity's text
in the task-6 pool and its image + text in the task-8 pool. So M-BEIR's global pool (the union of the
local pools) holds the same item in several modalities, and a query without an instruction can match
its twin in the wrong modality, up to the query itself (a task-3 query image is a task-0 candidate):
the confusion that instructions fix (UniIR's motivation; the paper's T2a: without instructions the
global Avg falls far more than the local one). The generator does the same (:data:`TWINS`): the
items of a twin group are drawn once per split, with their near misses and distractors, and every
row of the group views them in its own modalities; test, dev (``val``) and train items are disjoint
(no scene of a test or dev item appears in training). The other rows (WebQA 1 and 2, EDIS, NIGHTS,
FashionIQ, CIRR) are drawn row by row.

An item is drawn by ``draw(rng, cfg)`` (``cfg``: the build's
:class:`~umarvel_lib.data.synthetic.SyntheticConfig`) and viewed by each row of its group as an
:class:`Example` (query, positive, near misses, the false negative a query may get);
:func:`row_groups` lists the groups in the paper's row order. :mod:`umarvel_lib.data.synthetic`
draws the splits and :mod:`umarvel_lib.data.synthetic_writer` writes them.
One concern, simply long: sixteen rows' content, each a few short makers (splitting it by row
would scatter the twin groups).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .mbeir_rows import EVAL_ROWS
from .scenes import (
    COLORS,
    POS_WORDS,
    SHAPE_WORDS,
    Obj,
    Scene,
    caption,
    describe_object,
    perturb,
    sample_scene,
)


@dataclass(frozen=True)
class Content:
    """A query or candidate before it is written: text and/or an image of a scene (with jitter)."""

    txt: str | None = None
    scene: Scene | None = None
    jitter: int | None = None

    @property
    def modality(self) -> str:
        if self.txt is not None and self.scene is not None:
            return "image,text"
        return "image" if self.scene is not None else "text"

    @property
    def key(self) -> str:
        s = self.scene.key if self.scene is not None else ""
        return f"{self.modality}|{self.txt}|{s}|{self.jitter}"


@dataclass
class Example:
    query: Content
    positive: Content
    near: list[Content] = field(default_factory=list)
    false_negative: Content | None = None


# ---- row makers: (rng, cfg) -> Example ----------------------------------------------------------
_NEWS_LEAD = (
    "Archive photo:",
    "Breaking news:",
    "Photographers captured this scene:",
    "From the picture desk:",
    "Reporters documented the moment:",
)
_NEWS_TAIL = (
    ", officials said.",
    " according to witnesses.",
    " in a photo released on monday.",
    ", as seen downtown.",
    " during the afternoon briefing.",
)


def _near(scene, rng, n, attrs=None):
    out, keys = [], [scene.key]
    tries = 0
    while len(out) < n and tries < 50:
        tries += 1
        s, _ = perturb(scene, rng, attr=rng.choice(attrs) if attrs else None)
        if s.key not in keys:
            keys.append(s.key)
            out.append(s)
    return out


def _news(scene, rng):
    return f"{rng.choice(_NEWS_LEAD)} {caption(scene, rng)}{rng.choice(_NEWS_TAIL)}"


def _fashion_scene(rng):
    return sample_scene(rng, 1, background=rng.choice(("gray", "dark")))


def _fashion_text(scene, rng):
    o = scene.objects[0]
    return rng.choice(("{d} item", "product: {d}", "{d}, studio shot", "a {d} piece")).format(
        d=describe_object(o, rng)
    )


def _img(scene, rng):
    return Content(scene=scene, jitter=rng.randrange(1 << 30))


@dataclass(frozen=True)
class CaptionedItem:
    """A photo (scene + jitter) and its caption, with near-miss items one attribute off (photo + caption)."""

    scene: Scene
    jitter: int
    text: str
    near: tuple[CaptionedItem, ...] = ()


def draw_captioned(scene_fn, text_fn, near_attrs=None):
    def draw(rng, cfg):
        s = scene_fn(rng)
        near = tuple(
            CaptionedItem(x, rng.randrange(1 << 30), text_fn(x, rng))
            for x in _near(s, rng, cfg.near_misses, near_attrs)
        )
        return CaptionedItem(s, rng.randrange(1 << 30), text_fn(s, rng), near)

    return draw


def view_t2i(it: CaptionedItem, rng, cfg):
    """Task 0: the caption -> the photo (the near misses' photos; false negative: another photo of the scene)."""
    return Example(
        Content(txt=it.text), _photo(it), [_photo(n) for n in it.near], _img(it.scene, rng)
    )


def view_i2t(text_fn):
    """Task 3: the photo -> the caption (the near misses' captions; false negative: a paraphrase)."""

    def view(it: CaptionedItem, rng, cfg):
        return Example(
            _photo(it),
            Content(txt=it.text),
            [Content(txt=n.text) for n in it.near],
            Content(txt=text_fn(it.scene, rng)),
        )

    return view


def _photo(it: CaptionedItem) -> Content:
    return Content(scene=it.scene, jitter=it.jitter)


def _webqa_q(s, rng):
    return rng.choice(
        ("which scene has {c}?", "where can i find {c}?", "looking for a scene where {c}")
    ).format(c=caption(s, rng, with_background=False))


def _passage(s, rng):
    return rng.choice(
        ("This scene contains: {c}.", "Passage: {c}.", "Scene description. {c}.")
    ).format(c=caption(s, rng))


def make_t2t(rng, cfg):
    s = sample_scene(rng)
    return Example(
        Content(txt=_webqa_q(s, rng)),
        Content(txt=_passage(s, rng)),
        [Content(txt=_passage(x, rng)) for x in _near(s, rng, cfg.near_misses)],
        Content(txt=_passage(s, rng)),
    )


def make_t2it(query_fn, partial_fn):
    """text -> image+text, where the candidate text names only part of the scene (the image holds the rest)."""

    def make(rng, cfg):
        s = sample_scene(rng, rng.choice((2, 3)))
        near = _near(s, rng, cfg.near_misses)
        return Example(
            Content(txt=query_fn(s, rng)),
            Content(txt=partial_fn(s, rng), scene=s, jitter=rng.randrange(1 << 30)),
            [Content(txt=partial_fn(x, rng), scene=x, jitter=rng.randrange(1 << 30)) for x in near],
            Content(txt=partial_fn(s, rng), scene=s, jitter=rng.randrange(1 << 30)),
        )

    return make


def _headline(s, rng):
    return f"{rng.choice(('News:', 'Headline:', 'Report:'))} {describe_object(s.objects[0], rng)} spotted"


def make_i2i(rng, cfg):
    s = sample_scene(rng)
    return Example(
        _img(s, rng),
        _img(s, rng),
        [_img(x, rng) for x in _near(s, rng, cfg.near_misses)],
        _img(s, rng),
    )


def _entity(o: Obj) -> Obj:
    return Obj(o.shape, o.color, "large", "center", o.texture)


def _entity_text(e: Obj, rng: random.Random | None = None) -> str:
    d = describe_object(e, None, size=False)
    return (
        f"{d}: a {SHAPE_WORDS[e.shape][0]} entity, coloured {e.color}, with a {e.texture} surface."
    )


@dataclass(frozen=True)
class EntityItem:
    """An OVEN/INFOSEEK item: a query photo, the asked object and its entity's near misses."""

    scene: Scene
    jitter: int
    index: int  # the asked object
    near: tuple[Obj, ...]  # entities one attribute off

    @property
    def entity(self) -> Obj:
        return _entity(self.scene.objects[self.index])


def draw_entity(ask: str):
    """An OVEN ('position') or INFOSEEK ('color') item; the colour must identify the asked object."""

    def draw(rng, cfg):
        s = sample_scene(rng, rng.choice((2, 3)))
        if ask == "color" and len({o.color for o in s.objects}) < len(s.objects):
            s = Scene(
                tuple(
                    Obj(o.shape, c, o.size, o.position, o.texture)
                    for o, c in zip(s.objects, rng.sample(COLORS, len(s.objects)))
                ),
                s.background,
            )
        i = rng.randrange(len(s.objects))
        e = _entity(s.objects[i])
        near = tuple(
            perturb(Scene((e,)), rng, attr=attr)[0].objects[0]
            for attr in rng.sample(("shape", "color", "texture"), min(cfg.near_misses, 3))
        )
        return EntityItem(s, rng.randrange(1 << 30), i, near)

    return draw


def view_entity(ask: str, with_image: bool):
    """image + question -> the entity's text (task 6) or its image + text (task 8)."""

    def cand(e, txt=None):
        return Content(
            txt=txt or _entity_text(e), scene=Scene((e,), "gray") if with_image else None
        )

    def view(it: EntityItem, rng, cfg):
        o = it.scene.objects[it.index]
        if ask == "position":
            q = rng.choice(
                (
                    "what is the object at the {p}?",
                    "name the thing in the {p}.",
                    "which entity is shown in the {p}?",
                )
            ).format(p=rng.choice(POS_WORDS[o.position]))
        else:
            q = rng.choice(
                (
                    "the {c} object: what is it?",
                    "what entity is the {c} one?",
                    "identify the {c} thing.",
                )
            ).format(c=o.color)
        e = it.entity
        return Example(
            Content(txt=q, scene=it.scene, jitter=it.jitter),
            cand(e),
            [cand(n) for n in it.near],
            cand(e, _entity_text(e).replace("entity", "thing", 1)),
        )

    return view


_CHANGE = {
    "color": "change the colour to {v}",
    "texture": "make it {v}",
    "size": "make it {v}",
    "shape": "turn it into a {v}",
}


def make_composed(multi: bool):
    """reference image + modification text -> edited image (FashionIQ: one object; CIRR: scenes)."""

    def make(rng, cfg):
        s = sample_scene(rng, rng.choice((2, 3))) if multi else _fashion_scene(rng)
        if multi:
            i = rng.randrange(len(s.objects))
            t, ch = perturb(s, rng, attr="shape", index=i)
            text = (
                f"replace the {s.objects[i].color} {SHAPE_WORDS[ch['old']][0]} with a {ch['new']}"
            )
        else:
            t, ch = perturb(s, rng, attr=rng.choice(("color", "texture", "size", "shape")))
            text = _CHANGE[ch["attr"]].format(v=ch["new"])
        near = [_img(s, rng)]  # the unchanged reference is the nastiest near miss
        near += [_img(x, rng) for x in _near(t, rng, max(0, cfg.near_misses - 1))]
        return Example(
            Content(txt=text, scene=s, jitter=rng.randrange(1 << 30)),
            _img(t, rng),
            near,
            _img(t, rng),
        )

    return make


def _coco_text(s, rng):
    return caption(s, rng, with_background=False)


# Twin groups: dataset -> (draw one item, {task: view the item as that row's example}).
TWINS = {
    "VisualNews": (draw_captioned(sample_scene, _news), {0: view_t2i, 3: view_i2t(_news)}),
    "MSCOCO": (draw_captioned(sample_scene, _coco_text), {0: view_t2i, 3: view_i2t(_coco_text)}),
    "Fashion200K": (
        draw_captioned(_fashion_scene, _fashion_text, ("texture", "size", "color")),
        {0: view_t2i, 3: view_i2t(_fashion_text)},
    ),
    "OVEN": (
        draw_entity("position"),
        {6: view_entity("position", False), 8: view_entity("position", True)},
    ),
    "INFOSEEK": (
        draw_entity("color"),
        {6: view_entity("color", False), 8: view_entity("color", True)},
    ),
}
# Rows drawn on their own: (rng, cfg) -> Example.
SINGLE_ROWS = {
    ("WebQA", 1): make_t2t,
    ("EDIS", 2): make_t2it(_news, _headline),
    ("WebQA", 2): make_t2it(
        _webqa_q, lambda s, rng: f"photo of a {describe_object(s.objects[0], rng)}"
    ),
    ("NIGHTS", 4): make_i2i,
    ("FashionIQ", 7): make_composed(False),
    ("CIRR", 7): make_composed(True),
}


def row_groups() -> list[tuple[str, tuple[int, ...], object, dict]]:
    """(dataset, tasks, draw, {task: view}) in the paper's row order; a single row is a group whose
    item is its example."""
    out, seen = [], set()
    for dataset, task in EVAL_ROWS:
        if dataset in TWINS:
            if dataset not in seen:
                draw, views = TWINS[dataset]
                out.append((dataset, tuple(views), draw, views))
                seen.add(dataset)
        else:
            out.append(
                (dataset, (task,), SINGLE_ROWS[(dataset, task)], {task: lambda ex, rng, cfg: ex})
            )
    return out


assert sorted((d, t) for d, ts, _, _ in row_groups() for t in ts) == sorted(EVAL_ROWS)
