"""SimpleShot "CL2N" head: centre on the base-class mean, then L2-normalise.

Wang, Chao, Weinberger, van der Maaten. "SimpleShot: Revisiting Nearest-Neighbor Classification
for Few-Shot Learning." arXiv:1911.04623, 2019.

No learned weights: ``fit`` only computes the mean of the base-class (training) features, kept as
a buffer so it is saved with the head. Before ``fit`` the mean is zero (plain cosine). Nearest
prototype under cosine similarity on the centred, normalised vectors is SimpleShot's classifier.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..base import register_head
from ..train import TrainResult
from .head import Head


@register_head
class IdentityHead(Head):
    name = "identity"
    metric = "cosine"
    episodic = False

    def __init__(self, in_dim: int, *, in_shape=None, seed: int = 0, center: bool = True):
        super().__init__(in_dim, in_shape=in_shape, seed=seed, center=bool(center))
        self.center = bool(center)
        self.out_dim = self.in_dim
        self.register_buffer("mean", torch.zeros(self.in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center:
            x = x - self.mean
        return F.normalize(x, dim=1)

    def fit(self, features, labels=None, *, groups=None, **train_options) -> TrainResult:
        """Set the centring mean from base-class ``features`` (N, in_dim); no episodes, no training.

        ``labels``, ``groups`` and training options are accepted for a uniform API and ignored."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.in_dim or len(x) == 0:
            raise ValueError(f"identity head: features must have shape (N >= 1, {self.in_dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("identity head: features contain NaN or infinity")
        with torch.no_grad():
            self.mean.copy_(torch.from_numpy(x.mean(axis=0)).float())
        return TrainResult(best_val_accuracy=None, best_episode=0, episodes_run=0, stopped_early=False,
                           history=[])
