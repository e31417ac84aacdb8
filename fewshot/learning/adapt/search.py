"""``adapt``: try transfers cheapest first within a time budget, keep each only where it wins on the held-out
validation classes, and return the best as a saved-model head (the frozen default when nothing wins)."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ...data.datasets import ImageDataset, load_dataset
from ...embedding.cache import EmbeddingCache
from ...embedding.encoders import DEFAULT_ENCODER
from ...evaluation.openset import fit_domain_prior
from ..base import HeadBase
from . import candidates as C
from . import tuning
from .budget import Budget, parse_budget
from .domain import Caps, check_domain, drop_unreadable, split_domain, unlabeled_images
from .validation import Validation
from .workspace import Workspace

MAX_UNLABELED = 2000
VALIDATION_EPISODES = 300


@dataclass
class AdaptResult:
    """What ``adapt`` tried and chose; ``model`` is the chosen saved-model head (``save_head`` writes it)."""

    model: HeadBase
    chosen: str
    reason: str
    candidates: list[C.Candidate]
    domain: dict
    budget_seconds: float
    seconds: float
    seed: int
    interrupted: bool = False
    settings: dict = field(default_factory=dict)

    @property
    def frozen(self) -> C.Candidate:
        return self.candidates[0]

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "reason": self.reason, "interrupted": self.interrupted,
                "budget_seconds": self.budget_seconds, "seconds": round(self.seconds, 1), "seed": self.seed,
                "domain": self.domain, "settings": self.settings,
                "candidates": [c.to_dict() for c in self.candidates]}


def adapt(data: str | Path | ImageDataset, *, unlabeled: str | Path | None = None, budget: str | float = "10m",
          seed: int = 0, ways: int = 5, within_group: bool = False, encoder: str = DEFAULT_ENCODER,
          cache: bool | str | Path | EmbeddingCache = True, progress: bool | None = None,
          episodes: int = VALIDATION_EPISODES) -> AdaptResult:
    """Learn the domain of ``data`` (labelled classes, a folder or zip as ``load_dataset`` reads, or an
    ``ImageDataset``) for few-shot use on NEW classes of it: see ``fewshot.learning.adapt``.

    ``unlabeled``: a folder of unlabelled images of the domain (used for domain statistics and adaptation).
    ``budget``: wall-clock time ("10m", "90s" or seconds). ``ways``: N of the validation episodes;
    ``within_group``: draw each episode's classes from one group (e.g. one alphabet). ``seed`` fixes the class
    split, the samples and the episodes. Ctrl-C: returns the best complete candidate so far (``interrupted``)
    once the frozen default is scored, else raises KeyboardInterrupt.
    """
    clock = Budget(parse_budget(budget))
    dataset = check_domain(data if isinstance(data, ImageDataset) else load_dataset(data))
    extra = unlabeled_images(unlabeled, MAX_UNLABELED, seed) if unlabeled is not None else []
    domain = split_domain(dataset, extra, Caps(), seed)
    within_group = bool(within_group and domain.val.groups is not None)
    embedding_cache = cache if isinstance(cache, EmbeddingCache) else (
        EmbeddingCache(None if cache is True else cache) if cache else None)
    ws = Workspace(domain, None, cache=embedding_cache, progress=progress)
    log = _Log(progress)
    frozen = _frozen(ws, clock, encoder, log)
    ws.validation = Validation.build(ws.domain.val, ways=ways, within_group=within_group, episodes=episodes,
                                     seed=seed)
    tried = [frozen]
    _score(ws, frozen)
    log.candidate(frozen)
    interrupted = False
    try:
        for candidate in tuning.candidates(ws, clock, frozen, seed=seed, ways=ways, within_group=within_group,
                                           best=lambda: _best(tried)):
            tried.append(candidate)
            log.candidate(candidate)
    except KeyboardInterrupt:
        interrupted = True
        log.line("interrupted: choosing among the candidates that are complete")
    chosen, reason = _choose(tried)
    model = chosen.model
    model.metadata["unknown_prior"] = [list(row) for row in fit_domain_prior(
        _val_features(ws, chosen), ws.domain.val.labels, head=model, seed=seed)]
    settings = {"ways": ws.validation.ways, "within_group": within_group, "episodes": episodes, "encoder": encoder,
                "data": getattr(dataset, "source", str(data)), "unlabeled": str(unlabeled) if unlabeled else None}
    result = AdaptResult(model=model, chosen=chosen.name, reason=reason, candidates=tried,
                         domain=ws.domain.describe(), budget_seconds=clock.seconds, seconds=clock.elapsed(),
                         seed=seed, interrupted=interrupted, settings=settings)
    model.metadata["adapt"] = result.to_dict()
    return result


def _frozen(ws: Workspace, clock: Budget, encoder_name: str, log) -> C.Candidate:
    """The frozen default, embedded first: it sets the baseline, finds unreadable images and checks that the
    budget allows anything at all."""
    spec = C.FeatureSpec(encoder=encoder_name)
    encoder = spec.create()
    cost = ws.cost_per_image(encoder)
    needed = cost * len(ws.items())
    if needed > 0.9 * clock.seconds:
        raise ValueError(f"a budget of {clock.seconds:.0f} s is too short: embedding the {len(ws.items())} sampled "
                         f"images once takes about {needed:.0f} s here; give --budget {_minutes(needed * 4)} or more")
    start = time.monotonic()
    vectors, ok = ws.embed_all(encoder)
    ws.domain = drop_unreadable(ws.domain, ok)
    ws.remember(encoder, vectors[ok])
    log.line(f"domain: {ws.domain.describe()}")
    return C.Candidate(name=f"frozen default ({spec.label})", phase="baseline", model=C.frozen_model(encoder),
                       encoder=encoder, spec=spec, seconds=time.monotonic() - start, ms_per_image=1000 * cost)


def _score(ws: Workspace, candidate: C.Candidate) -> None:
    candidate.score = ws.validation.score(_val_features(ws, candidate), head=candidate.model)


def _val_features(ws: Workspace, candidate: C.Candidate) -> np.ndarray:
    return ws.features(candidate.encoder).val


def _best(tried: list[C.Candidate]) -> C.Candidate:
    scored = [c for c in tried if c.score is not None]
    return max(scored, key=lambda c: c.score.mean)  # ties: the earlier (cheaper) one


def _choose(tried: list[C.Candidate]) -> tuple[C.Candidate, str]:
    """The best candidate if it beats the frozen default beyond noise (paired 95% CI over the same episodes)."""
    frozen, best = tried[0], _best(tried)
    if best is frozen:
        return frozen, "no candidate beat the frozen default on the validation classes"
    gain, ci = best.score.gain_over(frozen.score)
    if gain - ci <= 0:
        return frozen, (f"the best candidate, {best.name}, was {gain:+.1%} ± {ci:.1%} over the frozen default: "
                        "not clearly better, so the frozen default is kept")
    return best, f"{gain:+.1%} ± {ci:.1%} accuracy over the frozen default on the same validation episodes"


def _minutes(seconds: float) -> str:
    return f"{max(1, int(np.ceil(seconds / 60)))}m"


class _Log:
    """One line per candidate on stderr (the tqdm bars show the work inside a candidate)."""

    def __init__(self, progress: bool | None):
        self.quiet = progress is False

    def line(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(f"adapt: {text}", file=sys.stderr)

    def candidate(self, c: C.Candidate) -> None:
        if c.status != "tried":
            self.line(f"{c.name}: {c.status} ({c.note})")
            return
        parts = [f"{k} {v['accuracy']:.1%} ± {v['ci95']:.1%}" for k, v in c.score.to_dict().items() if "shot" in k
                 and "auroc" not in k]
        auroc = c.score.to_dict().get("auroc_1shot")
        if auroc:
            parts.append(f"AUROC {auroc['mean']:.3f}")
        self.line(f"{c.name}: " + ", ".join(parts) + f" ({c.seconds:.0f} s)")


@contextlib.contextmanager
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
