"""Episodic evaluation: right accuracies, right CI, batched scoring equal to a plain reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fewshot.data.episodes import Episode, EpisodeSampler
from fewshot.evaluation.evaluate import confidence_interval, evaluate_batch, evaluate_episodes


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
    np.testing.assert_array_equal(result.confusion.toarray(), reference.confusion.toarray())
    assert (result.ways, result.shots, result.queries, result.episodes) == (5, 2, 3, episodes)
    assert 0.2 < result.accuracy < 1.0


def test_hand_checked_episode_and_confusion():
    features = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.2, 0.8], [0.8, 0.2]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 1])  # item 4 is class 1 but sits next to class 0
    episode = Episode(classes=np.array([0, 1]), support=np.array([0, 1]), support_labels=np.array([0, 1]),
                      query=np.array([2, 3, 4]), query_labels=np.array([0, 1, 1]))
    result = evaluate_episodes(features, labels, [episode], class_names=["a", "b"], progress=False)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.confusion.toarray().tolist() == [[1, 0], [1, 1]]
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


def test_episodes_csv_keeps_class_names_with_spaces_apart(tmp_path):
    import csv

    features = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    episode = Episode(classes=np.array([0, 1]), support=np.array([0, 1]), support_labels=np.array([0, 1]),
                      query=np.array([2, 3]), query_labels=np.array([0, 1]))
    result = evaluate_episodes(features, np.array([0, 1, 0, 1]), [episode], class_names=["grand piano", "cup"],
                               progress=False)
    with open(result.save(tmp_path)["episodes"], newline="") as fh:
        row = list(csv.DictReader(fh))[0]
    assert json.loads(row["classes"]) == ["grand piano", "cup"]


def test_confusion_png_renders_labels_as_plain_text(tmp_path):
    from fewshot.evaluation.evaluate import plot_confusion

    confusion = np.array([[3, 1], [0, 4]])
    path = plot_confusion(confusion, ["$x^$", "price $5 and $6"], tmp_path / "c.png")
    with Image.open(path) as png:
        assert png.format == "PNG"


def test_confusion_is_sparse_over_many_classes():
    """20,000 dataset classes must not need a dense 20,000 x 20,000 matrix (3 GB)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20000), 2)
    features = rng.normal(size=(40000, 8)).astype(np.float32)
    batch = EpisodeSampler(labels, ways=5, shots=1, queries=1, seed=0).sample_batch(50)
    result = evaluate_batch(features, labels, batch)
    assert result.confusion.shape == (20000, 20000) and result.confusion.nnz <= 250
    assert int(result.confusion.sum()) == 250 and len(result.per_class_accuracy()) <= 250


def test_confusion_png_of_many_classes_keeps_hidden_errors_visible(tmp_path):
    """Rows are normalised over all their queries: errors into classes not shown stay in an 'other' column."""
    from fewshot.evaluation.evaluate import confusion_view, plot_confusion

    n = 40
    confusion = np.eye(n, dtype=np.int64) * 10
    confusion[0, 39] = 10  # class 0 is confused with class 39, which has no errors of its own
    for c in range(1, 39):
        confusion[c, c - 1] = 5
    shown, matrix = confusion_view(confusion, max_classes=30)
    assert 39 not in shown and matrix.shape == (30, 31)  # 30 classes shown, then the "other" column
    row = matrix[list(shown).index(0)]
    assert row.sum() == pytest.approx(1.0) and row[-1] == pytest.approx(0.5)
    plot_confusion(confusion, [f"class {i}" for i in range(n)], tmp_path / "c.png")
