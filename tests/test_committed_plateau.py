"""Every committed cpu run trained each stage to a plateau of its dev curve (issue 19's convergence rule).

Read from the committed files only (``row.json``'s ``stage_plan``, ``dev_curve.csv``). A run without
a dev curve predates dev curves and is skipped with that reason; a run with one must meet the rule on
every stage of its plan (:func:`umarvel_lib.report.plateau_miss`), and a row that one of the paper's
findings compares must have trained at least ``MIN_STEPS`` optimizer steps per stage.
"""

import json
from pathlib import Path

import pytest

from umarvel_lib import report
from umarvel_lib.eval.plateau import MIN_STEPS

RESULTS = Path(__file__).resolve().parents[1] / "results" / "cpu"
RUNS = sorted(p.parent for p in RESULTS.glob("runs/table*/*/seed*/row.json"))


def _finding_row(side: dict) -> bool:
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.paper import finding_rows

    row = load_ablation(side["ablation"]).row(str(side["row"]))
    return not row.explain and str(row.id) in finding_rows(int(side["table"]))


@pytest.mark.parametrize("run_dir", RUNS, ids=[str(p.relative_to(RESULTS / "runs")) for p in RUNS])
def test_committed_run_trained_to_plateau(run_dir):
    side = json.loads((run_dir / "row.json").read_text())
    if side.get("status") != "ok":
        pytest.skip(f"status {side.get('status')}")
    curve = report.dev_curve(run_dir)
    if curve.empty:
        pytest.skip(
            "no dev curve (dev_curve.csv): the run predates dev curves; rerun it at the cpu preset"
        )
    min_steps = MIN_STEPS if _finding_row(side) else 0
    why = report.plateau_miss(run_dir, min_steps=min_steps)
    assert why is None, why
