"""``Head``: the contract of ``HeadBase`` plus ``fit``, which trains the head episodically.

``fit`` needs the training loop (``fewshot.learning.train``) and the training loop needs the head contract;
keeping ``fit`` here, above both, lets each import the other's layer without a loop. Every head subclasses
``Head``; ``fewshot.Head`` is this class.
"""

from __future__ import annotations

from ..train import TrainResult, train_head
from ..base import HeadBase


class Head(HeadBase):
    """A trainable map from frozen encoder embeddings to head-space vectors (see ``HeadBase``)."""

    def fit(self, features, labels, *, groups=None, **train_options) -> TrainResult:
        """Train on cached embeddings; see ``fewshot.learning.train.train_head`` for the options."""
        return train_head(self, features, labels, groups=groups, **train_options)
