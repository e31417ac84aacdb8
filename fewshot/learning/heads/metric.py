"""Metric-learning head: a learned projection trained with a pytorch-metric-learning loss.

Khosla et al. "Supervised Contrastive Learning." NeurIPS 2020 (``loss="supcon"``, the default);
Deng et al. "ArcFace: Additive Angular Margin Loss for Deep Face Recognition." CVPR 2019
(``"arcface"``); Schroff et al. "FaceNet." CVPR 2015 (``"triplet"``, with a triplet miner);
Chen et al. "A Simple Framework for Contrastive Learning (SimCLR)." ICML 2020 (``"ntxent"``).
See Musgrave et al., "A Metric Learning Reality Check", ECCV 2020, for the library.

The loss is injected by name from ``pytorch_metric_learning.losses`` (``loss_params`` are passed
to its constructor), never re-implemented. Sampling stays episodic: each step's batch is one
episode's support + query vectors with their labels (episode labels; ArcFace, which keeps a weight
per class, gets the dataset-wide class ids and needs ``num_classes`` = number of training classes).
Vectors come out unit-length; metric "cosine". Validation uses nearest-prototype logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...checks import check_int
from ..base import MAX_WAYS, check_choice, prototype_logits, register_head, seeded
from .head import Head
from ._projection import build_projection

LOSSES = ("supcon", "arcface", "triplet", "ntxent")
_DEFAULTS = {"supcon": {"temperature": 0.1}, "ntxent": {"temperature": 0.1}, "triplet": {"margin": 0.1},
             "arcface": {}}


def _build_loss(loss: str, loss_params: dict, num_classes, embedding_size: int):
    from pytorch_metric_learning import losses, miners

    kwargs = {**_DEFAULTS[loss], **loss_params}
    if loss == "supcon":
        return losses.SupConLoss(**kwargs), None
    if loss == "ntxent":
        return losses.NTXentLoss(**kwargs), None
    if loss == "triplet":
        return losses.TripletMarginLoss(**kwargs), miners.TripletMarginMiner(margin=kwargs["margin"] * 2,
                                                                             type_of_triplets="semihard")
    return losses.ArcFaceLoss(num_classes=num_classes, embedding_size=embedding_size, **kwargs), None


@register_head
class MetricHead(Head):
    name = "metric"
    metric = "cosine"

    def __init__(self, in_dim: int, *, in_shape=None, seed: int = 0, arch: str = "mlp", hidden: int = 512,
                 out_dim: int = 128, norm: str = "batch", dropout: float = 0.1, channels: int = 64,
                 blocks: int = 2, pool_size: int = 2, loss: str = "supcon", loss_params: dict | None = None,
                 num_classes: int | None = None):
        loss_params = dict(loss_params or {})
        super().__init__(in_dim, in_shape=in_shape, seed=seed, arch=arch, hidden=hidden, out_dim=out_dim,
                         norm=norm, dropout=dropout, channels=channels, blocks=blocks, pool_size=pool_size,
                         loss=loss, loss_params=loss_params, num_classes=num_classes)
        self.loss_name = check_choice(loss, "loss", LOSSES)
        self.global_labels = loss == "arcface"
        if self.global_labels:
            if num_classes is None:
                raise ValueError("loss='arcface' keeps one weight vector per training class: pass "
                                 "num_classes=<number of classes in the training labels>")
            check_int(num_classes, "num_classes", high=10 * MAX_WAYS)
        self.num_classes = num_classes
        self.out_dim = int(out_dim)
        with seeded(self.seed):
            self.body = build_projection(self.in_dim, self.in_shape, arch=arch, hidden=hidden, out_dim=out_dim,
                                         norm=norm, dropout=dropout, channels=channels, blocks=blocks,
                                         pool_size=pool_size)
            try:
                criterion, self.miner = _build_loss(loss, loss_params, num_classes, self.out_dim)
            except TypeError as e:
                raise ValueError(f"loss_params {loss_params} do not fit the {loss!r} loss: {e}") from None
        self.criterion = criterion  # a submodule: ArcFace's class weights are trained and saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=1)

    def prepare_training(self, n_classes: int) -> None:
        if self.global_labels and n_classes > self.num_classes:
            raise ValueError(f"the training labels hold {n_classes} classes but this arcface head was created "
                             f"with num_classes={self.num_classes}; create it with num_classes={n_classes}")

    def training_step(self, support, support_labels, query, query_labels, ways: int, classes=None):
        z = self(torch.cat([support, query]))
        labels = torch.cat([torch.as_tensor(support_labels), torch.as_tensor(query_labels)]).long()
        if self.global_labels:
            if classes is None:
                raise ValueError("loss='arcface' needs the episode's dataset-wide class ids (classes=...)")
            classes = torch.as_tensor(classes).long()
            if classes.max() >= self.num_classes:
                raise ValueError(f"class id {int(classes.max())} >= num_classes={self.num_classes}; create the "
                                 "head with num_classes = number of classes in the training labels")
            labels = classes[labels]
        indices = self.miner(z, labels) if self.miner is not None else None
        loss = self.criterion(z, labels, indices) if indices is not None else self.criterion(z, labels)
        with torch.no_grad():
            n = len(support)
            logits = prototype_logits(z[:n], support_labels, z[n:], ways, "cosine", self.cosine_scale())
        return loss, logits
