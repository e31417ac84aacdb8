"""``FewShotClassifier``: a frozen encoder + a class registry, with register / predict / save / load.

Two phases, as in few-shot learning: register classes from a few support images (no training),
then predict queries by their nearest class prototypes. Scores are probabilities: a softmax over
the negative distances (cosine: similarities) to the nearest prototypes, divided by a temperature.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import EmbeddingCache
from .encoders import (DEFAULT_BATCH_SIZE, DEFAULT_ENCODER, Embeddings, Encoder, create_encoder,
                       describe_fingerprint, encoder_from_fingerprint)
from .errors import EncoderMismatchError, ImageError, WeightsError
from .data import class_folders
from .heads import Head, load_head
from .registry import MANIFEST, Registry, _check_label, _lock_dir

# Default softmax temperatures: cosine similarities live in [-1, 1], so they need sharpening;
# squared L2 distances are already on a large scale.
DEFAULT_TEMPERATURE = {"cosine": 0.05, "l2": 1.0}

# Probabilities are normalised over this many nearest classes at most: beyond them a class's share
# is negligible, and it keeps a query against 100k classes from touching all of them.
SOFTMAX_CANDIDATES = 100


@dataclass(frozen=True)
class Prediction:
    """The answer for one input. ``label`` is None for an error or an "unknown" below the threshold."""

    label: str | None
    score: float | None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    input: str = ""

    def to_dict(self) -> dict:
        return {"input": self.input, "label": self.label, "score": self.score,
                "top_k": [{"label": lab, "score": s} for lab, s in self.top_k], "error": self.error}


@dataclass(frozen=True)
class RegisterReport:
    """What ``register`` did: how many images were added to ``label`` and which ones failed."""

    label: str
    added: int
    total: int  # examples the class holds now
    errors: list[str] = field(default_factory=list)


class FewShotClassifier:
    """Register classes from a few images and predict new images by nearest prototype.

    Parameters are only stored here (scikit-learn style); the encoder is created on first use.

    encoder: timm/fewshot encoder name, or an ``Encoder``. weights: local weights file for it.
    stages: intermediate feature stages (see ``create_encoder``). metric: "cosine" or "l2" (squared).
    head: a trained head (``fewshot train-head``), as a path or a ``Head``: images are embedded by the
    encoder it was trained on, then mapped by the head; the head's metric is used.
    index: "auto" (exact search while the registry is small, an approximate index with exact
    re-scoring once it is large; see ``Registry``) or a FAISS factory string ("Flat" is always exact).
    temperature: softmax temperature (default per metric). unknown_threshold: below this top-1 probability, the label
    is None ("unknown"). store_examples: keep every example embedding, not only prototypes.
    cache: True (default location), a path, or False for no embedding cache.
    """

    def __init__(self, encoder: str | Encoder = DEFAULT_ENCODER, *, weights: str | os.PathLike | None = None,
                 stages=None, head: str | os.PathLike | Head | None = None, metric: str = "cosine",
                 index: str = "auto", temperature: float | None = None, unknown_threshold: float | None = None,
                 store_examples: bool = False, cache: bool | str | os.PathLike = True,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool | None = None):
        self.encoder = encoder
        self.weights = weights
        self.stages = stages
        self.head = head
        self.metric = metric
        self.index = index
        self.temperature = temperature
        self.unknown_threshold = unknown_threshold
        self.store_examples = store_examples
        self.cache = cache
        self.batch_size = batch_size
        self.progress = progress
        self._encoder: Encoder | None = encoder if isinstance(encoder, Encoder) else None
        self._head: Head | None = head if isinstance(head, Head) else None
        self._registry: Registry | None = None
        self._cache: EmbeddingCache | None = None

    # -- lazily built parts ---------------------------------------------------------------------
    @property
    def head_(self) -> Head | None:
        if self._head is None and self.head is not None:
            self._head = load_head(self.head)
        return self._head

    @property
    def encoder_(self) -> Encoder:
        if self._encoder is None:
            if self.head_ is not None:
                self._encoder = head_encoder(self.head_, weights=self.weights)
            else:
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
        return self._registry

    def _embedding_cache(self) -> EmbeddingCache | None:
        if self.cache is False or self.cache is None:
            return None
        if self._cache is None:
            self._cache = EmbeddingCache(None if self.cache is True else self.cache)
        return self._cache

    def _embed(self, images) -> Embeddings:
        result = self.encoder_.embed_batch(images, batch_size=self.batch_size, cache=self._embedding_cache(),
                                           progress=self.progress)
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
        return Embeddings(vectors=vectors, sources=result.sources, errors=errors)

    # -- registering ----------------------------------------------------------------------------
    def register(self, label: str, images) -> RegisterReport:
        """Add ``images`` (paths, folders, bytes, PIL images, arrays) as examples of class ``label``.

        A new label creates the class; an existing one gains examples (its prototype is a running
        mean, so this is cheap). Bad images fail alone and are listed in the report; if none of the
        images could be used (or none were given), ``ImageError`` is raised and nothing changes.
        Labels are any text up to 1024 characters without NUL ("/" and ".." are fine: labels are never
        file names). Opened with ``FewShotClassifier.open``, the change is saved before this returns.
        """
        _check_label(label)  # before the (slow) embedding
        result = self._embed(images)
        failures = [e for e in result.errors if e]
        if not len(result.errors):
            raise ImageError(f"no images given for class {label!r}; pass image files, folders or arrays")
        if not result.ok.any():
            raise ImageError(f"none of the {len(result.errors)} images for class {label!r} could be used:\n  "
                             + "\n  ".join(failures))
        self._store_settings()
        self.registry_.add(label, result.vectors[result.ok])
        return RegisterReport(label=label, added=int(result.ok.sum()), total=self.registry_.count(label),
                              errors=failures)

    def register_folder(self, root: str | os.PathLike) -> list[RegisterReport]:
        """Register one class per subfolder of ``root`` (the subfolder's name is the label).

        All or nothing when opened with ``FewShotClassifier.open``: saved once at the end, and a
        folder that fails (e.g. no usable image) undoes the others."""
        folders = class_folders(root)
        for label in folders:
            try:
                _check_label(label)
            except ValueError:
                raise ValueError(f"{Path(root) / label}: the folder name {label!r} cannot be a class label "
                                 "(not valid Unicode text); rename the folder") from None
        with self.registry_.batch():
            return [self.register(label, paths) for label, paths in folders.items()]

    def remove(self, label: str) -> None:
        self._store_settings()
        self.registry_.remove(label)

    def rename(self, old: str, new: str) -> None:
        self._store_settings()
        self.registry_.rename(old, new)

    @property
    def classes(self) -> list[str]:
        return self.registry_.classes if self._registry is not None else []

    @property
    def counts(self) -> dict[str, int]:
        return self.registry_.counts if self._registry is not None else {}

    # -- predicting -----------------------------------------------------------------------------
    def predict(self, images, top_k: int = 5) -> list[Prediction]:
        """One ``Prediction`` per input (folders expand to their images), in input order.

        ``top_k`` must be a positive integer (else ``ValueError``); more than the number of classes
        gives them all. An input that cannot be used gets a Prediction with ``error`` set."""
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if not len(self.registry_):  # not self.classes: that copies every label, per call
            raise ValueError("no classes registered yet; call register(label, images) first")
        result = self._embed(images)
        predictions: list[Prediction | None] = [
            Prediction(label=None, score=None, error=err, input=src) if err else None
            for src, err in zip(result.sources, result.errors)]
        ok = np.flatnonzero(result.ok)
        if len(ok):
            for row, prediction in zip(ok, self._predict_vectors(result.vectors[ok], top_k)):
                predictions[row] = Prediction(prediction.label, prediction.score, prediction.top_k,
                                              input=result.sources[row])
        return predictions

    def _predict_vectors(self, vectors: np.ndarray, top_k: int) -> list[Prediction]:
        n_candidates = min(len(self.registry_), max(top_k, SOFTMAX_CANDIDATES))
        found = self.registry_.search(vectors, n_candidates)
        probabilities = softmax(found.scores / self.temperature_)
        predictions = []
        for labels, probs in zip(found.labels, probabilities):
            ranked = [(label, float(p)) for label, p in zip(labels[:top_k], probs[:top_k])]
            best_label, best_score = ranked[0]
            if self.unknown_threshold is not None and best_score < self.unknown_threshold:
                best_label = None
            predictions.append(Prediction(best_label, best_score, ranked))
        return predictions

    @property
    def temperature_(self) -> float:
        temperature = self.temperature if self.temperature is not None else DEFAULT_TEMPERATURE[self.metric]
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
            "weights": str(Path(self.weights).resolve()) if self.weights else None,
            "head": str(Path(self.head).resolve()) if self.head is not None and not isinstance(self.head, Head)
            else None,
        }

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
        lock = _lock_dir(path)
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
    def load(cls, path: str | os.PathLike, *, encoder: str | Encoder | None = None,
             weights: str | os.PathLike | None = None, head: str | os.PathLike | Head | None = None,
             **options) -> "FewShotClassifier":
        """Load a saved classifier. The encoder (and head) it was built with are re-created from the
        registry's fingerprint unless given; different ones are refused with ``EncoderMismatchError``."""
        registry = Registry.load(path)
        saved = registry.metadata.get("classifier", {})
        fingerprint = registry.fingerprint
        weights = weights or saved.get("weights")
        head = head if head is not None else _saved_head(fingerprint, saved.get("head"), path)
        options.setdefault("temperature", saved.get("temperature"))
        options.setdefault("unknown_threshold", saved.get("unknown_threshold"))
        classifier = cls(encoder if isinstance(encoder, Encoder) else DEFAULT_ENCODER, weights=weights, head=head,
                         metric=registry.metric, index=registry.index_factory,
                         store_examples=registry.store_examples, **options)
        if classifier.head_ is None and not isinstance(encoder, Encoder):
            classifier._encoder = _encoder_for(fingerprint, name=encoder, weights=weights)
        if classifier.fingerprint_ != fingerprint:
            raise EncoderMismatchError(
                f"registry {path} was built with {describe_fingerprint(fingerprint)}, not "
                f"{describe_fingerprint(classifier.fingerprint_)}; load it with the encoder (and head) it was "
                f"built with, or register its classes again with this one")
        classifier._registry = registry
        return classifier


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


def _saved_head(fingerprint: dict, saved_path: str | None, registry_path) -> str | None:
    """The head a registry was built with, from where it was when the registry was saved."""
    if "head" not in fingerprint:
        return None
    if saved_path and Path(saved_path).is_dir():
        return saved_path
    raise WeightsError(f"registry {registry_path} was built with head {fingerprint['head'].get('name')} "
                       f"({saved_path or 'path unknown'}), which is not there; pass head=PATH (CLI: --head PATH)")


def _encoder_for(fingerprint: dict, *, name: str | None, weights) -> Encoder:
    """Re-create the encoder a registry was built with (or the one the user named)."""
    if weights is not None and not Path(weights).is_file():
        raise WeightsError(f"this registry was built with weights from {weights}, which is gone; "
                           f"pass weights=FILE (CLI: --weights FILE) with the same weights")
    return encoder_from_fingerprint(fingerprint, name=name, weights=weights)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
