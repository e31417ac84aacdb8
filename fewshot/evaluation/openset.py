"""Open-set episodic evaluation: does the registry tell registered classes from never-registered ones?

Each episode registers its known classes from their support items and fits the unknown threshold and
temperature from them exactly as a registry does (``fewshot.registry.calibration.fit_calibration``: the same score,
the same fit), then scores queries of the known classes and of ``unknown_ways`` other classes. Reported
per episode, then as mean and 95% CI over episodes: AUROC of the top-1 similarity, FPR@95TPR (share
of unknowns accepted at the threshold keeping 95% of known queries), precision at 90% recall,
closed-set accuracy on the known queries, and at the fitted threshold: open-set accuracy (a known
query named correctly, an unknown one called unknown), known queries kept and unknowns accepted.
Expected calibration error and the ROC curve are computed on all episodes' queries pooled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .evaluate import confidence_interval, hide_progress
from ..data.episodes import OpenSetEpisode
from .metrics import (auroc, expected_calibration_error, fpr_at_tpr, precision_at_recall, reliability_bins,
                      roc_curve)
from ..registry.calibration import (DEFAULT_TARGET_TPR, cross_class_scores, fit_calibration, fit_prior,
                                   pairwise_scores)

DEFAULT_TEMPERATURE = {"cosine": 0.05, "l2": 1.0}  # as FewShotClassifier, where nothing can be fitted
_PER_EPISODE = ("auroc", "fpr_at_95tpr", "precision_at_90recall", "closed_set_accuracy", "open_set_accuracy",
                "known_kept", "unknown_accepted")


@dataclass
class OpenSetResult:
    """Per-episode open-set metrics (arrays of length E) and the pooled queries behind ROC and ECE."""

    per_episode: dict[str, np.ndarray]
    known_scores: np.ndarray  # top-1 similarity of every known query, all episodes
    unknown_scores: np.ndarray
    confidences: np.ndarray  # top-1 probability of every known query
    correct: np.ndarray  # whether its top-1 class was right
    ways: int
    shots: int
    unknown_ways: int
    target_tpr: float

    @property
    def episodes(self) -> int:
        return len(self.per_episode["auroc"])

    @property
    def ece(self) -> float:
        return expected_calibration_error(self.confidences, self.correct)

    def to_dict(self) -> dict:
        metrics = {name: {"mean": float(np.mean(v)), "ci95": confidence_interval(v)}
                   for name, v in self.per_episode.items()}
        return {"open_set": True, "episodes": self.episodes, "ways": self.ways, "shots": self.shots,
                "unknown_ways": self.unknown_ways, "target_tpr": self.target_tpr, **metrics,
                "expected_calibration_error": self.ece,
                # the fields closed-set results have, so tools reading "accuracy" keep working
                "accuracy": metrics["closed_set_accuracy"]["mean"], "ci95": metrics["closed_set_accuracy"]["ci95"]}

    def summary(self) -> str:
        d = self.to_dict()

        def pm(name, percent=True):
            m, c = d[name]["mean"], d[name]["ci95"]
            return f"{m:.1%} ± {c:.1%}" if percent else f"{m:.3f} ± {c:.3f}"

        return (f"{self.ways}-way {self.shots}-shot + {self.unknown_ways} unknown classes, {self.episodes} episodes: "
                f"AUROC {pm('auroc', False)}, FPR@95TPR {pm('fpr_at_95tpr')}, precision@90recall "
                f"{pm('precision_at_90recall')}, closed-set accuracy {pm('closed_set_accuracy')}; at the fitted "
                f"threshold (target {self.target_tpr:.0%}): open-set accuracy {pm('open_set_accuracy')}, known kept "
                f"{pm('known_kept')}, unknowns accepted {pm('unknown_accepted')}; ECE {self.ece:.3f}")

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write result.json, roc.png and reliability.png into ``out``; return their paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "result.json", "roc": out / "roc.png", "reliability": out / "reliability.png"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        plot_roc(self.known_scores, self.unknown_scores, paths["roc"],
                 title=f"{self.ways}-way {self.shots}-shot + {self.unknown_ways} unknown, {self.episodes} episodes")
        plot_reliability(self.confidences, self.correct, paths["reliability"])
        return paths


def evaluate_open_set(features: np.ndarray, episodes: list[OpenSetEpisode], *, head=None, metric: str = "cosine",
                      target_tpr: float = DEFAULT_TARGET_TPR, progress: bool | None = None) -> OpenSetResult:
    """Score open-set ``episodes`` (``fewshot.data.episodes.sample_open_set``) on embeddings ``features``."""
    if not episodes:
        raise ValueError("no episodes to evaluate; sample some with sample_open_set(...)")
    if head is not None and head.adapts:
        raise ValueError(f"open-set evaluation needs a head that maps features ({type(head).__name__} adapts per "
                         "episode and has no registry to calibrate); use a protonet or metric head")
    x = head.transform(features) if head is not None else np.asarray(features, dtype=np.float32)
    metric = head.metric if head is not None else metric
    x = np.asarray(x, dtype=np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    per_episode = {name: np.zeros(len(episodes)) for name in _PER_EPISODE}
    pooled = {"known": [], "unknown": [], "confidence": [], "correct": []}
    for i, open_episode in enumerate(tqdm(episodes, desc="evaluating", unit="episode", leave=False,
                                          disable=hide_progress(progress, len(episodes)))):
        scores = _score_episode(x, open_episode, metric, target_tpr)
        for name in _PER_EPISODE:
            per_episode[name][i] = scores[name]
        for name in pooled:
            pooled[name].append(scores[name])
    e = episodes[0].episode
    return OpenSetResult(per_episode, np.concatenate(pooled["known"]), np.concatenate(pooled["unknown"]),
                         np.concatenate(pooled["confidence"]), np.concatenate(pooled["correct"]),
                         ways=e.ways, shots=len(e.support) // e.ways, unknown_ways=len(episodes[0].unknown_classes),
                         target_tpr=target_tpr)


def fit_domain_prior(features: np.ndarray, labels, *, head=None, draws: int = 20, seed: int = 0
                     ) -> tuple[tuple[float, float], ...]:
    """A domain's own 1-shot unknown prior (``fewshot.registry.calibration.fit_prior``) from embeddings of
    held-out classes: same-class pairs are exactly 1-shot known scores; the cross-class scores come from
    ``draws`` seeded one-image-per-class registries. In ``head``'s space and metric when given, else cosine."""
    x = head.transform(features) if head is not None else np.asarray(features, dtype=np.float32)
    metric = head.metric if head is not None else "cosine"
    labels = np.asarray(labels)
    classes = np.unique(labels)
    known = np.concatenate([pairwise_scores(x[labels == c], metric) for c in classes])
    rng = np.random.default_rng(seed)
    one_per_class = [np.stack([x[rng.choice(np.flatnonzero(labels == c))] for c in classes]) for _ in range(draws)]
    cross = np.concatenate([cross_class_scores(prototypes, metric) for prototypes in one_per_class])
    return fit_prior(known, cross)


def _score_episode(x: np.ndarray, open_episode: OpenSetEpisode, metric: str, target_tpr: float) -> dict:
    episode = open_episode.episode
    examples = [x[episode.support[episode.support_labels == j]] for j in range(episode.ways)]
    labels = [str(j) for j in range(episode.ways)]
    calibration = fit_calibration(labels, examples, metric, target_tpr)
    prototypes = np.stack([e.mean(axis=0) for e in examples])
    if metric == "cosine":
        prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)

    def similarities(items):
        q = x[items]
        if metric == "cosine":
            return q @ prototypes.T
        return -((q[:, None, :] - prototypes[None]) ** 2).sum(axis=2)

    known_sim, unknown_sim = similarities(episode.query), similarities(open_episode.unknown_query)
    predicted, known_top = known_sim.argmax(axis=1), known_sim.max(axis=1)
    unknown_top = unknown_sim.max(axis=1)
    counts = [len(e) for e in examples]

    def accepted(sim):
        best = sim.argmax(axis=1)
        limits = np.array([calibration.threshold_for(labels[b], counts[b]) for b in best], dtype=float)
        return sim.max(axis=1) >= np.nan_to_num(limits, nan=-np.inf)

    kept, leaked = accepted(known_sim), accepted(unknown_sim)
    correct = predicted == episode.query_labels
    temperature = calibration.temperature or DEFAULT_TEMPERATURE[metric]
    logits = (known_sim - known_top[:, None]) / temperature
    confidence = 1.0 / np.exp(logits).sum(axis=1)
    n_queries = len(known_top) + len(unknown_top)
    return {"auroc": auroc(known_top, unknown_top), "fpr_at_95tpr": fpr_at_tpr(known_top, unknown_top, 0.95),
            "precision_at_90recall": precision_at_recall(known_top, unknown_top, 0.90),
            "closed_set_accuracy": float(correct.mean()),
            "open_set_accuracy": float(((kept & correct).sum() + (~leaked).sum()) / n_queries),
            "known_kept": float(kept.mean()), "unknown_accepted": float(leaked.mean()),
            "known": known_top, "unknown": unknown_top, "confidence": confidence, "correct": correct}


def roc_legend(known_scores, unknown_scores) -> str:
    """The ROC curve's legend, saying what its AUROC is computed on: every episode's queries pooled, which
    can differ from the mean of the per-episode AUROCs that ``summary`` reports."""
    return (f"top-1 similarity: AUROC {auroc(known_scores, unknown_scores):.3f} of all episodes'\n"
            "queries pooled, known vs unregistered")


def plot_roc(known_scores, unknown_scores, path: str | Path, *, title: str = "") -> Path:
    """ROC curve PNG: known queries kept against unknowns accepted, with the 95%-kept line."""
    plt = _pyplot()
    fpr, tpr = roc_curve(known_scores, unknown_scores)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=roc_legend(known_scores, unknown_scores))
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle=":")
    ax.axhline(0.95, color="grey", linewidth=0.5)
    ax.set_xlabel("unknown queries accepted (false positive rate)")
    ax.set_ylabel("known queries kept (true positive rate)")
    ax.set_title(title or "ROC", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_reliability(confidences, correct, path: str | Path, bins: int = 15) -> Path:
    """Reliability diagram PNG: accuracy against top-1 probability per bin, with the diagonal."""
    plt = _pyplot()
    mean_conf, accuracy, count = reliability_bins(confidences, correct, bins)
    filled = count > 0
    fig, ax = plt.subplots(figsize=(5, 5))
    width = 1.0 / bins
    centres = (np.arange(bins) + 0.5) * width
    ax.bar(centres[filled], accuracy[filled], width=width * 0.9, alpha=0.7, label="accuracy per bin")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.plot(mean_conf[filled], accuracy[filled], "o", color="black", markersize=3, label="mean probability")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-1 probability")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, ECE {expected_calibration_error(confidences, correct, bins):.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
