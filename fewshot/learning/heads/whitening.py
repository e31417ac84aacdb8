"""Whitening head: centre on the domain's mean, decorrelate with its shrunk covariance, then L2-normalise.

Nearest prototype under cosine similarity after ZCA whitening: each feature direction gets unit variance
over the domain, so directions that vary a lot on every image of a far domain (texture, stroke width) stop
dominating the similarity. The covariance is shrunk toward a scaled identity,
``(1 - shrinkage) * C + shrinkage * trace(C) / d * I`` (Ledoit and Wolf, "A well-conditioned estimator for
large-dimensional covariance matrices", J. Multivariate Analysis 2004), because a domain's few hundred images
estimate a d x d covariance badly; ``shrinkage=1`` is centring alone. ``fewshot adapt`` chooses the shrinkage
by validation on the domain's own held-out classes.

No learned weights: ``fit`` computes the mean and the whitening matrix from domain features (labelled or not),
kept as buffers so that they are saved with the head.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..base import register_head
from ..train import TrainResult
from .head import Head

MAX_WHITENING_DIM = 2048  # a d x d matrix (16 MB of float32 at this size) and its eigendecomposition


@register_head
class WhiteningHead(Head):
    name = "whitening"
    metric = "cosine"
    episodic = False

    def __init__(self, in_dim: int, *, in_shape=None, seed: int = 0, shrinkage: float = 0.5):
        if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 < shrinkage <= 1:
            raise ValueError(f"shrinkage must be in (0, 1] (1 = centring only), got {shrinkage!r}")
        if in_dim > MAX_WHITENING_DIM:
            raise ValueError(f"whitening needs a {in_dim} x {in_dim} matrix; it is limited to {MAX_WHITENING_DIM} "
                             "dimensions: use the identity head (centring) for wider features")
        super().__init__(in_dim, in_shape=in_shape, seed=seed, shrinkage=float(shrinkage))
        self.shrinkage = float(shrinkage)
        self.out_dim = self.in_dim
        self.register_buffer("mean", torch.zeros(self.in_dim))
        self.register_buffer("matrix", torch.eye(self.in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize((x - self.mean) @ self.matrix, dim=1)

    def fit(self, features, labels=None, *, groups=None, **train_options) -> TrainResult:
        """Set the mean and whitening matrix from domain ``features`` (N, in_dim); labels are not needed."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.in_dim or len(x) < 2:
            raise ValueError(f"whitening head: features must have shape (N >= 2, {self.in_dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("whitening head: features contain NaN or infinity")
        mean = x.mean(axis=0)
        covariance = np.cov(x - mean, rowvar=False)
        scale = np.trace(covariance) / self.in_dim
        shrunk = (1 - self.shrinkage) * covariance + self.shrinkage * scale * np.eye(self.in_dim)
        values, vectors = np.linalg.eigh(shrunk)
        inverse_root = (vectors / np.sqrt(np.maximum(values, 1e-12 * scale))) @ vectors.T
        with torch.no_grad():
            self.mean.copy_(torch.from_numpy(mean).float())
            self.matrix.copy_(torch.from_numpy(inverse_root * np.sqrt(scale)).float())  # keeps the overall scale
        return TrainResult(best_val_accuracy=None, best_episode=0, episodes_run=0, stopped_early=False,
                           history=[])
