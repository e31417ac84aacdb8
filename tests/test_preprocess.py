"""The numpy/Pillow preprocessing gives the very numbers of the torch encoder's transform (so the torch-free path can
answer as the torch path does), and refuses what it cannot reproduce."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fewshot.embedding.images import load_image
from fewshot.embedding.preprocess import Preprocess


def _torch_batch(encoder, images) -> np.ndarray:
    return np.ascontiguousarray(encoder._batch_step([encoder._image_step(i) for i in images]).numpy())


def _numpy_batch(preprocess, images) -> np.ndarray:
    return preprocess.batch_step([preprocess.image_step(i) for i in images])


def test_same_numbers_as_the_encoders_transform_on_real_photos(encoder, photo_root):
    preprocess = Preprocess.from_fingerprint(encoder.fingerprint)
    assert preprocess.resize_size == encoder.resize_size
    files = sorted(photo_root.glob("*.png"))[:10] + sorted(photo_root.glob("*.jpg"))
    images = [load_image(f, min_size=encoder.resize_size) for f in files]
    images += [Image.new("RGB", (3000, 40), (200, 30, 10)), images[0].resize((225, 611))]  # extreme and odd shapes
    expected, got = _torch_batch(encoder, images), _numpy_batch(preprocess, images)
    assert got.shape == expected.shape == (len(images), 3, 224, 224) and got.dtype == np.float32
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("size", [112, 301])
def test_same_numbers_at_other_input_sizes(size, photos):
    from fewshot import create_encoder

    encoder = create_encoder(input_size=size)
    preprocess = Preprocess.from_fingerprint(encoder.fingerprint)
    images = [load_image(photos[name], min_size=encoder.resize_size) for name in ("chelsea", "rocket")]
    assert np.array_equal(_numpy_batch(preprocess, images), _torch_batch(encoder, images))


@pytest.mark.parametrize("change, message", [
    ({"input_size": [3, 224, 192]}, "not a square"),
    ({"crop_pct": 1.1}, "pads the image"),
    ({"interpolation": "random"}, "no Pillow equivalent"),
])
def test_what_numpy_cannot_reproduce_is_refused(encoder, change, message):
    fingerprint = {**encoder.fingerprint, "preprocess": {**encoder.fingerprint["preprocess"], **change}}
    with pytest.raises(ValueError, match=message):
        Preprocess.from_fingerprint(fingerprint)
