"""Writes a synthetic build in the formats the real data comes in.

M-BEIR's layout (query and candidate records with ids, rendered PNGs, qrels, pools, the query
instructions file; ``docs/mbeir_format.md``), SimCSE's NLI CSV and LLaVA's CC3M-595K ``chat.json``.
:class:`Writer` assigns ids and renders each (scene, jitter) once; :func:`write_split` turns one row's
examples into query records and pool entries, planting false negatives at the configured rate.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path

from .mbeir_rows import DATASET_IDS, TASKS, row_name
from .scenes import Scene, caption, perturb, render, sample_scene
from .synthetic_rows import Content, Example

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


def row_seed(seed: int, dataset: str, task, split: str) -> int:
    return int.from_bytes(
        hashlib.sha256(f"{seed}/{dataset}/{task}/{split}".encode()).digest()[:8], "big"
    )


class Writer:
    """Assigns ids, renders images once per (scene, jitter), and collects records."""

    def __init__(self, root: Path, cfg):
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


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_qrels(path: Path, queries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for q in queries:
            for d in q["pos_cand_list"]:
                f.write(f"{q['qid']} 0 {d} 1 {q['task_id']}\n")


def write_split(
    w: Writer,
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


def dedup(records: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in records:
        if r["did"] not in seen:
            seen.add(r["did"])
            out.append(r)
    return out


def write_instructions(root: Path) -> None:
    lines = [
        "query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4"
    ]
    for (dataset, task), prompts in INSTRUCTIONS.items():
        qm, cm = TASKS[task]
        lines.append("\t".join([qm, cm, dataset, str(DATASET_IDS[dataset]), *prompts]))
    p = root / "instructions" / "query_instructions.tsv"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_nli(root: Path, cfg) -> None:
    """Stage-1 text pairs in SimCSE's NLI CSV format: a caption, a paraphrase, and a near-miss caption."""
    rng = random.Random(row_seed(cfg.seed, "nli", 0, "train"))
    p = root / "nli" / "nli_for_simcse.csv"
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["sent0", "sent1", "hard_neg"])
        for _ in range(cfg.n_nli):
            s = sample_scene(rng)
            wr.writerow([caption(s, rng), caption(s, rng), caption(perturb(s, rng)[0], rng)])


def write_cc3m(root: Path, cfg) -> None:
    """Stage-2 caption-image pairs in LLaVA's CC3M-595K ``chat.json`` format, images under ``cc3m/images``."""
    rng = random.Random(row_seed(cfg.seed, "cc3m", 0, "train"))
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
