"""Augmented views of a preprocessed image for fine-tuning, computed once and cached with the training images:
view 0 is the image itself, then its mirror image (augment "flip") and seeded random crops ("crop").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CROP_VIEWS = 2  # random crops per image with augment "crop"


def view_count(augment) -> int:
    """How many views ``training_views`` makes per image."""
    return 1 + ("flip" in augment) + CROP_VIEWS * ("crop" in augment)


def training_views(image_tensor: torch.Tensor, augment, rng: np.random.Generator) -> list[torch.Tensor]:
    """View 0 is the image itself; then its mirror image ("flip") and seeded random crops ("crop")."""
    views = [image_tensor]
    if "flip" in augment:
        views.append(torch.flip(image_tensor, dims=[-1]))
    if "crop" in augment:
        views += [crop_view(image_tensor, rng) for _ in range(CROP_VIEWS)]
    return views


def crop_view(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A crop of 60-90% of each side at a random place, resized back: scale and position jitter."""
    _, height, width = image.shape
    scale = rng.uniform(0.6, 0.9)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    crop = image[None, :, top:top + h, left:left + w]
    return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
