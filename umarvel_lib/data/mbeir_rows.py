"""M-BEIR's benchmark, as named by UniIR: dataset ids, tasks and their modalities, the 16 evaluation rows
(their order, names and headline k). Constants and naming only: no file is read here.
"""

from __future__ import annotations

# UniIR:src/data/preprocessing/utils.py DATASET_IDS
DATASET_IDS: dict[str, int] = {
    "VisualNews": 0,
    "Fashion200K": 1,
    "WebQA": 2,
    "EDIS": 3,
    "NIGHTS": 4,
    "OVEN": 5,
    "INFOSEEK": 6,
    "FashionIQ": 7,
    "CIRR": 8,
    "MSCOCO": 9,
}
DATASET_NAMES: dict[int, str] = {v: k for k, v in DATASET_IDS.items()}
# MBEIR_TASK: task id -> (query modality, candidate modality)
TASKS: dict[int, tuple[str, str]] = {
    0: ("text", "image"),
    1: ("text", "text"),
    2: ("text", "image,text"),
    3: ("image", "text"),
    4: ("image", "image"),
    5: ("image", "image,text"),
    6: ("image,text", "text"),
    7: ("image,text", "image"),
    8: ("image,text", "image,text"),
}
MODALITIES = ("text", "image", "image,text")

# The 16 evaluation rows of M-BEIR, in the column order of the paper's Tables 7/8.
EVAL_ROWS: tuple[tuple[str, int], ...] = (
    ("VisualNews", 0),
    ("MSCOCO", 0),
    ("Fashion200K", 0),
    ("WebQA", 1),
    ("EDIS", 2),
    ("WebQA", 2),
    ("VisualNews", 3),
    ("MSCOCO", 3),
    ("Fashion200K", 3),
    ("NIGHTS", 4),
    ("OVEN", 6),
    ("INFOSEEK", 6),
    ("FashionIQ", 7),
    ("CIRR", 7),
    ("OVEN", 8),
    ("INFOSEEK", 8),
)


def row_name(dataset: str, task_id: int) -> str:
    """UniIR's lower-case row name, e.g. ``visualnews_task0``."""
    return f"{dataset.lower()}_task{task_id}"


ROW_NAMES: tuple[str, ...] = tuple(row_name(d, t) for d, t in EVAL_ROWS)


def row_of_query(qid: str, task_id: int) -> str:
    """Row name of a query from its qid's dataset prefix and its task id (qrels 5th column)."""
    ds = int(qid.split(":")[0])
    if ds not in DATASET_NAMES:
        raise ValueError(f"qid {qid!r}: unknown dataset id {ds}")
    return row_name(DATASET_NAMES[ds], task_id)


def headline_k(row: str) -> int:
    """The R@5 / R@10 rule: R@10 for Fashion200K (tasks 0, 3) and FashionIQ (task 7), R@5 elsewhere."""
    dataset = row.split("_task")[0].removeprefix("syn_")
    return 10 if dataset in ("fashion200k", "fashioniq") else 5
