"""An encoder's preprocessing in numpy and Pillow alone, from its fingerprint: the torch-free twin of timm's eval
transform, giving the same numbers as ``Encoder`` (``fewshot.embedding.model``).

timm's eval transform for a square input of ``size`` px is ``Resize(floor(size / crop_pct))`` on the shorter side
(torchvision calls Pillow's ``resize`` for PIL images, with the long side truncated to an int), ``CenterCrop(size)``
(offsets rounded), ``ToTensor`` (uint8 / 255 in float32) and ``Normalize(mean, std)``. The encoder decodes with the
package's safe decoder (``fewshot.embedding.images``), a JPEG draft hint of ``round(size / crop_pct)``, and crops
extreme aspect ratios first (``limit_aspect``); so does this. What it cannot reproduce (a non-square input, a crop
larger than the resized image, an interpolation Pillow lacks) raises ``ValueError`` at construction, so callers
fall back to torch instead of computing other numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .images import limit_aspect

# timm's interpolation names -> the Pillow filter torchvision uses for each on PIL images.
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """Per image: decoded RGB ``PIL.Image`` -> ``(size, size, 3)`` uint8 (``image_step``); per batch: those arrays
    -> ``(N, 3, size, size)`` float32, normalised (``batch_step``), the encoder network's input."""

    size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float

    def __post_init__(self):
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(f"interpolation {self.interpolation!r} has no Pillow equivalent here "
                             f"(one of {', '.join(_PIL_FILTERS)})")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct {self.crop_pct} > 1 pads the image; only torch reproduces that")

    @classmethod
    def from_fingerprint(cls, fingerprint: dict) -> "Preprocess":
        """The preprocessing an encoder fingerprint records (``fingerprint["preprocess"]``)."""
        spec = fingerprint.get("preprocess") or {}
        channels, height, width = spec["input_size"]
        if height != width or channels != 3:
            raise ValueError(f"input size {spec['input_size']} is not a square RGB image; only torch resizes "
                             f"to other shapes")
        return cls(int(height), spec["interpolation"], tuple(spec["mean"]), tuple(spec["std"]),
                   float(spec["crop_pct"]))

    @property
    def resize_size(self) -> int:
        """The JPEG draft hint, as ``Encoder.resize_size`` gives it (rounded: the decoded pixels depend on it)."""
        return int(round(self.size / self.crop_pct))

    @property
    def scale_size(self) -> int:
        """The shorter side after resizing, as timm computes it (floored)."""
        return math.floor(self.size / self.crop_pct)

    def image_step(self, image: Image.Image) -> np.ndarray:
        """Resize the shorter side, centre-crop, as uint8 ``(size, size, 3)``."""
        image = limit_aspect(image)
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.scale_size, int(self.scale_size * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        if new_size != image.size:
            image = image.resize(new_size, _PIL_FILTERS[self.interpolation])
        left = int(round((new_size[0] - self.size) / 2.0))
        top = int(round((new_size[1] - self.size) / 2.0))
        array = np.asarray(image.crop((left, top, left + self.size, top + self.size)))
        if array.dtype != np.uint8 or array.shape != (self.size, self.size, 3):
            raise ValueError(f"preprocessing gave an array of shape {array.shape} and dtype {array.dtype}, "
                             f"expected {(self.size, self.size, 3)} uint8")
        return array

    def batch_step(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Stack, to float32 in [0, 1], normalise: the same float32 operations as ToTensor + Normalize."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        batch = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32)
        batch /= np.float32(255)
        batch -= mean
        batch /= std
        return batch
