"""The mechanisms' own measurements (eval.metrics): the reranker's accuracy on (positive, mined
negatives) pairs and the distillation teacher's agreement with the labels, on hand-made inputs whose
values are worked out by hand in the comments."""

import math

import pytest

from umarvel_lib.eval.metrics import reranker_accuracy, teacher_agreement


def test_reranker_accuracy_by_hand():
    # query 0: positive 0.9 vs negatives 0.2 (win), 0.9 (tie: one half), 0.95 (loss) -> 1.5 of 3
    # query 1: positive 0.4 vs 0.1 (win) -> 1 of 1; pairwise = 2.5 / 4
    # pointwise: positives > 0.5: 0.9 yes, 0.4 no (1 of 2); negatives <= 0.5: 0.2, 0.1 (2 of 4) -> 3 / 6
    acc = reranker_accuracy([0.9, 0.4], [[0.2, 0.9, 0.95], [0.1]])
    assert acc["pairwise"] == pytest.approx(62.5)
    assert acc["pointwise"] == pytest.approx(50.0)
    assert acc["positives_yes"] == pytest.approx(50.0) and acc["negatives_no"] == pytest.approx(
        50.0
    )
    assert acc["mean_p_yes_positive"] == pytest.approx(0.65)
    assert acc["mean_p_yes_negative"] == pytest.approx((0.2 + 0.9 + 0.95 + 0.1) / 4)
    assert (acc["n_queries"], acc["n_pairs"]) == (2, 4)
    # a perfect reranker, and a query without negatives (pointwise only)
    perfect = reranker_accuracy([0.8, 0.7], [[0.1, 0.3], []])
    assert perfect["pairwise"] == 100.0 and perfect["pointwise"] == 100.0
    with pytest.raises(ValueError, match="2 positives but negatives for 1"):
        reranker_accuracy([0.8, 0.7], [[0.1]])


def test_teacher_agreement_by_hand():
    tau = 0.5
    lists = [
        # exp(s / tau) = 1, 2, 1 -> target 1/4, 1/2, 1/4; the teacher's top "b" is the positive,
        # the recall order's first "a" is not; mass 50
        (["a", "b", "c"], [0.0, 0.5 * math.log(2), 0.0], {"b"}),
        # a tie goes to the first in recall order ("x", not a positive); mass 50
        (["x", "y"], [1.0, 1.0], {"y"}),
        # no labelled positive in the list: 0 everywhere
        (["p", "q"], [0.3, 0.2], set()),
        # target 1/4, 3/4: the teacher moves the positive "m" (recall top-1) down; mass 25
        (["m", "n"], [0.0, 0.5 * math.log(3)], {"m"}),
    ]
    ag = teacher_agreement(lists, tau=tau)
    assert ag["top1_positive"] == pytest.approx(25.0)  # 1 of 4
    assert ag["recall_top1_positive"] == pytest.approx(25.0)  # 1 of 4
    assert ag["mass_on_positives"] == pytest.approx((50 + 50 + 0 + 25) / 4)
    assert ag["list_has_positive"] == pytest.approx(75.0)
    assert ag["n_queries"] == 4 and ag["tau"] == tau
    with pytest.raises(ValueError, match="tau must be positive"):
        teacher_agreement(lists, tau=0.0)
    with pytest.raises(ValueError, match="2 candidates but 1 teacher scores"):
        teacher_agreement([(["a", "b"], [0.1], {"a"})], tau=1.0)
