"""The plateau rule on hand-made dev curves."""

from umarvel_lib.eval.plateau import plateau


def _ci(avgs, hw):
    return [(a - hw, a + hw) for a in avgs]


def test_flat_last_quarter_is_a_plateau_and_a_rising_one_is_not():
    steps = [0, 20, 40, 60, 80, 100, 120]
    flat = [10, 30, 45, 52, 55, 56, 56.5]
    c = plateau(steps, flat, _ci(flat, 4.0), min_steps=100)
    assert c.ok and c.window_start == 80 and abs(c.movement - 1.5) < 1e-9 and c.half_width == 4.0
    rising = [10, 20, 30, 40, 50, 60, 70]
    c = plateau(steps, rising, _ci(rising, 4.0))
    assert not c.ok and "moved the dev Avg by 20.00" in c.reason
    # a dip and a recovery inside the window counts too (range, not net change)
    dip = [10, 30, 45, 52, 56, 48, 56]
    assert not plateau(steps, dip, _ci(dip, 4.0)).ok


def test_minimum_steps_and_too_few_evaluations():
    steps, avgs = [0, 10, 20, 30], [5, 20, 21, 21]
    assert plateau(steps, avgs, _ci(avgs, 3)).ok
    c = plateau(steps, avgs, _ci(avgs, 3), min_steps=100)
    assert not c.ok and "minimum 100" in c.reason
    c = plateau([0, 30], [5, 6], _ci([5, 6], 3))  # sparse evaluations: the reference is step 0
    assert c.ok and c.window_start == 0
    assert not plateau([30], [6], [(3, 9)]).ok
    assert plateau([], [], []).reason == "no dev curve"
