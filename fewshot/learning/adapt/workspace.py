"""What every ``fewshot adapt`` candidate works on: the domain, its validation episodes, and embeddings.

Embeddings go through the user's embedding cache, so a candidate that reuses an encoder (a statistic, a head)
costs no new pass, and running ``adapt`` again on the same data is fast. A candidate that changes the network
(AdaBN, fine-tuning) has a new fingerprint and so new vectors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ...embedding.cache import EmbeddingCache
from ...embedding.encoders import Encoder
from .domain import Domain
from .validation import Score, Validation

COST_PROBE_IMAGES = 8  # images timed to estimate a candidate's cost per image


@dataclass
class Features:
    """One encoder's embeddings of the domain: training, validation and unlabelled rows."""

    train: np.ndarray
    val: np.ndarray
    unlabeled: np.ndarray

    @property
    def domain_rows(self) -> np.ndarray:
        """Every image of the domain but the validation classes: what domain statistics are fitted on."""
        return np.concatenate([self.train, self.unlabeled]) if len(self.unlabeled) else self.train


class Workspace:
    """The domain, the validation episodes and the embeddings computed so far (by encoder fingerprint)."""

    def __init__(self, domain: Domain, validation: Validation | None, *, cache: EmbeddingCache | None,
                 progress: bool | None):
        self.domain, self.validation = domain, validation
        self.cache, self.progress = cache, progress
        self._features: dict[str, Features] = {}

    def items(self) -> list:
        return list(self.domain.train.items) + list(self.domain.val.items) + list(self.domain.unlabeled)

    def embed_all(self, encoder: Encoder) -> tuple[np.ndarray, np.ndarray]:
        """Every image of the domain through ``encoder``: (vectors, ok mask); unreadable rows are NaN."""
        result = encoder.embed_batch(self.items(), cache=self.cache, progress=self.progress)
        return result.vectors, result.ok

    def features(self, encoder: Encoder) -> Features:
        """``encoder``'s embeddings of the domain (computed once per fingerprint)."""
        key = encoder.fingerprint_id
        if key not in self._features:
            vectors, _ = self.embed_all(encoder)
            self._features[key] = self.split(vectors)
        return self._features[key]

    def score(self, encoder: Encoder, head) -> Score:
        """The validation score of ``head`` on ``encoder``'s features of the validation classes."""
        return self.validation.score(self.features(encoder).val, head=head)

    def has(self, encoder: Encoder) -> bool:
        """Whether ``encoder``'s embeddings of the domain are computed already (no cost to use them)."""
        return encoder.fingerprint_id in self._features

    def split(self, vectors: np.ndarray) -> Features:
        n_train, n_val = len(self.domain.train), len(self.domain.val)
        return Features(train=vectors[:n_train], val=vectors[n_train:n_train + n_val],
                        unlabeled=vectors[n_train + n_val:])

    def remember(self, encoder: Encoder, vectors: np.ndarray) -> None:
        self._features[encoder.fingerprint_id] = self.split(vectors)

    def cost_per_image(self, encoder: Encoder) -> float:
        """Seconds per image of ``encoder`` end to end (decode included), timed on a few validation images
        without the cache: what a new image costs, and what an uncached pass of the domain will take."""
        items = list(self.domain.val.items[:COST_PROBE_IMAGES])
        encoder.embed_batch(items[:1], progress=False)  # first call: builds what the runtime needs
        start = time.perf_counter()
        encoder.embed_batch(items, progress=False)
        return (time.perf_counter() - start) / len(items)
