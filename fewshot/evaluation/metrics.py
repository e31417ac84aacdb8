"""Open-set and calibration metrics on plain score arrays (no models, no files).

Convention: a higher score means "more likely a registered (known) class". Known queries are the
positives: accepting a known query is a true positive, accepting an unknown one a false positive.
"""

from __future__ import annotations

import numpy as np


def _scores(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if not len(array):
        raise ValueError(f"{name} is empty; pass at least one score")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite scores")
    return array


def auroc(known_scores, unknown_scores) -> float:
    """Area under the ROC curve: the chance that a random known query scores above a random unknown
    one (ties count half). 0.5 is chance, 1.0 separates them perfectly."""
    known, unknown = _scores("known_scores", known_scores), _scores("unknown_scores", unknown_scores)
    both = np.concatenate([known, unknown])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_scores = both[order]
    # Average ranks over ties (Mann-Whitney U).
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(both)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[: len(known)].sum() - len(known) * (len(known) + 1) / 2.0
    return float(u / (len(known) * len(unknown)))


def threshold_at_tpr(known_scores, tpr: float = 0.95) -> float:
    """The highest threshold that keeps (score >= threshold) at least ``tpr`` of the known scores."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    known = np.sort(_scores("known_scores", known_scores))
    rejected = int(np.floor((1.0 - tpr) * len(known) + 1e-9))  # how many knowns may fall below
    return float(known[min(rejected, len(known) - 1)])


def fpr_at_tpr(known_scores, unknown_scores, tpr: float = 0.95) -> float:
    """Share of unknown queries accepted at the threshold that keeps ``tpr`` of known queries
    (FPR@95TPR for the default)."""
    threshold = threshold_at_tpr(known_scores, tpr)
    return float(np.mean(_scores("unknown_scores", unknown_scores) >= threshold))


def precision_at_recall(known_scores, unknown_scores, recall: float = 0.90) -> float:
    """Share of accepted queries that are known, at the threshold that accepts ``recall`` of the
    known queries."""
    threshold = threshold_at_tpr(known_scores, recall)
    accepted_known = np.sum(_scores("known_scores", known_scores) >= threshold)
    accepted_unknown = np.sum(_scores("unknown_scores", unknown_scores) >= threshold)
    return float(accepted_known / (accepted_known + accepted_unknown))


def roc_curve(known_scores, unknown_scores) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates), one point per distinct threshold, from (0, 0)
    to (1, 1)."""
    known, unknown = _scores("known_scores", known_scores), _scores("unknown_scores", unknown_scores)
    thresholds = np.unique(np.concatenate([known, unknown]))[::-1]
    tpr = np.searchsorted(np.sort(-known), -thresholds, side="right") / len(known)
    fpr = np.searchsorted(np.sort(-unknown), -thresholds, side="right") / len(unknown)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def reliability_bins(confidences, correct, bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin over [0, 1]: (mean confidence, accuracy, count). Empty bins
    hold NaN confidence and accuracy and a count of 0."""
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    conf = _scores("confidences", confidences)
    hits = np.asarray(correct, dtype=np.float64).ravel()
    if hits.shape != conf.shape:
        raise ValueError(f"confidences and correct differ in length ({len(conf)} vs {len(hits)})")
    if conf.min() < 0 or conf.max() > 1:
        raise ValueError("confidences must lie in [0, 1] (probabilities)")
    which = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
        accuracy = np.bincount(which, weights=hits, minlength=bins) / count
    return mean_conf, accuracy, count.astype(int)


def expected_calibration_error(confidences, correct, bins: int = 15) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over equal-width bins."""
    mean_conf, accuracy, count = reliability_bins(confidences, correct, bins)
    filled = count > 0
    return float(np.sum(count[filled] * np.abs(mean_conf[filled] - accuracy[filled])) / count.sum())
