"""How many photos per class do I need? Few-shot accuracy (and unknown rejection) against shot count.

``shots_sweep`` embeds a folder once, then for each shot count builds a ``Protocol`` over the folder's
classes and scores its seeded episodes with the project's evaluation functions: closed-set accuracy
(``evaluate_episodes``) and, with ``unknown_ways``, open-set metrics (``evaluate_open_set``) on the
same episodes. Every row uses the same number of ways so that rows compare: the ways asked for, capped
by the classes that hold enough images for the largest shot count that can be sampled (plus queries).
A shot count too large for even two such classes is left out with the reason.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..embedding.cache import EmbeddingCache
from ..data.datasets import ImageDataset, embed_dataset
from ..embedding.encoders import Encoder
from ..data.protocols import Protocol
from .evaluate import EvaluatedHead, evaluate_episodes, provenance
from ..registry.calibration import DEFAULT_TARGET_TPR, check_target
from .openset import evaluate_open_set


DEFAULT_SHOTS = (1, 2, 5, 10)
_OPEN_SET_COLUMNS = ("auroc", "known_kept", "unknown_accepted")  # open-set metrics a row reports


@dataclass
class SweepRow:
    """One shot count: closed-set accuracy and, in open-set sweeps, AUROC and the fitted threshold's effect."""

    shots: int
    classes: int  # classes with enough images for this shot count (the pool episodes draw from)
    accuracy: float
    ci95: float
    open_set: dict[str, dict[str, float]] | None = None  # name -> {"mean", "ci95"}

    def to_dict(self) -> dict:
        row = {"shots": self.shots, "classes": self.classes, "accuracy": self.accuracy, "ci95": self.ci95}
        return {**row, **(self.open_set or {})}


@dataclass
class SweepResult:
    """A shots sweep: one row per shot count that could be sampled, and why the others could not."""

    rows: list[SweepRow]
    ways: int
    queries: int
    episodes: int
    seed: int
    unknown_ways: int
    target_tpr: float
    skipped: dict[int, str] = field(default_factory=dict)  # shot count -> reason
    notes: list[str] = field(default_factory=list)  # defaults changed on the way, e.g. fewer ways
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"ways": self.ways, "queries": self.queries, "episodes": self.episodes, "seed": self.seed,
                "unknown_ways": self.unknown_ways, "target_tpr": self.target_tpr if self.unknown_ways else None,
                "rows": [r.to_dict() for r in self.rows], "skipped": {str(k): v for k, v in self.skipped.items()},
                "notes": self.notes, **self.provenance}

    def table(self) -> str:
        """The sweep as a text table, with its setting above and notes and skipped shot counts below."""
        setting = (f"{self.ways}-way, {self.queries} queries per class, {self.episodes} episodes per row, "
                   f"seed {self.seed}")
        if self.unknown_ways:
            setting += f", {self.unknown_ways} unknown classes per episode (threshold target {self.target_tpr:.0%})"
        header = ["shots", "classes", "accuracy"]
        if self.unknown_ways:
            header += ["AUROC", "known kept", "unknowns accepted"]
        lines = [setting, "  ".join(f"{h:>16}" if i > 1 else f"{h:>7}" for i, h in enumerate(header))]
        for r in self.rows:
            cells = [f"{r.shots:>7}", f"{r.classes:>7}", f"{_pm(r.accuracy, r.ci95):>16}"]
            if r.open_set:
                cells += [f"{_pm(r.open_set['auroc']['mean'], r.open_set['auroc']['ci95'], False):>16}"]
                cells += [f"{_pm(r.open_set[n]['mean'], r.open_set[n]['ci95']):>16}" for n in _OPEN_SET_COLUMNS[1:]]
            lines.append("  ".join(cells))
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"{k}-shot left out: {why}" for k, why in self.skipped.items()]
        return "\n".join(lines)

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write shots.json and shots.png (accuracy, and AUROC, against shots) into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "shots.json", "plot": out / "shots.png"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        plot_sweep(self, paths["plot"])
        return paths


def shots_sweep(dataset: ImageDataset, encoder: Encoder, *, ways: int = 5, shots: Sequence[int] = DEFAULT_SHOTS,
                queries: int = 5, unknown_ways: int = 0, episodes: int = 600, seed: int = 0,
                head: EvaluatedHead | None = None, target_tpr: float = DEFAULT_TARGET_TPR,
                cache: EmbeddingCache | None = None, progress: bool | None = None) -> SweepResult:
    """Evaluate ``dataset`` (class per folder) at each shot count in ``shots``, embedding it once.

    Each row is the mean over ``episodes`` seeded episodes of ``ways`` known classes, ``queries`` query
    images per class (and, with ``unknown_ways``, as many classes that are never registered, only
    queried), with a 95% CI. Same ``seed``, same episodes: the sweep replays exactly."""
    shots = _check_shots(shots)
    for name, value in [("ways", ways), ("queries", queries), ("episodes", episodes)]:
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(unknown_ways, (int, np.integer)) or unknown_ways < 0:
        raise ValueError(f"unknown_ways must be 0 (closed set) or a positive integer, got {unknown_ways!r}")
    target_tpr = check_target(target_tpr)
    features, dataset = embed_dataset(encoder, dataset, cache=cache, progress=progress)
    counts = np.bincount(np.unique(dataset.labels, return_inverse=True)[1])
    plan = _plan(counts, ways=ways, shots=shots, queries=queries, unknown_ways=unknown_ways)
    rows = []
    for k in tqdm(plan.shots, desc="shots", unit="shot count", disable=not progress if progress is not None else None):
        protocol = Protocol(name=f"{Path(dataset.source).name} {plan.ways}-way {k}-shot", ways=plan.ways, shots=k,
                            queries=queries, episodes=episodes, seed=seed, unknown_ways=unknown_ways)
        rows.append(_evaluate_row(features, dataset, protocol, _classes_with(counts, k + queries), head,
                                  target_tpr))
    return SweepResult(rows, ways=plan.ways, queries=queries, episodes=episodes, seed=seed,
                       unknown_ways=unknown_ways, target_tpr=target_tpr, skipped=plan.skipped, notes=plan.notes,
                       provenance=provenance(encoder, head, dataset.source))


@dataclass
class _Plan:
    ways: int
    shots: list[int]
    skipped: dict[int, str]
    notes: list[str]


def _plan(counts: np.ndarray, *, ways: int, shots: list[int], queries: int, unknown_ways: int) -> _Plan:
    """Which shot counts can be sampled, and the one number of ways every row uses."""
    n_classes = len(counts)
    known_limit = n_classes - unknown_ways  # every episode leaves unknown_ways classes unregistered
    if known_limit < 2:
        advice = "add class folders" if not unknown_ways or n_classes < 2 else "lower --unknown-ways or add classes"
        raise ValueError(f"the folder has {n_classes} class(es); an episode needs 2 known classes"
                         + (f" and {unknown_ways} unknown ones" if unknown_ways else "") + f": {advice}")

    def enough(k: int) -> int:
        return _classes_with(counts, k + queries)

    feasible = [k for k in shots if min(enough(k), known_limit) >= 2]
    skipped = {k: f"only {enough(k)} classes have {k + queries}+ images ({k} shots + {queries} queries); "
                  "an episode needs 2" for k in shots if k not in feasible}
    if not feasible:
        raise ValueError(f"no shot count in {shots} can be sampled: fewer than 2 classes have {min(shots) + queries}+ "
                         f"images ({min(shots)} shots + {queries} queries); lower --queries or add images")
    top = max(feasible)
    used = min(ways, enough(top), known_limit)
    notes = []
    if used < ways:
        why = (f"only {enough(top)} classes have {top + queries}+ images ({top} shots + {queries} queries)"
               if enough(top) < known_limit else f"{n_classes} classes minus {unknown_ways} unknown ones")
        notes.append(f"ways lowered from {ways} to {used} for every row: {why}")
    return _Plan(used, feasible, skipped, notes)


def _classes_with(counts: np.ndarray, images: int) -> int:
    return int((counts >= images).sum())


def _evaluate_row(features: np.ndarray, dataset: ImageDataset, protocol: Protocol, classes: int,
                  head: EvaluatedHead | None, target_tpr: float) -> SweepRow:
    open_set = None
    with warnings.catch_warnings():  # classes too small for this shot count: the row's "classes" says so
        warnings.filterwarnings("ignore", message=".*are never sampled")
        if protocol.unknown_ways:
            open_episodes = protocol.open_set_episodes(dataset.labels)
            episodes = [e.episode for e in open_episodes]  # closed-set accuracy on the same episodes
            measured = evaluate_open_set(features, open_episodes, head=head, target_tpr=target_tpr,
                                         progress=False).to_dict()
            open_set = {name: measured[name] for name in _OPEN_SET_COLUMNS}
        else:
            episodes = protocol.sampler(dataset.labels).sample_many(protocol.episodes)
    closed = evaluate_episodes(features, dataset.labels, episodes, head=head, class_names=dataset.classes,
                               progress=False)
    return SweepRow(protocol.shots, classes, closed.accuracy, closed.ci95, open_set)


def _check_shots(shots: Sequence[int]) -> list[int]:
    values = list(shots)
    if not values or any(not isinstance(k, (int, np.integer)) or k < 1 for k in values):
        raise ValueError(f"shots must be positive integers, e.g. 1,2,5,10; got {shots!r}")
    return sorted(set(int(k) for k in values))


def _pm(mean: float, ci: float, percent: bool = True) -> str:
    return f"{mean:.1%} ± {ci:.1%}" if percent else f"{mean:.3f} ± {ci:.3f}"


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """PNG: closed-set accuracy against shots (and AUROC, known kept, unknowns accepted), 95% CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = [r.shots for r in result.rows]
    panels = 2 if result.unknown_ways else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    ax = axes[0, 0]
    ax.errorbar(shots, [r.accuracy for r in result.rows], yerr=[r.ci95 for r in result.rows], marker="o",
                capsize=3, label="closed-set accuracy")
    _annotate(ax, shots, [r.accuracy for r in result.rows], "{:.1%}")
    ax.axhline(1 / result.ways, color="grey", linestyle=":", linewidth=1, label=f"chance (1/{result.ways})")
    _shots_axis(ax, shots, f"{result.ways}-way accuracy (95% CI)")
    ax.set_ylabel("accuracy")
    if result.unknown_ways:
        ax = axes[0, 1]
        for name, label, fmt in [("auroc", "AUROC (known vs unknown)", "{:.3f}"),
                                 ("known_kept", "known kept at threshold", None),
                                 ("unknown_accepted", "unknowns accepted at threshold", "{:.1%}")]:
            means = [r.open_set[name]["mean"] for r in result.rows]
            ax.errorbar(shots, means, yerr=[r.open_set[name]["ci95"] for r in result.rows], marker="o", capsize=3,
                        label=label)
            if fmt:
                _annotate(ax, shots, means, fmt)
        _shots_axis(ax, shots, f"{result.unknown_ways} unknown classes per episode (95% CI)", legend="center right")
        ax.set_ylabel("AUROC / share of queries")
    fig.suptitle(f"{Path(str(result.provenance.get('dataset', ''))).name}: {result.queries} queries per class, "
                 f"{result.episodes} episodes per point", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _shots_axis(ax, shots: list[int], title: str, legend: str = "lower right") -> None:
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("images per class (shots)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(loc=legend, fontsize=8)


def _annotate(ax, xs: list[int], ys: list[float], fmt: str) -> None:
    for x, y in zip(xs, ys):
        ax.annotate(fmt.format(y), (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
