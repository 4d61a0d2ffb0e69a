"""M-BEIR on-disk format (UniIR / TIGER-Lab), read and validated.

Layout under a data root (docs/mbeir.md)::

    query/{train,union_train,val,test}/mbeir_<dataset>_task<N>_<split>.jsonl
    cand_pool/local/mbeir_<dataset>_task<N>_cand_pool.jsonl      (MSCOCO test: ..._task<N>_test_cand_pool.jsonl)
    cand_pool/global/mbeir_union_{test,train}_cand_pool.jsonl
    instructions/query_instructions.tsv
    qrels/{train,val,test}/mbeir_<dataset>_task<N>_<split>_qrels.txt
    mbeir_images/...

The same reader serves the real benchmark and the synthetic mini-M-BEIR. Every problem is a
:class:`MBEIRFormatError` naming the file and line; nothing is skipped silently.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..io import UnsafePathError, safe_join

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


class MBEIRFormatError(ValueError):
    """Malformed M-BEIR input. The message starts with ``file:line``."""

    def __init__(self, path, line: int | None, msg: str):
        where = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{where}: {msg}")
        self.path, self.line = str(path), line


@dataclass(frozen=True)
class Query:
    qid: str
    txt: str | None
    img_path: str | None
    modality: str
    task_id: int
    pos: tuple[str, ...]
    neg: tuple[str, ...] = ()
    src_content: str | None = None

    @property
    def dataset_id(self) -> int:
        return int(self.qid.split(":")[0])


@dataclass(frozen=True)
class Candidate:
    did: str
    txt: str | None
    img_path: str | None
    modality: str
    src_content: str | None = None

    @property
    def dataset_id(self) -> int:
        return int(self.did.split(":")[0])


QUERY_FIELDS = (
    "qid",
    "query_txt",
    "query_img_path",
    "query_modality",
    "query_src_content",
    "pos_cand_list",
    "neg_cand_list",
    "task_id",
)
CAND_FIELDS = ("did", "txt", "img_path", "modality", "src_content")


def text_lines(path: Path) -> Iterable[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file; bytes that are not UTF-8 are a
    :class:`MBEIRFormatError` naming the file and line (not a bare ``UnicodeDecodeError``)."""
    if not path.is_file():
        raise MBEIRFormatError(path, None, "file not found")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MBEIRFormatError(
                    path,
                    n,
                    f"not UTF-8 (byte {raw[e.start : e.start + 1]!r} at column {e.start + 1})",
                ) from None


def _iter_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    for n, line in text_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MBEIRFormatError(
                path, n, f"malformed JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(rec, dict):
            raise MBEIRFormatError(path, n, f"expected a JSON object, got {type(rec).__name__}")
        yield n, rec


def _check_fields(path, n, rec, fields):
    missing = [k for k in fields if k not in rec]
    if missing:
        raise MBEIRFormatError(path, n, f"missing field(s) {', '.join(missing)}")


def _check_id(path, n, value, name):
    if not isinstance(value, str) or ":" not in value or not value.split(":")[0].isdigit():
        raise MBEIRFormatError(path, n, f"{name} {value!r} is not of the form '<dataset_id>:<n>'")


def _check_content(path, n, root, modality, txt, img, check_images, kind):
    if modality not in MODALITIES:
        raise MBEIRFormatError(
            path, n, f"unknown modality {modality!r} (expected one of {MODALITIES})"
        )
    if "text" in modality.split(",") and not (isinstance(txt, str) and txt.strip()):
        raise MBEIRFormatError(path, n, f"{kind} modality {modality!r} but no text")
    if "image" in modality.split(","):
        if not isinstance(img, str) or not img:
            raise MBEIRFormatError(path, n, f"{kind} modality {modality!r} but no image path")
        try:
            full = safe_join(root, img, where=f"{path}:{n}")
        except UnsafePathError as e:
            raise MBEIRFormatError(path, n, str(e).split(": ", 1)[1]) from None
        if check_images and not full.is_file():
            raise MBEIRFormatError(path, n, f"image file {img!r} not found under {root}")
    elif img not in (None, ""):
        # A text-only record that still names an image: validate the path but ignore it.
        try:
            safe_join(root, img, where=f"{path}:{n}")
        except UnsafePathError as e:
            raise MBEIRFormatError(path, n, str(e).split(": ", 1)[1]) from None


def read_queries(
    path,
    root,
    *,
    check_images: bool = True,
    allow_repeats: bool = False,
    dataset: str | None = None,
    task_id: int | None = None,
) -> list[Query]:
    """Read a query JSONL file; validates every record.

    ``allow_repeats``: UniIR's up-sampled training file (``mbeir_union_up_train.jsonl``) copies whole
    records, so a repeated qid there is the data (every copy is kept; :func:`count_repeats` counts
    them); in any other file it is an error. ``dataset``/``task_id``: what the file name says the
    records are (a per-row file); a qid of another dataset or another task id is an error saying so.
    """
    path, out, seen = Path(path), [], {}
    for n, r in _iter_jsonl(path):
        _check_fields(path, n, r, QUERY_FIELDS)
        _check_id(path, n, r["qid"], "qid")
        if r["qid"] in seen and not allow_repeats:
            raise MBEIRFormatError(
                path, n, f"duplicate qid {r['qid']!r} (first at line {seen[r['qid']]})"
            )
        seen.setdefault(r["qid"], n)
        if (
            not isinstance(r["task_id"], int)
            or isinstance(r["task_id"], bool)
            or r["task_id"] not in TASKS
        ):
            raise MBEIRFormatError(path, n, f"unknown task_id {r['task_id']!r} (expected 0..8)")
        if task_id is not None and r["task_id"] != task_id:
            raise MBEIRFormatError(
                path, n, f"task_id {r['task_id']} in a task{task_id} file (qid {r['qid']})"
            )
        if dataset is not None and int(r["qid"].split(":")[0]) != DATASET_IDS[dataset]:
            raise MBEIRFormatError(
                path,
                n,
                f"qid {r['qid']!r} has dataset id {r['qid'].split(':')[0]}, but the "
                f"file is {dataset} (dataset id {DATASET_IDS[dataset]})",
            )
        for key in ("pos_cand_list", "neg_cand_list"):
            lst = r[key]
            if not isinstance(lst, list) or not all(isinstance(d, str) for d in lst):
                raise MBEIRFormatError(path, n, f"{key} must be a list of did strings")
        _check_content(
            path,
            n,
            root,
            r["query_modality"],
            r["query_txt"],
            r["query_img_path"],
            check_images,
            "query",
        )
        out.append(
            Query(
                r["qid"],
                r["query_txt"],
                r["query_img_path"],
                r["query_modality"],
                r["task_id"],
                tuple(r["pos_cand_list"]),
                tuple(r["neg_cand_list"]),
                r["query_src_content"],
            )
        )
    return out


def count_repeats(queries: list[Query]) -> int:
    """Records that repeat an earlier qid (UniIR's up-sampling copies)."""
    return len(queries) - len({q.qid for q in queries})


def read_pool(
    path, root, *, check_images: bool = True, allow_empty: bool = False
) -> list[Candidate]:
    """Read a candidate-pool JSONL file; duplicate dids and empty pools are errors."""
    path, out, seen = Path(path), [], {}
    for n, r in _iter_jsonl(path):
        _check_fields(path, n, r, CAND_FIELDS)
        _check_id(path, n, r["did"], "did")
        if r["did"] in seen:
            raise MBEIRFormatError(
                path, n, f"duplicate did {r['did']!r} (first at line {seen[r['did']]})"
            )
        seen[r["did"]] = n
        _check_content(
            path, n, root, r["modality"], r["txt"], r["img_path"], check_images, "candidate"
        )
        out.append(Candidate(r["did"], r["txt"], r["img_path"], r["modality"], r["src_content"]))
    if not out and not allow_empty:
        raise MBEIRFormatError(path, None, "empty candidate pool")
    return out


def read_qrels(path, *, known_qids=None, known_dids=None) -> dict[str, set[str]]:
    """Read ``qid 0 did rel task_id`` lines; only relevance > 0 counts.

    With ``known_qids``/``known_dids`` given, a line naming an unknown id is an error.
    """
    path = Path(path)
    qrels: dict[str, set[str]] = {}
    for n, line in text_lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) not in (4, 5):
            raise MBEIRFormatError(
                path, n, f"expected 'qid 0 did rel [task_id]', got {line.strip()!r}"
            )
        qid, _, did, rel = parts[:4]
        try:
            rel_v = int(rel)
        except ValueError:
            raise MBEIRFormatError(path, n, f"relevance {rel!r} is not an integer") from None
        if known_qids is not None and qid not in known_qids:
            raise MBEIRFormatError(path, n, f"qrels names unknown query {qid!r}")
        if known_dids is not None and did not in known_dids:
            raise MBEIRFormatError(
                path, n, f"qrels names candidate {did!r}, which is not in the pool"
            )
        if rel_v > 0:
            qrels.setdefault(qid, set()).add(did)
    return qrels


def read_instructions(path) -> dict[tuple[int, str, str], list[str]]:
    """``instructions/query_instructions.tsv`` -> {(dataset_id, query_modality, cand_modality): [prompts]}.

    Columns: query_modality, cand_modality, dataset_name, dataset_id, prompt_1..prompt_4; a header line.
    """
    path = Path(path)
    out: dict[tuple[int, str, str], list[str]] = {}
    for n, line in text_lines(path):
        line = line.rstrip("\r\n")
        if n == 1 or not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 5:
            raise MBEIRFormatError(
                path, n, f"expected at least 5 tab-separated columns, got {len(parts)}"
            )
        qm, cm, _name, did = parts[:4]
        if qm not in MODALITIES or cm not in MODALITIES:
            raise MBEIRFormatError(path, n, f"unknown modality in {qm!r} / {cm!r}")
        if not did.strip().isdigit():
            raise MBEIRFormatError(path, n, f"dataset_id {did!r} is not an integer")
        prompts = [p.strip() for p in parts[4:] if p.strip()]
        if not prompts:
            raise MBEIRFormatError(path, n, "no instruction prompts")
        out[(int(did), qm, cm)] = prompts
    return out


def format_string(s: str) -> str:
    """UniIR's ``format_string``: strip, capitalise the first character, end with a full stop."""
    s = (s or "").strip()
    if not s:
        return s
    s = s[0].upper() + s[1:]
    return s if s[-1] in ".?!" else s + "."


@dataclass
class Row:
    """One of the 16 evaluation rows: queries, local pool and qrels of a dataset-task pair."""

    dataset: str
    task_id: int
    query_file: Path
    pool_file: Path
    qrels_file: Path

    @property
    def name(self) -> str:
        return row_name(self.dataset, self.task_id)

    @property
    def headline_k(self) -> int:
        return headline_k(self.name)


@dataclass
class MBEIR:
    """A data root in M-BEIR layout. ``check_images`` verifies every image file exists.
    ``max_queries``: only the first N queries of each row (in file order: a fixed subset, e.g. the
    dev curve's); their qrels are kept, the rest are dropped after validation."""

    root: Path
    check_images: bool = True
    split: str = "test"
    max_queries: int | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"M-BEIR data root {self.root} does not exist. Run `umarvel prepare` for the synthetic "
                f"mini-M-BEIR, or pass the path of a local copy of TIGER-Lab/M-BEIR (no download is attempted)."
            )

    # ---- files -------------------------------------------------------------------------------
    def query_file(self, dataset: str, task_id: int, split: str | None = None) -> Path:
        split = split or self.split
        return self.root / "query" / split / f"mbeir_{dataset.lower()}_task{task_id}_{split}.jsonl"

    def pool_file(self, dataset: str, task_id: int) -> Path:
        local = self.root / "cand_pool" / "local"
        for name in (
            f"mbeir_{dataset.lower()}_task{task_id}_{self.split}_cand_pool.jsonl",
            f"mbeir_{dataset.lower()}_task{task_id}_cand_pool.jsonl",
        ):
            if (local / name).is_file():
                return local / name
        return local / f"mbeir_{dataset.lower()}_task{task_id}_cand_pool.jsonl"

    def qrels_file(self, dataset: str, task_id: int, split: str | None = None) -> Path:
        split = split or self.split
        return (
            self.root / "qrels" / split / f"mbeir_{dataset.lower()}_task{task_id}_{split}_qrels.txt"
        )

    def rows(self, only: Iterable[str] | None = None) -> list[Row]:
        """The evaluation rows present under the root (all 16 for a complete copy)."""
        want = set(only) if only else None
        out = []
        for d, t in EVAL_ROWS:
            r = Row(d, t, self.query_file(d, t), self.pool_file(d, t), self.qrels_file(d, t))
            if want is not None and r.name not in want:
                continue
            if r.query_file.is_file():
                out.append(r)
        if want is not None and len(out) != len(want):
            missing = want - {r.name for r in out}
            raise FileNotFoundError(
                f"rows {sorted(missing)} not found under {self.root / 'query' / self.split}"
            )
        return out

    def missing_rows(self) -> list[Row]:
        """Evaluation rows whose query file is absent (a complete copy has none)."""
        return [
            Row(d, t, self.query_file(d, t), self.pool_file(d, t), self.qrels_file(d, t))
            for d, t in EVAL_ROWS
            if not self.query_file(d, t).is_file()
        ]

    # ---- readers (cached) --------------------------------------------------------------------
    def _cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def queries(self, row: Row) -> list[Query]:
        qs = self._all_queries(row)
        return qs[: self.max_queries] if self.max_queries is not None else qs

    def _all_queries(self, row: Row) -> list[Query]:
        return self._cached(
            ("q", row.query_file),
            lambda: read_queries(
                row.query_file,
                self.root,
                check_images=self.check_images,
                dataset=row.dataset,
                task_id=row.task_id,
            ),
        )

    def local_pool(self, row: Row) -> list[Candidate]:
        return self._cached(
            ("p", row.pool_file),
            lambda: read_pool(row.pool_file, self.root, check_images=self.check_images),
        )

    def qrels(self, row: Row) -> dict[str, set[str]]:
        """Qrels of a row, checked against its queries.

        A positive need not be in the row's local pool: OVEN and INFOSEEK positives may belong to
        the other dataset (UniIR). Recall counts a hit when any qrels positive is retrieved, so an
        absent one simply cannot be hit; :meth:`positives_outside_pool` counts them.
        """

        def load():
            qrels = read_qrels(row.qrels_file, known_qids={q.qid for q in self._all_queries(row)})
            keep = {q.qid for q in self.queries(row)}
            return {q: d for q, d in qrels.items() if q in keep}

        return self._cached(("r", row.qrels_file), load)

    def positives_outside_pool(self, row: Row, dids: set[str] | None = None) -> int:
        """(query, positive) pairs of a row's qrels whose candidate is not in ``dids`` (default: the
        row's local pool)."""
        dids = {c.did for c in self.local_pool(row)} if dids is None else dids
        return sum(len(pos - dids) for pos in self.qrels(row).values())

    def global_pool_file(self, split: str | None = None) -> Path:
        return (
            self.root
            / "cand_pool"
            / "global"
            / f"mbeir_union_{split or self.split}_cand_pool.jsonl"
        )

    def global_pool(self, *, dedup: bool = True) -> list[Candidate]:
        """Union of the local test pools.

        Reads ``cand_pool/global/mbeir_union_<split>_cand_pool.jsonl`` when present; otherwise
        concatenates the local pools of the rows present. ``dedup=False`` keeps duplicate dids, as
        the official global eval does (it concatenates local pool embeddings).
        """
        if dedup and self.global_pool_file().is_file():
            return self._cached(
                ("g",),
                lambda: read_pool(
                    self.global_pool_file(), self.root, check_images=self.check_images
                ),
            )
        out, seen = [], set()
        for r in self.rows():
            for c in self.local_pool(r):
                if dedup and c.did in seen:
                    continue
                seen.add(c.did)
                out.append(c)
        return out

    def union_train(self) -> list[Query]:
        f = self.root / "query" / "union_train" / "mbeir_union_up_train.jsonl"
        return self._cached(
            ("ut",),
            lambda: read_queries(f, self.root, check_images=self.check_images, allow_repeats=True),
        )

    def train_pool(self) -> list[Candidate]:
        f = self.global_pool_file("train")
        return self._cached(
            ("tp",), lambda: read_pool(f, self.root, check_images=self.check_images)
        )

    @cached_property
    def instructions(self) -> dict[tuple[int, str, str], list[str]]:
        return read_instructions(self.root / "instructions" / "query_instructions.tsv")

    def instruction_options(self, query: Query, cand_modality: str) -> list[str]:
        key = (query.dataset_id, query.modality, cand_modality)
        if key not in self.instructions:
            raise KeyError(
                f"no instructions for dataset {query.dataset_id}, {query.modality} -> {cand_modality} "
                f"in {self.root / 'instructions' / 'query_instructions.tsv'}"
            )
        return self.instructions[key]

    def sample_instruction(self, query: Query, cand_modality: str, rng: random.Random) -> str:
        """One instruction for a query, drawn with ``rng`` (UniIR draws unseeded; we record the seed)."""
        return format_string(rng.choice(self.instruction_options(query, cand_modality)))

    def candidates_by_id(self, pool: list[Candidate]) -> dict[str, Candidate]:
        return {c.did: c for c in pool}

    def image(self, rel: str):
        return load_rgb(safe_join(self.root, rel, where=str(self.root)))


def load_rgb(path, *, where: str = ""):
    """An image file as RGB (grayscale, palette, RGBA and CMYK converted); a missing, truncated or
    unreadable file is an :class:`MBEIRFormatError` naming it (and ``where`` it was referenced)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() decodes every pixel: a truncated file fails here
    except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, truncated data
        ref = f" (referenced at {where})" if where else ""
        raise MBEIRFormatError(path, None, f"cannot read image{ref}: {e}") from None
