"""Prototypical Networks head: a learned projection, classes as the mean of their support vectors.

Snell, Swersky, Zemel. "Prototypical Networks for Few-shot Learning." NeurIPS 2017.

Projection: ``arch="mlp"`` or ``arch="conv"`` (on flattened feature maps, needs ``in_shape``), see
``fewshot.learning.heads._projection``. ``distance="l2"``: logits are -squared Euclidean distances to the
prototypes (metric "l2", as in the paper); ``distance="cosine"``: scaled cosine similarities with a
learned temperature (a log-scale parameter; metric "cosine", vectors come out unit-length).
Loss: cross-entropy over the episode's logits (the prototypical loss).

``residual=True`` (``arch="mlp"``): the head maps ``x`` to ``x + mlp(x)`` with the MLP's last layer at
zero, so an untrained head *is* the raw features (same dimension; ``out_dim`` is not used) and training
starts at raw-feature accuracy instead of below it. Close to ImageNet (photos) this is what keeps a head
from losing to the features it was trained on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..base import check_choice, register_head, seeded
from .head import Head
from ._projection import build_projection


@register_head
class ProtoNetHead(Head):
    name = "protonet"

    def __init__(self, in_dim: int, *, in_shape=None, seed: int = 0, arch: str = "mlp", hidden: int = 512,
                 out_dim: int = 128, norm: str = "batch", dropout: float = 0.1, channels: int = 64,
                 blocks: int = 2, pool_size: int = 2, distance: str = "l2", init_scale: float = 10.0,
                 residual: bool = False):
        super().__init__(in_dim, in_shape=in_shape, seed=seed, arch=arch, hidden=hidden, out_dim=out_dim,
                         norm=norm, dropout=dropout, channels=channels, blocks=blocks, pool_size=pool_size,
                         distance=distance, init_scale=init_scale, residual=residual)
        self.metric = check_choice(distance, "distance", ("l2", "cosine"))
        if not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if not isinstance(residual, bool) or (residual and arch != "mlp"):
            raise ValueError(f"residual must be true or false, and true only with arch='mlp', got {residual!r} "
                             f"with arch={arch!r}")
        self.residual = residual
        self.out_dim = self.in_dim if residual else int(out_dim)
        with seeded(self.seed):
            self.body = build_projection(self.in_dim, self.in_shape, arch=arch, hidden=hidden, out_dim=self.out_dim,
                                         norm=norm, dropout=dropout, channels=channels, blocks=blocks,
                                         pool_size=pool_size)
        if residual:  # start as the identity map: training begins at raw-feature accuracy
            torch.nn.init.zeros_(self.body[-1].weight)
            torch.nn.init.zeros_(self.body[-1].bias)
        if self.metric == "cosine":  # learned temperature, as a log so that it stays positive
            self.log_scale = torch.nn.Parameter(torch.tensor(math.log(init_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x + self.body(x) if self.residual else self.body(x)
        return F.normalize(z, dim=1) if self.metric == "cosine" else z

    def cosine_scale(self):
        return self.log_scale.exp() if self.metric == "cosine" else super().cosine_scale()
