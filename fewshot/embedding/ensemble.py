"""Encoder ensembles: several frozen encoders as one, their L2-normalised features concatenated.

``create_encoder("efficientnet_lite0+efficientnet_lite2")`` builds an ``EnsembleEncoder``. In domain the
encoder is the lever (50-way 1-shot on held-out photo classes: Lite0 79.8%, Lite2 82.4%, the three
offline Lite encoders concatenated 84.0%), and concatenating normalised features weighs every member
equally whatever its dimension or scale.

``name@SIZE`` sets one member's input resolution (``efficientnet_lite0@260+efficientnet_lite2``).

Each image is decoded once (at the largest size any member needs) and every member embeds the same
batch. Vectors are cached per member, under each member's own fingerprint, so an ensemble reuses what
its members embedded alone and vice versa. The ensemble's fingerprint lists its members' fingerprints in
order: a registry built with one ensemble refuses another (or a single member).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cache import EmbeddingCache
from .fingerprints import SEPARATOR, SIZE_MARK, fingerprint_id
from .model import DEFAULT_BATCH_SIZE, Embeddings, Encoder

class EnsembleEncoder(Encoder):
    """Several ``Encoder``s behaving as one: ``dim`` is the sum of theirs, each block unit-length.

    Same interface as ``Encoder`` (``embed``, ``embed_batch``, ``dim``, ``fingerprint``); pooled
    features only (``feature_shape`` is None), since members' maps differ in size.
    """

    def __init__(self, members: Sequence[Encoder]):  # not Encoder.__init__: that builds one timm model
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two encoders")
        if any(m.feature_shape is not None for m in members):
            raise ValueError("ensembles take pooled features only: use pool='avg' (the default)")
        self.members = list(members)
        self.name = SEPARATOR.join(_member_label(m) for m in self.members)
        self.stages, self.pool, self.feature_shape = None, "avg", None
        self.compile, self.runtime = self.members[0].compile, self.members[0].runtime
        self.dims = [m.dim for m in self.members]
        self.dim = int(sum(self.dims))
        self.fingerprint = {"name": self.name, "ensemble": "l2-normalised concatenation",
                            "members": [m.fingerprint for m in self.members],
                            "features": {"stages": None, "pool": "avg", "dim": self.dim}}
        self.fingerprint_id = fingerprint_id(self.fingerprint)

    @property
    def resize_size(self) -> int:
        """Decode once, large enough for the member that needs the most pixels."""
        return max(m.resize_size for m in self.members)

    # -- the pieces Encoder's streams call: one decoded image feeds every member --------------------
    def _image_step(self, image) -> tuple:
        return tuple(m._image_step(image) for m in self.members)

    def _batch_step(self, values: list[tuple]) -> tuple:
        return tuple(m._batch_step([v[i] for v in values]) for i, m in enumerate(self.members))

    def _network(self, n_images: int, batch_size: int, threads: int) -> Callable:
        """Raw (unnormalised) member features side by side; normalised after caching."""
        networks = [m._network(n_images, batch_size, threads) for m in self.members]
        return lambda batches: torch.cat([net(b).float() for net, b in zip(networks, batches)], dim=1)

    def _onnx_wanted(self, n_images: int) -> bool:
        return any(m._onnx_wanted(n_images) for m in self.members)

    def _forward(self, batches: tuple) -> torch.Tensor:
        return torch.cat([m._forward(b) for m, b in zip(self.members, batches)], dim=1)

    # -- embedding ------------------------------------------------------------------------------------
    def embed_batch(self, images, *, batch_size: int = DEFAULT_BATCH_SIZE, cache: EmbeddingCache | None = None,
                    progress: bool | None = None, workers: int | None = None) -> Embeddings:
        """Like ``Encoder.embed_batch``; rows are each member's unit vector, concatenated."""
        members_cache = _MembersCache(cache, self.members) if cache is not None else None
        result = super().embed_batch(images, batch_size=batch_size, cache=members_cache, progress=progress,
                                     workers=workers)
        vectors = np.concatenate([_unit_rows(block) for block in _blocks(result.vectors, self.dims)], axis=1)
        return Embeddings(vectors=vectors, sources=result.sources, errors=result.errors, digests=result.digests)


class _MembersCache:
    """The embedding cache as an ensemble sees it: raw member vectors side by side, each stored under its
    member's fingerprint (a row is a hit only when every member has it)."""

    def __init__(self, cache: EmbeddingCache, members: Sequence[Encoder]):
        self.cache, self.members = cache, list(members)
        self.dims = [m.dim for m in self.members]

    def get_many(self, encoder_id: str, digests: list[str], *, dim: int) -> dict[str, np.ndarray]:
        found = [self.cache.get_many(m.fingerprint_id, digests, dim=m.dim) for m in self.members]
        return {d: np.concatenate([hits[d] for hits in found]) for d in digests if all(d in h for h in found)}

    def writer(self, encoder_id: str) -> "_MembersWriter":
        return _MembersWriter([self.cache.writer(m.fingerprint_id) for m in self.members], self.dims)


class _MembersWriter:
    """The cache's chunked writer for an ensemble: each member's block goes to that member's writer."""

    def __init__(self, writers: list, dims: list[int]):
        self.writers, self.dims = writers, dims

    def add(self, vectors: dict[str, np.ndarray]) -> None:
        if not vectors:
            return
        digests = list(vectors)
        blocks = _blocks(np.stack([vectors[d] for d in digests]), self.dims)
        for writer, block in zip(self.writers, blocks):
            writer.add(dict(zip(digests, block)))

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()


def _blocks(rows: np.ndarray, dims: list[int]) -> list[np.ndarray]:
    return np.split(rows, np.cumsum(dims)[:-1], axis=1)


def _member_label(encoder: Encoder) -> str:
    size = encoder.fingerprint["preprocess"]["input_size"][-1]
    default = encoder.model.pretrained_cfg.get("input_size", (3, size, size))[-1]
    return encoder.name if size == default else f"{encoder.name}{SIZE_MARK}{size}"


def _unit_rows(block: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (NaN rows of failed images stay NaN)."""
    return (F.normalize(torch.from_numpy(np.ascontiguousarray(block)), dim=1)).numpy()
