"""Verdicts: paired bootstrap over seeds x queries on hand-made hit vectors."""

import numpy as np

from umarvel_lib.paper import Finding
from umarvel_lib.report.findings import (
    CONTRA,
    FEW,
    HELD,
    NOISE,
    UNCONVERGED,
    decide,
    judge,
    paired_difference,
)


def _hits(p, n=400, rows=("a_task0", "b_task3"), seed=0):
    rng = np.random.default_rng(seed)
    return {r: ([f"{i}" for i in range(n)], (rng.random(n) < p).astype(float)) for r in rows}


F = Finding("TX", 1, "A > B", "A", "B")


def test_clear_effect_is_held_and_reverse_is_contradicted():
    hits = {
        "A": {s: _hits(0.6, seed=s) for s in range(3)},
        "B": {s: _hits(0.4, seed=10 + s) for s in range(3)},
    }
    v = judge(F, hits, n_boot=300)
    assert v.verdict == HELD and 15 < v.diff < 25 and v.ci95[0] > 0
    v2 = judge(Finding("TY", 1, "B > A", "B", "A"), hits, n_boot=300)
    assert v2.verdict == CONTRA


def test_identical_configs_are_within_noise_with_detectable_effect():
    same = {s: _hits(0.5, seed=s) for s in range(3)}
    v = judge(F, {"A": same, "B": same}, n_boot=300)
    assert v.verdict == NOISE and v.diff == 0.0 and v.detectable == 0.0
    other = {s: _hits(0.5, seed=100 + s) for s in range(3)}
    v = judge(F, {"A": same, "B": other}, n_boot=300)
    assert v.verdict == NOISE and v.detectable > 0


def test_fewer_than_three_seeds_cannot_hold():
    hits = {"A": {0: _hits(0.9)}, "B": {0: _hits(0.1, seed=5)}}
    v = judge(F, hits, n_boot=100)
    assert v.verdict == FEW and "1 seed" in v.note and "same direction" in v.note
    worst = Finding("W", 1, "B worst", "B", "*", kind="worst")
    assert judge(worst, hits, n_boot=100).verdict == FEW


def test_a_run_not_at_plateau_voids_the_verdict():
    """A verdict counts only on runs at plateau: one unconverged run of either row, or of any row a
    'worst' finding compares, gives *not at plateau*, the note naming it and keeping the interval."""
    hits = {
        "A": {s: _hits(0.6, seed=s) for s in range(3)},
        "B": {s: _hits(0.4, seed=10 + s) for s in range(3)},
    }
    v = judge(F, hits, n_boot=100, unconverged={"B": {2: "mbeir: moved 6.0 >= 3.5"}})
    assert v.verdict == UNCONVERGED and "row B seed 2" in v.note and "same direction" in v.note
    assert judge(F, hits, n_boot=100, unconverged={"C": {0: "x"}}).verdict == HELD  # not compared
    worst = Finding("W", 1, "B worst", "B", "*", kind="worst")
    hits["C"] = {s: _hits(0.7, seed=20 + s) for s in range(3)}
    assert judge(worst, hits, n_boot=100).verdict == HELD
    assert judge(worst, hits, n_boot=100, unconverged={"C": {1: "x"}}).verdict == UNCONVERGED


def test_plateau_miss_reads_the_committed_curve(tmp_path):
    """report.plateau_miss: None for a run whose every planned stage meets the rule; the reason when a
    stage rose in its last quarter, lacks a curve, or trained fewer than the minimum steps."""
    import json

    import pandas as pd

    from umarvel_lib.report import plateau_miss

    def run(curves: dict[str, list[float]], plan: list[str]):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "row.json").write_text(json.dumps({"stage_plan": [{"stage": s} for s in plan]}))
        recs = [
            {"stage": st, "step": 100 * i, "examples_seen": 0, "dev_avg": a,
             "dev_ci_lo": a - 3, "dev_ci_hi": a + 3, "dev_queries": 480}
            for st, avgs in curves.items() for i, a in enumerate(avgs)
        ]  # fmt: skip
        if recs:
            pd.DataFrame(recs).to_csv(d / "dev_curve.csv", index=False)
        return d

    flat = [10, 40, 60, 70, 71, 71.5, 72, 72, 72]
    assert plateau_miss(run({"mbeir": flat}, ["mbeir"]), min_steps=100) is None
    rising = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert "moved the dev Avg" in plateau_miss(run({"mbeir": rising}, ["mbeir"]))
    assert "nli: no dev curve" in plateau_miss(run({"mbeir": flat}, ["nli", "mbeir"]))
    assert "< the minimum 1000" in plateau_miss(run({"mbeir": flat}, ["mbeir"]), min_steps=1000)
    assert plateau_miss(run({}, ["mbeir"])) == "no dev curve"


def test_worst_row_and_divergence():
    hits = {
        "0": {s: _hits(0.5, seed=s) for s in range(3)},
        "2": {s: _hits(0.1, seed=20 + s) for s in range(3)},
        "4": {s: _hits(0.55, seed=40 + s) for s in range(3)},
    }
    assert (
        judge(Finding("W", 1, "2 worst", "2", "*", kind="worst"), hits, n_boot=200).verdict == HELD
    )
    fails = Finding("F", 5, "0 fails", "baseline", "0", kind="fails")
    assert judge(fails, {}, diverged={"0"}).verdict == HELD


def test_paired_difference_point_estimate_is_avg_difference():
    a, b = [_hits(0.7)], [_hits(0.2, seed=3)]
    d, ci, se = paired_difference(a, b, n_boot=200)
    expect = 100 * (
        np.mean([h.mean() for _, h in a[0].values()])
        - np.mean([h.mean() for _, h in b[0].values()])
    )
    assert abs(d - expect) < 1e-9 and ci[0] <= d <= ci[1]
    assert decide((0.5, 1.5)) == HELD and decide((-1.5, -0.5)) == CONTRA


def test_batch_trains_the_findings_rows_first():
    """`reproduce --jobs`: rows compared by a finding first (seeds side by side), then the tables' other
    paper rows, diagnostic rows last; a cut-short batch leaves complete finding pairs."""
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.paper import finding_rows
    from umarvel_lib.runner import _job_order

    assert finding_rows(4) == {"0", "4", "7"} and finding_rows(6) == {
        "baseline",
        "distillation",
        "reranker",
    }
    assert finding_rows(1) == {"0", "1", "2", "3", "4"}  # T1b: the worst of every paper row
    jobs = [
        (t, r, s) for t in (1, 4, 5) for r in load_ablation(f"table{t}").rows for s in (0, 1, 2)
    ]
    order = [(t, str(r.id), s) for t, r, s in sorted(jobs, key=lambda j: _job_order(*j))]
    first_rest = next(i for i, j in enumerate(order) if j[:2] == (4, "1"))
    first_diag = next(i for i, j in enumerate(order) if j[1] in ("ft0", "ft2", "rel"))
    assert {j[:2] for j in order[:first_rest]} == (
        {(1, r) for r in "01234"}
        | {(4, r) for r in "047"}
        | {(5, r) for r in ("baseline", "0", "1", "2")}
    )
    assert first_rest < first_diag and all(
        j[1] in ("ft0", "ft2", "rel") for j in order[first_diag:]
    )
    assert order[:3] == [(1, "0", 0), (1, "0", 1), (1, "0", 2)]
