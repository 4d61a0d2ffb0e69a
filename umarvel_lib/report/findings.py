"""Verdicts on the paper's findings from run directories, with paired statistics.

A finding says row A beats row B of a table on the Avg of the 16 headline metrics. Our evidence is
a set of evaluation run directories per (row, seed). The difference A - B is estimated by a
**paired bootstrap**: in each replicate, seeds are resampled (with replacement, the same seeds for
A and B, so seed-to-seed variation of shared stages cancels) and the queries of every dataset-task
row are resampled (the same query indices for A and B, so per-query difficulty cancels). The Avg
difference is recomputed on each replicate; the 95% percentile interval decides:

* **held**: same direction as the paper and the interval excludes zero;
* **within noise**: the interval includes zero (we report the smallest effect the run could have
  detected: 2.8 x the bootstrap standard error, i.e. 80% power at a two-sided 5% level);
* **contradicted**: opposite direction and the interval excludes zero.

A verdict counts only on runs that trained to a plateau of their dev curve
(:func:`umarvel_lib.report.curves.plateau_miss`): when a run the comparison uses did not, the
verdict is **not at plateau** and the note keeps which runs missed and what the interval showed.
Fewer than ``MIN_SEEDS`` seeds give **too few seeds** the same way.

This module reads run directories only; it imports no model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..paper import FINDINGS_BY_ID, Finding

VERDICTS = ("held", "within noise", "contradicted", "too few seeds", "not at plateau", "not run")
HELD, NOISE, CONTRA, FEW, UNCONVERGED, MISSING = VERDICTS
MIN_SEEDS = 3


def avg_of(hits: dict[str, tuple[list[str], np.ndarray]]) -> float:
    return 100.0 * float(np.mean([h.mean() for _, h in hits.values()]))


@dataclass
class Verdict:
    finding: str
    text: str
    pool: str
    verdict: str
    diff: float | None = None  # A - B (paper direction positive), points
    ci95: tuple[float, float] | None = None
    detectable: float | None = None  # minimum detectable effect (80% power), points
    n_seeds: int = 0
    note: str = ""

    def as_dict(self) -> dict:
        return {
            "finding": self.finding,
            "claim": self.text,
            "pool": self.pool,
            "verdict": self.verdict,
            "diff": None if self.diff is None else round(self.diff, 2),
            "ci95_lo": None if self.ci95 is None else round(self.ci95[0], 2),
            "ci95_hi": None if self.ci95 is None else round(self.ci95[1], 2),
            "detectable_effect": None if self.detectable is None else round(self.detectable, 2),
            "n_seeds": self.n_seeds,
            "note": self.note,
        }


def paired_difference(a: list[dict], b: list[dict], *, n_boot: int = 1000, seed: int = 0):
    """Bootstrap the Avg difference of configs A and B; ``a[i]``/``b[i]`` are the same seed.

    Returns (point estimate, (lo, hi), standard error).
    """
    if len(a) != len(b) or not a:
        raise ValueError(
            "paired_difference needs the same non-zero number of seeds for both configs"
        )
    rows = sorted(set(a[0]) & set(b[0]))
    for x in a + b:
        for row in rows:
            if x[row][0] != a[0][row][0]:
                raise ValueError(f"row {row}: A and B were not evaluated on the same queries")
    point = float(
        np.mean(
            [
                avg_of({r: x[r] for r in rows}) - avg_of({r: y[r] for r in rows})
                for x, y in zip(a, b)
            ]
        )
    )
    rng = np.random.default_rng(seed)
    n_seeds = len(a)
    reps = np.empty(n_boot)
    sizes = {row: len(a[0][row][0]) for row in rows}
    for i in range(n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds)
        d = []
        for s in seeds:
            per_row = []
            for row in rows:
                idx = rng.integers(0, sizes[row], sizes[row])
                per_row.append(a[s][row][1][idx].mean() - b[s][row][1][idx].mean())
            d.append(np.mean(per_row))
        reps[i] = 100.0 * float(np.mean(d))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return point, (float(lo), float(hi)), float(reps.std(ddof=1))


def decide(ci: tuple[float, float]) -> str:
    """The verdict of a paper-direction difference from its 95% interval (module doc)."""
    if ci[0] > 0:
        return HELD
    if ci[1] < 0:
        return CONTRA
    return NOISE


def judge(
    finding: Finding | str,
    hits: dict[str, dict[int, dict]],
    *,
    n_boot: int = 1000,
    diverged: set[str] = frozenset(),
    unconverged: dict[str, dict[int, str]] | None = None,
) -> Verdict:
    """Verdict for one finding. ``hits[row_id][seed]`` = :func:`~umarvel_lib.eval.runs.headline_hits` of that run's ``pool`` dir;
    ``unconverged[row_id][seed]`` = why that run is not at plateau (such runs void the verdict)."""
    f = FINDINGS_BY_ID[finding] if isinstance(finding, str) else finding
    v = Verdict(f.id, f.text, f.pool, MISSING)
    if f.kind == "fails" and f.worse in diverged:
        v.verdict, v.note = HELD, f"row {f.worse} diverged (non-finite loss)"
        return v
    if f.kind == "worst":
        others = [r for r in hits if r != f.better]
        if f.better not in hits or not others:
            return v
        diffs = []
        for o in others:
            seeds = sorted(set(hits[o]) & set(hits[f.better]))
            if not seeds:
                return v
            d, ci, se = paired_difference(
                [hits[o][s] for s in seeds], [hits[f.better][s] for s in seeds], n_boot=n_boot
            )
            diffs.append((ci[0], d, ci, se, o, len(seeds)))
        lo, d, ci, se, o, n = min(diffs)  # the closest competitor decides
        v.verdict, v.diff, v.ci95, v.detectable, v.n_seeds = decide(ci), d, ci, 2.8 * se, n
        v.note = f"closest other row: {o}"
        used = {r: sorted(set(hits[r]) & set(hits[f.better])) for r in others}
        used[f.better] = sorted(set().union(*used.values()))
        return _plateau_rule(_seed_rule(v), used, unconverged or {})
    if f.better not in hits or f.worse not in hits:
        return v
    seeds = sorted(set(hits[f.better]) & set(hits[f.worse]))
    if not seeds:
        return v
    d, ci, se = paired_difference(
        [hits[f.better][s] for s in seeds], [hits[f.worse][s] for s in seeds], n_boot=n_boot
    )
    v.verdict, v.diff, v.ci95, v.detectable, v.n_seeds = decide(ci), d, ci, 2.8 * se, len(seeds)
    if f.sub_1pt and v.verdict == NOISE:
        v.note = "paper effect < 1 point: expected within noise at micro scale"
    return _plateau_rule(_seed_rule(v), {f.better: seeds, f.worse: seeds}, unconverged or {})


_SEEN = {
    HELD: "same direction as the paper",
    CONTRA: "opposite direction to the paper",
    NOISE: "interval includes zero",
}


def _seed_rule(v: Verdict) -> Verdict:
    """Fewer than MIN_SEEDS seeds: no verdict; the note keeps what the queries-only interval says."""
    if v.n_seeds >= MIN_SEEDS:
        return v
    v.note = "; ".join(
        x
        for x in (
            v.note,
            f"{v.n_seeds} seed(s), needs >= {MIN_SEEDS}; over queries: {_SEEN[v.verdict]}",
        )
        if x
    )
    v.verdict = FEW
    return v


def _plateau_rule(
    v: Verdict, used: dict[str, list[int]], unconverged: dict[str, dict[int, str]]
) -> Verdict:
    """A run the comparison used did not train to a plateau: no verdict; the note names the runs and
    keeps what the interval showed."""
    missed = [
        f"row {r} seed{'s' if len(m) > 1 else ''} {', '.join(map(str, m))}"
        for r, seeds in sorted(used.items())
        if (m := sorted(s for s in seeds if s in unconverged.get(r, {})))
    ]
    if not missed:
        return v
    shown = f"; the interval: {_SEEN[v.verdict]}" if v.verdict in _SEEN else ""
    v.note = "; ".join(x for x in (v.note, f"not at plateau: {', '.join(missed)}{shown}") if x)
    v.verdict = UNCONVERGED
    return v
