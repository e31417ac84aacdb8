"""Open-set and calibration metrics against hand-checked values and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.evaluation.metrics import (auroc, expected_calibration_error, fpr_at_tpr, precision_at_recall,
                             reliability_bins, roc_curve, threshold_at_tpr)


def test_auroc_hand_checked():
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 3], [2]) == 0.5
    assert auroc([1], [1]) == 0.5  # a tie counts half


def test_auroc_and_roc_match_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    known, unknown = rng.normal(1, 1, 300).round(1), rng.normal(0, 1, 200).round(1)  # rounding makes ties
    labels = np.r_[np.ones(300), np.zeros(200)]
    assert auroc(known, unknown) == pytest.approx(roc_auc_score(labels, np.r_[known, unknown]))
    fpr, tpr = roc_curve(known, unknown)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(known, unknown))


def test_threshold_keeps_the_target_share_of_knowns():
    known = np.arange(100, dtype=float)  # 0..99
    threshold = threshold_at_tpr(known, 0.95)
    assert threshold == 5.0 and np.mean(known >= threshold) == 0.95
    assert fpr_at_tpr(known, [4.0, 5.0, 50.0, 200.0], 0.95) == 0.75
    assert precision_at_recall(known, [89.0, 95.0], 0.90) == pytest.approx(90 / 92)


def test_calibration_error():
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert expected_calibration_error([0.9] * 10, [1] * 5 + [0] * 5) == pytest.approx(0.4)
    mean_conf, accuracy, count = reliability_bins([0.05, 0.95, 0.96], [0, 1, 0], bins=10)
    assert count.tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2] and accuracy[9] == 0.5 and np.isnan(accuracy[1])


@pytest.mark.parametrize("call", [lambda: auroc([], [1]), lambda: auroc([np.nan], [1]),
                                  lambda: threshold_at_tpr([1], 0), lambda: reliability_bins([1.5], [1]),
                                  lambda: reliability_bins([0.5], [1, 0])])
def test_bad_input_is_refused(call):
    with pytest.raises(ValueError):
        call()
