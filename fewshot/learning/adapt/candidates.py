"""The transfers ``fewshot adapt`` tries, cheapest first, each built as a saved-model head.

Every candidate ends as something ``save_head`` writes and ``--head MODEL`` reads back: a head whose metadata
names the encoder whose features it takes (feature choices, domain statistics, a trained head), or a
``FineTunedHead`` carrying a changed network (AdaBN statistics, fine-tuned blocks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ...embedding.encoders import DEFAULT_ENCODER, Encoder, create_encoder
from ...embedding.fingerprints import PACKAGED_WEIGHTS
from ...embedding.images import decoded_size
from ...errors import ImageError
from ..base import HeadBase, create_head
from ..train import train_head
from .validation import Score
from .workspace import Features, Workspace

WHITENING_SHRINKAGES = (0.1, 0.3, 0.6)  # chosen among by validation: how far to trust the domain's covariance
RESOLUTION_CHANGE = 0.25  # try the domain's own image size when it differs from the model's by more than this
MIN_RESOLUTION, MAX_RESOLUTION = 96, 320
# Final features suit photos; pooled intermediate stages suit far domains; a grid keeps the spatial layout that
# strokes and shapes need (the README's Omniglot recipe), at the price of wide features.
LAYOUTS = (("final layer", None, "avg"), ("stages 3+4", (3, 4), "avg"), ("stages 2+3 on a 7x7 grid", (2, 3), 7))
FAMILY = ("efficientnet_lite1", "efficientnet_lite2")  # other offline encoders, in order of cost
PACKAGED = tuple(PACKAGED_WEIGHTS)
MIN_HEAD_CLASSES = 5


@dataclass
class Candidate:
    """One transfer tried (or skipped) by ``adapt``, with its validation score and cost."""

    name: str
    phase: str
    status: str = "tried"  # "tried", "skipped" (with the reason in note) or "failed"
    note: str = ""
    score: Score | None = None
    seconds: float = 0.0
    ms_per_image: float | None = None  # inference cost of the model per new image
    model: HeadBase | None = field(default=None, repr=False)
    encoder: Encoder | None = field(default=None, repr=False)
    spec: "FeatureSpec | None" = None
    shrinkage: float | None = None  # of a whitening candidate

    def to_dict(self) -> dict:
        return {"name": self.name, "phase": self.phase, "status": self.status, "note": self.note,
                "seconds": round(self.seconds, 2), "ms_per_image": self.ms_per_image,
                **({"validation": self.score.to_dict()} if self.score is not None else {})}


@dataclass(frozen=True)
class FeatureSpec:
    """Which features to take: an encoder (or ensemble) name, its stages, pooling and input size."""

    encoder: str = DEFAULT_ENCODER
    stages: tuple[int, ...] | None = None
    pool: str | int = "avg"
    input_size: int | None = None
    layout: str = "final layer"

    @property
    def label(self) -> str:
        short = "+".join(part.replace("efficientnet_", "").capitalize() for part in self.encoder.split("+"))
        size = f", {self.input_size} px" if self.input_size else ""
        return f"{short} {self.layout}{size}"

    @property
    def single(self) -> bool:
        return "+" not in self.encoder

    def create(self) -> Encoder:
        return create_encoder(self.encoder, stages=self.stages, pool=self.pool, input_size=self.input_size)

    def with_(self, **changes) -> "FeatureSpec":
        values = {**self.__dict__, **changes}
        return FeatureSpec(**values)


def layout_specs(base: FeatureSpec) -> list[FeatureSpec]:
    return [base.with_(stages=stages, pool=pool, layout=name) for name, stages, pool in LAYOUTS]


def resolution_spec(best: FeatureSpec, encoder: Encoder, items: list) -> FeatureSpec | None:
    """The best layout at the domain's own image size, when that differs clearly from the model's."""
    sides = []
    for item in items[:50]:
        try:
            sides.append(min(decoded_size(item)))
        except ImageError:
            continue
    if not sides:
        return None
    native = int(np.clip(np.median(sides), MIN_RESOLUTION, MAX_RESOLUTION)) // 8 * 8
    model_size = encoder.data_config["input_size"][-1]
    if abs(native - model_size) <= RESOLUTION_CHANGE * model_size:
        return None
    return best.with_(input_size=native)


def encoder_specs(best: FeatureSpec) -> list[FeatureSpec]:
    """The other offline encoders with the best layout, then the three together (costliest last)."""
    if best.encoder not in PACKAGED:
        return []
    others = [best.with_(encoder=name) for name in FAMILY if name != best.encoder]
    ensemble = best.with_(encoder="+".join(PACKAGED), input_size=None) if best.pool == "avg" else None
    return others + ([ensemble] if ensemble else [])


# -- models: what each candidate saves -------------------------------------------------------------------
def frozen_model(encoder: Encoder) -> HeadBase:
    """The frozen default as a model: plain cosine on the encoder's features."""
    return _with_encoder(create_head("identity", encoder.dim, center=False), encoder)


def centred_model(encoder: Encoder, features: Features) -> HeadBase:
    head = create_head("identity", encoder.dim, in_shape=encoder.feature_shape)
    head.fit(features.domain_rows)
    return _with_encoder(head, encoder)


def whitened_model(encoder: Encoder, features: Features, shrinkage: float) -> HeadBase:
    head = create_head("whitening", encoder.dim, in_shape=encoder.feature_shape, shrinkage=shrinkage)
    head.fit(features.domain_rows)
    return _with_encoder(head, encoder)


def protonet_model(encoder: Encoder, features: Features, ws: Workspace, *, ways: int, within_group: bool,
                   seed: int, deadline: float) -> HeadBase:
    """A ProtoNet head trained episodically on the training classes, with early stopping on a fifth of them;
    episodes sized to the time left. On pooled features a residual MLP (it starts as the identity map, so at
    the raw features' accuracy); on grid features a small conv net that can use the spatial layout."""
    train = ws.domain.train
    inner = _inner_validation(train.labels, train.groups, seed)
    def new_head() -> HeadBase:
        if encoder.feature_shape is not None:
            return create_head("protonet", encoder.dim, in_shape=encoder.feature_shape, seed=seed, arch="conv",
                               distance="cosine")
        return create_head("protonet", encoder.dim, seed=seed, residual=True, distance="cosine")

    head = new_head()
    groups = train.groups if within_group else None
    ways = min(ways, _ways_possible(train.labels[~inner], _rows(groups, ~inner)),
               _ways_possible(train.labels[inner], _rows(groups, inner)))
    start = time.monotonic()
    train_head(head, features.train[~inner], train.labels[~inner], groups=_rows(groups, ~inner), ways=ways,
               episodes=50, within_group=within_group, seed=seed, progress=False, patience=None)
    per_episode = (time.monotonic() - start) / 50
    episodes = int(np.clip((deadline - time.monotonic()) * 0.8 / max(per_episode * 1.3, 1e-4), 100, 5000))
    head = new_head()
    train_head(head, features.train[~inner], train.labels[~inner], groups=_rows(groups, ~inner), ways=ways,
               episodes=episodes, within_group=within_group, seed=seed, val_features=features.train[inner],
               val_labels=train.labels[inner], val_groups=_rows(groups, inner), val_every=max(50, episodes // 10),
               patience=4, progress=ws.progress)
    return _with_encoder(head, encoder)


def _inner_validation(labels: np.ndarray, groups, seed: int) -> np.ndarray:
    """Rows of a seeded fifth of the training classes (whole groups where there are groups)."""
    units = groups if groups is not None and len(np.unique(groups)) >= 5 else labels
    values = np.unique(units)
    held = np.random.default_rng([seed, 7]).choice(values, max(2, len(values) // 5), replace=False)
    return np.isin(units, held)


def _ways_possible(labels: np.ndarray, groups) -> int:
    """The most classes an episode can hold: all of them, or within a group, the biggest group's."""
    if groups is None:
        return max(2, len(np.unique(labels)))
    return max(2, max(len(np.unique(labels[groups == g])) for g in np.unique(groups)))


def _rows(groups, mask):
    return groups[mask] if groups is not None else None


def _with_encoder(head: HeadBase, encoder: Encoder) -> HeadBase:
    head.eval()
    head.metadata["encoder"] = encoder.fingerprint
    return head
