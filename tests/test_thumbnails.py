"""Tests of fewshot.registry.thumbnails: a small JPEG per class, made by fewshot's safe decoder."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from fewshot.errors import ImageError
from fewshot.registry import MAX_THUMBNAIL_BYTES
from fewshot.registry.thumbnails import make_thumbnail


def test_thumbnail_is_a_small_jpeg_of_the_photo(photos):
    data = make_thumbnail(photos["chelsea"])
    assert len(data) <= MAX_THUMBNAIL_BYTES
    with Image.open(io.BytesIO(data)) as img, Image.open(photos["chelsea"]) as original:
        assert img.format == "JPEG" and max(img.size) == 128
        assert abs(img.size[0] / img.size[1] - original.size[0] / original.size[1]) < 0.02  # aspect kept


def test_bad_inputs_raise_image_errors(corrupt_jpeg):
    with pytest.raises(ImageError):
        make_thumbnail(corrupt_jpeg)
    with pytest.raises(ImageError):
        make_thumbnail(b"not an image")
    with pytest.raises(ValueError, match="size"):
        make_thumbnail(b"x", size=4096)


def test_the_largest_noisy_thumbnail_fits_the_registry_limit():
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    assert len(make_thumbnail(noise, size=256)) <= MAX_THUMBNAIL_BYTES
