"""learn2learn interop: fewshot episodes as l2l tasks, fewshot arrays as an l2l MetaDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot.data.episodes import EpisodeSampler

l2l = pytest.importorskip("learn2learn", reason="learn2learn is optional: install it with `make learn2learn`")

from fewshot.evaluation.learn2learn import as_task_dataset, to_meta_dataset  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clustered(seed=0, n_classes=12, per_class=8, dim=6, spread=0.1):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    x = rng.normal(size=(n_classes, dim))[y] * 2 + spread * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y


def expected_task(x, episode):
    items = np.concatenate([episode.support, episode.query])
    return x[items], np.concatenate([episode.support_labels, episode.query_labels])


def test_fixed_tasks_are_exactly_the_samplers_episodes():
    x, y = clustered()
    labels = np.array([f"char{v:02d}" for v in y])  # any label values
    taskset = as_task_dataset(x, labels, EpisodeSampler(labels, ways=3, shots=2, queries=2, seed=4), num_tasks=5)
    assert isinstance(taskset, l2l.data.Taskset) and len(taskset) == 5
    twins = EpisodeSampler(labels, ways=3, shots=2, queries=2, seed=4).sample_many(5)
    for i in [3, 0, 4, 1, 2, 3]:  # any access order, repeated access: task i is always episode i
        data, task_labels = taskset[i]
        want_x, want_y = expected_task(x, twins[i])
        assert data.dtype == torch.float32 and task_labels.dtype == torch.int64
        np.testing.assert_array_equal(data.numpy(), want_x)
        np.testing.assert_array_equal(task_labels.numpy(), want_y)
        np.testing.assert_array_equal(taskset.episodes[i].query, twins[i].query)
    assert sum(1 for _ in taskset) == 5  # iterating stops after num_tasks


def test_endless_tasks_follow_the_sampler_in_order():
    x, y = clustered(1)
    taskset = as_task_dataset(x, y, EpisodeSampler(y, ways=4, shots=1, queries=3, seed=9))
    twin = iter(EpisodeSampler(y, ways=4, shots=1, queries=3, seed=9))
    stream = iter(taskset)
    for _ in range(4):
        data, labels = next(stream)
        want_x, want_y = expected_task(x, next(twin))
        np.testing.assert_array_equal(data.numpy(), want_x)
        np.testing.assert_array_equal(labels.numpy(), want_y)


def test_a_sampler_built_from_other_labels_is_refused():
    x, y = clustered(2)
    shuffled = np.random.default_rng(0).permutation(y)
    taskset = as_task_dataset(x, y, EpisodeSampler(shuffled, ways=3, shots=1, queries=1, seed=0))
    with pytest.raises(ValueError, match="same labels"):
        taskset.sample()
    with pytest.raises(ValueError, match="num_tasks"):
        as_task_dataset(x, y, EpisodeSampler(y, ways=3, queries=1, seed=0), num_tasks=0)


def test_meta_dataset_works_with_learn2learns_own_task_transforms():
    x, y = clustered(3)
    dataset = to_meta_dataset(x, y)
    assert isinstance(dataset, l2l.data.MetaDataset) and sorted(dataset.labels) == list(range(12))
    assert dataset.labels_to_indices[5] == list(range(40, 48))
    from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels

    taskset = l2l.data.Taskset(dataset, [NWays(dataset, 3), KShots(dataset, 2), LoadData(dataset),
                                             RemapLabels(dataset)], num_tasks=4)
    for data, labels in taskset:
        assert data.shape == (6, 6) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
        rows = [int(np.flatnonzero((x == row).all(1))[0]) for row in data.numpy()]  # real feature rows
        original = y[rows]
        # one original class per remapped label, and three distinct classes
        assert all(len(set(original[labels.numpy() == k])) == 1 for k in range(3))
        assert len(set(original)) == 3


def test_a_plain_learn2learn_maml_loop_trains_on_fewshot_tasks():
    x, y = clustered(4, n_classes=20, per_class=6, dim=8, spread=0.3)
    ways, shots = 5, 1
    taskset = as_task_dataset(x, y, EpisodeSampler(y, ways=ways, shots=shots, queries=3, seed=1))
    torch.manual_seed(0)
    maml = l2l.algorithms.MAML(torch.nn.Linear(8, ways), lr=0.5)
    optimizer = torch.optim.Adam(maml.parameters(), lr=0.01)
    before = [p.detach().clone() for p in maml.parameters()]
    accuracies = []
    for _step in range(30):  # the loop of learn2learn's examples, unchanged
        data, labels = taskset.sample()
        n_support = ways * shots  # support items come first in every task
        learner = maml.clone()
        learner.adapt(torch.nn.functional.cross_entropy(learner(data[:n_support]), labels[:n_support]))
        logits = learner(data[n_support:])
        loss = torch.nn.functional.cross_entropy(logits, labels[n_support:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        accuracies.append((logits.argmax(1) == labels[n_support:]).float().mean().item())
    assert any(not torch.equal(a, b) for a, b in zip(before, maml.parameters()))
    assert np.mean(accuracies[-10:]) > 0.6  # chance is 0.2
