"""Every notebook runs through papermill at the smoke preset and writes its table, plots and findings.

This is the end-to-end check of the whole kit (data -> micro backbone -> stages -> evaluation ->
report) on the smoke preset with one seed and every row (``all_rows``: `make reproduce PRESET=smoke`
runs only each table's first finding pair). The batch runner is the same one `make reproduce` uses.
"""
import json
from pathlib import Path

import pandas as pd
import pytest

from umarvel_lib.report.batch import NOTEBOOKS, reproduce

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory, monkeypatch_module):
    work = tmp_path_factory.mktemp("repro")
    monkeypatch_module.chdir(work)  # data/, cache/ and results/ of the run live here
    status = reproduce("smoke", seeds="0", results=str(work / "results" / "smoke"),
                       notebook_dir=ROOT / "notebooks", timeout=900, all_rows=True)
    return work / "results" / "smoke", status


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_every_notebook_executed(smoke_results):
    res, status = smoke_results
    assert [n for n, _ in NOTEBOOKS] == list(status)
    failed = {n: s for n, s in status.items() if s["status"] != "ok"}
    assert not failed, failed
    for name, _ in NOTEBOOKS:
        nb = json.loads((res / "notebooks" / f"{name}.ipynb").read_text())
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("table", [1, 2, 3, 4, 5, 6, 7])
def test_table_outputs_written(smoke_results, table):
    res, _ = smoke_results
    df = pd.read_csv(res / f"table{table}.csv")
    assert len(df) >= 1 and df["ours_local"].notna().any()
    assert (res / f"table{table}.png").stat().st_size > 1000
    assert (res / f"table{table}_curves.png").is_file()
    findings = pd.read_csv(res / f"table{table}_findings.csv")
    assert set(findings.columns) >= {"finding", "verdict", "diff", "ci95_lo", "ci95_hi"}


def test_report_traces_back_to_run_directories(smoke_results):
    res, status = smoke_results
    report = (res / "REPORT.md").read_text()
    assert "of 15 held" in report and "PROVISIONAL" in report and "Wall time per notebook" in report
    # every notebook of this batch is in the wall-time table with its final status, the report's own too
    for name, st in status.items():
        assert f"| {name} | {st['status']} | {st['wall_s']} | {st['finished_at']} |" in report, name
    df = pd.read_csv(res / "table1.csv")
    for _, r in df.iterrows():
        m = json.loads((res / "runs" / "table1" / str(r["id"]) / "seed0" / "eval" / "local" / "metrics.json").read_text())
        assert abs(m["avg"]["headline"] - r["ours_local"]) < 0.01


def test_rerun_skips_finished_rows(smoke_results):
    res, _ = smoke_results
    side = res / "runs" / "table2" / "0" / "seed0" / "row.json"
    before = side.stat().st_mtime_ns
    from umarvel_lib.config import load_ablation
    from umarvel_lib.experiment import run_row

    run_row(load_ablation("table2_instruction_masking"), "0", preset="smoke", seed=0, results=res)
    assert side.stat().st_mtime_ns == before
    # the data build is part of the run's identity (a rebuilt synthetic set must not reuse runs)
    cfg = json.loads(side.read_text())["config"]
    recipe = Path(json.loads(side.read_text())["data_root"]) / "synthetic_meta" / "recipe.json"
    assert cfg["data_digest"] == json.loads(recipe.read_text())["hash"]


def test_parallel_workers_run_each_row_once(smoke_results, tmp_path):
    """`reproduce --jobs 2`: each (row, seed) is one `umarvel run` worker with its own log; a finished
    row is skipped by its config hash (its sidecar is not rewritten)."""
    from umarvel_lib.config import load_ablation
    from umarvel_lib.report.batch import run_jobs

    res, _ = smoke_results
    sides = {r.id: res / "runs" / "table2" / str(r.id) / "seed0" / "row.json" for r in load_ablation("table2").rows}
    before = {k: p.stat().st_mtime_ns for k, p in sides.items()}
    recs = run_jobs([2], preset="smoke", seeds="0", results=res, jobs=2)
    assert sorted(r["row"] for r in recs) == sorted(sides) and all(r["rc"] == 0 for r in recs), recs
    logs = {r["row"]: Path(r["log"]).read_text() for r in recs}
    assert all(": ok (" in t for t in logs.values())
    assert {k: p.stat().st_mtime_ns for k, p in sides.items()} == before
    # again: every row is skipped, its log (of the run that trained it) is kept, the batch is recorded
    again = run_jobs([2], preset="smoke", seeds="0", results=res, jobs=2)
    assert all(r["skipped"] for r in again) and {r["row"]: Path(r["log"]).read_text() for r in again} == logs
    last = json.loads((res / "run_batches.json").read_text())[-1]
    assert (last["runs"], last["skipped"], last["trained"], last["failed"], last["workers"]) == (len(sides), len(sides), 0, 0, 2)
    assert not list((res / "logs").glob(".*.running"))


def test_diagnostic_checks_are_computed_and_reported(smoke_results):
    """Tables 1 and 5 carry diagnostic rows (full fine-tuning; a relative false-negative filter) and
    paired checks on them: computed from the runs, shown in the report, kept out of the findings."""
    from umarvel_lib.config import load_ablation
    from umarvel_lib.report.tables import checks

    res, _ = smoke_results
    for t in ("table1", "table5"):
        ab = load_ablation(t)
        df = checks(res, ab, n_boot=50)
        assert len(df) == len(ab.checks) and (df.n_seeds == 1).all() and df["diff"].notna().all(), df
    report = (res / "REPORT.md").read_text()
    assert report.count("Diagnostic check") == 2
    findings = pd.read_csv(res / "table1_findings.csv")
    assert not findings["note"].fillna("").str.contains("ft").any()  # diagnostic rows are in no finding


def test_smoke_reproduce_runs_one_seed_and_each_tables_first_finding_pair():
    """`make reproduce PRESET=smoke` (a first look in minutes): seed 0 and a finding's two rows per table."""
    from umarvel_lib.config import load_ablation
    from umarvel_lib.paper import FINDINGS
    from umarvel_lib.report.batch import QUICK_PRESETS, default_rows

    assert QUICK_PRESETS["smoke"] == "0"
    for t in range(1, 8):
        ids = {r.id for r in load_ablation(f"table{t}").rows}
        sel = default_rows("smoke", t)
        assert set(sel) <= ids and 1 <= len(sel) <= 2
        pairs = [{f.better, f.worse} for f in FINDINGS if f.table == t]
        assert set(sel) in pairs or (not pairs and len(sel) == 1)
    assert default_rows("cpu", 1) == [] and default_rows("smoke", None) == []
