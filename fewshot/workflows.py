"""End-to-end workflows over the stages: embed a dataset, train a head on it, evaluate a protocol.

Each is a short composition of the modules (data -> encoder -> cache -> head -> evaluation), shared
by the ``fewshot`` command and the examples. A trained head remembers the encoder features it was
trained on (its ``metadata["encoder"]`` fingerprint), so later steps re-create that encoder.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np

from .cache import EmbeddingCache
from .data import ImageDataset, load_dataset, split_by_class, split_by_group
from .encoders import Encoder
from .episodes import Episode, FixedRun, Protocol, load_episodes, load_fixed_runs
from .episodes import save_episodes as write_episodes
from .evaluate import EvaluationResult, evaluate_episodes
from .heads import Head, create_head
from .train import TrainResult


def resolve_dataset(data: str | os.PathLike, protocol: Protocol | None = None) -> ImageDataset:
    """``data`` is the dataset (folder or zip), or a root holding the protocol's ``dataset`` path."""
    data = Path(data)
    if protocol is not None and protocol.dataset and (data / protocol.dataset).exists():
        data = data / protocol.dataset
    return load_dataset(data)


def embed_dataset(encoder: Encoder, dataset: ImageDataset, *, cache: EmbeddingCache | None = None,
                  progress: bool | None = None) -> tuple[np.ndarray, ImageDataset]:
    """Embed every image once (cached); unreadable images are left out with a warning."""
    result = encoder.embed_batch(dataset.items, cache=cache, progress=progress)
    if not result.ok.all():
        failed = [e for e in result.errors if e]
        warnings.warn(f"{len(failed)} of {len(dataset)} images could not be read and are left out "
                      f"(first: {failed[0]})", RuntimeWarning, stacklevel=2)
        dataset = dataset.select_items(result.ok)
    return result.vectors[result.ok], dataset


def split_validation(dataset: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Hold out classes (or whole groups, for grouped data) for validation and early stopping."""
    if dataset.groups is not None and len(dataset.group_names) >= 4:
        n_val = max(1, round(fraction * len(dataset.group_names)))
        return split_by_group(dataset, n_val, seed=seed)
    return split_by_class(dataset, fraction, seed=seed)


def train_head_on_dataset(dataset: ImageDataset, encoder: Encoder, head_name: str, *, ways: int = 20,
                          shots: int = 1, queries: int = 5, episodes: int = 2000, within_group: bool = False,
                          val_fraction: float = 0.2, seed: int = 0, lr: float = 1e-3,
                          head_params: dict | None = None, cache: EmbeddingCache | None = None,
                          progress: bool | None = None) -> tuple[Head, TrainResult]:
    """Embed the dataset, hold out validation classes, train ``head_name`` episodically."""
    train, val = split_validation(dataset, val_fraction, seed)
    x_train, train = embed_dataset(encoder, train, cache=cache, progress=progress)
    x_val, val = embed_dataset(encoder, val, cache=cache, progress=progress)
    head = create_head(head_name, encoder.dim, in_shape=encoder.feature_shape, seed=seed, **(head_params or {}))
    ways = min(ways, _max_ways(train, within_group), _max_ways(val, within_group))
    result = head.fit(x_train, train.labels, groups=train.groups, ways=ways, shots=shots, queries=queries,
                      episodes=episodes, within_group=within_group, seed=seed, lr=lr,
                      val_features=x_val, val_labels=val.labels, val_groups=val.groups, progress=progress)
    head.metadata["encoder"] = encoder.fingerprint
    head.metadata["training"] = {"dataset": dataset.source, "ways": ways, "shots": shots, "queries": queries,
                                 "episodes": episodes, "within_group": within_group, "seed": seed,
                                 "validation_classes": val.classes[:50], "best_val_accuracy":
                                 result.best_val_accuracy}
    return head, result


def _max_ways(dataset: ImageDataset, within_group: bool) -> int:
    """Largest way count an episode can have on this dataset (training adapts to small splits)."""
    if within_group and dataset.groups is not None:
        return int(np.bincount(dataset.class_groups).max())
    return len(dataset.classes)


def evaluate_protocol(dataset: ImageDataset, protocol: Protocol, encoder: Encoder, *, head: Head | None = None,
                      episodes: int | None = None, seed: int | None = None, cache: EmbeddingCache | None = None,
                      progress: bool | None = None, save_episodes: str | os.PathLike | None = None,
                      replay: str | os.PathLike | None = None) -> EvaluationResult:
    """Evaluate on the protocol's test split with its seeded episodes, or replay a manifest's."""
    if seed is not None:
        protocol = dataclasses.replace(protocol, seed=seed)
    features, test = embed_dataset(encoder, protocol.test_split(dataset), cache=cache, progress=progress)
    if replay is not None:
        sampled = load_episodes(replay, test)
    else:
        sampled = protocol.sampler(test.labels, test.groups).sample_many(episodes or protocol.episodes)
    if save_episodes is not None:
        write_episodes(save_episodes, sampled, test, protocol=protocol.to_dict())
    return evaluate_episodes(features, test.labels, sampled, head=head, class_names=test.classes,
                             progress=progress)


def evaluate_runs(root: str | os.PathLike, encoder: Encoder, *, head: Head | None = None,
                  cache: EmbeddingCache | None = None, progress: bool | None = None) -> EvaluationResult:
    """Fixed-episode runs (published Omniglot one-shot format): one episode per run."""
    runs = load_fixed_runs(root)
    items, labels, names, episodes = runs_as_episodes(runs)
    result = encoder.embed_batch(items, cache=cache, progress=progress)
    if not result.ok.all():
        raise ValueError(f"fixed runs must be complete; could not read: {[e for e in result.errors if e][:3]}")
    return evaluate_episodes(result.vectors, labels, episodes, head=head, class_names=names, progress=progress)


def runs_as_episodes(runs: list[FixedRun]) -> tuple[list[str], np.ndarray, list[str], list[Episode]]:
    """Flatten runs into one item list + episodes indexing it; classes are the runs' support images."""
    items: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    episodes = []
    for run in runs:
        first_class, first_item = len(names), len(items)
        names += [f"{run.name}/{Path(p).stem}" for p in run.support]
        items += [str(p) for p in run.support] + [str(p) for p in run.query]
        ways = len(run.support)
        labels += list(range(first_class, first_class + ways)) + list(first_class + run.query_labels)
        support = np.arange(first_item, first_item + ways)
        query = np.arange(first_item + ways, first_item + ways + len(run.query))
        episodes.append(Episode(classes=np.arange(first_class, first_class + ways), support=support,
                                support_labels=np.arange(ways), query=query,
                                query_labels=np.asarray(run.query_labels)))
    return items, np.asarray(labels), names, episodes

