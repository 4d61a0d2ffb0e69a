"""Verdicts: paired bootstrap over seeds x queries on hand-made hit vectors."""
import numpy as np

from umarvel_lib.paper import Finding
from umarvel_lib.report.findings import CONTRA, FEW, HELD, NOISE, decide, judge, paired_difference


def _hits(p, n=400, rows=("a_task0", "b_task3"), seed=0):
    rng = np.random.default_rng(seed)
    return {r: ([f"{i}" for i in range(n)], (rng.random(n) < p).astype(float)) for r in rows}


F = Finding("TX", 1, "A > B", "A", "B")


def test_clear_effect_is_held_and_reverse_is_contradicted():
    hits = {"A": {s: _hits(0.6, seed=s) for s in range(3)}, "B": {s: _hits(0.4, seed=10 + s) for s in range(3)}}
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


def test_worst_row_and_divergence():
    hits = {"0": {s: _hits(0.5, seed=s) for s in range(3)}, "2": {s: _hits(0.1, seed=20 + s) for s in range(3)},
            "4": {s: _hits(0.55, seed=40 + s) for s in range(3)}}
    assert judge(Finding("W", 1, "2 worst", "2", "*", kind="worst"), hits, n_boot=200).verdict == HELD
    fails = Finding("F", 5, "0 fails", "baseline", "0", kind="fails")
    assert judge(fails, {}, diverged={"0"}).verdict == HELD


def test_paired_difference_point_estimate_is_avg_difference():
    a, b = [_hits(0.7)], [_hits(0.2, seed=3)]
    d, ci, se = paired_difference(a, b, n_boot=200)
    expect = 100 * (np.mean([h.mean() for _, h in a[0].values()]) - np.mean([h.mean() for _, h in b[0].values()]))
    assert abs(d - expect) < 1e-9 and ci[0] <= d <= ci[1]
    assert decide(1.0, (0.5, 1.5)) == HELD and decide(-1.0, (-1.5, -0.5)) == CONTRA
