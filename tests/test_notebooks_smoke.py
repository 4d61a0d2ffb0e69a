"""Every notebook runs through papermill at the smoke preset and writes its table, plots and findings.

This is the end-to-end check of the whole kit (data -> micro backbone -> stages -> evaluation ->
report) on the smoke preset with one seed and every row (``all_rows``: `make reproduce PRESET=smoke`
runs only each table's first finding pair). The batch runner is the same one `make reproduce` uses.
"""

import json
from pathlib import Path

import pandas as pd
import pytest

from umarvel_lib.runner import NOTEBOOKS, reproduce

ROOT = Path(__file__).resolve().parents[1]
# a reader's own row on one notebook (Table 4: one M-BEIR stage, the cheapest to train)
EXTRA_ROWS = '{"my_tau": {"label": "tau 0.02 from the start", "overrides": {"embedder.temperature_init": 0.02}}}'


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory, monkeypatch_module):
    work = tmp_path_factory.mktemp("repro")
    monkeypatch_module.chdir(work)  # data/, cache/ and results/ of the run live here
    status = reproduce(
        "smoke",
        seeds="0",
        results=str(work / "results" / "smoke"),
        notebook_dir=ROOT / "notebooks",
        timeout=900,
        all_rows=True,
        notebook_params={"04_batch_lr_temperature": {"extra_rows": EXTRA_ROWS}},
    )
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
        # the executed copies keep their figures (PNG at moderate size), and no cell failed
        pngs = [
            o["data"]["image/png"]
            for c in nb["cells"]
            for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})
        ]
        assert pngs, name
        assert all(len(p) < 400_000 for p in pngs), name


def test_extra_row_appears_in_its_table_and_figure(smoke_results):
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.report import figures

    res, _ = smoke_results
    mine = pd.read_csv(res / "table4_yours.csv").set_index("id").loc["my_tau"]
    assert (
        "(yours)" in mine["row"]
        and mine["ours_local"] == mine["ours_local"]
        and pd.isna(mine["paper_local"])
    )
    assert "my_tau" not in set(
        pd.read_csv(res / "table4.csv")["id"]
    )  # the paper-only table stays as it was
    side = json.loads((res / "runs" / "table4" / "my_tau" / "seed0" / "row.json").read_text())
    assert side["status"] == "ok" and side["config"]["embedder"]["temperature_init"] == 0.02
    ab = load_ablation("table4").with_extra_rows(EXTRA_ROWS)
    diff = figures.differences(res, ab, n_boot=20)
    assert diff.set_index("id").loc["my_tau", "n_seeds"] == 1
    fig = figures.plot_differences(diff, "t", "0")
    assert any(
        "my_tau" in t.get_text() and "(yours)" in t.get_text()
        for t in fig.axes[0].get_yticklabels()
    )
    nb = (res / "notebooks" / "04_batch_lr_temperature.ipynb").read_text()
    assert "tau 0.02 from the start (yours)" in nb  # in the executed notebook's table
    assert (res / "table4_yours.png").stat().st_size > 1000


def test_bad_extra_rows_fail_the_notebook_naming_the_key(smoke_results, tmp_path):
    import papermill as pm

    from umarvel_lib.runner import kernel_name

    res, _ = smoke_results
    bad = '{"mine": {"overrides": {"stage.mbeir.temprature": 0.02}}}'
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(
            str(ROOT / "notebooks" / "03_progressive_transition.ipynb"),
            str(tmp_path / "bad.ipynb"),
            parameters={
                "preset": "smoke",
                "results_dir": str(res),
                "extra_rows": bad,
                "train": False,
            },
            kernel_name=kernel_name(),
            progress_bar=False,
            cwd=str(Path.cwd()),
        )
    assert "stage.mbeir.temprature" in str(e.value) and "stage.mbeir.lr" in str(e.value)


def test_saved_figures_have_no_overlapping_tick_labels(smoke_results):
    """Every per-table figure and the forest plot, rebuilt from the smoke results as they were saved."""
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.report import figures
    from umarvel_lib.report.tables import table_vs_paper, verdicts

    res, _ = smoke_results
    abls = [load_ablation(f"table{t}") for t in range(1, 8)]
    for ab in abls:
        assert (res / f"table{ab.table}.png").is_file() and (
            res / f"table{ab.table}_curves.png"
        ).is_file()
        fig = figures.plot_differences(
            figures.differences(res, ab, n_boot=20),
            f"Table {ab.table}: {ab.title} (smoke)",
            f"{ab.baseline.id}: {ab.baseline.label}",
        )
        assert figures.overlapping_tick_labels(fig) == [], ab.table
        assert figures.overlapping_tick_labels(figures.plot_curves(res, ab.table)) == [], ab.table
    vall = pd.concat([verdicts(res, ab, n_boot=20) for ab in abls if ab.findings])
    ff = figures.findings_frame(vall, {ab.table: table_vs_paper(res, ab) for ab in abls})
    assert (
        figures.overlapping_tick_labels(figures.plot_findings(ff, "The paper's findings (smoke)"))
        == []
    )
    assert (res / "findings.png").stat().st_size > 1000
    report = (res / "REPORT.md").read_text()
    assert report.index("](findings.png)") < report.index("## Summary")


def test_table6_rows_record_the_reranker_accuracy_and_the_teacher_agreement(smoke_results):
    """The mechanisms' own artefacts (train.mechanisms) in each Table 6 run's row.json where the row used
    them, in notebook 06 and in the report."""
    from umarvel_lib.report.recipe import mechanism_artefacts

    res, _ = smoke_results
    side = {
        r: json.loads((res / "runs" / "table6" / r / "seed0" / "row.json").read_text())
        for r in ("baseline", "reranker", "distillation", "continue_hard")
    }
    for r in ("reranker", "distillation"):  # a reranked evaluation; the KL teacher's reranker
        acc = side[r]["reranker_accuracy"]
        assert acc["split"] == "val" and acc["n_queries"] > 0 and acc["n_pairs"] > 0, r
        assert 0 <= acc["pairwise"] <= 100 and 0 <= acc["pointwise"] <= 100, r
    assert side["reranker"]["reranker_accuracy"] == side["distillation"]["reranker_accuracy"]
    ag = side["distillation"]["teacher_agreement"]
    assert ag["n_queries"] > 0 and ag["tau"] > 0
    assert 0 <= ag["top1_positive"] <= ag["list_has_positive"] <= 100
    assert 0 <= ag["mass_on_positives"] <= ag["list_has_positive"] <= 100
    for r in ("baseline", "continue_hard"):  # no reranker, no teacher
        assert "teacher_agreement" not in side[r] and "reranker_accuracy" not in side[r], r
    for r in side:  # every row ran the hard-negative stage: its mining report is in row.json
        m = side[r]["mining"]
        assert m["retrieved"] >= m["survived"] >= m["used"] >= 0 and m["num_queries"] > 0, r
    df = mechanism_artefacts(res, 6, "teacher_agreement")
    assert list(df.index) == [("distillation", 0)]
    nb = (res / "notebooks" / "06_distillation.ipynb").read_text()
    assert "top1_positive" in nb and "pairwise" in nb  # the executed notebook shows both tables
    report = (res / "REPORT.md").read_text()
    assert "reranker's accuracy on held-out dev pairs" in report
    assert "teacher's agreement with the labels" in report


def test_runs_keep_headline_hits_of_both_pools_and_the_figure_draws_the_global_panel(
    smoke_results, tmp_path
):
    """Every run keeps per-query headline hits for every pool it evaluated; a copy without the run files
    (as a clone has the committed results) still gets its global-pool panel from them."""
    import shutil

    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.report import figures

    res, _ = smoke_results
    ab = load_ablation("table6")
    assert "global" in ab.pools
    for r in ab.rows:
        for pool in ("local", "global"):
            assert (
                res / "runs" / "table6" / r.id / "seed0" / "eval" / pool / "headline_hits.json"
            ).is_file()
    clone = tmp_path / "results"
    shutil.copytree(
        res / "runs" / "table6",
        clone / "runs" / "table6",
        ignore=shutil.ignore_patterns("run.trec", "run_recall.trec"),
    )
    assert not list(clone.rglob("run.trec"))
    diff = figures.differences(clone, ab, n_boot=20)
    glob = diff[diff.pool == "global"]
    assert len(glob) == len(ab.rows) and glob["diff"].notna().all() and (glob.n_seeds == 1).all()
    fig = figures.plot_differences(diff, "t", "b")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["local pool", "global pool"]
    assert not [t.get_text() for t in fig.axes[1].texts if "no per-query hits" in t.get_text()]


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
        m = json.loads(
            (
                res / "runs" / "table1" / str(r["id"]) / "seed0" / "eval" / "local" / "metrics.json"
            ).read_text()
        )
        assert abs(m["avg"]["headline"] - r["ours_local"]) < 0.01


def test_rerun_skips_finished_rows(smoke_results):
    res, _ = smoke_results
    side = res / "runs" / "table2" / "0" / "seed0" / "row.json"
    before = side.stat().st_mtime_ns
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.experiment import run_row

    run_row(load_ablation("table2_instruction_masking"), "0", preset="smoke", seed=0, results=res)
    assert side.stat().st_mtime_ns == before
    # the data build is part of the run's identity (a rebuilt synthetic set must not reuse runs)
    # (its bytes: every file, images included; the NLI and CC3M parts apart, read by their stages only)
    from umarvel_lib.io import DigestCache

    cfg = json.loads(side.read_text())["config"]
    root = Path(json.loads(side.read_text())["data_root"])
    assert cfg["data_digest"] == {
        "mbeir": DigestCache().tree_digest(root, exclude=("nli", "cc3m")),
        "nli": DigestCache().tree_digest(root / "nli"),
        "cc3m": DigestCache().tree_digest(root / "cc3m"),
    }


@pytest.mark.slow  # two `umarvel run` worker processes, twice
def test_parallel_workers_run_each_row_once(smoke_results, tmp_path):
    """`reproduce --jobs 2`: each (row, seed) is one `umarvel run` worker with its own log; a finished
    row is skipped by its config hash (its sidecar is not rewritten)."""
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.runner import run_jobs

    res, _ = smoke_results
    sides = {
        r.id: res / "runs" / "table2" / str(r.id) / "seed0" / "row.json"
        for r in load_ablation("table2").rows
    }
    before = {k: p.stat().st_mtime_ns for k, p in sides.items()}
    recs = run_jobs([2], preset="smoke", seeds="0", results=res, jobs=2)
    assert sorted(r["row"] for r in recs) == sorted(sides) and all(r["rc"] == 0 for r in recs), recs
    logs = {r["row"]: Path(r["log"]).read_text() for r in recs}
    assert all(": ok (" in t for t in logs.values())
    assert {k: p.stat().st_mtime_ns for k, p in sides.items()} == before
    # again: every row is skipped, its log (of the run that trained it) is kept, the batch is recorded
    again = run_jobs([2], preset="smoke", seeds="0", results=res, jobs=2)
    assert (
        all(r["skipped"] for r in again)
        and {r["row"]: Path(r["log"]).read_text() for r in again} == logs
    )
    last = json.loads((res / "run_batches.json").read_text())[-1]
    assert (last["runs"], last["skipped"], last["trained"], last["failed"], last["workers"]) == (
        len(sides),
        len(sides),
        0,
        0,
        2,
    )
    assert not list((res / "logs").glob(".*.running"))


def test_diagnostic_checks_are_computed_and_reported(smoke_results):
    """Tables 1 and 5 carry diagnostic rows (full fine-tuning; a relative false-negative filter) and
    paired checks on them: computed from the runs, shown in the report, kept out of the findings."""
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.report.tables import checks

    res, _ = smoke_results
    for t in ("table1", "table5"):
        ab = load_ablation(t)
        df = checks(res, ab, n_boot=50)
        assert len(df) == len(ab.checks) and (df.n_seeds == 1).all() and df["diff"].notna().all(), (
            df
        )
    report = (res / "REPORT.md").read_text()
    assert report.count("Diagnostic check") == 2
    findings = pd.read_csv(res / "table1_findings.csv")
    assert (
        not findings["note"].fillna("").str.contains("ft").any()
    )  # diagnostic rows are in no finding


def test_smoke_reproduce_runs_one_seed_and_each_tables_first_finding_pair():
    """`make reproduce PRESET=smoke` (a first look in minutes): seed 0 and a finding's two rows per table."""
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.paper import FINDINGS
    from umarvel_lib.runner import QUICK_PRESETS, default_rows

    assert QUICK_PRESETS["smoke"] == "0"
    for t in range(1, 8):
        ids = {r.id for r in load_ablation(f"table{t}").rows}
        sel = default_rows("smoke", t)
        assert set(sel) <= ids and 1 <= len(sel) <= 2
        pairs = [{f.better, f.worse} for f in FINDINGS if f.table == t]
        assert set(sel) in pairs or (not pairs and len(sel) == 1)
    assert default_rows("cpu", 1) == [] and default_rows("smoke", None) == []
    # cpu: Table 4 runs the rows of T4a/T4b only (the other six are listed as not run)
    assert default_rows("cpu", 4) == ["0", "4", "7"]
