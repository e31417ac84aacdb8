"""Episodic evaluation: right accuracies, right CI, batched scoring equal to a plain reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fewshot.episodes import Episode, EpisodeSampler
from fewshot.evaluate import confidence_interval, evaluate_batch, evaluate_episodes


def reference_accuracy(features, episode, metric):
    """One episode scored the obvious way, in float64 numpy."""
    x = features.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    protos = np.stack([x[episode.support[episode.support_labels == w]].mean(0) for w in range(len(episode.classes))])
    q = x[episode.query]
    if metric == "cosine":
        scores = q @ (protos / np.linalg.norm(protos, axis=1, keepdims=True)).T
    else:
        scores = -((q[:, None, :] - protos[None]) ** 2).sum(-1)
    return np.mean(scores.argmax(1) == episode.query_labels)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_batched_scoring_equals_reference(metric):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 10)
    features = (rng.normal(size=(12, 16))[labels] + rng.normal(scale=1.5, size=(120, 16))).astype(np.float32)
    episodes = EpisodeSampler(labels, ways=5, shots=2, queries=3, seed=1).sample_many(40)
    result = evaluate_episodes(features, labels, episodes, metric=metric, progress=False)
    expected = [reference_accuracy(features, e, metric) for e in episodes]
    np.testing.assert_allclose(result.episode_accuracies, expected)
    assert 0.2 < result.accuracy < 1.0  # a real, imperfect task: the check above means something


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("episodes", [4, 3000])  # few episodes gather rows; many go through a Gram matrix
def test_evaluate_batch_equals_per_episode_reference(metric, episodes):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 10)
    features = (rng.normal(size=(12, 16))[labels] + rng.normal(scale=1.5, size=(120, 16))).astype(np.float32)
    batch = EpisodeSampler(labels, ways=5, shots=2, queries=3, seed=1).sample_batch(episodes)
    result = evaluate_batch(features, labels, batch, metric=metric)
    listed = batch.to_episodes()
    expected = [reference_accuracy(features, e, metric) for e in listed[:200]]
    np.testing.assert_allclose(result.episode_accuracies[:200], expected)
    reference = evaluate_episodes(features, labels, listed, metric=metric, progress=False)
    np.testing.assert_array_equal(result.confusion, reference.confusion)
    assert (result.ways, result.shots, result.queries, result.episodes) == (5, 2, 3, episodes)
    assert 0.2 < result.accuracy < 1.0


def test_hand_checked_episode_and_confusion():
    features = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.2, 0.8], [0.8, 0.2]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 1])  # item 4 is class 1 but sits next to class 0
    episode = Episode(classes=np.array([0, 1]), support=np.array([0, 1]), support_labels=np.array([0, 1]),
                      query=np.array([2, 3, 4]), query_labels=np.array([0, 1, 1]))
    result = evaluate_episodes(features, labels, [episode], class_names=["a", "b"], progress=False)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.confusion.tolist() == [[1, 0], [1, 1]]
    assert result.per_class_accuracy() == {"a": 1.0, "b": 0.5}
    assert (result.ways, result.shots) == (2, 1)


def test_confidence_interval_is_1_96_std_over_sqrt_n():
    accs = np.array([0.5, 0.7, 0.9, 0.6])
    assert confidence_interval(accs) == pytest.approx(1.96 * accs.std() / 2)


def test_save_writes_json_csv_and_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 6)
    features = rng.normal(size=(36, 8)).astype(np.float32)
    result = evaluate_episodes(features, labels, EpisodeSampler(labels, ways=3, shots=1, queries=2).sample_many(7),
                               progress=False)
    paths = result.save(tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert {"accuracy", "ci95", "episodes", "ways", "shots", "error", "per_class_accuracy"} <= set(data)
    assert data["episodes"] == 7 and data["ways"] == 3
    assert len(paths["episodes"].read_text().strip().splitlines()) == 1 + 7
    with Image.open(paths["confusion"]) as png:
        assert png.format == "PNG"


def test_empty_episode_list_is_an_error():
    with pytest.raises(ValueError, match="no episodes"):
        evaluate_episodes(np.zeros((2, 2), np.float32), np.array([0, 1]), [])
