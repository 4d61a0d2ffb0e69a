"""Validate everything a run will read, before anything trains (``umarvel check-data``).

:func:`check_data` reads every file a preset reads (the 16 test rows' queries, local pools and qrels,
the global pools, the up-sampled training queries, the instructions, and the NLI / CC3M corpora of
the stages that run), opens every image they name, and returns one :class:`FileCheck` per file: its
record count, repeated training records, images checked, qrels positives outside the row's pool,
and the error, if any. A file's reader stops at its first error (named with file and line); the
other files are still checked, so one pass lists every broken file.

``umarvel run`` and the notebooks call it first (:func:`validate_run`), so a data error never
appears after hours of training. A passed check is remembered under ``<cache>/data_checks/`` keyed
by the size and mtime of every record file read, so repeated runs on the same data do not re-open
every image (an image replaced in place is re-checked by the next ``umarvel check-data``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_write_json
from .corpora import read_cc3m, read_nli
from .mbeir import MBEIR
from .mbeir_records import MBEIRFormatError, Query, count_repeats, load_rgb
from .mbeir_rows import EVAL_ROWS, TASKS, row_name


class DataError(ValueError):
    """Data that a run would read is broken; the message lists every failing file."""


@dataclass
class FileCheck:
    file: str
    kind: str  # queries | pool | qrels | instructions | nli | cc3m
    records: int = 0
    repeats: int = 0  # repeated qids (the up-sampled training file: UniIR's copies, not an error)
    images: int = 0  # distinct image files opened (or found, with open_images=False)
    outside_pool: int = (
        0  # qrels (query, positive) pairs whose candidate is not in the row's local pool
    )
    error: str | None = None
    paths: list[str] = field(
        default_factory=list, repr=False
    )  # files read (for the check's cache key)


@dataclass
class DataReport:
    files: list[FileCheck]
    root: str = ""  # the M-BEIR root: files under it are shown relative to it

    def _name(self, f: FileCheck) -> str:
        return (
            os.path.relpath(f.file, self.root)
            if self.root and f.file.startswith(self.root + os.sep)
            else f.file
        )

    @property
    def errors(self) -> list[str]:
        return [f.error for f in self.files if f.error]

    @property
    def ok(self) -> bool:
        return not self.errors

    def table(self) -> str:
        """One line per file: records, repeats, images, positives outside the pool, status."""
        w = max([len(self._name(f)) for f in self.files] + [4])
        lines = [
            f"{'file':<{w}}  {'records':>9}  {'repeats':>8}  {'images':>8}  {'pos outside pool':>16}  status"
        ]
        for f in self.files:
            lines.append(
                f"{self._name(f):<{w}}  {f.records:>9,}  {f.repeats:>8,}  {f.images:>8,}  {f.outside_pool:>16,}  "
                + ("ok" if not f.error else "ERROR")
            )
        n_err = len(self.errors)
        lines.insert(0, f"M-BEIR root: {self.root}")
        lines.append(
            f"{len(self.files)} files, {sum(f.records for f in self.files):,} records, "
            f"{sum(f.images for f in self.files):,} images checked, "
            f"{sum(f.outside_pool for f in self.files):,} qrels positives outside their local pool, "
            f"{n_err} error(s)"
        )
        lines += [f"ERROR {e}" for e in self.errors]
        return "\n".join(lines)

    def raise_for_errors(self) -> None:
        if not self.ok:
            raise DataError("data check failed:\n" + "\n".join(self.errors))


def _open_images(paths: Iterable[tuple[Path, str]], open_images: bool) -> int:
    """Check ``(image path, where referenced)`` pairs: each opens and decodes (or exists). Distinct count."""
    todo = {}
    for p, where in paths:
        todo.setdefault(str(p), where)
    if not open_images:
        for p, where in todo.items():
            if not os.path.isfile(p):
                raise MBEIRFormatError(p, None, f"image not found (referenced at {where})")
        return len(todo)
    with ThreadPoolExecutor(
        max_workers=min(8, os.cpu_count() or 1)
    ) as ex:  # PIL decodes without the GIL
        list(ex.map(lambda kv: load_rgb(kv[0], where=kv[1]), todo.items()))
    return len(todo)


def _record_images(
    data: MBEIR, file: Path, recs: Sequence, attr: str = "img_path"
) -> list[tuple[Path, str]]:
    return [
        (
            data.root / getattr(r, attr),
            f"{file} ({getattr(r, 'qid', None) or getattr(r, 'did', '')})",
        )
        for r in recs
        if getattr(r, attr) and "image" in r.modality
    ]


def _run(check: FileCheck, fn: Callable[[FileCheck], None]) -> FileCheck:
    try:
        fn(check)
    except (MBEIRFormatError, OSError, ValueError, KeyError) as e:
        check.error = (
            str(e)
            if str(e).startswith(check.file) or isinstance(e, MBEIRFormatError)
            else f"{check.file}: {e}"
        )
    return check


def _instructions_cover(data: MBEIR, file: Path, queries: list[Query]) -> None:
    missing: dict[tuple, str] = {}
    for q in queries:
        key = (q.dataset_id, q.modality, TASKS[q.task_id][1])
        if key not in data.instructions:
            missing.setdefault(key, q.qid)
    if missing:
        desc = "; ".join(
            f"dataset {k[0]}, {k[1]} -> {k[2]} (first qid {v})"
            for k, v in list(missing.items())[:5]
        )
        raise MBEIRFormatError(
            file,
            None,
            f"no instructions in {data.root / 'instructions' / 'query_instructions.tsv'}"
            f" for {desc}",
        )


def check_data(
    data_root,
    *,
    nli_path=None,
    cc3m_root=None,
    rows: Sequence[str] | None = None,
    stages: Sequence[str] = ("mbeir",),
    pools: Sequence[str] = ("local", "global"),
    open_images: bool = True,
) -> DataReport:
    """Check the data a run reads; see the module doc. ``rows``: the test rows asked for (None: all 16,
    and a missing query file is an error); ``stages``: the training stages (``nli``/``cc3m`` read their
    corpora, the M-BEIR stages the training queries and pool); ``pools``: ``global`` adds the global pool."""
    data = MBEIR(data_root, check_images=True)
    files: list[FileCheck] = []
    want = set(rows) if rows else None
    if want is not None:
        unknown = sorted(want - {row_name(d, t) for d, t in EVAL_ROWS})
        if unknown:
            raise DataError(f"unknown row(s) {unknown}")

    def inst(c: FileCheck):
        c.records = sum(len(v) for v in data.instructions.values())
        c.paths = [c.file]

    files.append(
        _run(
            FileCheck(str(data.root / "instructions" / "query_instructions.tsv"), "instructions"),
            inst,
        )
    )

    for d, t in EVAL_ROWS:
        name = row_name(d, t)
        if want is not None and name not in want:
            continue
        row = next((r for r in data.rows() if r.name == name), None)
        if row is None:
            files.append(
                FileCheck(
                    str(data.query_file(d, t)),
                    "queries",
                    error=f"{data.query_file(d, t)}: file not found (row {name}; pass the rows you "
                    f"want to evaluate to check or evaluate a subset)",
                )
            )
            continue

        def queries(c: FileCheck, row=row):
            qs = data.queries(row)
            c.records, c.paths = len(qs), [c.file]
            c.images = _open_images(
                _record_images(data, row.query_file, qs, "img_path"), open_images
            )
            _instructions_cover(data, row.query_file, qs)

        def pool(c: FileCheck, row=row):
            ps = data.local_pool(row)
            c.records, c.paths = len(ps), [c.file]
            c.images = _open_images(_record_images(data, row.pool_file, ps), open_images)

        def qrels(c: FileCheck, row=row):
            qr = data.qrels(row)
            c.records, c.paths = sum(len(v) for v in qr.values()), [c.file]
            c.outside_pool = data.positives_outside_pool(row)
            scored = sum(1 for q in data.queries(row) if qr.get(q.qid))
            if not scored:
                raise MBEIRFormatError(
                    row.qrels_file,
                    None,
                    f"none of the {len(data.queries(row))} queries of {row.name} has a positive",
                )

        files.append(_run(FileCheck(str(row.query_file), "queries"), queries))
        files.append(_run(FileCheck(str(row.pool_file), "pool"), pool))
        files.append(_run(FileCheck(str(row.qrels_file), "qrels"), qrels))

    if "global" in pools and data.global_pool_file().is_file():

        def gpool(c: FileCheck):
            ps = data.global_pool()
            c.records, c.paths = len(ps), [c.file]
            c.images = _open_images(_record_images(data, data.global_pool_file(), ps), open_images)

        files.append(_run(FileCheck(str(data.global_pool_file()), "pool"), gpool))

    if set(stages) & {"mbeir", "hard_negatives", "distill"}:
        train_file = data.root / "query" / "union_train" / "mbeir_union_up_train.jsonl"

        def tpool(c: FileCheck):
            ps = data.train_pool()
            c.records, c.paths = len(ps), [c.file]
            c.images = _open_images(
                _record_images(data, data.global_pool_file("train"), ps), open_images
            )

        def train(c: FileCheck):
            qs = data.union_train()
            c.records, c.repeats, c.paths = len(qs), count_repeats(qs), [c.file]
            uniq = list({q.qid: q for q in qs}.values())
            c.images = _open_images(_record_images(data, train_file, uniq), open_images)
            _instructions_cover(data, train_file, uniq)
            dids = {p.did for p in data.train_pool()}
            bad = [q.qid for q in uniq if not any(d in dids for d in q.pos)]
            if bad:
                raise MBEIRFormatError(
                    train_file,
                    None,
                    f"{len(bad)} training queries have no positive in "
                    f"{data.global_pool_file('train')} (first: {bad[:3]})",
                )

        files.append(_run(FileCheck(str(data.global_pool_file("train")), "pool"), tpool))
        files.append(_run(FileCheck(str(train_file), "queries"), train))

    if "nli" in stages:
        nli = Path(nli_path) if nli_path else data.root / "nli" / "nli_for_simcse.csv"

        def nli_check(c: FileCheck):
            c.records, c.paths = len(read_nli(nli)), [c.file]

        files.append(_run(FileCheck(str(nli), "nli"), nli_check))
    if "cc3m" in stages:
        cc3m = Path(cc3m_root) if cc3m_root else data.root / "cc3m"

        def cc3m_check(c: FileCheck):
            pairs = read_cc3m(cc3m)
            c.records, c.paths = len(pairs), [c.file]
            c.images = _open_images(((Path(p), f"{c.file}") for _, p in pairs), open_images)

        files.append(_run(FileCheck(str(cc3m / "chat.json"), "cc3m"), cc3m_check))
    return DataReport(files, root=str(data.root))


def _stat_key(report_paths: Sequence[str], extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in sorted(report_paths):
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}|".encode())
        except OSError:
            h.update(f"{p}|missing|".encode())
    return h.hexdigest()[:16]


def validate_run(cfg, *, open_images: bool = True) -> DataReport | None:
    """:func:`check_data` for what ``cfg`` (a :class:`~umarvel_lib.config.RunConfig`) reads; raises
    :class:`DataError` listing every failing file. A passed check is remembered in
    ``<cache_dir>/data_checks/`` (keyed by the files' sizes and mtimes); then it returns None."""
    cfg.corpus_paths()  # a missing NLI / CC3M corpus: the error names the flag
    root = cfg.resolved_data_root()
    args = dict(
        nli_path=cfg.nli_path,
        cc3m_root=cfg.cc3m_root,
        rows=cfg.eval.rows,
        stages=tuple(cfg.stages),
        pools=tuple(cfg.eval.pools),
        open_images=open_images,
    )
    marker_dir = Path(cfg.cache_dir) / "data_checks"
    ident = {"root": str(Path(root).absolute()), **args}
    pre = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    marker = marker_dir / f"{pre}.json"
    if marker.is_file():
        try:
            m = json.loads(marker.read_text())
            if m.get("key") == _stat_key(m.get("paths", []), ident):
                return None
        except (OSError, ValueError):
            pass
    report = check_data(root, **args)
    report.raise_for_errors()
    paths = [p for f in report.files for p in f.paths]
    atomic_write_json(
        marker,
        {
            "key": _stat_key(paths, ident),
            "paths": paths,
            "files": [asdict(f) | {"paths": None} for f in report.files],
        },
    )
    return report
