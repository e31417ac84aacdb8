"""What the classifier answers: ``Prediction`` (with its ``Neighbour`` explanations), ``RegisterReport``, and how
scores become probabilities (temperature, softmax over the nearest classes).

Plain result types and numpy only, so surfaces (the service, the export bundle) can use them without the
classifier's machinery.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# Default softmax temperatures: cosine similarities live in [-1, 1], so they need sharpening;
# squared L2 distances are already on a large scale.
DEFAULT_TEMPERATURE = {"cosine": 0.05, "l2": 1.0}

# Probabilities are normalised over this many nearest classes at most: beyond them a class's share
# is negligible, and it keeps a query against 100k classes from touching all of them.
SOFTMAX_CANDIDATES = 100


@dataclass(frozen=True)
class Neighbour:
    """A registered example near a query: its class, where it came from (``source`` name and sha256
    ``digest`` of its content, None where not recorded) and its ``similarity`` to the query (cosine,
    or negative squared L2 for metric="l2": higher is closer)."""

    label: str
    source: str | None
    digest: str | None
    similarity: float


@dataclass(frozen=True)
class Prediction:
    """The answer for one input. ``label`` is None for an error or an "unknown" below the threshold.

    ``score``: top-1 probability. ``similarity``: top-1 similarity (cosine, or negative squared L2),
    which the unknown decision rests on. ``top_k``: (label, probability) pairs, best first, with
    ``similarities`` their similarities in the same order. ``unknown``: the nearest class was not
    close enough (``label`` is then None; ``top_k`` still names the nearest classes)."""

    label: str | None
    score: float | None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    input: str = ""
    similarity: float | None = None
    unknown: bool = False
    similarities: list[float] = field(default_factory=list)
    # predict(..., explain=n): the n registered examples nearest to the input among its top-k classes
    # ([] where the registry stores no examples); None when not asked for.
    neighbours: list[Neighbour] | None = None

    def to_dict(self) -> dict:
        """The JSON shape of a prediction (CLI and HTTP service print this)."""
        top_k = [{"label": lab, "score": s, "similarity": sim}
                 for (lab, s), sim in zip(self.top_k, self.similarities or [None] * len(self.top_k))]
        return {"input": self.input, "label": self.label, "score": self.score, "similarity": self.similarity,
                "unknown": self.unknown, "top_k": top_k, "error": self.error} | self._neighbours_dict()

    def _neighbours_dict(self) -> dict:
        return {} if self.neighbours is None else {"neighbours": [asdict(n) for n in self.neighbours]}


@dataclass(frozen=True)
class RegisterReport:
    """What ``register`` did: how many images were added to ``label`` and which ones failed."""

    label: str
    added: int
    total: int  # examples the class holds now
    errors: list[str] = field(default_factory=list)
    # One line each: images skipped as already registered to this class, the same image in another
    # class, a near-duplicate class, likely mislabelled examples (see fewshot.registry.hygiene).
    warnings: list[str] = field(default_factory=list)



def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
