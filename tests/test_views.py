"""Support views: mirrored support images, real photos."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.embedding.images import load_image
from fewshot.embedding.views import average_views, check_support_views, flipped


def test_flipped_is_the_decoded_photo_mirrored_left_right(photos):
    original = np.asarray(load_image(photos["rocket"]))
    mirror = flipped(photos["rocket"])
    assert mirror.shape == original.shape and (mirror == original[:, ::-1]).all()
    assert not (mirror == original).all()


def test_an_unreadable_image_is_passed_on_to_fail_where_it_is_embedded(corrupt_jpeg):
    assert flipped(corrupt_jpeg) is corrupt_jpeg


def test_cosine_views_weigh_the_same_whatever_their_length():
    a, b = np.array([[3.0, 0.0]]), np.array([[0.0, 1.0]])
    assert np.allclose(average_views([a, b], "cosine"), [[0.5, 0.5]])
    assert np.allclose(average_views([a, b], "l2"), [[1.5, 0.5]])


def test_unknown_setting_says_which_exist():
    assert check_support_views("flip") == "flip"
    with pytest.raises(ValueError, match="'none', 'flip'"):
        check_support_views("mirror")
