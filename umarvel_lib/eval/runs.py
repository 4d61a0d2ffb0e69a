"""Run directories: TREC run/qrels files, ``queries.jsonl``, ``metrics.json``, ``config.json``.

(Over 400 lines: one concern, the run-directory format; every writer and reader of its files is here.)

One self-contained directory per pool (``<out>/local/``, ``<out>/global/``)::

    run.trec       qid Q0 did rank score tag       ranks 1..n (n <= depth, 50 by default), best first
    qrels.txt      qid 0 did 1 task_id            M-BEIR qrels format, positives only
    queries.jsonl  {"qid", "row", "task_id", "instruction", "instruction_seed", "scored"}
    metrics.json   {"rows": {row: {"R@1", ..., "headline", "ci95", ...}}, "avg": {...}, ...}
    config.json    everything needed to know what produced the numbers
    headline_hits.json  {row: {"qids", "hits"}}: each scored query's 0/1 hit at its row's headline k
                   (written by the evaluation for every pool; small, committed where run.trec is not)

``qrels.txt`` and ``queries.jsonl`` are the same for every run on one data build (and instruction
seed): a run directory may instead hold ``inputs.ref.json``: for each, a path to one shared copy and its
sha256 (:func:`share_inputs`, :func:`input_file`); readers go through
:func:`input_file`, so both layouts read the same.

The rank column is authoritative: re-scoring (:func:`rescore`) orders each query's candidates by
rank, never by score, so float ties and score formatting cannot change a number. Scores are
written with 9 significant digits (float32 round-trips).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..data.mbeir_records import read_qrels
from ..data.mbeir_rows import ROW_NAMES, headline_k, row_of_query
from ..io import (
    DamagedFileError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_stream,
    atomic_write_text,
    file_sha256,
    read_json,
    read_jsonl,
)
from .metrics import DEFAULT_KS, hits_table, score_rows

RUN_FILE, QRELS_FILE, QUERIES_FILE, METRICS_FILE, CONFIG_FILE = (
    "run.trec",
    "qrels.txt",
    "queries.jsonl",
    "metrics.json",
    "config.json",
)
#: Files that are the same for every run on one data build: a run directory may hold, instead of
#: them, ``inputs.ref.json`` = {file name: {"path": relative path of a shared copy, "sha256": digest}}.
SHAREABLE = (QRELS_FILE, QUERIES_FILE)
INPUTS_REF_FILE = "inputs.ref.json"


class RunFormatError(ValueError):
    """A malformed run directory file; the message starts with ``file:line``."""


# ---- shared inputs: one copy of queries/qrels per data build, referenced by path + sha256 ---------


def input_file(run_dir, name: str) -> Path:
    """``<run_dir>/<name>``, or the shared copy that ``inputs.ref.json`` names for it (sha256 checked).

    Raises FileNotFoundError naming the run directory when neither exists, and RunFormatError
    naming the reference when the shared copy is missing or its digest differs."""
    run_dir = Path(run_dir)
    if (run_dir / name).is_file():
        return run_dir / name
    ref_file = run_dir / INPUTS_REF_FILE
    if not ref_file.is_file():
        raise FileNotFoundError(f"{run_dir}: neither {name} nor {INPUTS_REF_FILE}")
    try:
        ref = read_json(ref_file)[name]
        target, sha = (run_dir / ref["path"]).resolve(), ref["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunFormatError(
            f"{ref_file}: no reference {{'path', 'sha256'}} for {name} ({e!r})"
        ) from None
    if not target.is_file():
        raise RunFormatError(f"{ref_file}: the shared {name} {target} does not exist")
    got = file_sha256(target)
    if got != sha:
        raise RunFormatError(f"{ref_file}: {target} has sha256 {got}, the reference says {sha}")
    return target


def has_input(run_dir, name: str) -> bool:
    """Whether the run directory holds ``name`` or a reference to it."""
    run_dir = Path(run_dir)
    ref = run_dir / INPUTS_REF_FILE
    return (run_dir / name).is_file() or (ref.is_file() and name in read_json(ref))


def share_inputs(run_dir, shared_dir, *, final_dir=None) -> list[str]:
    """Replace the run directory's :data:`SHAREABLE` files by references to one copy in ``shared_dir``.

    The copy is named by content (``<stem>-<sha256[:16]><suffix>``) and written once; the reference's
    path is relative to ``final_dir`` (default ``run_dir``; the final place of a directory being
    built under a temporary name). Returns the names replaced."""
    run_dir, shared_dir = Path(run_dir), Path(shared_dir)
    final_dir = Path(final_dir) if final_dir is not None else run_dir
    ref_file = run_dir / INPUTS_REF_FILE
    refs = read_json(ref_file) if ref_file.is_file() else {}
    done = []
    for name in SHAREABLE:
        f = run_dir / name
        if not f.is_file():
            continue
        sha = file_sha256(f)
        target = shared_dir / f"{Path(name).stem}-{sha[:16]}{Path(name).suffix}"
        if not (target.is_file() and file_sha256(target) == sha):
            atomic_write_bytes(target, f.read_bytes())
        refs[name] = {"path": os.path.relpath(target.resolve(), final_dir.resolve()), "sha256": sha}
        done.append(name)
    if done:
        atomic_write_json(ref_file, refs)
        for name in done:
            (run_dir / name).unlink()
    return done


# ---- TREC run -------------------------------------------------------------------------------------


def _check_tag(tag: str) -> str:
    if any(c.isspace() for c in tag) or not tag:
        raise ValueError(f"run tag {tag!r} must be a non-empty word without spaces")
    return tag


def ranked_lines(qid: str, ranked: Iterable[tuple[str, float]], tag: str) -> Iterable[str]:
    """TREC lines of one query's ranking ``[(did, score), ...]`` (best first): ranks 1, 2, ..."""
    _check_tag(tag)
    for rank, (did, score) in enumerate(ranked, 1):
        yield f"{qid} Q0 {did} {rank} {float(score):.9g} {tag}\n"


def trec_lines(
    qids: Sequence[str],
    indices: np.ndarray,
    scores: np.ndarray,
    dids: Sequence[str],
    tag: str,
    depth: int | None = None,
) -> Iterable[str]:
    """TREC lines for a top-k result: ``qid Q0 did rank score tag``. Empty slots (index -1) are dropped."""
    _check_tag(tag)
    depth = depth or indices.shape[1]
    for qid, idx_row, sc_row in zip(qids, indices, scores):
        kept = [(dids[i], s) for i, s in zip(idx_row[:depth], sc_row[:depth]) if i >= 0]
        yield from ranked_lines(qid, kept, tag)


def write_run(path, lines: Iterable[str]) -> Path:
    """Stream TREC ``lines`` to ``path`` atomically (:func:`umarvel_lib.io.atomic_write_stream`)."""
    return atomic_write_stream(path, lines)


def read_run(path) -> dict[str, list[tuple[str, float]]]:
    """``{qid: [(did, score), ...]}`` ordered by the rank column (1 first)."""
    path = Path(path)
    tmp: dict[str, list[tuple[int, str, float]]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            p = line.split()
            if len(p) != 6:
                raise RunFormatError(
                    f"{path}:{n}: expected 'qid Q0 did rank score tag', got {line.strip()!r}"
                )
            try:
                tmp.setdefault(p[0], []).append((int(p[3]), p[2], float(p[4])))
            except ValueError:
                raise RunFormatError(
                    f"{path}:{n}: rank/score not numeric in {line.strip()!r}"
                ) from None
    out = {}
    for qid, lst in tmp.items():
        lst.sort(key=lambda t: t[0])
        ranks = [t[0] for t in lst]
        if len(set(ranks)) != len(ranks):
            raise RunFormatError(f"{path}: query {qid} has duplicate ranks")
        out[qid] = [(d, s) for _, d, s in lst]
    return out


def ranked_dids(run: Mapping[str, list[tuple[str, float]]]) -> dict[str, list[str]]:
    return {q: [d for d, _ in lst] for q, lst in run.items()}


# ---- qrels / queries ------------------------------------------------------------------------------


def write_qrels(path, qrels: Mapping[str, set[str]], task_of: Mapping[str, int]) -> Path:
    """M-BEIR qrels (``qid 0 did 1 task_id``), positives only, qids in the given mapping's order."""
    lines = []
    for qid, dids in qrels.items():
        for did in sorted(dids):
            lines.append(f"{qid} 0 {did} 1 {task_of[qid]}\n")
    return atomic_write_text(path, "".join(lines))


def write_queries(path, records: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_queries(path) -> list[dict]:
    return read_jsonl(path)


def _qrels_task_ids(path) -> dict[str, int]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            p = line.split()
            if not p:
                continue
            if len(p) != 5:
                raise RunFormatError(
                    f"{path}:{n}: qrels line has no task_id column; cannot infer the row"
                )
            out.setdefault(p[0], int(p[4]))
    return out


# ---- scoring and tables ---------------------------------------------------------------------------


def rescore(
    run_dir, *, ks: Sequence[int] | None = None, n_boot: int | None = None, seed: int | None = None
) -> dict:
    """Recompute ``metrics.json`` from ``run.trec`` + ``qrels.txt`` of a run directory.

    The query universe and each query's row come from ``queries.jsonl`` when present (so queries
    absent from the run count as misses and queries without positives are counted as skipped);
    otherwise from the qrels (row = dataset prefix of the qid + task_id column). ``ks``, ``n_boot``
    and ``seed`` default to those recorded in ``metrics.json``/``config.json``.
    """
    run_dir = Path(run_dir)
    prev = {}
    if (run_dir / METRICS_FILE).is_file():
        prev = read_json(run_dir / METRICS_FILE)
    boot = prev.get("bootstrap", {})
    ks = ks or prev.get("ks") or DEFAULT_KS
    n_boot = n_boot if n_boot is not None else boot.get("n", 1000)
    seed = seed if seed is not None else boot.get("seed", 0)
    run = ranked_dids(read_run(run_dir / RUN_FILE))
    qrels = read_qrels(input_file(run_dir, QRELS_FILE))
    row_qids: dict[str, list[str]] = {}
    if has_input(run_dir, QUERIES_FILE):
        for r in read_queries(input_file(run_dir, QUERIES_FILE)):
            row_qids.setdefault(r["row"], []).append(r["qid"])
    else:
        for qid, task in _qrels_task_ids(input_file(run_dir, QRELS_FILE)).items():
            row_qids.setdefault(row_of_query(qid, task), []).append(qid)
    out = score_rows(run, qrels, row_qids, ks=ks, n_boot=n_boot, seed=seed)
    for key in ("pool", "paper_table", "split", "instruction_seed"):
        if key in prev:
            out[key] = prev[key]
    return out


def wrong_modality_rate(run_dir, modality_of: Mapping[str, str], *, k: int = 5) -> dict:
    """How often a query's top ``k`` holds candidates of the wrong modality (a diagnostic of the global pool).

    For every scored query of the run directory (``queries.jsonl``), the fraction of its top-``k``
    candidates whose modality (``modality_of[did]``, e.g. from the global pool file) differs from the
    query's target modality (the task's candidate modality, ``TASKS[task_id][1]``). In M-BEIR's
    global pool the rows of one dataset hold the same items in several modalities (MSCOCO's images
    and their captions), and a query without an instruction drifts to its twin in the wrong
    modality: this rate shows that confusion, which instructions fix (the paper's T2a).

    Returns ``{"k", "rate", "n_queries", "rows": {row: rate}}``: rates in percent, ``rate`` over all
    top-``k`` slots of all scored queries (a query with fewer than ``k`` results counts the ones it has).
    """
    from ..data.mbeir_rows import TASKS

    run_dir = Path(run_dir)
    run = ranked_dids(read_run(run_dir / RUN_FILE))
    wrong: dict[str, list[int]] = {}  # row -> [wrong slots, slots, queries]
    for q in read_queries(input_file(run_dir, QUERIES_FILE)):
        if not q.get("scored", True):
            continue
        target = TASKS[int(q["task_id"])][1]
        top = run.get(q["qid"], [])[:k]
        missing = [d for d in top if d not in modality_of]
        if missing:
            raise KeyError(
                f"{run_dir / RUN_FILE}: candidate(s) {missing[:3]} of query {q['qid']} have no known "
                f"modality (a run made with another pool?)"
            )
        w = wrong.setdefault(q["row"], [0, 0, 0])
        w[0] += sum(modality_of[d] != target for d in top)
        w[1] += len(top)
        w[2] += 1
    if not wrong:
        raise ValueError(f"{run_dir / QUERIES_FILE}: no scored query")
    total = [sum(v[i] for v in wrong.values()) for i in range(3)]
    return {
        "k": k,
        "rate": round(100 * total[0] / max(1, total[1]), 4),
        "n_queries": total[2],
        "rows": {r: round(100 * a / max(1, b), 4) for r, (a, b, _) in wrong.items()},
    }


def load_metrics(run_dir) -> dict:
    return read_json(Path(run_dir) / METRICS_FILE)


def metrics_frame(sources) -> pandas.DataFrame:  # noqa: F821
    """Tidy table of one or more evaluations for notebooks.

    ``sources``: a run directory, an evaluation output directory (with ``local/``/``global/``
    subdirectories), a metrics dict, or a list of those. Columns: ``row, pool, metric, value,
    ci_lo, ci_hi, n_queries`` (values in percent; ``metric`` is ``R@k`` or ``headline``; the Avg is
    row ``avg``).
    """
    import pandas as pd

    if isinstance(sources, (str, Path, dict)):
        sources = [sources]
    metrics: list[dict] = []
    for s in sources:
        if isinstance(s, dict):
            metrics.append(s)
            continue
        p = Path(s)
        if (p / METRICS_FILE).is_file():
            metrics.append(load_metrics(p))
        else:
            subs = (
                [d for d in sorted(p.iterdir()) if (d / METRICS_FILE).is_file()]
                if p.is_dir()
                else []
            )
            if not subs:
                raise FileNotFoundError(f"no {METRICS_FILE} in {p} or its subdirectories")
            metrics.extend(load_metrics(d) for d in subs)
    recs = []
    for m in metrics:
        pool = m.get("pool")
        for row, e in m["rows"].items():
            for met, ci in e["ci95_by_metric"].items():
                recs.append((row, pool, met, e[met], ci[0], ci[1], e["n_queries"]))
            recs.append(
                (row, pool, "headline", e["headline"], e["ci95"][0], e["ci95"][1], e["n_queries"])
            )
        a = m["avg"]
        for k in m.get("ks", DEFAULT_KS):
            recs.append(("avg", pool, f"R@{k}", a[f"R@{k}"], np.nan, np.nan, m["n_queries"]))
        recs.append(
            ("avg", pool, "headline", a["headline"], a["ci95"][0], a["ci95"][1], m["n_queries"])
        )
    df = pd.DataFrame.from_records(
        recs, columns=["row", "pool", "metric", "value", "ci_lo", "ci_hi", "n_queries"]
    )
    row_order = {r: i for i, r in enumerate(ROW_NAMES + ("avg",))}
    met_order = {m: (int(m[2:]) if m.startswith("R@") else 10**6) for m in df.metric.unique()}
    df = df.assign(
        _p=df.pool.map({"local": 0, "global": 1}).fillna(2),
        _r=df.row.map(row_order).fillna(len(row_order)),
        _m=df.metric.map(met_order),
    )
    return (
        df.sort_values(["_p", "_r", "row", "_m"], kind="stable")
        .drop(columns=["_p", "_r", "_m"])
        .reset_index(drop=True)
    )


def write_metrics(path, metrics: dict) -> Path:
    return atomic_write_json(path, metrics)


# ---- per-query headline hits: what the paired statistics of the report resample ----------------
HITS_FILE = "headline_hits.json"


def headline_hits(run_dir) -> dict[str, tuple[list[str], np.ndarray]]:
    """{row: (qids, 0/1 hits at the row's headline k)} from ``run.trec`` + ``qrels.txt`` + ``queries.jsonl``
    (the latter two in the run directory or referenced, :func:`input_file`).

    The result is kept beside them as ``headline_hits.json`` (small, committed with results), so
    verdicts can be recomputed where the large ``run.trec`` is not kept.
    """
    run_dir = Path(run_dir)
    cached = run_dir / HITS_FILE
    if cached.is_file() and (
        not (run_dir / RUN_FILE).is_file()
        or cached.stat().st_mtime >= (run_dir / RUN_FILE).stat().st_mtime
    ):
        try:
            d = read_json(cached)
            return {
                row: (v["qids"], np.array([float(c) for c in v["hits"]])) for row, v in d.items()
            }
        except (DamagedFileError, KeyError, TypeError, AttributeError, ValueError) as e:
            if not (run_dir / RUN_FILE).is_file():
                raise DamagedFileError(
                    f"{cached}: damaged ({e}) and no {RUN_FILE} to rebuild it from"
                ) from None
            # rebuilt from the run file below
    out = _hits_from_run(run_dir)
    atomic_write_json(
        cached,
        {
            row: {"qids": q, "hits": "".join(str(int(h)) for h in hits)}
            for row, (q, hits) in out.items()
        },
        indent=None,
    )
    return out


def _hits_from_run(run_dir: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    run = ranked_dids(read_run(run_dir / RUN_FILE))
    qrels = read_qrels(input_file(run_dir, QRELS_FILE))
    rows: dict[str, list[str]] = {}
    for r in read_queries(input_file(run_dir, QUERIES_FILE)):
        if r.get("scored", True):
            rows.setdefault(r["row"], []).append(r["qid"])
    out = {}
    for row, qids in rows.items():
        hits, scored, _ = hits_table(
            run, qrels, qids, [headline_k(row)]
        )  # the metrics' own hit rule
        out[row] = (scored, hits[:, 0])
    return out
