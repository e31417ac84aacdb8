"""Cached training views of a real photo: the image first, then its mirror and seeded random crops."""

from __future__ import annotations

import numpy as np
import torch

from fewshot import create_encoder
from fewshot.embedding.images import load_image
from fewshot.learning.augment import training_views, view_count


def test_views_are_the_image_its_mirror_and_seeded_crops(photos):
    image = create_encoder(input_size=64, compile="none").transform(load_image(photos["chelsea"]))
    views = training_views(image, ("flip", "crop"), np.random.default_rng(0))
    assert len(views) == view_count(("flip", "crop")) == 4 and view_count(()) == 1
    assert all(v.shape == image.shape for v in views)
    assert torch.equal(views[0], image) and torch.equal(views[1], image.flip(-1))
    assert not torch.allclose(views[2], image, atol=0.05) and not torch.allclose(views[2], views[3], atol=0.05)
    again = training_views(image, ("flip", "crop"), np.random.default_rng(0))
    assert all(torch.equal(a, b) for a, b in zip(views, again))  # the same seed, the same crops
    assert view_count(("rotations",)) == 1  # rotations make new classes, not views
