"""The classifier behind the HTTP API: one worker thread runs the model and every registry change.

Everything that touches the model or changes the registry runs in that one thread, so changes are
serialised (the registry's one writer) and predictions never run beside a half-applied change. Predict
requests from many clients go through a ``Batcher``, which groups them into one model call.

Images to predict are decoded and preprocessed before they join a batch, by a pool of decode threads
(``Encoder.prepare``): the model call runs only the network (onnxruntime by default), so a large image
delays its own request and never the batch it would have joined.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from ..classifier import FewShotClassifier, Prediction, RegisterReport
from ..errors import ImageError
from ..embedding.images import NamedBytes, decoded_size
from ..registry.calibration import Calibration
from ..registry.thumbnails import make_thumbnail
from .batching import Batcher
from .telemetry import Telemetry

MAX_TOP_K = 1000
# Decode threads: Pillow releases the GIL while decoding, so one per core keeps every core busy; capped, since
# each holds a decoded image in memory.
DECODE_THREADS = max(1, min(os.cpu_count() or 1, 8))


class TooManyPixels(ValueError):
    """The images of one request would decode to more pixels than the service allows per request."""


@dataclass(frozen=True)
class PredictJob:
    images: list[NamedBytes]
    top_k: int


class Service:
    """Owns an open ``FewShotClassifier`` (``FewShotClassifier.open``) and the thread that uses it."""

    def __init__(self, classifier: FewShotClassifier, *, max_batch: int = 16, batch_window_ms: float = 5.0,
                 compile: str | None = "torchscript", runtime: str | None = "onnxruntime",
                 telemetry: Telemetry | None = None, max_image_mp: float = 40.0, max_request_mp: float = 160.0):
        self.classifier = classifier
        self.max_image_mp, self.max_request_mp = max_image_mp, max_request_mp  # decoded megapixels
        self.compile = compile  # how the encoder's network runs (``Encoder.compile``); None: as it is
        self.runtime = runtime  # its engine (``Encoder.runtime``; torch with ``compile`` if onnxruntime fails)
        self.telemetry = telemetry or Telemetry()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fewshot-model")
        self._decoders = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="fewshot-decode")
        self.batcher: Batcher[PredictJob] = Batcher(self._predict_batch, self._worker, max_batch=max_batch,
                                                    window_s=batch_window_ms / 1000,
                                                    on_batch=self.telemetry.record_batch)
        self.ready = False

    async def start(self) -> None:
        """Load the model and run it once, so that the first request is as fast as the others."""
        await self._in_worker(self._warm_up)
        self.ready = True

    def _warm_up(self) -> None:
        encoder = self.classifier.encoder_
        for part in [encoder, *getattr(encoder, "members", [])]:  # an ensemble's members run their own networks
            if self.compile is not None:  # a long-running service pays a compile or an export once, at start-up
                part.compile = self.compile
            if self.runtime is not None:
                part.runtime = self.runtime
        encoder.embed_batch([np.full((224, 224, 3), 128, np.uint8)] * 2, progress=False)
        self.classifier.registry_  # noqa: B018 - creates an empty registry for a new path

    async def close(self) -> None:
        await self.batcher.close()
        self._decoders.shutdown(wait=True, cancel_futures=True)
        self._worker.shutdown(wait=True)
        self.classifier.close()

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # -- reading: in a helper thread, as the registry's lock may be held by a save for a while ----
    async def counts(self) -> dict[str, int]:
        return await asyncio.to_thread(lambda: self.classifier.counts)

    async def thumbnail(self, label: str) -> bytes | None:
        return await asyncio.to_thread(self.classifier.registry_.thumbnail, label)

    async def calibration(self) -> Calibration:
        """The registry's fitted unknown thresholds (refitted in the worker if a change made them stale)."""
        return await self._in_worker(lambda: self.classifier.calibration_)

    def class_count(self) -> int:
        """Classes in the registry (no lock, O(1)); 0 until the model is loaded."""
        return len(self.classifier.registry_) if self.ready else 0

    # -- changes (the worker thread) --------------------------------------------------------------
    async def register(self, label: str, images: list[NamedBytes]) -> RegisterReport:
        refused = await self._screen(images)
        errors = [why for why in refused if why]
        usable = [image for image, why in zip(images, refused) if not why]
        if not usable:
            raise ImageError(f"none of the {len(images)} images for class {label!r} could be used:\n  "
                             + "\n  ".join(errors))
        report = await self._in_worker(self._register, label, usable)
        return replace(report, errors=errors + report.errors)

    def _register(self, label: str, images: list[NamedBytes]) -> RegisterReport:
        registry = self.classifier.registry_
        thumbnail = None
        if not (label in registry and registry.thumbnail(label) is not None):
            thumbnail = _first_thumbnail(images)
        return self.classifier.register(label, images, thumbnail=thumbnail)

    async def remove(self, label: str) -> None:
        await self._in_worker(self.classifier.remove, label)

    async def rename(self, old: str, new: str) -> None:
        await self._in_worker(self.classifier.rename, old, new)

    # -- predicting (batched, the worker thread) ---------------------------------------------------
    async def predict(self, images: list[NamedBytes], top_k: int) -> list[Prediction]:
        refused = await self._screen(images)
        loop = asyncio.get_running_loop()
        decoded = iter(await asyncio.gather(*(loop.run_in_executor(self._decoders, self._prepare, image)
                                              for image, why in zip(images, refused) if not why)))
        outcome = [why or next(decoded) for why in refused]  # per image: why it is refused, or its decoded form
        usable = [item for item in outcome if not isinstance(item, str)]
        answers = iter(await self.batcher.submit(PredictJob(usable, top_k), size=len(usable)) if usable else [])
        return [Prediction(label=None, score=None, error=item, input=image.name) if isinstance(item, str)
                else next(answers) for image, item in zip(images, outcome)]

    def _prepare(self, image: NamedBytes):
        """The image decoded and preprocessed for the encoder (a decode thread), or why it cannot be used."""
        try:
            return self.classifier.encoder_.prepare(image)
        except ImageError as exc:
            return str(exc)

    # -- decoding cost, from the images' headers ------------------------------------------------
    async def _screen(self, images: list[NamedBytes]) -> list[str | None]:
        """Per image, why it is refused before decoding (more pixels than ``max_image_mp``), or None;
        TooManyPixels if the rest would decode to more than ``max_request_mp`` together."""
        return await asyncio.to_thread(self._screen_now, images, self.classifier.encoder_.resize_size)

    def _screen_now(self, images: list[NamedBytes], min_size: int) -> list[str | None]:
        refused, total = [], 0.0
        for image in images:
            try:
                width, height = decoded_size(image, min_size=min_size)
            except ImageError:  # decoding fails it alone, with the same message
                refused.append(None)
                continue
            megapixels = width * height / 1e6
            too_big = megapixels > self.max_image_mp
            refused.append(f"{image.name}: {width} x {height} pixels ({megapixels:.1f} MP) as decoded, more than "
                           f"this server's {self.max_image_mp:g} MP per image (--max-image-mp); send it downscaled, "
                           "or as a JPEG (which decodes at reduced size)" if too_big else None)
            total += 0 if too_big else megapixels
        if total > self.max_request_mp:
            raise TooManyPixels(f"the images of this request decode to {total:.0f} MP in all, more than this "
                                f"server's {self.max_request_mp:g} MP per request (--max-request-mp); send fewer "
                                "images per request, or smaller ones")
        return refused

    def _predict_batch(self, jobs: list[PredictJob]) -> list[list[Prediction] | Exception]:
        """One model call per distinct top_k in the batch (normally one), split back per request."""
        results: list[list[Prediction] | Exception | None] = [None] * len(jobs)
        for top_k in sorted({job.top_k for job in jobs}):
            members = [i for i, job in enumerate(jobs) if job.top_k == top_k]
            images = [image for i in members for image in jobs[i].images]
            try:
                predictions = self.classifier.predict(images, top_k=top_k)
            except Exception as exc:  # e.g. no classes yet: every request of this group gets it
                for i in members:
                    results[i] = exc
                continue
            start = 0  # each Prediction's input is its upload's file name (NamedBytes)
            for i in members:
                results[i] = predictions[start:start + len(jobs[i].images)]
                start += len(jobs[i].images)
        return results


def _first_thumbnail(images: list[NamedBytes]) -> bytes | None:
    """A thumbnail of the first image that decodes (None if none does: register reports why)."""
    for image in images:
        try:
            return make_thumbnail(image)
        except ImageError:
            continue
    return None
