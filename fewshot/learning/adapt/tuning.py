"""The order in which ``adapt`` tries candidates, and the budget check before each.

Phases, cheapest first, each building on the best candidate so far: feature choice (layout, resolution,
encoder), domain statistics (whitening, AdaBN), a trained head, fine-tuning of the top blocks, and with
unlabelled images, adaptation on them. A candidate whose estimated cost does not fit before its phase's
deadline is reported as skipped; one that fails is reported with the reason, and the search goes on.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

from ...data.datasets import ImageDataset
from ...errors import FewShotError
from ..heads.whitening import MAX_WHITENING_DIM
from . import candidates as C
from .budget import Budget
from .workspace import Workspace

MIN_TRAINING_SECONDS = 30  # a head or a fine-tuning run given less than this has no chance to learn
ENCODER_SETUP_SECONDS = 3  # building an encoder and timing it, before its embedding pass


def candidates(ws: Workspace, clock: Budget, frozen: C.Candidate, *, seed: int, ways: int, within_group: bool,
               best: Callable[[], C.Candidate]) -> Iterator[C.Candidate]:
    """Yield each candidate as it is tried (scored) or skipped; ``best()`` is the best scored so far."""
    trial = _Trial(ws, clock)
    for spec in C.layout_specs(frozen.spec):
        yield trial.features(spec)
    resolution = C.resolution_spec(best().spec, best().encoder, list(ws.domain.val.items))
    if resolution is not None:
        yield trial.features(resolution)
    for spec in C.encoder_specs(best().spec):
        yield trial.features(spec)
    yield from _statistics(trial, best, seed)
    yield trial.head(best(), seed=seed, ways=ways, within_group=within_group)
    yield from _finetuning(trial, best, seed=seed, ways=ways, within_group=within_group)


def _statistics(trial: "_Trial", best, seed: int) -> Iterator[C.Candidate]:
    base = best()
    if base.encoder.dim <= MAX_WHITENING_DIM:
        for shrinkage in C.WHITENING_SHRINKAGES:
            yield trial.whitening(base, shrinkage)
    yield trial.adabn(best(), seed=seed)


def _finetuning(trial: "_Trial", best, *, seed: int, ways: int, within_group: bool) -> Iterator[C.Candidate]:
    base = best()
    yield trial.finetune(base, "finetune", seed=seed, ways=ways, within_group=within_group)
    if trial.ws.domain.unlabeled:
        yield trial.finetune(base, "unlabeled", seed=seed, ways=ways, within_group=within_group, objective="distill")
        yield trial.finetune(base, "unlabeled", seed=seed, ways=ways, within_group=within_group, objective="dann")


class _Trial:
    """Runs one candidate: budget check, build, score, timing, and failures turned into report rows."""

    def __init__(self, ws: Workspace, clock: Budget):
        self.ws, self.clock = ws, clock

    def run(self, name: str, phase: str, estimate: float, build: Callable[[C.Candidate], None]) -> C.Candidate:
        candidate = C.Candidate(name=name, phase=phase)
        left = self.clock.left(phase)
        if estimate > left:
            candidate.status = "skipped"
            candidate.note = f"needs about {estimate:.0f} s, {max(left, 0):.0f} s left for {phase}"
            return candidate
        start = time.monotonic()
        try:
            build(candidate)
            candidate.score = self.ws.validation.score(self.ws.features(candidate.encoder).val, head=candidate.model)
        except (FewShotError, ValueError, RuntimeError, FloatingPointError) as exc:
            candidate.status, candidate.note = "failed", " ".join(str(exc).split())[:200]
            candidate.model = None
        candidate.seconds = time.monotonic() - start
        return candidate

    def _images(self) -> int:
        return len(self.ws.items())

    # -- feature choice --------------------------------------------------------------------------------
    def features(self, spec: C.FeatureSpec) -> C.Candidate:
        def build(c: C.Candidate) -> None:
            encoder = spec.create()
            c.ms_per_image = 1000 * self.ws.cost_per_image(encoder)
            needed = c.ms_per_image / 1000 * self._images()
            if time.monotonic() + needed > self.clock.deadline("features"):
                raise _OverBudget(f"embedding the domain would take about {needed:.0f} s")
            c.encoder, c.spec = encoder, spec
            c.model = C.centred_model(encoder, self.ws.features(encoder))

        return self._guarded(f"{spec.label}, centred", "features", ENCODER_SETUP_SECONDS, build)

    def _guarded(self, name, phase, estimate, build) -> C.Candidate:
        candidate = self.run(name, phase, estimate, build)
        if candidate.status == "failed" and candidate.note.startswith(_OverBudget.prefix):
            candidate.status, candidate.note = "skipped", candidate.note[len(_OverBudget.prefix):]
        return candidate

    # -- domain statistics ---------------------------------------------------------------------------------
    def whitening(self, base: C.Candidate, shrinkage: float) -> C.Candidate:
        def build(c: C.Candidate) -> None:
            c.encoder, c.spec, c.ms_per_image = base.encoder, base.spec, base.ms_per_image
            c.model = C.whitened_model(base.encoder, self.ws.features(base.encoder), shrinkage)

        return self.run(f"{base.spec.label}, whitened (shrinkage {shrinkage})", "statistics", 1, build)

    def adabn(self, base: C.Candidate, *, seed: int) -> C.Candidate:
        from ..adabn import adapt_batchnorm
        from ..heads.finetuned import FineTunedHead

        def build(c: C.Candidate) -> None:
            if not base.spec.single:
                raise ValueError("AdaBN runs on one encoder, not an ensemble")
            images = list(self.ws.domain.train.items) + list(self.ws.domain.unlabeled)
            encoder = adapt_batchnorm(base.encoder, images, seed=seed, progress=self.ws.progress)
            c.encoder, c.spec, c.ms_per_image = encoder, base.spec, base.ms_per_image
            head = C.centred_model(encoder, self.ws.features(encoder))
            c.model = FineTunedHead.wrap(encoder, head)

        estimate = 2 * (base.ms_per_image or 0) / 1000 * self._images()
        return self.run(f"{base.spec.label}, AdaBN statistics, centred", "statistics", estimate, build)

    # -- a trained head ------------------------------------------------------------------------------------
    def head(self, base: C.Candidate, *, seed: int, ways: int, within_group: bool) -> C.Candidate:
        def build(c: C.Candidate) -> None:
            c.encoder, c.spec, c.ms_per_image = base.encoder, base.spec, base.ms_per_image
            c.model = C.protonet_model(base.encoder, self.ws.features(base.encoder), self.ws, ways=ways,
                                       within_group=within_group, seed=seed, deadline=self.clock.deadline("head"))

        return self.run(f"{base.spec.label}, residual ProtoNet head", "head", MIN_TRAINING_SECONDS, build)

    # -- fine-tuning -------------------------------------------------------------------------------------
    def finetune(self, base: C.Candidate, phase: str, *, seed: int, ways: int, within_group: bool,
                 objective: str | None = None) -> C.Candidate:
        from ..finetune import Recipe, finetune

        spec = base.spec

        def build(c: C.Candidate) -> None:
            if not spec.single:
                raise ValueError("fine-tuning runs on one encoder, not an ensemble")
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


class _OverBudget(ValueError):
    prefix = "over budget: "

    def __init__(self, message: str):
        super().__init__(self.prefix + message)


def _unlabeled_dataset(items: list) -> ImageDataset:
    import numpy as np

    return ImageDataset(items=list(items), names=[str(i) for i in items], labels=np.zeros(len(items), np.int64),
                        classes=["unlabelled"], groups=None, group_names=None, source="unlabelled images")
