"""learn2learn interop, both directions (learn2learn is imported lazily, only when used).

* fewshot -> learn2learn: ``as_task_dataset`` turns cached embeddings and an ``EpisodeSampler`` into a
  ``learn2learn.data.Taskset`` (l2l's ``TaskDataset``) whose tasks are exactly the sampler's episodes,
  so l2l training loops consume fewshot data; ``to_meta_dataset`` gives a ``learn2learn.data.MetaDataset`` for l2l's own
  ``NWays``/``KShots``/``LoadData``/``RemapLabels`` task transforms.
* learn2learn -> fewshot: the ``anil`` and ``maml`` heads (``fewshot.learning.heads``) adapt with
  ``learn2learn.algorithms.MAML``.

learn2learn 0.2.0 ships only an sdist that does not build on Python >= 3.11 as is; ``make learn2learn``
builds it (see the Makefile).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch

_HINT = ("install it with `make learn2learn` (learn2learn 0.2.0's package only builds on Python 3.11 "
         "that way: its Cython modules must be regenerated)")


def import_learn2learn(what: str = "this feature"):
    """``import learn2learn``, or an ImportError that says how to install it."""
    try:
        # gym (a learn2learn import) prints a deprecation notice on stderr: keep the user's output clean.
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import learn2learn
    except ImportError as e:
        raise ImportError(f"{what} needs learn2learn, which is not installed or cannot be imported ({e}); "
                          f"{_HINT}") from e
    return learn2learn


class _ArrayDataset(torch.utils.data.Dataset):
    """Items ``(features[i] as a float32 tensor, labels[i] as a Python scalar)``."""

    def __init__(self, features, labels):
        self.features = _features_tensor(features)
        labels = np.asarray(labels)
        if labels.shape != (len(self.features),):
            raise ValueError(f"labels must hold one label per feature row: expected shape ({len(self.features)},), "
                             f"got {labels.shape}")
        self.labels = labels.tolist()  # Python ints/strs: hashable keys for l2l's bookkeeping

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return self.features[i], self.labels[i]


def _features_tensor(features) -> torch.Tensor:
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty (N, dim) array, got shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels_to_indices(labels: list) -> dict:
    out: dict = {}
    for i, label in enumerate(labels):
        out.setdefault(label, []).append(i)
    return out


def to_meta_dataset(features, labels):
    """A ``learn2learn.data.MetaDataset`` over ``(features[i], labels[i])`` items (labels as Python scalars),
    e.g. for ``TaskDataset(md, [NWays(md, 5), KShots(md, 2), LoadData(md), RemapLabels(md)])``."""
    l2l = import_learn2learn("to_meta_dataset")
    dataset = _ArrayDataset(features, labels)
    return l2l.data.MetaDataset(dataset, labels_to_indices=_labels_to_indices(dataset.labels))


class _EpisodeItem:
    """Data transform of one task item: index -> (features row, episode label). Picklable."""

    def __init__(self, features: torch.Tensor, label: int):
        self.features, self.label = features, label

    def __call__(self, index):
        return self.features[index], self.label


class EpisodeTaskTransform:
    """A learn2learn task transform that draws the next episode of a fewshot ``EpisodeSampler`` and
    describes it as support items then query items, labelled with episode labels 0..ways-1."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray, sampler):
        self.features, self.labels, self.sampler = features, labels, sampler

    def describe(self, episode) -> list:
        from learn2learn.data import DataDescription

        items = np.concatenate([episode.support, episode.query])
        episode_labels = np.concatenate([episode.support_labels, episode.query_labels])
        if len(items) and (items.min() < 0 or items.max() >= len(self.labels)
                           or not np.array_equal(self.labels[items], np.asarray(episode.classes)[episode_labels])):
            raise ValueError("the sampler's episodes do not match these labels: build the EpisodeSampler from the "
                             "same labels (in the same order) as the features")
        description = []
        for index, label in zip(items.tolist(), episode_labels.tolist()):
            dd = DataDescription(index)
            dd.transforms.append(_EpisodeItem(self.features, label))
            description.append(dd)
        return description

    def __call__(self, task_description=None):
        return self.describe(self.sampler.sample())


def as_task_dataset(features, labels, sampler, num_tasks: int = -1):
    """A ``learn2learn.data.Taskset`` (a.k.a. ``TaskDataset``) whose tasks are ``sampler``'s episodes.

    Each task is ``(data, labels)``: data ``(n_support + n_query, dim)`` float32 (support items first,
    then query items, in the episode's order) and labels ``(n,)`` int64 episode labels. With
    ``num_tasks=-1`` every access draws the sampler's next episode (endless, as in l2l); with
    ``num_tasks=n`` the first ``n`` episodes are drawn now and task ``i`` is episode ``i`` (also
    available as ``taskset.episodes[i]``, e.g. to split support and query).
    ``sampler`` must have been built from ``labels`` (same items, same order).
    """
    l2l = import_learn2learn("as_task_dataset")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or not (
            num_tasks == -1 or num_tasks >= 1):
        raise ValueError(f"num_tasks must be -1 (endless) or a positive integer, got {num_tasks!r}")
    dataset = _ArrayDataset(features, labels)
    meta = l2l.data.MetaDataset(dataset, labels_to_indices=_labels_to_indices(dataset.labels))
    transform = EpisodeTaskTransform(dataset.features, np.asarray(labels), sampler)
    # Taskset: TaskDataset's current name (TaskDataset is its deprecated alias, which warns).
    taskset_class = getattr(l2l.data, "Taskset", None) or l2l.data.TaskDataset
    taskset = taskset_class(meta, task_transforms=transform, num_tasks=int(num_tasks))
    taskset.episodes = None
    if num_tasks != -1:
        taskset.episodes = sampler.sample_many(int(num_tasks))
        taskset.sampled_descriptions = {i: transform.describe(e) for i, e in enumerate(taskset.episodes)}
    return taskset
