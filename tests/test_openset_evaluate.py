"""Open-set evaluation on real photos: sane metrics, replayable, and what FewShotClassifier would do."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fewshot import FewShotClassifier
from fewshot.data.datasets import load_dataset
from fewshot.data.episodes import sample_open_set
from fewshot.evaluation.openset import evaluate_open_set


@pytest.fixture(scope="module")
def embedded(caltech_subset, encoder):
    dataset = load_dataset(caltech_subset)
    return encoder.embed(dataset.items), dataset


def test_metrics_are_present_sane_and_replay_exactly(embedded, tmp_path):
    features, dataset = embedded
    episodes = sample_open_set(dataset.labels, ways=3, shots=2, queries=3, unknown_ways=3, episodes=30, seed=1)
    result = evaluate_open_set(features, episodes)
    summary = result.to_dict()
    for name in ("auroc", "fpr_at_95tpr", "precision_at_90recall", "closed_set_accuracy", "open_set_accuracy",
                 "known_kept", "unknown_accepted"):
        assert 0.0 <= summary[name]["mean"] <= 1.0 and summary[name]["ci95"] >= 0.0, name
    # Real photos of distinct objects: far better than chance, and most known queries kept.
    assert summary["auroc"]["mean"] > 0.75 and summary["closed_set_accuracy"]["mean"] > 0.8
    assert summary["known_kept"]["mean"] > 0.7 and 0.0 <= summary["expected_calibration_error"] <= 1.0
    again = evaluate_open_set(features, sample_open_set(dataset.labels, ways=3, shots=2, queries=3, unknown_ways=3,
                                                        episodes=30, seed=1))
    assert again.to_dict() == summary
    paths = result.save(tmp_path / "out")
    assert json.loads(paths["json"].read_text())["auroc"] == summary["auroc"]
    for key in ("roc", "reliability"):
        with Image.open(paths[key]) as png:
            assert png.format == "PNG" and png.size[0] > 200


def test_roc_legend_says_its_auroc_is_of_all_queries_pooled(embedded):
    """roc.png's AUROC is not the summary's mean over episodes: its legend says what it is computed on."""
    from fewshot.evaluation.metrics import auroc
    from fewshot.evaluation.openset import roc_legend

    features, dataset = embedded
    result = evaluate_open_set(features, sample_open_set(dataset.labels, ways=3, shots=2, queries=3, unknown_ways=3,
                                                         episodes=10, seed=2))
    legend = roc_legend(result.known_scores, result.unknown_scores)
    assert f"AUROC {auroc(result.known_scores, result.unknown_scores):.3f}" in legend
    assert "top-1 similarity" in legend and "pooled" in legend and "known vs unregistered" in legend


def test_evaluation_decides_unknown_as_the_classifier_does(embedded, encoder):
    features, dataset = embedded
    (open_episode,) = sample_open_set(dataset.labels, ways=3, shots=3, queries=3, unknown_ways=3, episodes=1, seed=4)
    result = evaluate_open_set(features, [open_episode])
    episode = open_episode.episode
    clf = FewShotClassifier(encoder, cache=False, progress=False)
    for j, label in enumerate(episode.classes):
        clf.register(str(label), [dataset.items[i] for i in episode.support[episode.support_labels == j]])
    known = clf.predict([dataset.items[i] for i in episode.query])
    unknown = clf.predict([dataset.items[i] for i in open_episode.unknown_query])
    assert result.per_episode["known_kept"][0] == pytest.approx(np.mean([not p.unknown for p in known]))
    assert result.per_episode["unknown_accepted"][0] == pytest.approx(np.mean([not p.unknown for p in unknown]))
    np.testing.assert_allclose(result.known_scores, [p.similarity for p in known], atol=1e-5)


def test_no_progress_bar_when_stderr_is_not_a_terminal(capsys):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 6)
    features = rng.normal(size=(len(labels), 16)).astype(np.float32) + np.eye(8, 16)[labels] * 4
    episodes = sample_open_set(labels, ways=3, shots=1, queries=2, unknown_ways=2, episodes=120, seed=0)
    evaluate_open_set(features, episodes)  # 100+ episodes: a bar, but only for a person at a terminal
    assert capsys.readouterr().err == ""
