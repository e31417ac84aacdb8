"""Registry hygiene: near-duplicate classes, likely mislabelled examples, one image in several classes.

A registry works on numbers alone, so it cannot tell that "mug" and "cup" are the same thing, that a
photo of a plate was filed under "mug", or that one photo was registered to two classes. These
checks find such cases for ``register`` (warnings) and ``fewshot doctor`` (every finding).

Both similarity checks use the cosine similarity of directions (of prototypes, and of an example to
a prototype) whatever the registry's metric. The thresholds were measured on the Caltech-101
classes in ../shared/datasets with the default encoder (``benchmarks/hygiene_thresholds.py``,
51 classes, 10 seeds):

- ``NEAR_DUPLICATE_SIMILARITY = 0.90``: a class's prototype reached 0.79 at most to its nearest
  other class at 1 shot (99th percentile 0.75), 0.91 at 3 shots and 0.92 at 5 shots (means of more
  images are closer to everything); at 0.90 the only pair found was Faces ~ Faces_easy, which are
  the same photos cropped differently: a real near-duplicate. One class split in two with *different* photos is
  mostly missed (11% found at 5 shots): its prototypes are no closer than neighbouring classes.
- ``MISLABEL_MARGIN = 0.15``: an example is likely mislabelled when it is at least this much more
  similar to another class's prototype than to its own class's prototype without it (leave-one-out).
  At 5 shots this flagged 1.1% of correctly labelled examples and found 96% of images of another
  registered class slipped into a class (margin 0: 14.5% false alarms; 0.10: 3.2%; 0.20: 0.2% and 93%).
  A class needs two examples or more to be judged (a single example has no class without it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from .labels import UNRECORDED, ExampleSource
from .table import Registry

NEAR_DUPLICATE_SIMILARITY = 0.90
MISLABEL_MARGIN = 0.15
NEAR_DUPLICATE, MISLABELLED, DUPLICATE_IMAGE = "near_duplicate_classes", "likely_mislabelled", "duplicate_image"
_CANDIDATES = 8  # nearest classes searched per query; the cosine check is exact among them
_CHUNK = 1024  # queries searched at once by ``diagnose``
PROGRESS_MIN_CLASSES = 2000


@dataclass(frozen=True)
class Finding:
    """One hygiene problem. ``kind``: ``NEAR_DUPLICATE`` (``classes`` = the two classes, ``similarity``
    of their prototypes), ``MISLABELLED`` (``classes`` = (its class, the closer class), ``similarity``
    to the closer class, ``own_similarity`` to its own class without it, ``source``/``digest`` of the
    example) or ``DUPLICATE_IMAGE`` (``classes`` holding the image, its ``source`` and ``digest``)."""

    kind: str
    classes: tuple[str, ...]
    similarity: float | None = None
    own_similarity: float | None = None
    source: str | None = None
    digest: str | None = None

    @property
    def message(self) -> str:
        """One line for people; labels and names are quoted with repr, so no control character
        of a label reaches the terminal."""
        if self.kind == NEAR_DUPLICATE:
            a, b = self.classes
            return (f"classes {a!r} and {b!r} look like near-duplicates (prototype similarity "
                    f"{self.similarity:.3f}); merge them or check their images")
        if self.kind == MISLABELLED:
            own, other = self.classes
            return (f"{_name(self.source, self.digest)} in class {own!r} looks more like class {other!r} "
                    f"(similarity {self.similarity:.3f}, {self.own_similarity:.3f} to its own class); "
                    "check its label")
        holders = ", ".join(repr(label) for label in self.classes)
        return f"the same image {_name(self.source, self.digest)} is in classes {holders}"

    def to_dict(self) -> dict:
        return {**asdict(self), "classes": list(self.classes), "message": self.message}


def _name(source: str | None, digest: str | None) -> str:
    digest = f"sha256 {digest[:12]}" if digest else None
    if source is None:
        return f"({digest})" if digest else "an example with no recorded source"
    return f"{source!r} ({digest})" if digest else repr(source)


# ---------------------------------------------------------------- the checks

def near_duplicate_classes(registry: Registry, labels=None, *,
                           threshold: float = NEAR_DUPLICATE_SIMILARITY) -> list[Finding]:
    """Pairs of classes whose prototypes have cosine similarity >= threshold: pairs involving
    ``labels`` (default: every class), each pair once (older class first), most similar first."""
    order = {label: i for i, label in enumerate(registry.classes)}
    labels = list(order) if labels is None else list(labels)
    found: dict[tuple[str, str], float] = {}
    for a in range(0, len(labels), _CHUNK):
        chunk = labels[a:a + _CHUNK]
        for label, candidates in zip(chunk, _nearest(registry, [registry.mean(lb) for lb in chunk], exclude=chunk)):
            for other, similarity in candidates:
                if similarity >= threshold:
                    found[(label, other) if order[label] < order[other] else (other, label)] = similarity
    return [Finding(NEAR_DUPLICATE, pair, similarity=s) for pair, s in sorted(found.items(), key=lambda i: -i[1])]


def likely_mislabelled(registry: Registry, label: str, vectors, sources: list[ExampleSource] | None = None, *,
                       margin: float = MISLABEL_MARGIN) -> list[Finding]:
    """The examples among ``vectors`` (already registered in class ``label``) that are at least
    ``margin`` more similar to another class than to ``label`` without them."""
    x = np.asarray(vectors, dtype=np.float64).reshape(-1, registry.dim)
    count = registry.count(label)
    if count < 2 or len(registry) < 2:
        return []
    sources = sources or [UNRECORDED] * len(x)
    unit = _unit(x)
    own_sum = count * registry.mean(label).astype(np.float64)
    # The class without each example: the registry's mean is of unit vectors for cosine, raw for l2.
    without = own_sum - (unit if registry.metric == "cosine" else x)
    own = (_unit(without) * unit).sum(axis=1)
    findings = []
    for i, candidates in enumerate(_nearest(registry, x, exclude=[label] * len(x))):
        if not candidates or not np.isfinite(own[i]):
            continue
        other, similarity = candidates[0]
        if similarity - own[i] >= margin:
            findings.append(Finding(MISLABELLED, (label, other), similarity=similarity,
                                    own_similarity=float(own[i]), source=sources[i].source,
                                    digest=sources[i].digest))
    return findings


def duplicate_images(registry: Registry, digests=None) -> list[Finding]:
    """Images (by content digest) registered to more than one class: those among ``digests``
    (default: all)."""
    findings = []
    for digest, holders in registry.classes_by_digest(digests).items():
        if len(holders) > 1:
            source = next(s.source for s in registry.sources(holders[0]) if s.digest == digest)
            findings.append(Finding(DUPLICATE_IMAGE, tuple(holders), source=source, digest=digest))
    return findings


def diagnose(registry: Registry, *, progress: bool | None = None) -> list[Finding]:
    """Every finding of the registry: near-duplicate classes, likely mislabelled examples (where
    examples are stored) and images in more than one class. ``progress``: a progress bar on stderr
    for the examples (default: from ``PROGRESS_MIN_CLASSES`` classes on; 5-10 ms a class on 2 busy cores)."""
    findings = near_duplicate_classes(registry)
    if registry.store_examples:
        show = progress if progress is not None else len(registry) >= PROGRESS_MIN_CLASSES
        for label in tqdm(registry.classes, desc="checking examples", unit="class", disable=not show, leave=False):
            findings += likely_mislabelled(registry, label, registry.examples(label), registry.sources(label))
    return findings + duplicate_images(registry)


# ---------------------------------------------------------------- helpers

def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / norms  # a zero vector gives NaN: no direction, never flagged


def _nearest(registry: Registry, queries, exclude: list[str]) -> list[list[tuple[str, float]]]:
    """Per query, the classes nearest to it (other than its ``exclude`` label) with the exact cosine
    similarity of their prototypes, best first. Candidates come from the registry's own search."""
    queries = np.asarray(queries, dtype=np.float32).reshape(-1, registry.dim)
    usable = np.linalg.norm(queries, axis=1) > 0
    out: list[list[tuple[str, float]]] = [[] for _ in queries]
    if not usable.any():
        return out
    found = registry.search(queries[usable], min(len(registry), _CANDIDATES))
    unit = _unit(queries.astype(np.float64))
    means: dict[str, np.ndarray] = {}
    for row, candidates in zip(np.flatnonzero(usable), found.labels):
        scored = []
        for other in candidates:
            if other == exclude[row]:
                continue
            if other not in means:
                means[other] = _unit(registry.mean(other).astype(np.float64))
            scored.append((other, float(means[other] @ unit[row])))
        out[row] = sorted(scored, key=lambda item: -item[1])
    return out

