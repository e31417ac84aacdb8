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

from .embedding.cache import EmbeddingCache
from .data.datasets import ImageDataset, load_dataset
from .data.datasets import embed_dataset as embed_dataset
from .data.datasets import split_validation as split_validation
from .data.datasets import with_rotations as with_rotations
from .embedding.encoders import Encoder
from .data.episodes import Episode, EpisodeSampler, load_episodes
from .data.protocols import FixedRun, Protocol, load_fixed_runs
from .data.episodes import save_episodes as write_episodes
from .evaluation.evaluate import EvaluationResult, evaluate_episodes
from .evaluation.evaluate import provenance as provenance
from .errors import ImageError
from .learning.heads import Head, create_head
from .registry.calibration import DEFAULT_TARGET_TPR, check_target
from .evaluation.openset import OpenSetResult, evaluate_open_set
from .learning.train import TrainResult
from .embedding.views import check_support_views, embed_flipped


def resolve_dataset(data: str | os.PathLike, protocol: Protocol | None = None) -> ImageDataset:
    """``data`` is the dataset (folder or zip), or a root holding the protocol's ``dataset`` path."""
    data = Path(data)
    if protocol is None or not protocol.dataset:
        return load_dataset(data)
    if (data / protocol.dataset).exists():
        return load_dataset(data / protocol.dataset)
    try:
        return load_dataset(data)
    except ValueError as e:
        raise ValueError(f"{data / protocol.dataset}: not found, and {data} is not a dataset either ({e}); pass "
                         f"--data ROOT holding {protocol.dataset} (protocol {protocol.name!r}), or the dataset"
                         ) from None


def train_head_on_dataset(dataset: ImageDataset, encoder: Encoder, head_name: str, *, ways: int = 20,
                          shots: int = 1, queries: int = 5, episodes: int = 2000, within_group: bool = False,
                          val_fraction: float = 0.2, seed: int = 0, lr: float = 1e-3,
                          head_params: dict | None = None, augment: str | None = None,
                          val_every: int = 200, patience: int = 5,
                          cache: EmbeddingCache | None = None, force: bool = False,
                          progress: bool | None = None) -> tuple[Head, TrainResult]:
    """Embed the dataset, hold out validation classes, train ``head_name`` episodically.

    ``augment="rotations"`` adds rotated copies of the training classes as new classes.
    A head is never worse than the features it was trained on without saying so: if the trained head
    scores below raw features on the validation classes, raw features are returned instead (an
    ``identity`` head without centring) with a warning, unless ``force=True``. Both figures and the choice
    are in ``head.metadata["training"]``."""
    if within_group and dataset.groups is None:
        raise ValueError(f"--within-group needs a dataset of groups (group/class/image folders, like Omniglot's "
                         f"alphabets), but {dataset.source} is flat: leave --within-group out (within_group=False)")
    if augment not in (None, "rotations"):
        raise ValueError(f"augment must be None or 'rotations', got {augment!r}")
    train, val = split_validation(dataset, val_fraction, seed)
    _check_measurable(val, within_group)
    if augment == "rotations":
        train = with_rotations(train)
    x_train, train = embed_dataset(encoder, train, cache=cache, progress=progress)
    x_val, val = embed_dataset(encoder, val, cache=cache, progress=progress)
    head = create_head(head_name, encoder.dim, in_shape=encoder.feature_shape, seed=seed, **(head_params or {}))
    ways = min(ways, _max_ways(train, within_group), _max_ways(val, within_group))
    result = head.fit(x_train, train.labels, groups=train.groups, ways=ways, shots=shots, queries=queries,
                      episodes=episodes, within_group=within_group, seed=seed, lr=lr,
                      val_features=x_val, val_labels=val.labels, val_groups=val.groups, val_every=val_every,
                      patience=patience, progress=progress)
    raw, trained = compare_with_raw_features(head, x_val, val, ways=ways, shots=shots, queries=queries,
                                             within_group=within_group, seed=seed)
    keep_raw = trained < raw and not force
    if trained < raw:
        kept = "raw features (an identity head without centring)" if keep_raw else f"the {head_name} head (--force)"
        warnings.warn(f"the trained {head_name} head ({trained:.1%}) is worse than raw features ({raw:.1%}) on "
                      f"the validation classes; keeping {kept}. This domain may need no head, more training "
                      f"classes, or a head that starts at raw features (protonet with residual=true)",
                      RuntimeWarning, stacklevel=2)
    if keep_raw:
        head = raw_features_head(encoder.dim)
    head.metadata["encoder"] = encoder.fingerprint
    head.metadata["training"] = {"dataset": dataset.source, "ways": ways, "shots": shots, "queries": queries,
                                 "episodes": episodes, "within_group": within_group, "seed": seed,
                                 "augment": augment, "validation_classes": val.classes[:50],
                                 "best_val_accuracy": result.best_val_accuracy,
                                 "val_accuracy_raw_features": raw, "val_accuracy_head": trained,
                                 "trained_head": head_name, "kept": "raw features" if keep_raw else "head",
                                 "forced": bool(force)}
    return head, result


def raw_features_head(dim: int) -> Head:
    """A head that leaves features as they are (cosine nearest prototype on the encoder's vectors)."""
    return create_head("identity", dim, center=False)

def _check_measurable(val: ImageDataset, within_group: bool) -> None:
    """A 1-way validation episode always scores 100%: such a report would be meaningless."""
    if _max_ways(val, within_group) < 2:
        where = " per group" if within_group and val.groups is not None else ""
        raise ValueError(f"validation would hold only {_max_ways(val, within_group)} class{where}, so every "
                         f"validation episode is 1-way and scores 100% whatever the head; raise --val-fraction "
                         f"(val_fraction), or train on a dataset with more classes")


def compare_with_raw_features(head: Head, features: np.ndarray, dataset: ImageDataset, *, ways: int, shots: int,
                              queries: int, within_group: bool, seed: int, episodes: int = 200) -> tuple[float, float]:
    """Accuracy of raw features and of the head on the same seeded validation episodes."""
    sampler = EpisodeSampler(dataset.labels, ways=ways, shots=shots, queries=queries, groups=dataset.groups,
                             within_group=within_group, seed=seed)
    sampled = sampler.sample_many(episodes)
    raw = evaluate_episodes(features, dataset.labels, sampled, progress=False).accuracy
    return raw, evaluate_episodes(features, dataset.labels, sampled, head=head, progress=False).accuracy


def _max_ways(dataset: ImageDataset, within_group: bool) -> int:
    """Largest way count an episode can have on this dataset (training adapts to small splits)."""
    if within_group and dataset.groups is not None:
        return int(np.bincount(dataset.class_groups).max())
    return len(dataset.classes)


def evaluate_protocol(dataset: ImageDataset, protocol: Protocol, encoder: Encoder, *, head: Head | None = None,
                      episodes: int | None = None, seed: int | None = None, cache: EmbeddingCache | None = None,
                      progress: bool | None = None, save_episodes: str | os.PathLike | None = None,
                      replay: str | os.PathLike | None = None, support_views: str = "none") -> EvaluationResult:
    """Evaluate on the protocol's test split with its seeded episodes, or replay a manifest's.

    ``support_views="flip"``: each support image also counts with its left-right mirror, averaged into
    one example as ``FewShotClassifier(support_views="flip")`` registers it (``fewshot.embedding.views``)."""
    check_support_views(support_views)
    if seed is not None:
        protocol = dataclasses.replace(protocol, seed=seed)
    features, test = embed_dataset(encoder, protocol.test_split(dataset), cache=cache, progress=progress)
    if replay is not None:
        sampled = load_episodes(replay, test)
        _check_replay_fits(sampled, protocol, replay)
    else:
        try:
            sampler = protocol.sampler(test.labels, test.groups)
        except ValueError as e:
            raise ValueError(f"protocol {protocol.name!r} (ways, shots, queries): {e}") from None
        sampled = sampler.sample_many(episodes or protocol.episodes)
    if save_episodes is not None:
        write_episodes(save_episodes, sampled, test, protocol=protocol.to_dict())
    labels, scored = test.labels, sampled
    if support_views == "flip":
        features, labels, scored = with_flipped_support(encoder, test, features, sampled, cache=cache,
                                                        progress=progress)
    result = evaluate_episodes(features, labels, scored, head=head, class_names=test.classes, progress=progress)
    if support_views == "flip":
        result.shots = _shots_of(sampled)  # a flipped view is a second view of a shot, not another shot
    result.provenance = provenance(encoder, head, dataset.source, protocol.to_dict()) | {"support_views": support_views}
    return result


def with_flipped_support(encoder: Encoder, dataset: ImageDataset, features: np.ndarray, episodes: list[Episode], *,
                         cache: EmbeddingCache | None = None,
                         progress: bool | None = None) -> tuple[np.ndarray, np.ndarray, list[Episode]]:
    """(features, labels, episodes) with the flipped view of every support image appended as a row, and
    each episode's support holding both views of each image. Under nearest prototype the prototype is
    then the mean of the images' view averages, as a registry with ``support_views="flip"`` keeps it.
    Each image is flipped and embedded once (cached), however many episodes it supports."""
    support = np.unique(np.concatenate([e.support for e in episodes]))

    def embed(items: list) -> tuple[np.ndarray, np.ndarray]:
        result = encoder.embed_batch(items, cache=cache, progress=False)
        return result.vectors, result.ok

    vectors, ok = embed_flipped(embed, [dataset.items[i] for i in support], progress=progress)
    if not ok.all():  # the image itself was read, so its mirror can only fail in the network
        raise ImageError(f"{int((~ok).sum())} flipped support images could not be embedded "
                         f"(first: {dataset.names[support[np.flatnonzero(~ok)[0]]]})")
    flipped_row = np.full(len(features), -1)
    flipped_row[support] = len(features) + np.arange(len(support))
    viewed = [dataclasses.replace(e, support=np.stack([e.support, flipped_row[e.support]], axis=1).ravel(),
                                  support_labels=np.repeat(e.support_labels, 2)) for e in episodes]
    return (np.concatenate([features, vectors.astype(features.dtype)]),
            np.concatenate([dataset.labels, dataset.labels[support]]), viewed)


def _shots_of(episodes: list[Episode]) -> int | str:
    shots = {int(n) for e in episodes for n in np.bincount(e.support_labels)}
    return shots.pop() if len(shots) == 1 else "variable"


def _check_replay_fits(episodes: list[Episode], protocol: Protocol, manifest) -> None:
    """Replayed episodes must be the protocol's shape, or the result lands under the wrong setting."""
    shots = {int(np.bincount(e.support_labels).max()) if len(e.support_labels) else 0 for e in episodes}
    for what, want, got in [("shot", protocol.shots, shots),
                            ("way", protocol.ways, {len(e.classes) for e in episodes})]:
        if want is not None and not protocol.variable and got != {want}:
            held = "/".join(f"{n}-{what}" for n in sorted(got))
            raise ValueError(f"{manifest} holds {held} episodes, but protocol {protocol.name!r} is {want}-{what}; "
                             f"replay it without --protocol (the manifest records its own protocol) or with the "
                             f"protocol it was saved with")


def evaluate_open_set_protocol(dataset: ImageDataset, protocol: Protocol, encoder: Encoder, *,
                               head: Head | None = None, episodes: int | None = None, seed: int | None = None,
                               target_tpr: float | None = None, cache: EmbeddingCache | None = None,
                               progress: bool | None = None) -> OpenSetResult:
    """Open-set evaluation (``protocol.unknown_ways`` > 0) on the protocol's test split."""
    if seed is not None:
        protocol = dataclasses.replace(protocol, seed=seed)
    features, test = embed_dataset(encoder, protocol.test_split(dataset), cache=cache, progress=progress)
    sampled = protocol.open_set_episodes(test.labels, episodes)
    return evaluate_open_set(features, sampled, head=head, progress=progress,
                             target_tpr=DEFAULT_TARGET_TPR if target_tpr is None else check_target(target_tpr))


def evaluate_runs(root: str | os.PathLike, encoder: Encoder, *, head: Head | None = None,
                  cache: EmbeddingCache | None = None, progress: bool | None = None) -> EvaluationResult:
    """Fixed-episode runs (published Omniglot one-shot format): one episode per run."""
    runs = load_fixed_runs(root)
    items, labels, names, episodes = runs_as_episodes(runs)
    result = encoder.embed_batch(items, cache=cache, progress=progress)
    if not result.ok.all():
        raise ValueError(f"fixed runs must be complete; could not read: {[e for e in result.errors if e][:3]}")
    evaluation = evaluate_episodes(result.vectors, labels, episodes, head=head, class_names=names, progress=progress)
    evaluation.provenance = provenance(encoder, head, str(root))
    return evaluation


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

