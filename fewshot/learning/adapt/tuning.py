"""The order in which ``adapt`` tries candidates, and the budget check before each.

Phases, cheapest first, each building on the best candidate so far: feature choice (layout, resolution,
encoder), domain statistics (whitening, AdaBN), a trained head, fine-tuning of the top blocks, and with
unlabelled images, adaptation on them. A candidate whose estimated cost does not fit before its phase's
deadline is reported as skipped; one that fails is reported with the reason, and the search goes on.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np

from ...data.datasets import ImageDataset
from ...errors import FewShotError
from ..heads.whitening import MAX_WHITENING_DIM
from .candidates import (MIN_HEAD_CLASSES, WHITENING_SHRINKAGES, Candidate, FeatureSpec, centred_model, encoder_specs,
                         layout_specs, protonet_model, resolution_spec, whitened_model)
from .budget import Budget
from .workspace import Workspace

MIN_TRAINING_SECONDS = 30  # a head or a fine-tuning run given less than this has no chance to learn
ENCODER_SETUP_SECONDS = 3  # building an encoder and timing it, before its embedding pass


def best_of(tried: list[Candidate], *, single: bool = False) -> Candidate:
    """The best scored candidate (on one encoder only, with ``single``); ties go to the earlier, cheaper one."""
    scored = [c for c in tried if c.score is not None and (c.spec.single or not single)]
    return max(scored, key=lambda c: c.score.mean)


def candidates(ws: Workspace, clock: Budget, tried: list[Candidate], *, seed: int, ways: int,
               within_group: bool) -> Iterator[Candidate]:
    """Yield each candidate as it is tried (scored) or skipped; ``tried`` (the frozen default first) is the
    caller's list of candidates so far, which it extends with each one yielded."""
    trial = _Trial(ws, clock)
    frozen = tried[0]

    def best() -> Candidate:
        return best_of(tried)

    def best_single() -> Candidate:  # AdaBN and fine-tuning change one network
        return best_of(tried, single=True)

    for spec in layout_specs(frozen.spec):
        yield trial.features(spec)
    resolution = resolution_spec(best().spec, best().encoder, list(ws.domain.val.items))
    if resolution is not None:
        yield trial.features(resolution)
    for spec in encoder_specs(best().spec):
        yield trial.features(spec)
    yield from _statistics(trial, best(), best_single(), seed)
    yield trial.head(best(), seed=seed, ways=ways, within_group=within_group)
    yield from _finetuning(trial, best_single(), _best_shrinkage(tried), seed=seed, ways=ways,
                           within_group=within_group)


def _best_shrinkage(tried: list[Candidate]) -> float:
    """The whitening shrinkage that validated best (the middle one when none was scored)."""
    whitened = [c for c in tried if c.shrinkage is not None and c.score is not None]
    return max(whitened, key=lambda c: c.score.mean).shrinkage if whitened else WHITENING_SHRINKAGES[1]


def _statistics(trial: "_Trial", base: Candidate, single: Candidate, seed: int) -> Iterator[Candidate]:
    for shrinkage in WHITENING_SHRINKAGES:
        candidate = trial.whitening(base, shrinkage)
        yield candidate
        if candidate.status == "skipped":  # too wide: once is enough to say so
            break
    yield trial.adabn(single, seed=seed)


def _finetuning(trial: "_Trial", base: Candidate, shrinkage: float, *, seed: int, ways: int, within_group: bool
                ) -> Iterator[Candidate]:
    finetuned = trial.finetune(base, "finetune", seed=seed, ways=ways, within_group=within_group)
    yield finetuned
    if finetuned.score is not None:  # the domain's statistics on the fine-tuned features: nearly free
        yield trial.whitening(finetuned, shrinkage, phase="refine")
    if trial.ws.domain.unlabeled:
        yield trial.finetune(base, "unlabeled", seed=seed, ways=ways, within_group=within_group, objective="distill")
        yield trial.finetune(base, "unlabeled", seed=seed, ways=ways, within_group=within_group, objective="dann")


class _Trial:
    """Runs one candidate: budget check, build, score, timing, and failures turned into report rows."""

    def __init__(self, ws: Workspace, clock: Budget):
        self.ws, self.clock = ws, clock

    def run(self, name: str, phase: str, estimate: float, build: Callable[[Candidate], None]) -> Candidate:
        candidate = Candidate(name=name, phase=phase)
        left = self.clock.left(phase)
        if estimate > left:
            candidate.status = "skipped"
            candidate.note = f"needs about {estimate:.0f} s, {max(left, 0):.0f} s left for {phase}"
            return candidate
        start = time.monotonic()
        try:
            build(candidate)
            candidate.score = self.ws.score(candidate.encoder, candidate.model)
        except _Skip as skip:
            candidate.status, candidate.note, candidate.model = "skipped", str(skip), None
        except (FewShotError, ValueError, RuntimeError, FloatingPointError) as exc:
            candidate.status, candidate.note = "failed", " ".join(str(exc).split())[:200]
            candidate.model = None
        candidate.seconds = time.monotonic() - start
        return candidate

    def _images(self) -> int:
        return len(self.ws.items())

    # -- feature choice --------------------------------------------------------------------------------
    def features(self, spec: FeatureSpec) -> Candidate:
        def build(c: Candidate) -> None:
            encoder = spec.create()
            c.ms_per_image = 1000 * self.ws.cost_per_image(encoder)
            needed = 0 if self.ws.has(encoder) else c.ms_per_image / 1000 * self._images()
            if time.monotonic() + needed > self.clock.deadline("features"):
                raise _Skip(f"embedding the domain would take about {needed:.0f} s")
            c.encoder, c.spec = encoder, spec
            c.model = centred_model(encoder, self.ws.features(encoder))

        return self.run(f"{spec.label}, centred", "features", ENCODER_SETUP_SECONDS, build)

    # -- domain statistics ---------------------------------------------------------------------------------
    def whitening(self, base: Candidate, shrinkage: float, phase: str = "statistics") -> Candidate:
        """Whitening with the domain's statistics on ``base``'s features (a fine-tuned network stays carried)."""
        from ..heads.finetuned import FineTunedHead

        def build(c: Candidate) -> None:
            if base.encoder.dim > MAX_WHITENING_DIM:
                raise _Skip(f"{base.encoder.dim}-dim features are too wide to whiten (limit {MAX_WHITENING_DIM})")
            c.encoder, c.spec, c.ms_per_image, c.shrinkage = base.encoder, base.spec, base.ms_per_image, shrinkage
            head = whitened_model(base.encoder, self.ws.features(base.encoder), shrinkage)
            c.model = FineTunedHead.wrap(base.encoder, head) if isinstance(base.model, FineTunedHead) else head

        label = base.name if phase == "refine" else base.spec.label
        return self.run(f"{label}, whitened (shrinkage {shrinkage})", phase, 1, build)

    def adabn(self, base: Candidate, *, seed: int) -> Candidate:
        from ..adabn import adapt_batchnorm
        from ..heads.finetuned import FineTunedHead

        def build(c: Candidate) -> None:
            images = list(self.ws.domain.train.items) + list(self.ws.domain.unlabeled)
            encoder = adapt_batchnorm(base.encoder, images, seed=seed, progress=self.ws.progress)
            c.encoder, c.spec, c.ms_per_image = encoder, base.spec, base.ms_per_image
            head = centred_model(encoder, self.ws.features(encoder))
            c.model = FineTunedHead.wrap(encoder, head)

        estimate = 2 * (base.ms_per_image or 0) / 1000 * self._images()
        return self.run(f"{base.spec.label}, AdaBN statistics, centred", "statistics", estimate, build)

    # -- a trained head ------------------------------------------------------------------------------------
    def head(self, base: Candidate, *, seed: int, ways: int, within_group: bool) -> Candidate:
        def build(c: Candidate) -> None:
            if len(self.ws.domain.train.classes) < MIN_HEAD_CLASSES:
                raise _Skip(f"a head needs {MIN_HEAD_CLASSES}+ training classes (a fifth of them validate its "
                            f"training), the domain has {len(self.ws.domain.train.classes)}")
            c.encoder, c.spec, c.ms_per_image = base.encoder, base.spec, base.ms_per_image
            c.model = protonet_model(base.encoder, self.ws.features(base.encoder), self.ws, ways=ways,
                                       within_group=within_group, seed=seed, deadline=self.clock.deadline("head"))

        return self.run(f"{base.spec.label}, ProtoNet head", "head", MIN_TRAINING_SECONDS, build)

    # -- fine-tuning -------------------------------------------------------------------------------------
    def finetune(self, base: Candidate, phase: str, *, seed: int, ways: int, within_group: bool,
                 objective: str | None = None) -> Candidate:
        from ..finetune import Recipe, finetune

        spec = base.spec

        def build(c: Candidate) -> None:
            recipe = Recipe(encoder=spec.encoder, stages=spec.stages, pool=spec.pool, input_size=spec.input_size,
                            trainable_stages=1 if spec.stages is None else 2, head="identity", ways=ways,
                            within_group=within_group, augment=("flip",), episodes=5000, val_every=25, patience=4,
                            seed=seed, **({"unlabeled": objective} if objective else {}))
            target = _unlabeled_dataset(self.ws.domain.unlabeled) if objective else None
            model, _ = finetune(self.ws.domain.train, recipe, adapt_to=target, progress=self.ws.progress,
                                deadline=self.clock.deadline(phase))
            c.model, c.encoder, c.spec, c.ms_per_image = model, model.carried_encoder(), spec, base.ms_per_image

        what = {None: "fine-tuned top blocks", "distill": "top blocks distilled on unlabelled images",
                "dann": "top blocks with DANN on unlabelled images"}[objective]
        return self.run(f"{spec.label}, {what}", phase, MIN_TRAINING_SECONDS * 2, build)


class _Skip(Exception):
    """Raised while building a candidate that turns out not to fit (time, width, data): reported as skipped."""


def _unlabeled_dataset(items: list) -> ImageDataset:
    """Unlabelled images as a one-class dataset: what fine-tuning's ``adapt_to`` takes (labels are ignored)."""
    return ImageDataset(items=list(items), names=[str(i) for i in items], labels=np.zeros(len(items), np.int64),
                        classes=["unlabelled"], groups=None, group_names=None, source="unlabelled images")
