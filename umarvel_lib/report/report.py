"""``REPORT.md``: every reproduced table beside the paper's, the 15 findings with verdicts, provenance."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..ablation import ablations_dir, load_ablation
from ..io import DamagedFileError, atomic_write_text, read_json
from ..paper import FINDINGS
from ..presets import check_preset
from . import recipe, tables

#: The mechanisms' own artefacts that runs record in ``row.json`` (:func:`.recipe.mechanism_artefacts`).
MECHANISMS = {
    "reranker_accuracy": "The reranker's accuracy on held-out dev pairs (percent; `pairwise`: P(Yes) of "
    "the positive above a mined negative's, `pointwise`: P(Yes) > 0.5 right)",
    "teacher_agreement": "The distillation teacher's agreement with the labels on the distillation "
    "sample (percent of queries; `mass_on_positives`: the KL target's mass on labelled positives)",
}


def _md(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "_no results yet_\n"
    cols = list(df.columns)
    lines = ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(
        index=False
    ):  # itertuples keeps each column's type (iterrows upcasts ints)
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


def _forest_plot(res: Path, vall: pd.DataFrame, paper_dfs: dict, preset: str) -> str:
    """``findings.png``: one line per finding (ours with its CI, coloured by verdict; the paper as a marker)."""
    import matplotlib.pyplot as plt

    from . import figures

    ff = figures.findings_frame(vall, paper_dfs)
    from ..io import tmp_prefix

    tmp = res / (tmp_prefix("findings.png") + "fig.png")  # this process's temporary
    fig = figures.plot_findings(
        ff,
        f"The paper's findings at preset {preset}: our paired difference (95% CI, "
        "seeds x queries) and the paper's",
        tmp,
    )
    plt.close(fig)
    tmp.replace(res / "findings.png")
    return (
        "\n![findings: ours with 95% CI coloured by verdict, the paper's difference as a diamond](findings.png)\n\n"
        "Each line is one finding: the dot and bar are our paired difference (A minus B in the paper's "
        "direction, so positive agrees with the paper) with its 95% CI, coloured by verdict; the diamond is "
        "the paper's difference of the same rows (on the paper's scale).\n"
    )


def failures_section(res: Path) -> str:
    """Everything that failed, first in the report: notebooks (``batch.json``), runs (``FAILED.json``),
    damaged result files (skipped by the tables below; the row runs again on the next reproduce)."""
    lines = []
    batch = res / "batch.json"
    if batch.is_file():
        try:
            st = read_json(batch)
        except DamagedFileError as e:
            st = {}
            lines.append(f"- `batch.json` is damaged: {e}")
        for name, v in st.items():
            if isinstance(v, dict) and v.get("status") == "failed":
                lines.append(f"- notebook `{name}` FAILED: {_one_line(v.get('error', ''))}")
    for p in tables.problems(res):
        what = (
            "FAILED" if p["kind"] == "failed" else "has a damaged file (skipped below; it reruns)"
        )
        lines.append(
            f"- table {p['table']} row `{p['row']}` seed {p['seed']} {what}: {_one_line(p['error'])} "
            f"(`{Path(p['file']).relative_to(res)}`)"
        )
    if not lines:
        return ""
    return (
        "\n## Failures\n\nThese did not finish; their rows count as *not run* below. The whole error is in "
        "`batch.json` (notebooks) and in each run's `FAILED.json` (traceback). Fix the cause and run "
        "`umarvel reproduce` again: finished runs are skipped, failed and damaged ones run again.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def _one_line(s: str, limit: int = 400) -> str:
    s = " ".join(str(s).split())
    return (s[:limit] + " ...") if len(s) > limit else s


def write_report(results, preset: str, *, n_boot: int = 1000) -> Path:
    check_preset(preset)
    res = Path(results)
    abls = [load_ablation(p) for p in sorted(ablations_dir().glob("table*.yaml"))]
    all_v = []
    parts = [
        f"# U-MARVEL reproduction report: preset `{preset}`\n",
        "Every number in the *ours* columns comes from a run of this kit (run directories under "
        "`runs/`, each with `row.json` and `eval/<pool>/` holding `metrics.json`, `config.json`, "
        "`headline_hits.json`, `inputs.ref.json` (path + sha256 of the qrels and queries shared by every run "
        "under `eval_inputs/`) and the TREC run `run.trec`, which is regenerated rather than committed). The *paper* "
        "columns are the paper's numbers (Tables 1-6 **provisional**: secondary summaries, see "
        "`umarvel_lib/paper_tables/PROVENANCE.md`). At micro scale absolute numbers are not comparable "
        "with the paper's; what is compared is the **direction** of each finding.\n",
        failures_section(res),
    ]
    body = []
    paper_dfs = {}
    for ab in abls:
        df = tables.table_vs_paper(res, ab)
        paper_dfs[ab.table] = df
        body.append(
            f"\n## Table {ab.table}: {ab.title}\n\n{tables.provenance_note(ab.table)}\n\n" + _md(df)
        )
        if (res / f"table{ab.table}.png").is_file():
            body.append(f"\n![table {ab.table}](table{ab.table}.png)\n")
        if ab.findings:
            vdf = tables.verdicts(res, ab, n_boot=n_boot)
            all_v.append(vdf)
            body.append("\nFindings:\n\n" + _md(vdf))
        if ab.checks:
            body.append(
                f"\nDiagnostic check: {ab.checks_title} (A minus B, paired seeds x queries bootstrap):\n\n"
                + _md(tables.checks(res, ab, n_boot=n_boot))
            )
        for key, what in MECHANISMS.items():
            art = recipe.mechanism_artefacts(res, ab.table, key)
            if not art.empty:
                body.append(f"\n{what}:\n\n" + _md(art.reset_index()))
    vall = (
        pd.concat(all_v, ignore_index=True)
        if all_v
        else pd.DataFrame(columns=["finding", "verdict"])
    )
    counts = tables.verdict_counts(vall)
    if not vall.empty:
        parts.append(_forest_plot(res, vall, paper_dfs, preset))
    summary = [
        f"\n## Summary of the paper's {len(FINDINGS)} findings\n",
        f"**{counts['held']} of {len(FINDINGS)} held**, {counts['within noise']} within noise, "
        f"{counts['contradicted']} contradicted, {counts['too few seeds']} with too few seeds for a verdict, "
        f"{counts['not at plateau']} not at plateau, {counts['not run']} not run.\n\n",
        "Verdicts: *held* = same direction, 95% CI of the paired difference (seeds x queries bootstrap) "
        "excludes zero, >= 3 seeds; *within noise* = CI includes zero (column `detectable_effect`: "
        "the smallest difference this run could detect with 80% power); *contradicted* = opposite "
        "direction, CI excludes zero; *too few seeds* = fewer than 3 seeds (the note says what the interval over \
queries alone shows); *not at plateau* = a run the comparison uses did not train every stage to a \
plateau of its dev curve (the last quarter of its steps moved the dev Avg by less than the CI half-width, \
>= 100 steps per stage; the note names the runs and what the interval showed): a verdict counts only on \
runs at plateau. T1a, T2b, T3a and T3b are effects of well under one point in "
        "the paper and are expected to be within noise at micro scale.\n",
        _md(vall[list(tables.FINDING_COLUMNS)] if not vall.empty else vall),
    ]
    runs = tables.runs_frame(res)
    prov = ["\n## Provenance\n"]
    if not runs.empty:
        prov.append(f"- git commits of the runs: {', '.join(sorted(set(map(str, runs.git))))}\n")
        prov.append(
            f"- rows x seeds run: {runs[['table', 'row', 'seed']].drop_duplicates().shape[0]}; "
            f"statuses: {runs.drop_duplicates(['table', 'row', 'seed']).status.value_counts().to_dict()}\n"
        )
        side = tables.sidecars(res)
        if side:
            v = side[0].get("versions", {})
            prov.append("- versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)) + "\n")
            prov.append(f"- seeds: {sorted(set(int(s['seed']) for s in side))}\n")
    if not runs.empty:
        per = (
            runs.drop_duplicates(["table", "row", "seed"])
            .groupby("table")
            .agg(runs=("row", "size"), wall_s=("wall_s", "sum"), slowest_row_s=("wall_s", "max"))
            .reset_index()
            .round(1)
        )
        prov.append(
            "\nCompute per table (sum of the (row, seed) runs' wall times from their `row.json`; a "
            "notebook rerun skips finished rows, so its own wall time can be much shorter):\n"
            + _md(per)
        )
    batches = res / "run_batches.json"
    if batches.is_file():
        prov.append(
            "\nTraining batches (`umarvel reproduce --jobs N`: the (row, seed) runs in N worker processes "
            "before the notebooks; a row finished earlier with the same config hash is skipped):\n\n"
            + _md(
                pd.DataFrame(
                    _json_or_empty(batches, []),
                    columns=[
                        "started_at",
                        "finished_at",
                        "workers",
                        "runs",
                        "trained",
                        "skipped",
                        "failed",
                        "wall_s",
                    ],
                )
            )
        )
    batch = res / "batch.json"
    if batch.is_file():
        st = _json_or_empty(batch, {})
        prov.append(
            "\nWall time per notebook:\n\n"
            + _md(
                pd.DataFrame(
                    [
                        {
                            "notebook": k,
                            **{c: v.get(c) for c in ("status", "wall_s", "finished_at")},
                        }
                        for k, v in st.items()
                    ]
                )
            )
        )
    out = res / "REPORT.md"
    atomic_write_text(out, "".join(parts + summary + body + prov))
    return out


def _json_or_empty(path: Path, empty):
    try:
        return read_json(path)
    except DamagedFileError:  # named in the Failures section
        return empty
