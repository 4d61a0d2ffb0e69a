"""The two earlier-stage corpora, read and validated as they ship (separate downloads, separate places).

* **NLI** (stage 1): SimCSE's ``nli_for_simcse.csv``, a header ``sent0,sent1,hard_neg`` and one
  triplet per row (the released training uses ``sent0 -> sent1``; ``hard_neg`` is read and unused).
  Set with ``--nli-path`` (the CSV file itself).
* **CC3M** (stage 2): LLaVA's CC3M-595K ``chat.json``, a JSON list of
  ``{"id", "image", "conversations": [{"from": "human", ...}, {"from": "gpt", "value": caption}]}``,
  with the images unpacked next to it (``<root>/images/<image>`` when an ``images/`` folder exists,
  else ``<root>/<image>``). Set with ``--cc3m-root`` (the folder holding ``chat.json``).

Every problem is a :class:`~umarvel_lib.data.mbeir_records.MBEIRFormatError` naming the file (and line or
record); image paths go through :func:`~umarvel_lib.io.safe_join` (``../`` and absolute paths refused).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..io import UnsafePathError, safe_join
from .mbeir_records import MBEIRFormatError, load_rgb, text_lines

NLI_FILE = "nli_for_simcse.csv"
NLI_HEADER = ["sent0", "sent1", "hard_neg"]
CC3M_FILE = "chat.json"


def read_nli(path) -> list[tuple[str, str, str]]:
    """``(sent0, sent1, hard_neg)`` triplets of a SimCSE NLI CSV file, every row checked."""
    path = Path(path)
    lines = [
        line for _, line in text_lines(path)
    ]  # UTF-8 checked line by line (file:line on error)
    out = []
    rows = csv.reader(lines)
    try:
        header = next(rows)
    except StopIteration:
        raise MBEIRFormatError(
            path, None, "empty file (expected a header sent0,sent1,hard_neg)"
        ) from None
    if [h.strip() for h in header[:3]] != NLI_HEADER:
        raise MBEIRFormatError(path, 1, f"expected header sent0,sent1,hard_neg, got {header}")
    for r in rows:
        n = rows.line_num
        if not r:
            continue
        if len(r) < 3:
            raise MBEIRFormatError(
                path, n, f"expected 3 columns sent0,sent1,hard_neg, got {len(r)}"
            )
        if not r[0].strip() or not r[1].strip():
            raise MBEIRFormatError(path, n, "empty sent0 or sent1")
        out.append((r[0], r[1], r[2]))
    if not out:
        raise MBEIRFormatError(path, None, "no NLI triplets")
    return out


def cc3m_image_dir(root) -> Path:
    root = Path(root)
    return root / "images" if (root / "images").is_dir() else root


def read_cc3m(root, *, check_images: bool = True) -> list[tuple[str, str]]:
    """``(caption, image path)`` pairs of a LLaVA CC3M-595K ``chat.json``; with ``check_images`` every
    image file must exist (:func:`check_cc3m_images` also opens them)."""
    root = Path(root)
    path = root / CC3M_FILE
    if not path.is_file():
        raise MBEIRFormatError(path, None, "file not found")
    try:
        data = json.loads("".join(line for _, line in text_lines(path)))
    except json.JSONDecodeError as e:
        raise MBEIRFormatError(
            path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})"
        ) from None
    if not isinstance(data, list) or not data:
        raise MBEIRFormatError(path, None, "expected a non-empty JSON list of conversations")
    img_dir = cc3m_image_dir(root)
    out = []
    for i, d in enumerate(data):
        where = f"record {i} (id {d.get('id')!r})" if isinstance(d, dict) else f"record {i}"
        conv = d.get("conversations") if isinstance(d, dict) else None
        if (
            not isinstance(d, dict)
            or not isinstance(d.get("image"), str)
            or not isinstance(conv, list)
        ):
            raise MBEIRFormatError(
                path, None, f"{where}: expected an object with 'image' and 'conversations'"
            )
        caps = [c.get("value") for c in conv if isinstance(c, dict) and c.get("from") == "gpt"]
        if not caps or not isinstance(caps[0], str) or not caps[0].strip():
            raise MBEIRFormatError(path, None, f"{where}: no caption (a 'gpt' turn with a value)")
        try:
            img = safe_join(img_dir, d["image"], where=f"{path} {where}")
        except UnsafePathError as e:
            raise MBEIRFormatError(path, None, f"{where}: {str(e).split(': ', 1)[1]}") from None
        if check_images and not img.is_file():
            raise MBEIRFormatError(
                path, None, f"{where}: image file {d['image']!r} not found under {img_dir}"
            )
        out.append((caps[0].strip(), str(img)))
    return out


def check_cc3m_images(pairs: list[tuple[str, str]], *, where: str) -> None:
    """Open every image of ``pairs`` (decoded in full); the first unreadable one is an error naming it."""
    for _, img in pairs:
        load_rgb(img, where=where)
