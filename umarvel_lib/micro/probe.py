"""The caption probe: what a pre-trained micro backbone knows about its scenes.

Greedy captions of held-out scenes, parsed back into attributes and scored against the truth
(per attribute, with the chance level of a uniform guess).
"""

from __future__ import annotations

import random
from typing import Any

from ..data import scenes
from .pretrain import CAPTION_PROMPT, chat_text, heldout_caption_loss

# ------------------------------------------------------------------------------------------------
# caption probe
# ------------------------------------------------------------------------------------------------
_NUM = {w: i for i, w in enumerate(scenes.NUMBER_WORDS)}


def _phrase_table(table: dict) -> list[tuple[str, str]]:
    pairs = [(w, k) for k, words in table.items() for w in words]
    return sorted(
        pairs, key=lambda x: -len(x[0])
    )  # longest first ("tilted square" before "square")


_SHAPE_P = _phrase_table(scenes.SHAPE_WORDS)
_POS_P = _phrase_table(scenes.POS_WORDS)
_SIZE_P = _phrase_table(scenes.SIZE_WORDS)
_TEX_P = _phrase_table(scenes.TEXTURE_WORDS)


def _find(text: str, table: list[tuple[str, str]]) -> tuple[str | None, str]:
    import re

    for w, k in table:
        m = re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)
        if m:
            return k, text[: m.start()] + " " + text[m.end() :]
    return None, text


def parse_caption(text: str) -> dict:
    """Parse a generated caption back into ``{"count": int|None, "objects": [{...}]}`` (best effort)."""
    import re

    t = text.strip().lower()
    count = None
    m = re.match(r"^(\w+) objects? on an? \w+ background:\s*", t)
    if m:
        count = _NUM.get(m.group(1))
        t = t[m.end() :]
    pieces = [p for p in re.split(r";|, and |\. also | while |\.\s", t) if p.strip()]
    objs = []
    for piece in pieces:
        o: dict[str, str | None] = {}
        o["position"], rest = _find(piece, _POS_P)
        o["shape"], rest = _find(rest, _SHAPE_P)
        o["size"], rest = _find(rest, _SIZE_P)
        o["texture"], rest = _find(rest, _TEX_P)
        o["texture"] = o["texture"] or "solid"  # captions leave solid textures unnamed
        col = [c for c in scenes.COLORS if re.search(rf"\b{c}\b", rest)]
        o["color"] = col[0] if col else None
        if any(v for k, v in o.items() if k != "texture"):
            objs.append(o)
    return {"count": count, "objects": objs}


def score_caption(scene: scenes.Scene, text: str) -> dict[str, float | None]:
    """Per-attribute correctness of one generated caption (``None`` = not applicable)."""
    from itertools import permutations

    parsed = parse_caption(text)
    pred = parsed["objects"]
    by_pos = {}
    for o in pred:
        if o["position"] and o["position"] not in by_pos:
            by_pos[o["position"]] = o
    n = len(scene.objects)
    res: dict[str, Any] = {}
    # per object, the predicted object at the same position must carry the attribute
    for attr in ("color", "shape", "size", "texture"):
        hits = [float(by_pos.get(o.position, {}).get(attr) == o.get(attr)) for o in scene.objects]
        res[attr] = sum(hits) / n
    res["position"] = sum(float(o.position in by_pos) for o in scene.objects) / n
    res["color_anywhere"] = (
        sum(float(o.color in {p.get("color") for p in pred}) for o in scene.objects) / n
    )
    res["count"] = float(len(pred) == n)
    # colour+shape pair present anywhere in the caption (ignores position)
    pairs = {(o.get("color"), o.get("shape")) for o in pred}
    res["color_shape_pair"] = sum(float((o.color, o.shape) in pairs) for o in scene.objects) / n
    # binding: scenes with >=2 objects of distinct colours and shapes, where the caption names exactly the
    # right colours and shapes; is the colour-shape pairing right?
    cols, shps = [o.color for o in scene.objects], [o.shape for o in scene.objects]
    res["binding"] = None
    res["binding_chance"] = None
    if n >= 2 and len(set(cols)) == n and len(set(shps)) == n and len(pred) == n:
        if sorted(str(o["color"]) for o in pred) == sorted(cols) and sorted(
            str(o["shape"]) for o in pred
        ) == sorted(shps):
            res["binding"] = float({(o["color"], o["shape"]) for o in pred} == set(zip(cols, shps)))
            res["binding_chance"] = 1.0 / len(list(permutations(range(n))))
    return res


def _chance(attr: str, scene: scenes.Scene) -> float:
    n = len(scene.objects)
    if attr == "position":
        return n / len(scenes.POSITIONS)  # naming n random distinct positions
    if attr == "count":
        return 0.375  # sample_scene draws n from (1, 2, 2, 3): sum of p^2
    if attr == "color_anywhere":
        return 1 - (1 - 1 / len(scenes.COLORS)) ** n  # n random colour names
    if attr == "color_shape_pair":
        return 1.0 / (len(scenes.COLORS) * len(scenes.SHAPES))
    return 1.0 / len(scenes.VALUES[attr])


def generate_captions(
    model, processor, images, *, batch_size: int = 16, max_new_tokens: int = 64
) -> list[str]:
    """Greedy captions (left padding, stop at ``<|im_end|>``)."""
    import torch

    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    outs: list[str] = []
    try:
        prompt = chat_text(processor, CAPTION_PROMPT, None, image=True)
        model.eval()
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                imgs = images[i : i + batch_size]
                b = processor(
                    text=[prompt] * len(imgs), images=imgs, padding=True, return_tensors="pt"
                )
                gen = model.generate(
                    **b,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                    pad_token_id=tok.pad_token_id,
                )
                new = gen[:, b["input_ids"].shape[1] :]
                outs.extend(tok.batch_decode(new, skip_special_tokens=True))
    finally:
        tok.padding_side = old_side
    return [o.strip() for o in outs]


def caption_probe(
    model,
    processor,
    n: int = 200,
    seed: int = 777,
    *,
    image_size: int = 112,
    untrained_model=None,
    batch_size: int = 16,
    return_captions: bool = False,
):
    """Greedy captions of ``n`` held-out scenes, scored per attribute against the truth.

    Returns a ``pandas.DataFrame`` with one row per metric (``accuracy``, ``chance``, ``n``) and, as
    extra rows, the held-out caption loss of ``model`` and of ``untrained_model`` (if given). With
    ``return_captions`` also returns the list of (canonical truth, generated) captions.

    Metrics (per true object, averaged per scene, then over scenes):
    ``color``/``shape``/``size``/``texture``: the object the caption puts at the true object's
    position has the right value (so these include colour-to-position binding); ``position``: the
    true position is named; ``count``: the caption describes exactly n objects; ``color_anywhere``:
    the colour is named somewhere; ``color_shape_pair``: the (colour, shape) pair is named anywhere;
    ``binding``: scenes with 2-3 objects of distinct colours and shapes whose caption names exactly
    the right colours and shapes: is the colour-shape pairing right (chance 1/n!)?
    Chance: a uniform guess (1/|values|); position n/5; count 0.375 (sum of p² of sample_scene's n).
    """
    import pandas as pd

    rng = random.Random(f"probe-{seed}")
    sc = [scenes.sample_scene(rng) for _ in range(n)]
    imgs = [scenes.render(s, image_size, jitter_seed=rng.randrange(1 << 30)) for s in sc]
    caps = generate_captions(model, processor, imgs, batch_size=batch_size)
    attrs = (
        "color",
        "shape",
        "position",
        "size",
        "texture",
        "count",
        "color_anywhere",
        "color_shape_pair",
        "binding",
    )
    acc: dict[str, list[float]] = {a: [] for a in attrs}
    ch: dict[str, list[float]] = {a: [] for a in attrs}
    for s, c in zip(sc, caps):
        r = score_caption(s, c)
        for a in attrs:
            if r[a] is None:
                continue
            acc[a].append(r[a])
            ch[a].append(r["binding_chance"] if a == "binding" else _chance(a, s))
    rows = [
        {
            "metric": a,
            "accuracy": (sum(acc[a]) / len(acc[a])) if acc[a] else float("nan"),
            "chance": (sum(ch[a]) / len(ch[a])) if ch[a] else float("nan"),
            "n": len(acc[a]),
        }
        for a in attrs
    ]
    loss_kw = dict(n=min(n, 128), seed=seed, image_size=image_size, batch_size=batch_size)
    rows.append(
        {
            "metric": "heldout_caption_loss",
            "accuracy": heldout_caption_loss(model, processor, **loss_kw),
            "chance": float("nan"),
            "n": loss_kw["n"],
        }
    )
    if untrained_model is not None:
        rows.append(
            {
                "metric": "heldout_caption_loss_untrained",
                "accuracy": heldout_caption_loss(untrained_model, processor, **loss_kw),
                "chance": float("nan"),
                "n": loss_kw["n"],
            }
        )
    df = pd.DataFrame(rows)
    if return_captions:
        return df, [(scenes.canonical_caption(s), c) for s, c in zip(sc, caps)]
    return df
