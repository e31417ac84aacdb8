"""``FewShotClassifier``: a frozen encoder + a class registry, with register / predict / save / load.

Two phases, as in few-shot learning: register classes from a few support images (no training),
then predict queries by their nearest class prototypes. Scores are probabilities: a softmax over
the negative distances (cosine: similarities) to the nearest prototypes, divided by a temperature.
Each prediction also reports the similarity itself, and is "unknown" when that similarity is below
the threshold the registry fitted for its nearest class (``fewshot.registry.calibration``).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .embedding.cache import EmbeddingCache
from .embedding.fingerprints import (DEFAULT_ENCODER, check_fingerprint, check_weights_file, describe_encoder_name,
                                     describe_fingerprint, names_other_encoder)  # torch-free, unlike encoders
from .errors import EncoderMismatchError, ImageError, RegistryFormatError, WeightsError
from .data.datasets import class_folders
from .embedding.images import expand_inputs
from .registry.hygiene import Finding, diagnose, duplicate_images, likely_mislabelled, near_duplicate_classes
from .registry.calibration import PRIOR_KEY, Calibration, calibrate, check_prior, current_calibration
from .registry import MANIFEST, MAX_SOURCE_LEN, ExampleSource, Registry, check_label, check_thumbnail, lock_registry_dir
from .embedding.views import SUPPORT_VIEWS, average_views, check_support_views, embed_flipped
from .predictions import DEFAULT_TEMPERATURE as DEFAULT_TEMPERATURE
from .predictions import SOFTMAX_CANDIDATES as SOFTMAX_CANDIDATES
from .predictions import Neighbour as Neighbour
from .predictions import Prediction as Prediction
from .predictions import RegisterReport as RegisterReport
from .predictions import softmax as softmax

if TYPE_CHECKING:
    from .embedding.model import Embeddings, Encoder
    from .learning.heads import Head

class FewShotClassifier:
    """Register classes from a few images and predict new images by nearest prototype.

    Parameters are only stored here (scikit-learn style); the encoder is created on first use.

    encoder: timm/fewshot encoder name, or an ``Encoder``. weights: local weights file for it.
    stages: intermediate feature stages (see ``create_encoder``). metric: "cosine" or "l2" (squared).
    head: a trained head (``fewshot train-head``), as a path or a ``Head``: images are embedded by the
    encoder it was trained on, then mapped by the head; the head's metric is used.
    index: "auto" (exact search while the registry is small, an approximate index with exact
    re-scoring once it is large; see ``Registry``) or a FAISS factory string ("Flat" is always exact).
    temperature: softmax temperature (default: fitted by the registry's self-calibration, else per metric).
    unknown: answer "unknown" (label None) when the top-1 similarity is below the threshold the registry
    fitted for that class (on by default; see ``fewshot.registry.calibration``). unknown_threshold: a similarity
    threshold for every class instead of the fitted ones. store_examples: keep every example embedding,
    not only prototypes (on by default: the unknown threshold is fitted from them).
    cache: True (default location), a path, or False for no embedding cache.
    support_views: "flip" embeds each registered image also mirrored left-right and keeps the average of
    the two as its example (one example per image: counts stay the number of images); queries are embedded
    once. "none" (default) embeds each image once. Recorded in the registry, so a reloaded one does the same.
    """

    def __init__(self, encoder: str | Encoder = DEFAULT_ENCODER, *, weights: str | os.PathLike | None = None,
                 stages=None, head: str | os.PathLike | Head | None = None, metric: str = "cosine",
                 index: str = "auto", temperature: float | None = None, unknown_threshold: float | None = None,
                 unknown: bool = True, store_examples: bool = True, cache: bool | str | os.PathLike = True,
                 batch_size: int | None = None, progress: bool | None = None, support_views: str = "none"):
        _check_settings(metric, temperature, unknown_threshold)  # now, not at the first predict
        check_support_views(support_views)
        self.encoder = encoder
        self.weights = weights
        self.stages = stages
        self.head = head
        self.metric = metric
        self.index = index
        self.temperature = temperature
        self.unknown_threshold = unknown_threshold
        self.unknown = unknown
        self.store_examples = store_examples
        self.cache = cache
        self.batch_size = batch_size
        self.progress = progress
        self.support_views = support_views
        self._encoder: Encoder | None = None if isinstance(encoder, str) else encoder
        self._head: Head | None = None if head is None or isinstance(head, (str, os.PathLike)) else head
        self._registry: Registry | None = None
        self._cache: EmbeddingCache | None = None
        self._head_files: dict[str, bytes] | None = None  # the head's saved files, copied into registries
        self._calibration: Calibration | None = None
        self._refit_later = False

    # -- lazily built parts ---------------------------------------------------------------------
    @property
    def head_(self) -> Head | None:
        if self._head is None and self.head is not None:
            from .learning.heads import load_head
            self._head = load_head(self.head)
        return self._head

    @property
    def encoder_(self) -> Encoder:
        if self._encoder is None:
            if self.head_ is not None:
                self._encoder = head_encoder(self.head_, weights=self.weights)
            else:
                from .embedding.encoders import create_encoder
                self._encoder = create_encoder(self.encoder, weights=self.weights, stages=self.stages)
        elif self.head_ is not None and self._encoder.fingerprint != self.head_.metadata.get("encoder"):
            raise EncoderMismatchError(f"the head was trained on features of "
                                       f"{describe_fingerprint(self.head_.metadata.get('encoder'))}, not "
                                       f"{describe_fingerprint(self._encoder.fingerprint)}")
        return self._encoder

    @property
    def fingerprint_(self) -> dict:
        """What produced the registry's vectors: the encoder, and the head if there is one."""
        fingerprint = self.encoder_.fingerprint
        return {**fingerprint, "head": self.head_.fingerprint} if self.head_ is not None else fingerprint

    @property
    def registry_(self) -> Registry:
        if self._registry is None:
            head = self.head_
            dim = head.out_dim if head is not None else self.encoder_.dim
            metric = head.metric if head is not None else self.metric
            self._registry = Registry(dim, metric=metric, index=self.index, fingerprint=self.fingerprint_,
                                      store_examples=self.store_examples)
            if head is not None and PRIOR_KEY in head.metadata:  # an adapted model's own 1-shot prior
                self._registry.metadata[PRIOR_KEY] = [list(row) for row in check_prior(head.metadata[PRIOR_KEY])]
        return self._registry

    def _embedding_cache(self) -> EmbeddingCache | None:
        if self.cache is False or self.cache is None:
            return None
        if self._cache is None:
            self._cache = EmbeddingCache(None if self.cache is True else self.cache)
        return self._cache

    def _embed(self, images) -> Embeddings:
        batch = {} if self.batch_size is None else {"batch_size": self.batch_size}  # None: the encoder's default
        result = self.encoder_.embed_batch(images, cache=self._embedding_cache(), progress=self.progress, **batch)
        vectors = result.vectors
        if self.head_ is not None:
            vectors = np.full((len(result.errors), self.head_.out_dim), np.nan, dtype=np.float32)
            if result.ok.any():
                vectors[result.ok] = self.head_.transform(result.vectors[result.ok])
        # A NaN or infinite embedding (broken weights or head) fails its image alone, like a bad file.
        finite = np.isfinite(vectors).all(axis=1)
        errors = [err if err or ok else
                  f"{src}: its embedding is not finite (NaN or infinity); check the encoder weights and head"
                  for src, err, ok in zip(result.sources, result.errors, finite)]
        return replace(result, vectors=vectors, errors=errors)

    # -- registering ----------------------------------------------------------------------------
    def register(self, label: str, images, *, thumbnail: bytes | None = None) -> RegisterReport:
        """Add ``images`` (paths, folders, bytes, PIL images, arrays) as examples of class ``label``.

        A new label creates the class; an existing one gains examples (its prototype is a running
        mean, so this is cheap). Bad images fail alone and are listed in the report; if none of the
        images could be used (or none were given), ``ImageError`` is raised and nothing changes.
        Labels are any text up to 1024 characters without NUL ("/" and ".." are fine: labels are never
        file names). Opened with ``FewShotClassifier.open``, the change is saved before this returns.

        The registry records each image's name and content digest. An image the class already holds
        (same digest) is skipped rather than counted twice; that, an image also in another class, a
        near-duplicate new class and likely mislabelled examples are in ``RegisterReport.warnings``.

        ``thumbnail``: a small encoded image (``fewshot.registry.thumbnails.make_thumbnail``) kept as the class's
        thumbnail, saved in the same atomic save as the examples.
        """
        label = check_label(label)  # before the (slow) embedding; labels are stored in Unicode NFC
        if thumbnail is not None:
            check_thumbnail(thumbnail)
        result = self._embed_support(images)
        failures = [e for e in result.errors if e]
        if not len(result.errors):
            raise ImageError(f"no images given for class {label!r}; pass image files, folders or arrays")
        if not result.ok.any():
            raise ImageError(f"none of the {len(result.errors)} images for class {label!r} could be used:\n  "
                             + "\n  ".join(failures))
        self._store_settings()
        ok = np.flatnonzero(result.ok)
        sources = [ExampleSource(_source_name(result.sources[i]), result.digests[i] if result.digests else None)
                   for i in ok]
        keep, warnings = self._skip_repeated_images(label, sources)
        if keep:  # all skipped: the class already holds every one of these images
            is_new = label not in self.registry_
            vectors, kept = result.vectors[ok[keep]], [sources[i] for i in keep]
            with self._change():  # examples, thumbnail and refitted threshold: one save, all or none
                self.registry_.add(label, vectors, sources=kept)
                if thumbnail is not None:
                    self.registry_.set_thumbnail(label, thumbnail)
            warnings += [f.message for f in self._registration_findings(label, vectors, kept, is_new)]
        return RegisterReport(label=label, added=len(keep), total=self.registry_.count(label),
                              errors=failures, warnings=warnings)

    def _embed_support(self, images) -> Embeddings:
        """Embeddings of support images: with ``support_views="flip"``, each image's vector is the average
        of it and its mirror image (``fewshot.embedding.views``), so the class gains one example per image."""
        if self.support_views == "none":
            return self._embed(images)
        items = expand_inputs(images)
        result = self._embed(items)
        ok = np.flatnonzero(result.ok)
        if not len(ok):
            return result

        def embed(views: list) -> tuple[np.ndarray, np.ndarray]:
            flipped = self._embed(views)
            return flipped.vectors, flipped.ok

        flipped, flipped_ok = embed_flipped(embed, [items[i] for i in ok], progress=self.progress)
        vectors, errors = result.vectors.copy(), list(result.errors)
        metric = self.head_.metric if self.head_ is not None else self.metric
        vectors[ok] = average_views([result.vectors[ok], flipped], metric)
        for i in ok[~flipped_ok]:  # cannot happen for a readable image unless the network gives NaN
            errors[i] = f"{result.sources[i]}: its flipped view could not be embedded"
            vectors[i] = np.nan
        return replace(result, vectors=vectors, errors=errors)

    def _skip_repeated_images(self, label: str, sources: list[ExampleSource]) -> tuple[list[int], list[str]]:
        """Indices of the images to add, and a warning for each image the class already holds (same
        content digest) or that was given twice: registering it again would silently double its weight."""
        held = {s.digest for s in self.registry_.sources(label)} if label in self.registry_ else set()
        held.discard(None)
        keep, warnings, given = [], [], set()
        for i, source in enumerate(sources):
            if source.digest is not None and (source.digest in held or source.digest in given):
                where = "is already registered" if source.digest in held else "was given twice"
                warnings.append(f"skipped {source.source!r}: the same image (sha256 {source.digest[:12]}) {where} "
                                f"in class {label!r}")
                continue
            given.add(source.digest)
            keep.append(i)
        return keep, warnings

    def _registration_findings(self, label: str, vectors: np.ndarray, sources: list[ExampleSource],
                               is_new: bool) -> list[Finding]:
        registry = self.registry_
        findings = near_duplicate_classes(registry, [label]) if is_new else []
        findings += likely_mislabelled(registry, label, vectors, sources)
        # An image also in another class is named as given now: the other class's record may be a path
        # on the server that an HTTP client must not learn.
        given = {s.digest: s.source for s in sources if s.digest is not None}
        return findings + [replace(f, source=given[f.digest])
                           for f in duplicate_images(registry, list(given))]

    def doctor(self) -> list[Finding]:
        """Every hygiene problem of the registry (``fewshot.registry.hygiene.diagnose``): near-duplicate
        classes, likely mislabelled examples (where examples are stored), images in several classes."""
        return diagnose(self.registry_)

    def register_folder(self, root: str | os.PathLike) -> list[RegisterReport]:
        """Register one class per subfolder of ``root`` (the subfolder's name is the label).

        All or nothing when opened with ``FewShotClassifier.open``: saved once at the end, and a
        folder that fails (e.g. no usable image) undoes the others."""
        folders = class_folders(root)
        for label in folders:
            try:
                check_label(label)
            except ValueError:
                raise ValueError(f"{Path(root) / label}: the folder name {label!r} cannot be a class label "
                                 "(not valid Unicode text); rename the folder") from None
        with self._change():
            self._refit_later = True  # one refit for the whole folder, not one per class
            try:
                return [self.register(label, paths) for label, paths in folders.items()]
            finally:
                self._refit_later = False

    def remove(self, label: str) -> None:
        self._store_settings()
        with self._change():
            self.registry_.remove(label)

    def rename(self, old: str, new: str) -> None:
        self._store_settings()
        with self._change():
            self.registry_.rename(old, new)

    @contextlib.contextmanager
    def _change(self):
        """A change to the registry and the refit of its unknown threshold, saved together once (opened
        registries); if it fails, the fit is re-read from the registry when next needed."""
        try:
            with self.registry_.batch():
                yield
                if not self._refit_later:
                    self.recalibrate()
        except BaseException:
            self._calibration = None
            raise

    def recalibrate(self, target_tpr: float | None = None) -> Calibration:
        """Refit the unknown thresholds and temperature from the registry's examples (done
        automatically on register / remove / rename); ``target_tpr``: share of known queries to keep
        (default: the last one used, else 0.95). Stored in the registry's metadata."""
        self._calibration = calibrate(self.registry_, target_tpr)
        return self._calibration

    @property
    def calibration_(self) -> Calibration:
        """The registry's fitted unknown thresholds and temperature (refitted if out of date)."""
        if self._calibration is None:
            self._calibration = current_calibration(self.registry_)
        return self._calibration

    @property
    def classes(self) -> list[str]:
        return self.registry_.classes if self._registry is not None else []

    @property
    def counts(self) -> dict[str, int]:
        return self.registry_.counts if self._registry is not None else {}

    # -- predicting -----------------------------------------------------------------------------
    def predict(self, images, top_k: int = 5, *, explain: int = 0) -> list[Prediction]:
        """One ``Prediction`` per input (folders expand to their images), in input order.

        ``top_k`` must be a positive integer (else ``ValueError``); more than the number of classes
        gives them all. An input that cannot be used gets a Prediction with ``error`` set.
        ``explain=n`` fills ``Prediction.neighbours`` with the n registered examples nearest to each
        input among its top-k classes (needs ``store_examples=True``; else the list is empty)."""
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if isinstance(explain, bool) or not isinstance(explain, (int, np.integer)) or explain < 0:
            raise ValueError(f"explain must be a number of neighbours >= 0, got {explain!r}")
        if not len(self.registry_):  # not self.classes: that copies every label, per call
            raise ValueError("no classes registered yet; call register(label, images) first")
        result = self._embed(images)
        predictions: list[Prediction | None] = [
            Prediction(label=None, score=None, error=err, input=src) if err else None
            for src, err in zip(result.sources, result.errors)]
        ok = np.flatnonzero(result.ok)
        if len(ok):
            for row, prediction in zip(ok, self._predict_vectors(result.vectors[ok], top_k)):
                predictions[row] = replace(prediction, input=result.sources[row])
        if explain:
            for row in ok:
                predictions[row] = replace(predictions[row], neighbours=self._neighbours(
                    result.vectors[row], [label for label, _ in predictions[row].top_k], explain))
        return predictions

    def _neighbours(self, vector: np.ndarray, labels: list[str], n: int) -> list[Neighbour]:
        if not self.registry_.store_examples:
            return []
        return [Neighbour(label, source.source, source.digest, score)
                for label, source, score in self.registry_.nearest_examples(vector, labels, n)]

    def _predict_vectors(self, vectors: np.ndarray, top_k: int) -> list[Prediction]:
        n_candidates = min(len(self.registry_), max(top_k, SOFTMAX_CANDIDATES))
        found = self.registry_.search(vectors, n_candidates)
        probabilities = softmax(found.scores / self.temperature_)
        predictions = []
        for labels, probs, sims in zip(found.labels, probabilities, found.scores):
            ranked = [(label, float(p)) for label, p in zip(labels[:top_k], probs[:top_k])]
            similarity = float(sims[0])
            unknown = self.is_unknown(labels[0], similarity)
            predictions.append(Prediction(None if unknown else labels[0], ranked[0][1], ranked,
                                          similarity=similarity, unknown=unknown,
                                          similarities=[float(s) for s in sims[:top_k]]))
        return predictions

    def is_unknown(self, label: str, similarity: float) -> bool:
        """Whether a query whose nearest class is ``label`` at ``similarity`` is answered "unknown"."""
        if not self.unknown:
            return False
        threshold = self.threshold_for(label)
        return threshold is not None and similarity < threshold

    def threshold_for(self, label: str) -> float | None:
        """The top-1 similarity below which a query nearest to ``label`` is "unknown" (None: never)."""
        if self.unknown_threshold is not None:
            return self.unknown_threshold
        return self.calibration_.threshold_for(label, self.registry_.count(label))

    @property
    def temperature_(self) -> float:
        metric = self.head_.metric if self.head_ is not None else self.metric  # a head brings its metric
        temperature = self.temperature
        if temperature is None:
            temperature = self.calibration_.temperature if self._registry is not None and len(self._registry) else None
        if temperature is None:
            temperature = DEFAULT_TEMPERATURE[metric]
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return float(temperature)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Save atomically to the directory ``path`` (a crash leaves the old or the new registry)."""
        self._store_settings()
        self.registry_.save(path)

    def _store_settings(self) -> None:
        """Record what ``load`` needs to rebuild this classifier in the registry's metadata."""
        self.registry_.metadata["classifier"] = {
            "temperature": self.temperature,
            "unknown_threshold": self.unknown_threshold,
            "unknown": self.unknown,
            "support_views": self.support_views,
            "weights": str(Path(self.weights).resolve()) if self.weights else None,
            "head": str(Path(self.head).resolve()) if isinstance(self.head, (str, os.PathLike)) else None,
        }
        if self.head_ is not None:  # a registry carries its head: retraining or moving it breaks nothing
            if self._head_files is None:
                self._head_files = head_files(self.head_)
            self.registry_.attachments.update(self._head_files)

    @classmethod
    def open(cls, path: str | os.PathLike, *, encoder: str | Encoder | None = None,
             weights: str | os.PathLike | None = None, head: str | os.PathLike | Head | None = None,
             **options) -> "FewShotClassifier":
        """Open the classifier saved at directory ``path`` for writing, creating it if there is none.

        ``register``, ``register_folder``, ``remove`` and ``rename`` then save (atomically, synced to
        disk) before they return: what returned survives a crash. The registry's writer lock is held
        until ``close()`` or the end of a ``with`` block; another writer gets ``RegistryLockedError``
        at once, while readers (``load``, ``fewshot predict``) need no lock. An existing registry is
        loaded as ``load`` does (``metric``, ``index`` and ``store_examples`` only apply to a new one).
        """
        path = Path(path)
        lock = lock_registry_dir(path)
        try:
            if (path / MANIFEST).is_file():
                kept = {k: v for k, v in options.items() if k not in ("metric", "index", "store_examples")}
                classifier = cls.load(path, encoder=encoder, weights=weights, head=head, **kept)
            else:
                classifier = cls(encoder if encoder is not None else DEFAULT_ENCODER, weights=weights, head=head,
                                 **options)
            classifier._store_settings()
            classifier.registry_._bind(path, lock)
        except BaseException:
            lock.release()
            raise
        return classifier

    def close(self) -> None:
        """Release the registry's writer lock (``open``); everything that returned is saved already."""
        if self._registry is not None:
            self._registry.close()

    def __enter__(self) -> "FewShotClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def over_registry(cls, registry: Registry) -> "FewShotClassifier":
        """A classifier over an open registry for work on its classes alone (doctor, remove, rename): nothing here
        creates an encoder, so it never loads a network."""
        classifier = cls(metric=registry.metric, index=registry.index_factory, store_examples=registry.store_examples)
        classifier._registry = registry
        return classifier

    @classmethod
    def load(cls, path: str | os.PathLike, *, encoder: str | Encoder | None = None,
             weights: str | os.PathLike | None = None, head: str | os.PathLike | Head | None = None,
             **options) -> "FewShotClassifier":
        """Load a saved classifier. The encoder (and head) it was built with are re-created from the
        registry's fingerprint unless given; different ones are refused with ``EncoderMismatchError``."""
        registry = Registry.load(path)
        saved = _saved_settings(path, registry)
        fingerprint = registry.fingerprint
        if weights is None and saved.get("weights") is not None:
            weights = check_weights_file(saved["weights"])
        if head is None:
            head = head_from_files(registry.attachments) or _saved_head(fingerprint, saved.get("head"), path)
        options.setdefault("temperature", saved.get("temperature"))
        options.setdefault("unknown_threshold", saved.get("unknown_threshold"))
        options.setdefault("unknown", saved.get("unknown", True))
        options.setdefault("support_views", saved.get("support_views", "none"))
        named = encoder is None or isinstance(encoder, str)  # else an encoder object (torch or ONNX) to use as it is
        classifier = cls(DEFAULT_ENCODER if named else encoder, weights=weights, head=head, metric=registry.metric,
                         index=registry.index_factory, store_examples=registry.store_examples, **options)
        if classifier.head_ is None and named:
            if encoder is not None and names_other_encoder(fingerprint, encoder):  # refused before any download
                raise _encoder_mismatch(path, fingerprint, describe_encoder_name(encoder))
            classifier._encoder = _encoder_for(fingerprint, name=encoder, weights=weights)
        if classifier.fingerprint_ != fingerprint:
            raise _encoder_mismatch(path, fingerprint, describe_fingerprint(classifier.fingerprint_))
        classifier._registry = registry
        return classifier


def _encoder_mismatch(path, fingerprint: dict, other: str) -> EncoderMismatchError:
    return EncoderMismatchError(f"registry {path} was built with {describe_fingerprint(fingerprint)}, not {other}; "
                                "load it with the encoder (and head) it was built with, or register its classes "
                                "again with this one")


def _saved_settings(path, registry: Registry) -> dict:
    """The classifier settings a registry's manifest records, checked (types and sizes) before anything
    is created from them: the manifest's checksum catches damage, not someone who re-seals it."""
    def refuse(problem: str):
        return RegistryFormatError(f"{Path(path) / MANIFEST}: {problem}; this registry was not saved by "
                                   "fewshot as it is, or was tampered with: re-create it with fewshot register")

    try:
        check_fingerprint(registry.fingerprint)
    except ValueError as e:
        raise refuse(str(e)) from None
    head = registry.fingerprint.get("head")
    if head is not None and not isinstance(head, dict):
        raise refuse("the head fingerprint must be an object")
    saved = registry.metadata.get("classifier", {})
    if not isinstance(saved, dict):
        raise refuse("metadata 'classifier' must be an object")
    for key in ("weights", "head"):
        if saved.get(key) is not None and (not isinstance(saved[key], str) or not saved[key] or "\0" in saved[key]):
            raise refuse(f"saved {key} must be a file path, got {str(saved[key])[:100]!r}")
    for key in ("temperature", "unknown_threshold"):
        value = saved.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise refuse(f"saved {key} must be a number, got {str(value)[:100]!r}")
    if saved.get("support_views", "none") not in SUPPORT_VIEWS:
        raise refuse(f"saved support_views must be one of {', '.join(SUPPORT_VIEWS)}, got "
                     f"{str(saved['support_views'])[:100]!r}")
    return saved


def _check_settings(metric, temperature, unknown_threshold) -> None:
    if metric not in DEFAULT_TEMPERATURE:
        raise ValueError(f"metric must be one of {', '.join(DEFAULT_TEMPERATURE)}, got {metric!r}")
    if temperature is not None and not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0 (or None for the default), got {temperature!r}")
    if unknown_threshold is not None and not (isinstance(unknown_threshold, (int, float))
                                              and not isinstance(unknown_threshold, bool)
                                              and math.isfinite(unknown_threshold)):
        raise ValueError(f"unknown_threshold must be a finite similarity (or None for the fitted thresholds), "
                         f"got {unknown_threshold!r}")


def _source_name(name: str) -> str:
    """An input's name as the registry keeps it (at most MAX_SOURCE_LEN characters, no NUL)."""
    return name.replace("\0", "\\0")[:MAX_SOURCE_LEN]


def head_encoder(head: Head, *, weights=None) -> Encoder:
    """Re-create the encoder whose features ``head`` was trained on."""
    fingerprint = head.metadata.get("encoder")
    if not fingerprint:
        raise ValueError("this head does not record the encoder it was trained on; train it with "
                         "fewshot train-head (or set head.metadata['encoder'] = encoder.fingerprint)")
    encoder = head.carried_encoder()  # a fine-tuned model carries its own network
    if encoder is None:
        encoder = _encoder_for(fingerprint, name=None, weights=weights)
    if encoder.fingerprint != fingerprint:
        raise EncoderMismatchError(f"the head was trained on {describe_fingerprint(fingerprint)}, but re-creating "
                                   f"it gave {describe_fingerprint(encoder.fingerprint)}; pass the same "
                                   f"--weights used for training")
    return encoder


_HEAD_PREFIX = "head-"  # attachment names of a head's files in a registry


def head_files(head: Head) -> dict[str, bytes]:
    """The files ``save_head`` writes for ``head``, as registry attachments (``head-<file name>``)."""
    from .learning.heads import save_head
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_head(head, Path(tmp) / "head")
        return {_HEAD_PREFIX + p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def head_from_files(attachments: dict[str, bytes]) -> Head | None:
    """The head a registry carries (see ``head_files``), checked as ``load_head`` checks; None if none."""
    files = {name[len(_HEAD_PREFIX):]: data for name, data in attachments.items() if name.startswith(_HEAD_PREFIX)}
    if not files:
        return None
    from .learning.heads import load_head
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return load_head(tmp)


def _saved_head(fingerprint: dict, saved_path: str | None, registry_path) -> str | None:
    """The head a registry saved before heads were copied into registries was built with, from where
    it was when the registry was saved."""
    if "head" not in fingerprint:
        return None
    if saved_path and Path(saved_path).is_dir():
        return saved_path
    raise WeightsError(f"registry {registry_path} was built with head {fingerprint['head'].get('name')} "
                       f"({saved_path or 'path unknown'}), which is not there; give that head again (--head PATH; "
                       f"in Python, the head argument)")


def _encoder_for(fingerprint: dict, *, name: str | None, weights) -> Encoder:
    """Re-create the encoder a registry was built with (or the one the user named)."""
    if weights is not None and not Path(weights).is_file():
        raise WeightsError(f"this registry was built with weights from {weights}, which is gone; "
                           f"give the same weights file again (--weights FILE; in Python, the weights argument)")
    from .embedding.encoders import encoder_from_fingerprint
    return encoder_from_fingerprint(fingerprint, name=name, weights=weights)
