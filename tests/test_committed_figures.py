"""The committed cpu results as a reviewer opens them (issue 18): every per-table figure, every curve
figure and the findings forest plot exist, and none has overlapping tick labels when drawn again from
the committed run directories (the executed notebooks' outputs: tests/test_packaging.py).

Read from the committed files only (no training, no model): ``results/cpu`` of this checkout.
"""

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

RESULTS = Path(__file__).resolve().parents[1] / "results" / "cpu"
TABLES = range(1, 8)

pytestmark = pytest.mark.skipif(
    not (RESULTS / "REPORT.md").is_file(), reason="no committed cpu results"
)


@pytest.mark.parametrize("table", TABLES)
def test_committed_table_figures_have_no_overlapping_tick_labels(table):
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.report import figures

    ab = load_ablation(f"table{table}")
    for name in (f"table{table}.png", f"table{table}_curves.png"):
        assert (RESULTS / name).stat().st_size > 1000, name
    fig = figures.plot_differences(
        figures.differences(RESULTS, ab, n_boot=20),
        f"Table {table}: {ab.title} (cpu)",
        f"{ab.baseline.id}: {ab.baseline.label}",
    )
    assert figures.overlapping_tick_labels(fig) == []
    assert figures.overlapping_tick_labels(figures.plot_curves(RESULTS, table)) == []
    plt.close("all")


def test_committed_forest_plot_has_no_overlapping_tick_labels():
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.report import figures
    from umarvel_lib.report.tables import table_vs_paper, verdicts

    abls = [load_ablation(f"table{t}") for t in TABLES]
    vall = pd.concat([verdicts(RESULTS, ab, n_boot=20) for ab in abls if ab.findings])
    ff = figures.findings_frame(vall, {ab.table: table_vs_paper(RESULTS, ab) for ab in abls})
    fig = figures.plot_findings(ff, "The paper's findings (cpu)")
    assert figures.overlapping_tick_labels(fig) == []
    plt.close("all")
    assert (RESULTS / "findings.png").stat().st_size > 1000
    report = (RESULTS / "REPORT.md").read_text()
    assert report.index("](findings.png)") < report.index("## Summary")
