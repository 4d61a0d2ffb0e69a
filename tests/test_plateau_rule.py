"""The plateau rule on hand-made dev curves."""

from umarvel_lib.eval.plateau import plateau


def _ci(avgs, hw):
    return [(a - hw, a + hw) for a in avgs]


def test_flat_last_quarter_is_a_plateau_and_a_rising_one_is_not():
    steps = [0, 20, 40, 60, 80, 100, 120]
    flat = [10, 30, 45, 52, 55, 56, 56.5]
    c = plateau(steps, flat, _ci(flat, 4.0), min_steps=100, min_evals=2)
    assert c.ok and c.window_start == 80 and abs(c.movement - 1.5) < 1e-9 and c.half_width == 4.0
    # the default window holds 4 evaluations: steps 60-120 here, where the curve still rose 4.5
    c = plateau(steps, flat, _ci(flat, 4.0), min_steps=100)
    assert not c.ok and c.window_start == 60 and abs(c.movement - 4.5) < 1e-9
    rising = [10, 20, 30, 40, 50, 60, 70]
    c = plateau(steps, rising, _ci(rising, 4.0))
    assert not c.ok and "moved the dev Avg by 30.00" in c.reason
    # a dip and a recovery inside the window counts too (range, not net change)
    dip = [10, 30, 45, 52, 56, 48, 56]
    assert not plateau(steps, dip, _ci(dip, 4.0)).ok


def test_a_pause_at_the_minimum_is_not_a_plateau():
    """Table 1 row 0 seed 2 at the cpu preset (dev curve every 100 steps, stop allowed from 600): the
    last quarter alone (steps 400-600) moved 2.3 points against a half-width of 3.5 and the stage
    stopped at dev Avg 22.7, while the curve of its other seeds went on to 64-71. The window of at
    least four evaluations (steps 300-600) sees the rise."""
    steps = [0, 100, 200, 300, 400, 500, 600]
    avgs = [6.88, 10.42, 11.25, 17.08, 25.0, 22.92, 22.71]
    assert plateau(steps, avgs, _ci(avgs, 3.5), min_steps=600, min_evals=2).ok  # the old rule
    c = plateau(steps, avgs, _ci(avgs, 3.5), min_steps=600)
    assert not c.ok and c.window_start == 300 and "moved the dev Avg by 7.92" in c.reason


def test_minimum_steps_and_too_few_evaluations():
    steps, avgs = [0, 10, 20, 30, 40], [5, 20, 21, 21, 21]
    assert plateau(steps, avgs, _ci(avgs, 3)).ok
    c = plateau(steps, avgs, _ci(avgs, 3), min_steps=100)
    assert not c.ok and "minimum 100" in c.reason
    c = plateau([0, 30], [5, 6], _ci([5, 6], 3), min_evals=2)  # sparse: the reference is step 0
    assert c.ok and c.window_start == 0
    c = plateau([0, 30], [5, 6], _ci([5, 6], 3))
    assert not c.ok and "2 evaluations, the window needs 4" in c.reason
    assert not plateau([30], [6], [(3, 9)]).ok
    assert plateau([], [], []).reason == "no dev curve"
