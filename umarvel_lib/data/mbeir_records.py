"""M-BEIR's record files read and validated line by line: queries and candidates (JSONL), qrels, the
query instructions (TSV), and image files.

The same readers serve the real benchmark and the synthetic mini-M-BEIR. Every problem is a
:class:`MBEIRFormatError` naming the file and line; nothing is skipped silently. Reading and
validating are one pass (each record is checked as it is read), so they share this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..io import UnsafePathError, safe_join
from .mbeir_rows import DATASET_IDS, MODALITIES, TASKS


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
