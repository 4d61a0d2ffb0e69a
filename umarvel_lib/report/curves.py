"""Stage plans and dev curves of a run directory, and the plateau rule on them (reads files only).

``row.json`` holds the run's ``stage_plan`` (one record per training stage: optimizer steps, global
batch, LR, tau at start and end and whether it was learned, examples and examples seen, the budget and
whether it stopped early); ``dev_curve.csv`` holds the dev curve of every stage (the dev-split local
Avg with its 95% CI every ``eval.eval_every`` steps). See :mod:`umarvel_lib.eval.plateau` for the rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..eval.plateau import DEV_CURVE_COLUMNS, DEV_CURVE_FILE, MIN_EVALS, plateau_of_curve

PLAN_COLUMNS = [
    "stage",
    "budget",
    "steps",
    "max_steps",
    "min_steps",
    "min_evals",
    "batch",
    "lr",
    "tau_learnable",
    "tau_start",
    "tau_end",
    "examples",
    "examples_seen",
    "epochs_seen",
    "stopped_early",
    "eval_every",
    "dev_avg_end",
]


def stage_plan(run_dir) -> pd.DataFrame:
    """The stage plan of one (row, seed) run: one line per stage (empty for a run that predates plans)."""
    side = json.loads((Path(run_dir) / "row.json").read_text())
    return pd.DataFrame.from_records(side.get("stage_plan") or [], columns=PLAN_COLUMNS)


def dev_curve(run_dir) -> pd.DataFrame:
    """The run's dev curve (``dev_curve.csv``): stage, step, examples seen, dev Avg, CI; empty when absent."""
    f = Path(run_dir) / DEV_CURVE_FILE
    if not f.is_file():
        return pd.DataFrame(columns=DEV_CURVE_COLUMNS)
    return pd.read_csv(f)


def plateau_checks(run_dir, *, min_steps: int = 0) -> pd.DataFrame:
    """The plateau rule on each stage of a run's dev curve: ok, reason, window, movement, CI half-width
    (the window's minimum of evaluations as the stage plan records it; the rule's default for runs
    that predate the record)."""
    curve = dev_curve(run_dir)
    plan = stage_plan(run_dir).set_index("stage")
    recs = []
    for stage, g in curve.groupby("stage", sort=False):
        n = plan["min_evals"].get(stage) if stage in plan.index else None
        recs.append(
            {
                "stage": stage,
                **plateau_of_curve(
                    g.to_dict("records"),
                    min_steps=min_steps,
                    min_evals=MIN_EVALS if pd.isna(n) else int(n),
                ).as_dict(),
            }
        )
    return pd.DataFrame.from_records(
        recs,
        columns=["stage", "ok", "reason", "last_step", "window_start", "movement", "half_width"],
    )


def plateau_miss(run_dir, *, min_steps: int = 0) -> str | None:
    """Why a run did *not* train every stage to a plateau (``None`` when it did): a verdict counts only
    on runs whose every planned stage has a dev curve that meets the rule (:func:`plateau_checks`)."""
    curve = dev_curve(run_dir)
    if curve.empty:
        return "no dev curve"
    checks = plateau_checks(run_dir, min_steps=min_steps)
    missing = sorted(set(stage_plan(run_dir)["stage"]) - set(checks["stage"]))
    why = [f"{s}: no dev curve" for s in missing]
    why += [f"{r.stage}: {r.reason}" for r in checks.itertuples() if not bool(r.ok)]
    return "; ".join(why) or None
