"""``adapt``: try transfers cheapest first within a time budget, keep each only where it wins on the held-out
validation classes, and return the best as a saved-model head (the frozen default when nothing wins)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ...data.datasets import ImageDataset, load_dataset
from ...embedding.cache import EmbeddingCache
from ...embedding.encoders import DEFAULT_ENCODER
from ...evaluation.openset import fit_domain_prior
from ..base import HeadBase
from .candidates import Candidate, FeatureSpec, frozen_model
from .tuning import candidates
from .budget import PHASE_ENDS, Budget, parse_budget
from .domain import Caps, caps_for_budget, check_domain, drop_unreadable, split_domain, unlabeled_images
from .validation import Validation
from .workspace import Workspace

VALIDATION_EPISODES = 300


@dataclass
class AdaptResult:
    """What ``adapt`` tried and chose; ``model`` is the chosen saved-model head (``save_head`` writes it)."""

    model: HeadBase
    chosen: str
    reason: str
    candidates: list[Candidate]
    domain: dict
    budget_seconds: float
    seconds: float
    seed: int
    interrupted: bool = False
    settings: dict = field(default_factory=dict)

    @property
    def frozen(self) -> Candidate:
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
    extra = unlabeled_images(unlabeled) if unlabeled is not None else []
    domain = split_domain(dataset, extra, Caps(), seed)
    within_group = bool(within_group and domain.val.groups is not None)
    embedding_cache = cache if isinstance(cache, EmbeddingCache) else (
        EmbeddingCache(None if cache is True else cache) if cache else None)
    ws = Workspace(domain, None, cache=embedding_cache, progress=progress)
    log = _Log(progress)
    spec = FeatureSpec(encoder=encoder)
    frozen_encoder = spec.create()
    cost = ws.cost_per_image(frozen_encoder)
    caps = caps_for_budget(domain.images, cost, clock.seconds)
    if caps != Caps():
        ws.domain = split_domain(dataset, extra, caps, seed)
    frozen = _frozen(ws, clock, spec, frozen_encoder, cost, log)
    ws.validation = Validation.build(ws.domain.val, ways=ways, within_group=within_group, episodes=episodes,
                                     seed=seed)
    tried = [frozen]
    frozen.score = ws.score(frozen.encoder, frozen.model)
    log.candidate(frozen)
    interrupted = False
    try:
        for candidate in candidates(ws, clock, tried, seed=seed, ways=ways, within_group=within_group):
            tried.append(candidate)
            log.candidate(candidate)
    except KeyboardInterrupt:
        interrupted = True
        log.line("interrupted: choosing among the candidates that are complete")
    chosen, reason = _choose(tried)
    model = chosen.model
    model.metadata["unknown_prior"] = [list(row) for row in fit_domain_prior(
        ws.features(chosen.encoder).val, ws.domain.val.labels, head=model, seed=seed)]
    settings = {"ways": ws.validation.ways, "within_group": within_group, "episodes": episodes, "encoder": encoder,
                "data": getattr(dataset, "source", str(data)), "unlabeled": str(unlabeled) if unlabeled else None}
    result = AdaptResult(model=model, chosen=chosen.name, reason=reason, candidates=tried,
                         domain=ws.domain.describe(), budget_seconds=clock.seconds, seconds=clock.elapsed(),
                         seed=seed, interrupted=interrupted, settings=settings)
    model.metadata["adapt"] = result.to_dict()
    return result


def _frozen(ws: Workspace, clock: Budget, spec: FeatureSpec, encoder, cost: float, log) -> Candidate:
    """The frozen default, embedded first: it sets the baseline, finds unreadable images and checks that the
    budget allows anything at all."""
    needed = cost * len(ws.items())
    room = PHASE_ENDS["features"] * clock.seconds  # the frozen pass and at least one candidate's must fit here
    if 2 * needed > room:
        raise ValueError(f"a budget of {clock.seconds:.0f} s is too short for any candidate: one pass over the "
                         f"{len(ws.items())} sampled images takes about {needed:.1f} s here; give --budget "
                         f"{_duration(4 * needed / PHASE_ENDS['features'])} or more")
    log.line(f"embedding {len(ws.items())} images with the frozen default ({spec.label}), about {needed:.0f} s")
    start = time.monotonic()
    vectors, ok = ws.embed_all(encoder)
    ws.domain = drop_unreadable(ws.domain, ok)
    ws.remember(encoder, vectors[ok])
    log.line(f"domain: {ws.domain.describe()}")
    return Candidate(name=f"frozen default ({spec.label})", phase="baseline", model=frozen_model(encoder),
                       encoder=encoder, spec=spec, seconds=time.monotonic() - start, ms_per_image=1000 * cost)


def _choose(tried: list[Candidate]) -> tuple[Candidate, str]:
    """The best candidate that beats the frozen default beyond noise: the lower end of the 95% interval of its
    paired per-class gain is above zero. None does: the frozen default."""
    frozen = tried[0]
    gains = {id(c): c.score.gain_over(frozen.score) for c in tried[1:] if c.score is not None}
    clear = [c for c in tried[1:] if id(c) in gains and gains[id(c)][0] - gains[id(c)][1] > 0]
    if clear:
        best = max(clear, key=lambda c: c.score.mean)
        gain, ci = gains[id(best)]
        return best, (f"{gain:+.1%} ± {ci:.1%} accuracy over the frozen default (paired, over "
                      f"{len(best.score.class_accuracy[1])} validation classes)")
    if not gains:
        return frozen, "no other candidate could be scored"
    top = max((c for c in tried[1:] if id(c) in gains), key=lambda c: c.score.mean)
    gain, ci = gains[id(top)]
    return frozen, (f"no candidate beat the frozen default beyond noise (the best, {top.name}: {gain:+.1%} ± "
                    f"{ci:.1%} over {len(top.score.class_accuracy[1])} validation classes); the frozen default is kept")


def _duration(seconds: float) -> str:
    return f"{int(np.ceil(seconds))}s" if seconds < 120 else f"{int(np.ceil(seconds / 60))}m"


class _Log:
    """One line per candidate on stderr (the tqdm bars show the work inside a candidate)."""

    def __init__(self, progress: bool | None):
        self.quiet = progress is False

    def line(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(f"adapt: {text}", file=sys.stderr)

    def candidate(self, c: Candidate) -> None:
        if c.status != "tried":
            self.line(f"{c.name}: {c.status} ({c.note})")
            return
        parts = [f"{k} {v['accuracy']:.1%} ± {v['ci95']:.1%}" for k, v in c.score.to_dict().items() if "shot" in k
                 and "auroc" not in k]
        auroc = c.score.to_dict().get("auroc_1shot")
        if auroc:
            parts.append(f"AUROC {auroc['mean']:.3f}")
        self.line(f"{c.name}: " + ", ".join(parts) + f" ({c.seconds:.0f} s)")
