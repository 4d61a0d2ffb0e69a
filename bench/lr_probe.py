"""Does the cpu preset's learning rate let the slowest Table 1 row reach a plateau before its cap?

Why: at the cpu preset (LR x 10 over the paper's, cosine schedule laid over the step cap), Table 1 row 0
(causal + last + prompt) ran into the cap without meeting the plateau rule twice: cap 1500 (seeds 0/1:
the last quarter moved the dev Avg by 3.33/3.54 points against CI half-widths of 3.02/3.44) and cap
2400 (still rising at step 1900). Its training loss follows the LR closely (at step 600: 0.39 at LR
6.8e-4 under the 1500 cap, 0.60 at LR 8.8e-4 under the 2400 cap, seed 0; the dev Avg 64.6 vs 28.5), so
the peak LR, not the number of steps, looks like what holds it back.

What runs (fixed here before any run): Table 1 rows 0 (the slowest row seen) and 4 (the baseline row
the synthetic difficulty was calibrated on), seed 0, the cpu preset unchanged except
``scale.lr_multiplier`` from ``MULTIPLIERS``; each M-BEIR stage to its plateau or the cap, its dev
curve every 100 steps. Nothing else is looked at: no other row, seed or test split enters a choice.
Rule for the next preset, fixed with the grid: the largest multiplier under which both rows meet the
plateau rule before the cap (``umarvel_lib.eval.plateau``); row 4's rows in the calibration band are
reported beside it, since the difficulty was chosen under x 10.

    .venv/bin/python bench/lr_probe.py --row 0      # one (row, multiplier) after another
    .venv/bin/python bench/lr_probe.py --summary    # results/lr_probe/LR_PROBE.md from what has finished

Stages are cached and resumable (``cache/stages``), like every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MULTIPLIERS = [3.0]  # fixed before any run; x 10 is the preset's value, measured already
ROWS = ["0", "4"]
OUT = Path("results/lr_probe")
BAND = (40.0, 80.0)


def name(row: str, mult: float) -> str:
    return f"row{row}-lr-x{mult:g}"


def run(row: str, mult: float, *, data_root: str | None):
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.experiment import run_row

    t1 = load_ablation("table1")
    base = t1.row(row)
    extra = {
        "probe": {
            "label": f"T1 row {row}, LR x {mult:g}",
            "overrides": {**base.overrides, "scale.lr_multiplier": mult},
        }
    }
    return run_row(
        t1.with_extra_rows(extra),
        "probe",
        preset="cpu",
        seed=0,
        results=OUT / name(row, mult),
        data_root=data_root,
        progress=True,
    )


def summary() -> str:
    from umarvel_lib import report

    lines = [
        "# LR probe (Table 1 rows 0 and 4, seed 0, cpu preset, M-BEIR stage to plateau or cap)",
        "",
        f"Multipliers fixed before any run: {MULTIPLIERS} (the preset's x 10 measured before).",
        "Rule: the largest multiplier under which both rows meet the plateau rule before the cap.",
        "",
        "| run | stopped at | plateau rule | dev Avg at stop | local Avg (test) | rows in [40, 80] |",
        "|---|---|---|---|---|---|",
    ]
    for mult in MULTIPLIERS:
        for row in ROWS:
            rdir = OUT / name(row, mult) / "runs" / "table1" / "probe" / "seed0"
            if not (rdir / "row.json").is_file():
                lines.append(f"| {name(row, mult)} | not finished | | | | |")
                continue
            chk = report.plateau_checks(rdir).iloc[0]
            curve = report.dev_curve(rdir)
            loc = json.loads((rdir / "eval" / "local" / "metrics.json").read_text())
            heads = [v["headline"] for v in loc["rows"].values()]
            inband = sum(BAND[0] <= h <= BAND[1] for h in heads)
            lines.append(
                f"| {name(row, mult)} | {chk.last_step} | {'met' if chk.ok else chk.reason} | "
                f"{curve.dev_avg.iloc[-1]:.1f} | {loc['avg']['headline']:.1f} | {inband}/{len(heads)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--row", choices=ROWS)
    ap.add_argument("--data-root")
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args(argv)
    if not args.summary:
        for mult in MULTIPLIERS:
            for row in [args.row] if args.row else ROWS:
                run(row, mult, data_root=args.data_root)
    OUT.mkdir(parents=True, exist_ok=True)
    text = summary()
    (OUT / "LR_PROBE.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
