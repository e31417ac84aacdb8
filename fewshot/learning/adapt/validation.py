"""How ``fewshot adapt`` scores a candidate: fixed episodes on the held-out validation classes.

Every candidate is scored on the SAME episodes (N-way 1- and 5-shot, and 1-shot open-set episodes with
unregistered classes), so that two candidates can be compared class by class. The unit of a comparison is the
validation CLASS, not the episode: episodes drawn from a few classes are not independent draws of what a new
class will do (with two validation classes every episode holds the same two), so the paired difference of
per-class accuracies gets a Student-t interval over classes, which is wide when the classes are few.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ...data.datasets import ImageDataset
from ...data.episodes import EpisodeSampler, sample_open_set
from ...evaluation.evaluate import confidence_interval, evaluate_episodes
from ...evaluation.openset import evaluate_open_set

SHOTS = (1, 5)
QUERIES = 5


@dataclass
class Score:
    """A candidate's per-episode validation results."""

    accuracy: dict[int, np.ndarray]  # shots -> per-episode accuracy
    class_accuracy: dict[int, np.ndarray]  # shots -> accuracy of each queried validation class (fixed order)
    auroc: np.ndarray  # per open-set episode (1 shot), AUROC of the top-1 similarity

    @property
    def mean(self) -> float:
        """What candidates are ranked by: mean accuracy over the shot counts."""
        return float(np.mean([a.mean() for a in self.accuracy.values()]))

    def gain_over(self, other: "Score") -> tuple[float, float]:
        """Mean paired accuracy difference per validation class (averaged over the shot counts), and the
        half-width of its 95% Student-t interval over classes (infinite with a single class)."""
        diff = np.mean([self.class_accuracy[k] - other.class_accuracy[k] for k in self.class_accuracy], axis=0)
        if len(diff) < 2:
            return float(diff.mean()), float("inf")
        half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
        return float(diff.mean()), float(half)

    def to_dict(self) -> dict:
        out = {f"{k}-shot": {"accuracy": float(a.mean()), "ci95": confidence_interval(a)}
               for k, a in self.accuracy.items()}
        if len(self.auroc):
            out["auroc_1shot"] = {"mean": float(self.auroc.mean()), "ci95": confidence_interval(self.auroc)}
        return out


@dataclass
class Validation:
    """The fixed validation episodes over the validation classes' images (row order of ``labels``)."""

    labels: np.ndarray
    ways: int
    episodes: dict[int, list]
    open_episodes: list

    @classmethod
    def build(cls, val: ImageDataset, *, ways: int, within_group: bool, episodes: int, seed: int) -> "Validation":
        groups = val.groups if within_group else None
        ways = min(ways, _max_ways(val, within_group))
        sampled = {}
        for shots in SHOTS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # classes too small for 5 shots: that shot count is skipped
                    sampler = EpisodeSampler(val.labels, ways=ways, shots=shots, queries=_queries(val, shots),
                                             groups=groups, within_group=within_group, seed=[seed, shots])
                sampled[shots] = sampler.sample_many(episodes)
            except ValueError:
                continue
        if 1 not in sampled:
            raise ValueError(f"the validation classes cannot form {ways}-way 1-shot episodes; add images per class")
        return cls(labels=val.labels, ways=ways, episodes=sampled, open_episodes=_open_episodes(val, ways, episodes,
                                                                                                  seed))

    def score(self, features: np.ndarray, head=None) -> Score:
        """Score ``features`` (rows as ``labels``) with ``head`` (None: cosine on the raw features)."""
        accuracy, class_accuracy = {}, {}
        for shots, episodes in self.episodes.items():
            result = evaluate_episodes(features, self.labels, episodes, head=head, progress=False)
            accuracy[shots] = result.episode_accuracies
            per_class = result.per_class_accuracy()
            class_accuracy[shots] = np.array([per_class[name] for name in sorted(per_class, key=int)])
        auroc = np.zeros(0)
        if self.open_episodes:
            auroc = evaluate_open_set(features, self.open_episodes, head=head, progress=False).per_episode["auroc"]
        return Score(accuracy=accuracy, class_accuracy=class_accuracy, auroc=auroc)


def _max_ways(val: ImageDataset, within_group: bool) -> int:
    if within_group and val.groups is not None:
        return int(np.bincount(val.class_groups).max())
    return len(val.classes)


def _queries(val: ImageDataset, shots: int) -> int:
    smallest = int(np.bincount(val.labels).min())
    return max(1, min(QUERIES, smallest - shots))


def _open_episodes(val: ImageDataset, ways: int, episodes: int, seed: int) -> list:
    """1-shot open-set episodes: about half the validation classes known, the others never registered."""
    unknown = max(1, min(ways, len(val.classes) // 2))
    known = min(ways, len(val.classes) - unknown)
    if known < 2:
        return []
    return sample_open_set(val.labels, ways=known, shots=1, queries=_queries(val, 1), unknown_ways=unknown,
                           episodes=episodes, seed=[seed, 99])
