"""Tables and plots of reproduced results next to the paper's, read from run directories.

(Over 400 lines: one concern, a table of runs beside the paper; the figures are in report/figures.py.)

Reads ``<results>/runs/table<N>/<row>/seed<k>/row.json`` sidecars and their ``eval/<pool>/``
run directories; imports no model code. The paper's numbers come from :mod:`umarvel_lib.paper`
and appear only in the ``paper_*`` columns.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..ablation import Ablation
from ..data.mbeir_rows import ROW_NAMES
from ..eval.plateau import MIN_STEPS
from ..eval.runs import HITS_FILE, RunFormatError, headline_hits
from ..io import DamagedFileError, read_json
from ..paper import FINDINGS_BY_ID, PROVISIONAL, paper_row, provenance
from .curves import plateau_miss
from .findings import VERDICTS, judge

log = logging.getLogger(__name__)

FINDING_COLUMNS = (
    "finding",
    "claim",
    "pool",
    "verdict",
    "diff",
    "ci95_lo",
    "ci95_hi",
    "detectable_effect",
    "n_seeds",
    "note",
)  # one row per finding and pool: what tables.checks returns and REPORT.md shows
VERDICT_ORDER = VERDICTS  # the report lists verdict counts in this order


def sidecars(results, table: int | None = None) -> list[dict]:
    """The runs' ``row.json`` sidecars (a damaged one is skipped: :func:`problems` lists it)."""
    base = Path(results) / "runs"
    pattern = f"table{table}/*/seed*/row.json" if table is not None else "table*/*/seed*/row.json"
    out = []
    for f in sorted(base.glob(pattern)):
        try:
            d = read_json(f)
        except DamagedFileError:
            continue
        d["run_dir"] = str(f.parent)
        out.append(d)
    return out


def _metrics(run_dir: str, pool: str) -> dict | None:
    f = Path(run_dir) / "eval" / pool / "metrics.json"
    try:
        return read_json(f) if f.is_file() else None
    except DamagedFileError:  # listed by problems()
        return None


def problems(results) -> list[dict]:
    """What the report must say before any table: runs that failed (``FAILED.json``, written by
    ``experiment.run_row`` with the whole error) and damaged result files (skipped by every table; the
    row reruns on the next ``reproduce``/notebook run). One record per problem: table, row, seed,
    kind, file, error."""
    base = Path(results) / "runs"
    out = []
    for f in sorted(base.glob("table*/*/seed*/FAILED.json")):
        rec = {
            "table": f.parts[-4][5:],
            "row": f.parts[-3],
            "seed": f.parts[-2][4:],
            "kind": "failed",
            "file": str(f),
        }
        try:
            d = read_json(f)
            rec["error"] = d.get("error", "")
        except DamagedFileError as e:
            rec["error"] = str(e)
        out.append(rec)
    for f in sorted(
        list(base.glob("table*/*/seed*/row.json"))
        + list(base.glob("table*/*/seed*/eval/*/metrics.json"))
    ):
        try:
            read_json(f)
        except DamagedFileError as e:
            rd = f.parent if f.name == "row.json" else f.parents[2]
            out.append(
                {
                    "table": rd.parts[-3][5:],
                    "row": rd.parts[-2],
                    "seed": rd.parts[-1][4:],
                    "kind": "damaged",
                    "file": str(f),
                    "error": str(e),
                }
            )
    return out


def runs_frame(results, table: int | None = None) -> pd.DataFrame:
    """One line per (row, seed, pool): Avg headline (percent), its CI over queries, status, wall time, tau."""
    recs = []
    for s in sidecars(results, table):
        for pool in ("local", "global"):
            m = _metrics(s["run_dir"], pool) if s.get("status") == "ok" else None
            if m is None and s.get("status") == "ok":
                continue
            recs.append(
                {
                    "table": s["table"],
                    "row": str(s["row"]),
                    "label": s.get("label"),
                    "seed": s["seed"],
                    "pool": pool,
                    "status": s.get("status"),
                    "avg": None if m is None else m["avg"]["headline"],
                    "ci_lo": None if m is None else m["avg"]["ci95"][0],
                    "ci_hi": None if m is None else m["avg"]["ci95"][1],
                    "tau": s.get("tau"),
                    "wall_s": s.get("wall_s"),
                    "hash": s.get("hash"),
                    "git": s.get("git"),
                    "run_dir": s["run_dir"],
                }
            )
    return pd.DataFrame.from_records(
        recs,
        columns=[
            "table",
            "row",
            "label",
            "seed",
            "pool",
            "status",
            "avg",
            "ci_lo",
            "ci_hi",
            "tau",
            "wall_s",
            "hash",
            "git",
            "run_dir",
        ],
    )


def per_task_frame(results, table: int, pool: str = "local") -> pd.DataFrame:
    """Per dataset-task headline metric, mean over seeds, one column per ablation row."""
    recs = []
    for s in sidecars(results, table):
        m = _metrics(s["run_dir"], pool) if s.get("status") == "ok" else None
        if m:
            for name, e in m["rows"].items():
                recs.append(
                    {
                        "row": str(s["row"]),
                        "seed": s["seed"],
                        "task": name,
                        "headline": e["headline"],
                    }
                )
    df = pd.DataFrame.from_records(recs, columns=["row", "seed", "task", "headline"])
    if df.empty:
        return df
    return df.groupby(["task", "row"])["headline"].mean().unstack("row")


def table_vs_paper(results, ablation: Ablation) -> pd.DataFrame:
    """Per ablation row: the paper's Local/Global Avg beside ours (mean +- sd over seeds), with deltas."""
    runs = runs_frame(results, ablation.table)
    recs = []
    for r in ablation.rows:
        try:
            p = (
                paper_row(ablation.table, r.paper_key)
                if ablation.table <= 6 and not r.own
                else None
            )
        except KeyError:
            p = None
        rec = {"id": r.id, "row": r.label + (" (yours)" if r.own else "")}
        for pool in ("local", "global"):
            sub = runs[(runs.row == r.id) & (runs.pool == pool)] if not runs.empty else runs
            ok = sub[sub.status == "ok"] if not sub.empty else sub
            vals = ok["avg"].astype(float).to_numpy() if not ok.empty else np.array([])
            paper_v = None if p is None else p[pool]
            if ablation.table == 7 and not r.own:
                paper_v = _main_table_avg(pool)
            rec[f"paper_{pool}"] = (
                paper_v
                if paper_v is not None
                else (None if p is None else p[f"{pool}_raw"] or None)
            )
            rec[f"ours_{pool}"] = round(float(vals.mean()), 2) if len(vals) else None
            rec[f"ours_{pool}_sd"] = round(float(vals.std(ddof=1)), 2) if len(vals) > 1 else None
            rec[f"delta_{pool}"] = (
                round(rec[f"ours_{pool}"] - paper_v, 2)
                if rec[f"ours_{pool}"] is not None and isinstance(paper_v, float)
                else None
            )
            rec[f"n_seeds_{pool}"] = len(vals)
            if not sub.empty and (sub.status == "diverged").any():
                rec[f"ours_{pool}"] = rec[f"ours_{pool}"] if len(vals) else "diverged"
        recs.append(rec)
    df = pd.DataFrame.from_records(recs)
    if "global" not in ablation.pools:
        df = df[[c for c in df.columns if "global" not in c]]
    return df


def _main_table_avg(pool: str) -> float:
    from ..paper import load_table

    df = load_table(7 if pool == "local" else 8)
    row = df[df["Method"].str.startswith("U-MARVEL(Qwen2VL-7B")].iloc[0]
    return float(row["Avg."])


def hits_by_row(results, table: int, pool: str) -> tuple[dict, set[str]]:
    """{row_id: {seed: headline_hits}} for finished runs, and the ids of rows that diverged."""
    out: dict[str, dict[int, dict]] = {}
    diverged = set()
    for s in sidecars(results, table):
        if s.get("status") == "diverged":
            diverged.add(str(s["row"]))
            continue
        d = Path(s["run_dir"]) / "eval" / pool
        if (d / "run.trec").is_file() or (
            d / HITS_FILE
        ).is_file():  # a clone keeps only the hits file
            try:
                hits = headline_hits(d)
            except (
                DamagedFileError,
                RunFormatError,
                OSError,
            ) as e:  # that run is left out, with its path
                log.warning("%s: left out of the findings (%s)", d, e)
                continue
            out.setdefault(str(s["row"]), {})[int(s["seed"])] = hits
    return out, diverged


def unconverged_runs(results, table: int) -> dict[str, dict[int, str]]:
    """{row_id: {seed: why}} for the finished runs of a table that did not train every stage to a
    plateau of its dev curve, with at least ``MIN_STEPS`` steps per stage (:func:`curves.plateau_miss`)."""
    out: dict[str, dict[int, str]] = {}
    for s in sidecars(results, table):
        if s.get("status") != "ok":
            continue
        why = plateau_miss(s["run_dir"], min_steps=MIN_STEPS)
        if why:
            out.setdefault(str(s["row"]), {})[int(s["seed"])] = why
    return out


def verdicts(results, ablation: Ablation, *, n_boot: int = 1000) -> pd.DataFrame:
    """One line per paper finding of this table, with its verdict and statistics (a finding whose
    runs did not all train to a plateau gets no verdict: *not at plateau*)."""
    recs = []
    unconverged = unconverged_runs(results, ablation.table)
    for fid in ablation.findings:
        f = FINDINGS_BY_ID[fid]
        pool = f.pool if f.pool in ablation.pools else ablation.pools[0]
        hits, div = hits_by_row(results, ablation.table, pool)
        paper_rows = {
            r.id for r in ablation.rows if not r.explain
        }  # diagnostic rows are in no finding
        v = judge(
            f,
            {k: h for k, h in hits.items() if k in paper_rows},
            n_boot=n_boot,
            diverged=div,
            unconverged=unconverged,
        )
        v.pool = pool
        recs.append(v.as_dict())
    return pd.DataFrame.from_records(
        recs,
        columns=list(FINDING_COLUMNS),
    )


def checks(
    results, ablation: Ablation, *, pool: str | None = None, n_boot: int = 1000
) -> pd.DataFrame:
    """The ablation's named ``checks`` (YAML ``checks.pairs``: row A minus row B), each paired over
    the seeds both finished and bootstrapped over queries, e.g. Table 1's mean-vs-last gap of the
    causal rows under LoRA and under full fine-tuning (why T1b does or does not show)."""
    from .findings import paired_difference

    pool = pool or ablation.pools[0]
    hits, _ = hits_by_row(results, ablation.table, pool)
    recs = []
    for name, (a, b) in ablation.checks.items():
        seeds = sorted(set(hits.get(a, {})) & set(hits.get(b, {})))
        rec = {
            "check": name,
            "row_a": a,
            "row_b": b,
            "pool": pool,
            "n_seeds": len(seeds),
            "diff": None,
            "ci95_lo": None,
            "ci95_hi": None,
        }
        if seeds:
            d, (lo, hi), _ = paired_difference(
                [hits[a][s] for s in seeds], [hits[b][s] for s in seeds], n_boot=n_boot
            )
            rec.update(diff=round(d, 2), ci95_lo=round(lo, 2), ci95_hi=round(hi, 2))
        recs.append(rec)
    return pd.DataFrame.from_records(
        recs, columns=["check", "row_a", "row_b", "pool", "n_seeds", "diff", "ci95_lo", "ci95_hi"]
    )


WRONG_MODALITY_FILE = (
    "wrong_modality.json"  # kept beside a global run (small, committed like headline_hits)
)


def wrong_modality(results, table: int, *, k: int = 5) -> pd.DataFrame:
    """The wrong-modality rate of the global top-``k`` per row of a table (mean over seeds, percent),
    with whether the row uses instructions: :func:`umarvel_lib.eval.runs.wrong_modality_rate` on each
    run's global pool, over all rows, over the rows built from a shared item set (M-BEIR's twins:
    VisualNews/MSCOCO/Fashion200K 0/3, OVEN/INFOSEEK 6/8) and over the others. Computed from
    ``run.trec`` with the candidates' modalities from the run's data root, and kept as
    ``wrong_modality.json`` so a clone without ``run.trec`` still shows it. Runs made with another
    build of the data than the one now at their data root are left out (counted in ``not_current``)."""
    from ..data.mbeir import MBEIR
    from ..data.synthetic_rows import TWINS
    from ..eval.runs import RUN_FILE, wrong_modality_rate
    from ..io import DigestCache, atomic_write_json

    twin_rows = {n for n in ROW_NAMES if n.split("_task")[0] in {d.lower() for d in TWINS}}
    modality_of: dict[str, dict[str, str]] = {}
    recs = []
    for sc in sidecars(results, table):
        d = Path(sc["run_dir"]) / "eval" / "global"
        cached = d / WRONG_MODALITY_FILE
        rec = {
            "row": str(sc["row"]),
            "label": sc.get("label"),
            "seed": sc["seed"],
            "instructions": sc["config"]["embedder"]["instructions"],
            "rate": None,
            "not_current": 0,
        }
        w = read_json(cached) if cached.is_file() else None
        if w is not None and (
            w.get("k") != k
            or (
                (d / RUN_FILE).is_file() and (d / RUN_FILE).stat().st_mtime > cached.stat().st_mtime
            )
        ):
            w = None  # another k, or a newer run.trec
        if w is None and (d / RUN_FILE).is_file():
            root = sc["data_root"]
            dd = sc["config"].get("data_digest")
            store = DigestCache(
                Path(sc["config"].get("cache_dir") or "cache") / "file_digests.sqlite"
            )
            if not isinstance(dd, dict) or store.tree_digest(
                root, exclude=("nli", "cc3m")
            ) != dd.get("mbeir"):
                rec["not_current"] = 1
            else:
                if root not in modality_of:
                    modality_of[root] = {
                        c.did: c.modality for c in MBEIR(root, check_images=False).global_pool()
                    }
                w = wrong_modality_rate(d, modality_of[root], k=k)
                atomic_write_json(cached, w)
        if w is not None:
            rec.update(
                rate=w["rate"],
                twin_rows=float(
                    np.mean([v for r, v in w["rows"].items() if r in twin_rows] or [np.nan])
                ),
                other_rows=float(
                    np.mean([v for r, v in w["rows"].items() if r not in twin_rows] or [np.nan])
                ),
            )
        recs.append(rec)
    cols = [
        "row",
        "label",
        "instructions",
        "n_seeds",
        f"wrong_modality_top{k}",
        "twin_rows",
        "other_rows",
        "not_current",
    ]
    df = pd.DataFrame.from_records(
        recs,
        columns=[
            "row",
            "label",
            "seed",
            "instructions",
            "rate",
            "twin_rows",
            "other_rows",
            "not_current",
        ],
    )
    if df.empty:
        return pd.DataFrame(columns=cols)
    out = (
        df.groupby(["row", "label", "instructions"], sort=False)
        .agg(
            n_seeds=("rate", "count"),
            rate=("rate", "mean"),
            twin_rows=("twin_rows", "mean"),
            other_rows=("other_rows", "mean"),
            not_current=("not_current", "sum"),
        )
        .reset_index()
    )
    return out.rename(columns={"rate": f"wrong_modality_top{k}"})[cols].round(2)


def provenance_note(table: int) -> str:
    note = provenance(table)
    if table in PROVISIONAL:
        note += " — paper numbers are provisional."
    return note


def verdict_counts(vdf: pd.DataFrame) -> dict[str, int]:
    return {k: int((vdf.verdict == k).sum()) for k in VERDICT_ORDER}
