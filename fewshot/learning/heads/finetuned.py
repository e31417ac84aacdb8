"""A fine-tuned model saved as a head: the encoder network it was trained with, plus its head.

Written by ``fewshot finetune`` (``fewshot.learning.finetune``). It is a head like any other (same directory
format, sha256-checked safetensors, ``--head MODEL`` everywhere), whose weights also hold the whole
encoder network. ``carried_encoder`` rebuilds the frozen ``Encoder`` from those weights, so the
encoder fingerprint (a hash of the weights) differs from the base encoder's as soon as a single weight
changed, and registries built on the base encoder refuse this model (and the other way round).

``config``: ``encoder`` = {"name", "architecture", "stages", "pool", "input_size"} (how features are
taken from the network, as ``create_encoder`` takes them) and ``head`` = the inner head's config.
"""

from __future__ import annotations

import copy

import timm
import torch

from ...embedding.encoders import Encoder
from ..base import create_head, register_head
from .head import Head

ENCODER_KEYS = ("name", "architecture", "stages", "pool", "input_size")


@register_head
class FineTunedHead(Head):
    name = "finetuned"

    def __init__(self, in_dim: int, *, in_shape=None, seed: int = 0, encoder: dict | None = None,
                 head: dict | None = None):
        if not isinstance(encoder, dict) or sorted(encoder) != sorted(ENCODER_KEYS):
            raise ValueError(f"encoder must be a dict with keys {ENCODER_KEYS}, got {encoder!r}")
        if not isinstance(head, dict) or not isinstance(head.get("name"), str) or head.get("in_dim") != in_dim:
            raise ValueError(f"head must be the inner head's config with in_dim {in_dim}, got {head!r}")
        super().__init__(in_dim, in_shape=in_shape, seed=seed, encoder=encoder, head=head)
        inner = dict(head)
        self.inner = create_head(inner.pop("name"), inner.pop("in_dim"), **inner)
        self.network = timm.create_model(encoder["architecture"], pretrained=False, num_classes=0)
        self.metric = self.inner.metric
        self.out_dim = self.inner.out_dim
        self.adapts = self.inner.adapts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def cosine_scale(self):
        return self.inner.cosine_scale()

    def episode_logits(self, support, support_labels, query, ways: int) -> torch.Tensor:
        return self.inner.episode_logits(support, support_labels, query, ways)

    @classmethod
    def wrap(cls, encoder: Encoder, head: Head, *, network: torch.nn.Module | None = None,
             seed: int = 0) -> "FineTunedHead":
        """Package a frozen ``encoder`` (e.g. with AdaBN statistics, ``fewshot.learning.adabn``) and a ``head`` on
        its features as one saveable model (``save_head``; ``--head MODEL`` everywhere). ``network``: weights to
        carry instead of the encoder's own (same architecture), as fine-tuning does."""
        if head.in_dim != encoder.dim:
            raise ValueError(f"the head takes {head.in_dim}-dim features but the encoder gives {encoder.dim}")
        spec = {"name": encoder.name, "architecture": encoder.fingerprint["architecture"],
                "stages": list(encoder.stages) if encoder.stages is not None else None, "pool": encoder.pool,
                "input_size": encoder.data_config["input_size"][-1]}
        packaged = cls(encoder.dim, in_shape=encoder.feature_shape, seed=seed, encoder=spec, head=head.config)
        packaged.inner.load_state_dict(head.state_dict())
        packaged.network.load_state_dict((network if network is not None else encoder.model).state_dict())
        packaged.eval()
        packaged.metadata["encoder"] = packaged.carried_encoder().fingerprint
        return packaged

    def carried_encoder(self) -> Encoder:
        """The frozen encoder with this model's (fine-tuned) network weights."""
        spec = self._params["encoder"]
        stages = tuple(spec["stages"]) if spec["stages"] is not None else None
        return Encoder(copy.deepcopy(self.network), name=spec["name"], stages=stages, pool=spec["pool"],
                       input_size=spec["input_size"])
