"""Synthetic mini-M-BEIR: 16 dataset-task rows in the real M-BEIR layout, built from procedural scenes.

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
modality, so a pool never saturates on easy differences, and a documented fraction of queries gets a
**planted false negative**: an unlabelled near-duplicate of its positive (same scene re-rendered
with jitter, or a paraphrase of the positive text). They are listed in
``synthetic_meta/planted_false_negatives.jsonl``. This is the failure mode of M-BEIR that the
paper's similarity-threshold filter targets.

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

Also written: a **dev split** (``query/val``, ``qrels/val``, ``cand_pool/local/mbeir_<row>_val_cand_pool.jsonl``,
``n_dev`` queries per row, disjoint from test and train and never trained on), for the learning
curves and the plateau rule; and the two earlier-stage corpora in the formats the paper used, ``nli/nli_for_simcse.csv``
(``sent0,sent1,hard_neg``) and ``cc3m/chat.json`` (LLaVA CC3M-595K style conversations + images).

Deterministic: same config and seed give the same bytes (no set/dict-of-set iteration, PNGs from
pixel-identical images). Written atomically: the root appears only once complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_dir, config_hash, file_lock
from .mbeir import DATASET_IDS, EVAL_ROWS, TASKS, row_name
from .scenes import (
    COLORS,
    POS_WORDS,
    SHAPE_WORDS,
    Obj,
    Scene,
    caption,
    describe_object,
    perturb,
    render,
    sample_scene,
)


@dataclass
class SyntheticConfig:
    """Sizes of the synthetic mini-M-BEIR (see :data:`SYNTHETIC_PRESETS`)."""

    n_test: int = 300  # test queries per row
    n_train: int = 1200  # train queries per row (union_train = 16 x n_train)
    n_dev: int = 0  # dev (val split) queries per row, for learning curves (0: no dev split)
    near_misses: int = 3  # near-miss candidates per query (one attribute off)
    distractors: int = 100  # random extra candidates per row pool
    false_negative_rate: float = (
        0.1  # fraction of queries with a planted unlabelled duplicate of the positive
    )
    image_size: int = 112
    n_nli: int = 4000
    n_cc3m: int = 4000
    seed: int = 0


SYNTHETIC_PRESETS = {
    "smoke": dict(
        n_test=16,
        n_train=24,
        n_dev=4,
        near_misses=2,
        distractors=6,
        n_nli=64,
        n_cc3m=64,
        image_size=56,
    ),
    # cpu: 50 test / 30 dev queries per row (800 / 480; the dev Avg's 95% CI half-width is about 3-4
    # points), 300 train queries per row (4,800: a plateau of a few hundred steps of batch 16 within one
    # or two epochs, as the probe of Table 1 trained). Difficulty (6 near misses per query, 90 random
    # distractors per pool) chosen once by bench/calibrate.py on Table 1 row 4 alone, seed 0, from the
    # grid [(3, 30), (6, 90)] fixed before the runs, by the rule fixed with it (most dataset-task rows
    # with a plateau headline in [40, 80]): 6/16 rows in the band against 3/16 (results/calibration/).
    "cpu": dict(
        n_test=50,
        n_train=300,
        n_dev=30,
        near_misses=6,
        distractors=90,
        n_nli=800,
        n_cc3m=800,
    ),
    "gpu": dict(
        n_test=1000,
        n_train=5000,
        n_dev=200,
        near_misses=4,
        distractors=500,
        n_nli=20000,
        n_cc3m=20000,
    ),
}

INSTRUCTIONS = {
    ("VisualNews", 0): [
        "Identify the news photo that matches this report.",
        "Retrieve the news image described by the caption.",
        "Find the image that illustrates this news story.",
        "Show me the photograph for this news caption.",
    ],
    ("MSCOCO", 0): [
        "Find an everyday image matching the caption.",
        "Retrieve the image described by this sentence.",
        "Show me a picture of this description.",
        "Identify the image this caption describes.",
    ],
    ("Fashion200K", 0): [
        "Find the product image matching this item description.",
        "Retrieve the picture of this fashion item.",
        "Show me the product photo for this description.",
        "Identify the item image described here.",
    ],
    ("WebQA", 1): [
        "Retrieve a passage that answers this question.",
        "Find the text passage relevant to the question.",
        "Show me a text document that answers this query.",
        "Identify the passage that matches this question.",
    ],
    ("EDIS", 2): [
        "Find the news image with headline that matches this event.",
        "Retrieve the image and headline for this story.",
        "Show me the news image item for this headline.",
        "Identify the news image-text pair matching the event.",
    ],
    ("WebQA", 2): [
        "Find an image with caption that answers the question.",
        "Retrieve the captioned image relevant to this question.",
        "Show me the image and text that answer this.",
        "Identify the image-text document answering the question.",
    ],
    ("VisualNews", 3): [
        "Find the news caption for this photo.",
        "Retrieve the caption describing this news image.",
        "Find the news text matching this image.",
        "Identify the news report caption of this photograph.",
    ],
    ("MSCOCO", 3): [
        "Find a caption describing this everyday image.",
        "Retrieve the sentence that describes the picture.",
        "Show me the text caption of this image.",
        "Identify the caption for this image.",
    ],
    ("Fashion200K", 3): [
        "Find the product description for this item image.",
        "Retrieve the text describing this fashion item.",
        "Show me the description of the product in the photo.",
        "Identify the item description matching the image.",
    ],
    ("NIGHTS", 4): [
        "Find an image that looks the same as this one.",
        "Retrieve a visually identical picture.",
        "Show me another photo of the same scene.",
        "Identify the image most similar to this one.",
    ],
    ("OVEN", 6): [
        "Answer the question about the image with an entity description.",
        "Retrieve the text about the entity asked about.",
        "Find the entity description that answers the visual question.",
        "Identify the text naming the entity in question.",
    ],
    ("INFOSEEK", 6): [
        "Find the text that answers this question about the image.",
        "Retrieve the passage answering the visual query.",
        "Show me the entity text that answers the question.",
        "Identify the text passage for this image question.",
    ],
    ("FashionIQ", 7): [
        "Find the product image with the requested change.",
        "Retrieve the edited item image matching the feedback.",
        "Show me the item image after this modification.",
        "Identify the product picture with this change applied.",
    ],
    ("CIRR", 7): [
        "Find the image after the described modification.",
        "Retrieve the picture that applies this change.",
        "Show me the scene image with the requested edit.",
        "Identify the image edited as described.",
    ],
    ("OVEN", 8): [
        "Find the entity image and description that answer the question.",
        "Retrieve the image-text entity entry asked about.",
        "Show me the entity image and text answering this visual question.",
        "Identify the entity page with image and text.",
    ],
    ("INFOSEEK", 8): [
        "Find the image-text entry that answers the question.",
        "Retrieve the entity image answering this query.",
        "Show me an image with text answering the visual question.",
        "Identify the entity image and text for this question.",
    ],
}


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


def _groups() -> list[tuple[str, tuple[int, ...], object, dict]]:
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


assert sorted((d, t) for d, ts, _, _ in _groups() for t in ts) == sorted(EVAL_ROWS)


# ---- writer --------------------------------------------------------------------------------------
def _row_seed(seed: int, dataset: str, task, split: str) -> int:
    return int.from_bytes(
        hashlib.sha256(f"{seed}/{dataset}/{task}/{split}".encode()).digest()[:8], "big"
    )


class _Writer:
    """Assigns ids, renders images once per (scene, jitter), and collects records."""

    def __init__(self, root: Path, cfg: SyntheticConfig):
        self.root, self.cfg = root, cfg
        self.images: dict[str, str] = {}
        self.next_did = {d: 1 for d in DATASET_IDS}
        self.next_qid = {d: 1 for d in DATASET_IDS}

    def image(self, dataset: str, scene: Scene, jitter: int | None) -> str:
        k = f"{scene.key}#{jitter}"
        if k not in self.images:
            name = hashlib.sha1(k.encode()).hexdigest()[:16]
            rel = f"mbeir_images/{dataset.lower()}_images/{name[:2]}/{name}.png"
            p = self.root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            render(scene, self.cfg.image_size, jitter_seed=jitter).save(
                buf, format="PNG", optimize=False
            )
            p.write_bytes(buf.getvalue())
            self.images[k] = rel
        return self.images[k]

    def candidate(self, dataset: str, c: Content, pool: dict[str, dict]) -> str:
        if c.key in pool:
            return pool[c.key]["did"]
        did = f"{DATASET_IDS[dataset]}:{self.next_did[dataset]}"
        self.next_did[dataset] += 1
        pool[c.key] = {
            "txt": c.txt,
            "img_path": self.image(dataset, c.scene, c.jitter) if c.scene is not None else None,
            "modality": c.modality,
            "did": did,
            "src_content": None,
        }
        return did

    def query(self, dataset: str, task: int, c: Content, pos: list[str]) -> dict:
        qid = f"{DATASET_IDS[dataset]}:{self.next_qid[dataset]}"
        self.next_qid[dataset] += 1
        return {
            "qid": qid,
            "query_txt": c.txt,
            "query_img_path": self.image(dataset, c.scene, c.jitter)
            if c.scene is not None
            else None,
            "query_modality": c.modality,
            "query_src_content": None,
            "pos_cand_list": pos,
            "neg_cand_list": [],
            "task_id": task,
        }


def _item_keys(it) -> list[str]:
    """What must not leak from test or dev into train: an item's scene (for an example of a single
    row: the query's scene, or the positive's, or the query text)."""
    if not isinstance(it, Example):
        return [it.scene.key]
    if it.query.scene is not None:
        return [it.query.scene.key]
    if it.positive.scene is not None:
        return [it.positive.scene.key]
    return [it.query.txt or ""]


def _draw_items(
    draw, rng: random.Random, cfg: SyntheticConfig, n: int, held_out: set[str], what: str
) -> list:
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 20 * n + 100:
            raise RuntimeError(
                f"{what}: cannot draw {n} items disjoint from the test and dev items"
            )
        it = draw(rng, cfg)
        if not any(
            k in held_out for k in _item_keys(it)
        ):  # no test or dev scene leaks into a later split
            out.append(it)
    return out


def _jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _qrels(path: Path, queries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for q in queries:
            for d in q["pos_cand_list"]:
                f.write(f"{q['qid']} 0 {d} 1 {q['task_id']}\n")


def _write_split(
    w: _Writer,
    split: str,
    dataset: str,
    task: int,
    examples: list[Example],
    rng: random.Random,
    pool: dict[str, dict],
    fn_log: list,
) -> list[dict]:
    queries = []
    for ex in examples:
        pos = w.candidate(dataset, ex.positive, pool)
        for n in ex.near:
            w.candidate(dataset, n, pool)
        q = w.query(dataset, task, ex.query, [pos])
        if ex.false_negative is not None and rng.random() < w.cfg.false_negative_rate:
            if ex.false_negative.key not in pool:
                fn = w.candidate(dataset, ex.false_negative, pool)
                fn_log.append(
                    {
                        "split": split,
                        "row": row_name(dataset, task),
                        "qid": q["qid"],
                        "positive": pos,
                        "false_negative": fn,
                    }
                )
        queries.append(q)
    return queries


RECIPE_FILE = Path("synthetic_meta") / "recipe.json"  # the build's recipe and its hash


def build_digest(root) -> str | None:
    """Identity of a synthetic mini-M-BEIR build: its recipe hash (``synthetic_meta/recipe.json``), so
    that runs and cached stages of another build of the same preset are not reused. None for a root
    without the marker (a real M-BEIR copy: its path identifies it)."""
    marker = Path(root) / RECIPE_FILE
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())["hash"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{marker}: not a synthetic recipe file ({e})") from e


def generate(root, cfg: SyntheticConfig | None = None, *, force: bool = False) -> Path:
    """Write the synthetic mini-M-BEIR under ``root`` (atomic; a no-op when an identical build exists,
    rebuilt when the recipe differs or its marker is unreadable)."""
    cfg = cfg or SyntheticConfig()
    root = Path(root)
    recipe = {"generator": "umarvel_lib.data.synthetic", "version": 2, "config": asdict(cfg)}
    h = config_hash(recipe)

    def built() -> bool:
        try:
            return build_digest(root) == h
        except ValueError:
            return False  # a broken marker: build again

    if not force and built():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # concurrent runs on one data root: the first builds, the others wait and reuse its build
    with file_lock(root.parent / f".{root.name}.lock"):
        if not force and built():
            return root
        with atomic_dir(root) as tmp:
            _build(tmp, cfg)
            (tmp / RECIPE_FILE).parent.mkdir(exist_ok=True)
            (tmp / RECIPE_FILE).write_text(
                json.dumps({**recipe, "hash": h}, indent=2, sort_keys=True) + "\n"
            )
    return root


SPLITS = ("test", "val", "train")  # drawn in this order; val is the dev split


def _build(root: Path, cfg: SyntheticConfig) -> None:
    w = _Writer(root, cfg)
    fn_log: list[dict] = []
    written: dict[str, dict] = {}  # row name -> split -> (queries, pool records)
    sizes = {"test": cfg.n_test, "val": cfg.n_dev, "train": cfg.n_train}
    for dataset, tasks, draw, views in _groups():
        held_out: set[str] = set()
        for split in SPLITS:
            n = sizes[split]
            if not n:
                continue
            rng = random.Random(_row_seed(cfg.seed, dataset, "+".join(map(str, tasks)), split))
            what = f"{dataset} tasks {'/'.join(map(str, tasks))} ({split})"
            items = _draw_items(draw, rng, cfg, n, held_out, what)
            # random distractors: more items of the dataset, in the test and dev pools only (dev: pro rata)
            n_extra = {
                "test": cfg.distractors,
                "val": round(cfg.distractors * n / max(1, cfg.n_test)),
                "train": 0,
            }[split]
            extra = [draw(rng, cfg) for _ in range(n_extra)]
            held_out.update(k for it in items for k in _item_keys(it))
            for task in tasks:
                view, name = views[task], row_name(dataset, task)
                vrng = random.Random(_row_seed(cfg.seed, dataset, task, f"{split}/view"))
                examples = [view(it, vrng, cfg) for it in items]
                pool: dict[str, dict] = {}
                queries = _write_split(w, split, dataset, task, examples, vrng, pool, fn_log)
                for it in extra:
                    w.candidate(dataset, view(it, vrng, cfg).positive, pool)
                written.setdefault(name, {})[split] = (queries, list(pool.values()))
    union_train, test_pools, train_pool_all, stats = [], [], [], []
    for dataset, task in EVAL_ROWS:
        name = row_name(dataset, task)
        for split, (queries, pool) in written[name].items():
            _jsonl(root / "query" / split / f"mbeir_{name}_{split}.jsonl", queries)
            _qrels(root / "qrels" / split / f"mbeir_{name}_{split}_qrels.txt", queries)
            pool_name = (
                f"mbeir_{name}_cand_pool.jsonl"
                if split == "test"
                else f"mbeir_{name}_{split}_cand_pool.jsonl"
            )
            _jsonl(root / "cand_pool" / "local" / pool_name, pool)
        tq, tpool = written[name]["test"]
        trq, trpool = written[name]["train"]
        dq, dpool = written[name].get("val", ([], []))
        union_train += trq
        test_pools += tpool
        train_pool_all += trpool
        stats.append(
            {
                "row": name,
                "task_id": task,
                "query_modality": TASKS[task][0],
                "cand_modality": TASKS[task][1],
                "twin_group": dataset if dataset in TWINS else None,
                "n_test_queries": len(tq),
                "n_test_pool": len(tpool),
                "n_dev_queries": len(dq),
                "n_dev_pool": len(dpool),
                "n_train_queries": len(trq),
                "n_train_pool": len(trpool),
            }
        )
    _jsonl(root / "query" / "union_train" / "mbeir_union_up_train.jsonl", union_train)
    _jsonl(root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl", _dedup(test_pools))
    _jsonl(
        root / "cand_pool" / "global" / "mbeir_union_train_cand_pool.jsonl", _dedup(train_pool_all)
    )
    _write_instructions(root)
    _write_nli(root, cfg)
    _write_cc3m(root, cfg)
    meta = root / "synthetic_meta"
    _jsonl(meta / "planted_false_negatives.jsonl", fn_log)
    _jsonl(meta / "rows.jsonl", stats)


def _dedup(records: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in records:
        if r["did"] not in seen:
            seen.add(r["did"])
            out.append(r)
    return out


def _write_instructions(root: Path) -> None:
    lines = [
        "query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4"
    ]
    for (dataset, task), prompts in INSTRUCTIONS.items():
        qm, cm = TASKS[task]
        lines.append("\t".join([qm, cm, dataset, str(DATASET_IDS[dataset]), *prompts]))
    p = root / "instructions" / "query_instructions.tsv"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_nli(root: Path, cfg: SyntheticConfig) -> None:
    """Stage-1 text pairs in SimCSE's NLI CSV format: a caption, a paraphrase, and a near-miss caption."""
    rng = random.Random(_row_seed(cfg.seed, "nli", 0, "train"))
    p = root / "nli" / "nli_for_simcse.csv"
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["sent0", "sent1", "hard_neg"])
        for _ in range(cfg.n_nli):
            s = sample_scene(rng)
            wr.writerow([caption(s, rng), caption(s, rng), caption(perturb(s, rng)[0], rng)])


def _write_cc3m(root: Path, cfg: SyntheticConfig) -> None:
    """Stage-2 caption-image pairs in LLaVA's CC3M-595K ``chat.json`` format, images under ``cc3m/images``."""
    rng = random.Random(_row_seed(cfg.seed, "cc3m", 0, "train"))
    out = []
    for i in range(cfg.n_cc3m):
        s = sample_scene(rng)
        name = f"GCC_train_{i:09d}.png"
        p = root / "cc3m" / "images" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        render(s, cfg.image_size, jitter_seed=rng.randrange(1 << 30)).save(buf, format="PNG")
        p.write_bytes(buf.getvalue())
        out.append(
            {
                "id": f"GCC_train_{i:09d}",
                "image": name,
                "conversations": [
                    {
                        "from": "human",
                        "value": "Render a clear and concise summary of the photo.\n<image>",
                    },
                    {"from": "gpt", "value": caption(s, rng)},
                ],
            }
        )
    (root / "cc3m" / "chat.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
