"""A data root in M-BEIR's on-disk layout (UniIR / TIGER-Lab): which file holds what, its rows, cached reads.

Layout under a data root (docs/mbeir.md)::

    query/{train,union_train,val,test}/mbeir_<dataset>_task<N>_<split>.jsonl
    cand_pool/local/mbeir_<dataset>_task<N>_cand_pool.jsonl      (MSCOCO test: ..._task<N>_test_cand_pool.jsonl)
    cand_pool/global/mbeir_union_{test,train}_cand_pool.jsonl
    instructions/query_instructions.tsv
    qrels/{train,val,test}/mbeir_<dataset>_task<N>_<split>_qrels.txt
    mbeir_images/...

The same reader serves the real benchmark and the synthetic mini-M-BEIR. The records are read and
validated by :mod:`umarvel_lib.data.mbeir_records` (every problem a :class:`MBEIRFormatError`
naming the file and line); the benchmark's ids, tasks and rows are :mod:`umarvel_lib.data.mbeir_rows`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..io import safe_join
from .mbeir_records import (
    Candidate,
    Query,
    format_string,
    load_rgb,
    read_instructions,
    read_pool,
    read_qrels,
    read_queries,
)
from .mbeir_rows import EVAL_ROWS, headline_k, row_name


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
