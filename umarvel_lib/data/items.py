"""What the embedder encodes: an :class:`Item` is a text and/or an image plus an optional instruction.

M-BEIR queries and candidates, NLI sentences and CC3M captions/images all become Items, so the
embedder never needs to know which corpus a sample came from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from .mbeir import MBEIR
from .mbeir_records import Candidate, Query, load_rgb
from .mbeir_rows import TASKS


@dataclass(frozen=True)
class Item:
    txt: str | None = None
    image_path: str | None = None  # absolute or already-resolved path
    instruction: str | None = None  # queries only; candidates never get one
    image: Image.Image | None = None  # an in-memory image wins over image_path

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_path is not None

    def load_image(self) -> Image.Image | None:
        if self.image is not None:
            return self.image.convert("RGB")
        if self.image_path is None:
            return None
        return load_rgb(self.image_path)


def candidate_item(c: Candidate, data: MBEIR) -> Item:
    img = str(data.root / c.img_path) if (c.img_path and "image" in c.modality) else None
    txt = c.txt if "text" in c.modality else None
    return Item(txt=txt, image_path=img)


def query_item(q: Query, data: MBEIR, *, instruction: str | None = None) -> Item:
    img = str(data.root / q.img_path) if (q.img_path and "image" in q.modality) else None
    txt = q.txt if "text" in q.modality else None
    return Item(txt=txt, image_path=img, instruction=instruction)


def query_items(
    queries: list[Query], data: MBEIR, *, instructions: bool, seed: int
) -> tuple[list[Item], list[str | None]]:
    """Items for queries with an instruction sampled per query from ``seed`` (recorded by the caller).

    The instruction is looked up by the task's candidate modality, as UniIR does.
    """
    rng = random.Random(seed)
    items, instr = [], []
    for q in queries:
        ins = data.sample_instruction(q, TASKS[q.task_id][1], rng) if instructions else None
        items.append(query_item(q, data, instruction=ins))
        instr.append(ins)
    return items, instr
