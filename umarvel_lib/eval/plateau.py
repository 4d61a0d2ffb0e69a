"""The plateau rule: has a training stage trained long enough? (budgets by convergence, not by clock)

A stage's **dev curve** is its dev-split local Avg (percent), evaluated on a fixed dev subset every
``eval.eval_every`` optimizer steps from step 0 to its last step ``S`` (:func:`umarvel_lib.experiment.curve_eval`),
each point with the 95% CI of the Avg (stratified bootstrap over the dev subset's per-query hits,
:func:`umarvel_lib.eval.metrics.score_rows`).

**Rule** (:func:`plateau`). The *last quarter* of the stage is the window from the latest evaluation
at or before step ``0.75 S`` (the reference) to the evaluation at ``S``, widened back where needed so
that it holds at least ``min_evals`` evaluations (:data:`MIN_EVALS` = 4: three evaluation intervals;
a stage's ``plateau_min_evals``). The widening guards a short stage: at 600 steps with a dev
evaluation every 100, the last quarter holds only steps 400-600, and a rising curve that paused for
two evaluations passed the rule there (Table 1 row 0 seed 2 at the cpu preset stopped at step 600 at
dev Avg 22.7 while its other seeds went on to 64-71). The dev Avg's *movement* over it is its range there (max - min, so a rise and a fall
both count). The stage has **plateaued** when that movement is smaller than the *half-width* of the
final evaluation's CI ((hi - lo) / 2): the last quarter of training changed the dev Avg by less than
the dev subset can resolve. A stage also needs ``S >= min_steps`` (:data:`MIN_STEPS` = 100 optimizer
steps for the rows that a finding compares).

With ``budget: plateau`` a stage stops at the first evaluation, at or after ``min_steps``, where the
rule holds on the curve so far (capped by ``max_steps``/``epochs``). The learning-rate schedule is
laid out over the cap, so an early stop ends at a higher LR than a run planned to that length: use
the plateau budget to *find* a stage's steps, then fix them (``max_steps``) in the preset and check
the fixed runs against the rule (``tests/test_plateau.py`` does so for every committed cpu run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

DEV_CURVE_FILE = (
    "dev_curve.csv"  # in the run directory, written by experiment.run_row, read by report.curves
)
DEV_CURVE_COLUMNS = [
    "stage",
    "step",
    "examples_seen",
    "dev_avg",
    "dev_ci_lo",
    "dev_ci_hi",
    "dev_queries",
]
MIN_STEPS = 100  # optimizer steps per stage for the rows that a finding compares
WINDOW = 0.25  # the last quarter
MIN_EVALS = 4  # ... widened to hold at least this many evaluations (StageConfig.plateau_min_evals)


@dataclass(frozen=True)
class PlateauCheck:
    ok: bool
    reason: str
    last_step: int | None
    window_start: int | None  # step of the reference evaluation
    movement: float | None  # max - min of the dev Avg over the window (points)
    half_width: float | None  # half the final evaluation's 95% CI (points)

    def as_dict(self) -> dict:
        return asdict(self)


def plateau(
    steps: Sequence[int],
    avgs: Sequence[float],
    cis: Sequence[Sequence[float]],
    *,
    min_steps: int = 0,
    min_evals: int = MIN_EVALS,
) -> PlateauCheck:
    """Apply the rule to one stage's dev curve: evaluation steps, dev Avgs and their 95% CIs (lo, hi)."""
    pts = sorted(zip((int(s) for s in steps), (float(a) for a in avgs), (tuple(c) for c in cis)))
    if not pts:
        return PlateauCheck(False, "no dev curve", None, None, None, None)
    last = pts[-1][0]
    lo, hi = pts[-1][2]
    half = (float(hi) - float(lo)) / 2
    before = [p for p in pts if p[0] <= (1 - WINDOW) * last]
    if not before:
        return PlateauCheck(
            False,
            f"no evaluation at or before step {(1 - WINDOW) * last:g}",
            last,
            None,
            None,
            half,
        )
    need = max(2, min_evals)
    ref = move = None
    if len(pts) >= need:
        ref = min(before[-1][0], pts[-need][0])  # the last quarter, widened to `need` evaluations
        window = [a for s, a, _ in pts if s >= ref]
        move = max(window) - min(window)
    if last < min_steps:
        return PlateauCheck(False, f"{last} steps < the minimum {min_steps}", last, ref, move, half)
    if move is None:
        return PlateauCheck(
            False, f"{len(pts)} evaluations, the window needs {need}", last, None, None, half
        )
    if move >= half:
        return PlateauCheck(
            False,
            f"the window (steps {ref}-{last}) moved the dev Avg by {move:.2f} >= "
            f"the CI half-width {half:.2f}",
            last,
            ref,
            move,
            half,
        )
    return PlateauCheck(
        True,
        f"the window (steps {ref}-{last}) moved the dev Avg by {move:.2f} < "
        f"the CI half-width {half:.2f}",
        last,
        ref,
        move,
        half,
    )


def plateau_of_curve(
    curve: Sequence[dict], *, min_steps: int = 0, min_evals: int = MIN_EVALS
) -> PlateauCheck:
    """:func:`plateau` on dev-curve records ``{"step", "dev_avg", "dev_ci_lo", "dev_ci_hi"}`` (one stage)."""
    return plateau(
        [c["step"] for c in curve],
        [c["dev_avg"] for c in curve],
        [(c["dev_ci_lo"], c["dev_ci_hi"]) for c in curve],
        min_steps=min_steps,
        min_evals=min_evals,
    )
