"""``Embeddings``: what every encoder and runtime returns for a batch of inputs (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Embeddings:
    """Embeddings of a batch of inputs, one row per input; rows of failed inputs are NaN."""

    vectors: np.ndarray  # (N, dim) float32
    sources: list[str]  # describe(item) per input
    errors: list[str | None]  # None where the input embedded fine
    digests: list[str | None] = field(default_factory=list)  # sha256 of each input's content (None: unreadable)

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of the inputs that embedded."""
        return np.array([e is None for e in self.errors], dtype=bool)
