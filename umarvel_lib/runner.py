"""The batch runner (``umarvel reproduce``): every notebook through papermill, executed copies under ``results/<preset>/notebooks``.

One failed notebook is recorded and the batch goes on; finished (row, seed) runs are skipped by the
notebooks themselves (config-hash sidecars), so a rerun only does what is missing. ``08_report``
always runs last and writes ``REPORT.md``.

With ``jobs > 1`` the (row, seed) runs are first trained by ``jobs`` worker processes (``umarvel run``,
one thread each: on small CPUs two single-thread processes do far more work than one process with
two threads), ordered so that concurrent workers rarely need the same cached stage (a file lock
makes the second one wait and reuse it). The notebooks then find every row done and only collect,
compare and plot.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .io import DamagedFileError, atomic_write_json, read_json, remove_stale_tmp, tmp_prefix

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
# (notebook, paper table it reproduces or None)
NOTEBOOKS = (
    ("00_quickstart", None),
    ("01_embedding_extraction", 1),
    ("02_instruction_masking", 2),
    ("03_progressive_transition", 3),
    ("04_batch_lr_temperature", 4),
    ("05_hard_negatives", 5),
    ("06_distillation", 6),
    ("07_main_results", 7),
    ("08_report", None),
)
KERNEL = "umarvel-kit"


def kernel_name() -> str:
    """The kit's registered kernel when present (``make setup`` registers it), else ``python3``."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        return KERNEL if KERNEL in KernelSpecManager().find_kernel_specs() else "python3"
    except Exception:  # noqa: BLE001
        return "python3"


def select(tables=None) -> list[tuple[str, int | None]]:
    if not tables:
        return list(NOTEBOOKS)
    want = {int(t) for t in tables}
    return [(n, t) for n, t in NOTEBOOKS if t in want or n == "08_report"]


DEFAULT_SEEDS = "0,1,2"  # the table notebooks' default
# `reproduce` without explicit seeds/rows: the smoke preset is a first look in a few minutes (one seed,
# the two rows of each table's first finding, one row for a table without findings); every other
# preset runs every row of every table with the notebooks' seeds.
QUICK_PRESETS = {"smoke": "0"}


# tables of which a preset runs only the rows that a finding compares (the others: `--all-rows`). cpu: the six
# Table 4 rows that no finding compares would each need hundreds of steps of batch 64-256 to reach a dev
# plateau (the cpu budget rule), as much as the rest of the reproduction; the report lists them as not run.
FINDING_ROWS_ONLY = {"cpu": {4}}


def default_rows(preset: str, table: int | None) -> list[str]:
    """Row ids ``reproduce`` runs for ``table`` at ``preset`` by default (``[]``: every row)."""
    if table is None:
        return []
    if table in FINDING_ROWS_ONLY.get(preset, ()):
        from .ablation import load_ablation
        from .paper import finding_rows

        want = finding_rows(table)
        return [r.id for r in load_ablation(f"table{table}").rows if r.id in want]
    if preset not in QUICK_PRESETS:
        return []
    from .ablation import load_ablation
    from .paper import FINDINGS

    for f in FINDINGS:
        if f.table == table and "*" not in (f.better, f.worse):
            return [f.better, f.worse]
    return [load_ablation(f"table{table}").rows[0].id]


def _job_order(table: int, row, seed: int) -> tuple:
    """Rows that one of the paper's findings compares come first, table by table, each row with its
    seeds side by side (parallel workers then share no stage); then the table's other paper rows; the
    diagnostic rows last, seed by seed. A batch cut short still leaves the findings' pairs complete."""
    if row.explain:
        return (2, seed, table)
    return (0 if str(row.id) in _finding_rows(table) else 1, table)


@functools.cache
def _finding_rows(table: int) -> frozenset[str]:
    from .paper import finding_rows

    return frozenset(finding_rows(table))


def job_list(tables, seeds: str, rows: dict[int, list[str]] | None = None) -> list[tuple]:
    """The (table, ablation row, seed) jobs of a batch in the order they run (:func:`_job_order`)."""
    from .ablation import load_ablation

    seed_list = [int(x) for x in str(seeds).split(",") if x.strip()]
    want = rows or {}
    jobs_ = [
        (t, r, s)
        for t in tables
        if t is not None
        for r in load_ablation(f"table{t}").rows
        if not want.get(t) or r.id in want[t]
        for s in seed_list
    ]
    return sorted(jobs_, key=lambda j: _job_order(*j))


def print_estimate(
    tables, *, preset: str, seeds: str, rows: dict | None, workers: int, **paths
) -> None:
    """Print what the batch will cost on this device (:func:`umarvel_lib.cost.estimate_reproduction`);
    ``paths``: the run's backbone, data_root, nli_path, cc3m_root (None: the preset's)."""
    from .ablation import load_ablation
    from .cost import estimate_reproduction

    jobs_ = job_list(tables, seeds, rows)
    runs = [
        (load_ablation(f"table{t}").run_config(r.id, preset, s, **paths), r.reranker)
        for t, r, s in jobs_
    ]
    print(f"estimating the cost of {len(runs)} runs ({preset}) on this device ...", flush=True)
    est = estimate_reproduction(runs, workers=workers)
    print(est.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(
        f"estimate ({preset}, {workers} worker(s)): {est.low_h.sum():.1f} to {est.high_h.sum():.1f} h "
        "(plateau stages stop between their minimum and their cap)",
        flush=True,
    )


def run_jobs(
    tables: list[int],
    *,
    preset: str,
    seeds: str,
    results: Path,
    jobs: int,
    backbone: str | None = None,
    data_root: str | None = None,
    rows: dict[int, list[str]] | None = None,
    nli_path: str | None = None,
    cc3m_root: str | None = None,
) -> list[dict]:
    """Train + evaluate every (table, row, seed) in ``jobs`` single-thread worker processes
    (``rows``: per table, the row ids to run; a table not in it, or with ``[]``, runs every row).

    Each job is ``umarvel run``; its log goes to ``<results>/logs/table<N>-<row>-seed<S>.log``. A
    finished row returns at once (``skipped``: its ``row.json`` is not rewritten) and keeps the log of
    the run that trained it. Jobs are ordered by :func:`_job_order`. Returns one record per job; the
    batch itself (start, end, workers, counts) is appended to ``<results>/run_batches.json``.
    """
    from tqdm.auto import tqdm

    from .experiment import run_dir_for

    todo = [(t, r.id, s) for t, r, s in job_list(tables, seeds, rows)]
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "UMARVEL_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(job):
        t, rid, s = job
        cmd = [
            sys.executable,
            "-m",
            "umarvel_lib.cli",
            "run",
            "--table",
            f"table{t}",
            "--row",
            str(rid),
            "--seed",
            str(s),
            "--preset",
            preset,
            "--results",
            str(results),
        ]
        cmd += ["--backbone", backbone] if backbone else []
        cmd += ["--data-root", data_root] if data_root else []
        cmd += ["--nli-path", nli_path] if nli_path else []
        cmd += ["--cc3m-root", cc3m_root] if cc3m_root else []
        t0, log_file = time.time(), logs / f"table{t}-{rid}-seed{s}.log"
        side = run_dir_for(results, t, rid, s) / "row.json"
        before = side.stat().st_mtime_ns if side.is_file() else None
        tmp_log = log_file.with_name(tmp_prefix(log_file.name) + "running")  # this process's
        with open(tmp_log, "w") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=Path.cwd())
        skipped = (
            rc == 0 and before is not None and side.is_file() and side.stat().st_mtime_ns == before
        )
        if skipped and log_file.is_file():
            tmp_log.unlink()  # keep the log of the run that trained it
        else:
            tmp_log.replace(log_file)
        return {
            "table": t,
            "row": rid,
            "seed": s,
            "rc": rc,
            "skipped": skipped,
            "wall_s": round(time.time() - t0, 1),
            "log": str(log_file),
        }

    done, t_start = [], time.time()
    with (
        ThreadPoolExecutor(max_workers=max(1, jobs)) as pool,
        tqdm(total=len(todo), desc=f"runs ({jobs} workers)", unit="run") as bar,
    ):
        for fut in as_completed([pool.submit(one, j) for j in todo]):
            rec = fut.result()
            done.append(rec)
            bar.update(1)
            if rec["rc"] != 0:
                print(
                    f"table {rec['table']} row {rec['row']} seed {rec['seed']} FAILED (rc {rec['rc']}); log: {rec['log']}"
                )
    _record_batch(
        results,
        {
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "workers": max(1, jobs),
            "runs": len(done),
            "trained": sum(r["rc"] == 0 and not r["skipped"] for r in done),
            "skipped": sum(r["skipped"] for r in done),
            "failed": sum(r["rc"] != 0 for r in done),
            "wall_s": round(time.time() - t_start, 1),
        },
    )
    return done


def _record_batch(results: Path, rec: dict) -> None:
    """Append one training batch to ``<results>/run_batches.json`` (the report's wall-clock record)."""
    f = Path(results) / "run_batches.json"
    try:
        hist = read_json(f) if f.is_file() else []
    except DamagedFileError as e:
        print(f"{e}; starting a new one")
        hist = []
    atomic_write_json(f, hist + [rec])


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def notebook_error(e: BaseException) -> dict:
    """The whole error of a failed notebook: for a cell that raised (papermill's PapermillExecutionError),
    the cell's exception name, value and traceback (without terminal colours); else the exception."""
    ename, evalue = getattr(e, "ename", None), getattr(e, "evalue", None)
    if ename:
        tb = getattr(e, "traceback", None) or []
        return {
            "error": f"{ename}: {evalue}",
            "ename": ename,
            "evalue": evalue,
            "cell": getattr(e, "exec_count", None),
            "traceback": _ANSI.sub("", "\n".join(tb)),
        }
    import traceback

    return {
        "error": f"{type(e).__name__}: {e}",
        "ename": type(e).__name__,
        "evalue": str(e),
        "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__)),
    }


def reproduce(
    preset: str = "cpu",
    *,
    tables=None,
    seeds: str | None = None,
    results: str | None = None,
    backbone: str | None = None,
    data_root: str | None = None,
    timeout: int | None = None,
    notebook_dir: Path = NOTEBOOK_DIR,
    jobs: int = 1,
    train: bool = True,
    all_rows: bool = False,
    notebook_params: dict[str, dict] | None = None,
    nli_path: str | None = None,
    cc3m_root: str | None = None,
    estimate: bool | None = None,
) -> dict:
    """Every notebook of ``tables`` through papermill (``jobs`` > 1: the runs trained by workers first).

    Without ``seeds`` a quick preset (:data:`QUICK_PRESETS`, smoke) runs its own seed; without
    ``all_rows`` each table runs :func:`default_rows` (smoke: one finding's rows; cpu: every row except
    Table 4's, which runs its finding rows); otherwise every row, with ``seeds`` (default: 0,1,2).
    ``notebook_params`` adds parameters to single notebooks, e.g.
    ``{"04_batch_lr_temperature": {"extra_rows": "..."}}``. ``estimate``: print the batch's cost on
    this device first (:func:`print_estimate`; default: for the ``gpu`` preset), ``True``: print it
    and stop."""
    import papermill as pm
    from tqdm.auto import tqdm

    res = Path(results or Path("results") / preset).resolve()
    quick = preset in QUICK_PRESETS and not all_rows
    if seeds is None and quick:
        seeds = QUICK_PRESETS[preset]
    rows = (
        {} if all_rows else {t: default_rows(preset, t) for _, t in select(tables) if t is not None}
    )
    if estimate or (estimate is None and preset == "gpu" and train):
        print_estimate(
            [t for _, t in select(tables)],
            preset=preset,
            seeds=seeds or DEFAULT_SEEDS,
            rows=rows,
            workers=max(1, jobs),
            backbone=backbone,
            data_root=data_root,
            nli_path=nli_path,
            cc3m_root=cc3m_root,
        )
        if estimate:
            return {"estimate": True}
    if jobs > 1 and train:
        t0 = time.time()
        recs = run_jobs(
            [t for _, t in select(tables)],
            preset=preset,
            seeds=seeds or DEFAULT_SEEDS,
            results=res,
            jobs=jobs,
            backbone=backbone,
            data_root=data_root,
            rows=rows,
            nli_path=nli_path,
            cc3m_root=cc3m_root,
        )
        failed = [r for r in recs if r["rc"] != 0]
        skipped = sum(r["skipped"] for r in recs)
        print(
            f"{len(recs) - len(failed)}/{len(recs)} runs ok ({len(recs) - len(failed) - skipped} trained, {skipped} "
            f"skipped as finished) with {jobs} workers in {time.time() - t0:.0f} s"
            + (f"; {len(failed)} failed (the notebooks retry and record them)" if failed else "")
        )
    out_dir = res / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out_dir)  # executed copies of a killed batch
    status_file = res / "batch.json"
    try:
        status = read_json(status_file) if status_file.is_file() else {}
    except DamagedFileError as e:  # a record of earlier batches only: start it again
        print(f"{e}; starting a new one")
        status = {}
    params = {"preset": preset, "results_dir": str(res)}
    if not train:
        params["train"] = False
    if seeds is not None:
        params["seeds"] = seeds
    if backbone:
        params["backbone"] = backbone
    if data_root:
        params["data_root"] = data_root
    if nli_path:
        params["nli_path"] = nli_path
    if cc3m_root:
        params["cc3m_root"] = cc3m_root
    chosen = select(tables)
    kname = kernel_name()
    bar = tqdm(chosen, desc=f"reproduce ({preset})", unit="notebook")
    for name, table in bar:
        bar.set_postfix_str(name)
        src = notebook_dir / f"{name}.ipynb"
        dst = out_dir / f"{name}.ipynb"
        tmp = out_dir / (
            tmp_prefix(name) + "running.ipynb"
        )  # this process's (two batches may share results)
        t0 = time.time()
        try:
            nb_params = {**params, "rows": ",".join(rows[table])} if rows.get(table) else params
            nb_params = {**nb_params, **(notebook_params or {}).get(name, {})}
            pm.execute_notebook(
                str(src),
                str(tmp),
                parameters=nb_params,
                kernel_name=kname,
                progress_bar=False,
                execution_timeout=timeout,
                cwd=str(Path.cwd()),
            )
            tmp.replace(dst)
            status[name] = {"status": "ok", "wall_s": round(time.time() - t0, 1)}
        except Exception as e:  # noqa: BLE001  (one failed notebook does not sink the batch)
            if tmp.is_file():
                tmp.replace(out_dir / f"{name}.FAILED.ipynb")
            status[name] = {
                "status": "failed",
                "wall_s": round(time.time() - t0, 1),
                **notebook_error(e),
                "notebook": str(out_dir / f"{name}.FAILED.ipynb"),
            }
            print(f"notebook {name} FAILED: {status[name]['error']}; continuing")
        status[name]["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_json(status_file, status)
    if status.get("08_report", {}).get("status") == "ok" and any(
        n == "08_report" for n, _ in chosen
    ):
        # 08_report wrote REPORT.md while it ran, so the report's wall-time table still shows its previous
        # run: rewrite it now that every notebook of this batch has its final status
        from .report.report import write_report

        write_report(res, preset)
    failed = [n for n, _ in chosen if status.get(n, {}).get("status") != "ok"]
    print(
        f"reproduce {preset}: {len(chosen) - len(failed)}/{len(chosen)} notebooks ok"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
        + f"; report: {res / 'REPORT.md'}"
    )
    return status
