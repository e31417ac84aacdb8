"""Support views: extra views of each support image, averaged into its example vector.

With ``support_views="flip"`` a registered (or episode support) image is embedded as it is and
mirrored left-right, and the two embeddings are averaged into one vector per image: the prototype
gets the flip invariance of the class without counting any image twice (a class's ``count`` stays the
number of images). Queries are embedded once, as they are. Flipped views are pixel arrays, so the
embedding cache keys them by content like any other input and a second run embeds nothing new.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import ImageError
from .images import load_image

SUPPORT_VIEWS = ("none", "flip")

# Flipped images are decoded pixel arrays: embed them a chunk at a time so memory stays bounded.
_CHUNK = 64


def check_support_views(views: str) -> str:
    """``views`` if it is a known setting, else ``ValueError`` saying which ones exist."""
    if views not in SUPPORT_VIEWS:
        raise ValueError(f"support_views must be one of {', '.join(map(repr, SUPPORT_VIEWS))}, got {views!r}")
    return views


def flipped(item):
    """The item mirrored left-right as an RGB pixel array, or the item itself if it cannot be read
    (it then fails again, alone, where it is embedded)."""
    try:
        return np.asarray(load_image(item).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    except ImageError:
        return item


def embed_flipped(embed: Callable[[list], tuple[np.ndarray, np.ndarray]], items: Sequence, *,
                  progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, ok) of the flipped views of ``items``; ``embed`` maps a list of inputs to (vectors, ok)."""
    starts = range(0, len(items), _CHUNK)
    hide = (len(items) <= _CHUNK) if progress is None else not progress
    parts = [embed([flipped(item) for item in items[start:start + _CHUNK]])
             for start in tqdm(starts, desc="flipped views", unit="chunk", disable=hide)]
    if not parts:
        raise ValueError("no images to flip")
    return np.concatenate([v for v, _ in parts]), np.concatenate([ok for _, ok in parts])


def average_views(views: Sequence[np.ndarray], metric: str) -> np.ndarray:
    """One vector per image from its (n, dim) view embeddings. Under cosine each view is scaled to
    unit length first, so the views weigh the same in the direction the registry keeps."""
    stacked = np.stack([np.asarray(v, dtype=np.float32) for v in views])
    if metric == "cosine":
        norms = np.linalg.norm(stacked, axis=2, keepdims=True)
        stacked = stacked / np.maximum(norms, 1e-12)
    return stacked.mean(axis=0)
