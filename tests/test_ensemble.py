"""Encoder ensembles: real Lite0 and Lite1 weights, real photos, small input sizes to stay fast."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot import FewShotClassifier
from fewshot.embedding.cache import EmbeddingCache
from fewshot.embedding.encoders import create_encoder, encoder_from_fingerprint
from fewshot.embedding.ensemble import EnsembleEncoder
from fewshot.embedding.fingerprints import split_encoder_name
from fewshot.errors import EncoderMismatchError

PAIR = "efficientnet_lite0@96+efficientnet_lite1@96"


@pytest.fixture(scope="module")
def pair():
    return create_encoder(PAIR)


def test_features_are_the_members_normalised_features_side_by_side(pair, photos, tmp_path):
    images = [photos["coins"], photos["camera"], photos["astronaut"]]
    cache = EmbeddingCache(tmp_path / "cache.sqlite")
    result = pair.embed_batch(images + [b"not an image"], cache=cache)
    assert isinstance(pair, EnsembleEncoder) and pair.dim == 1280 + 1280 == result.vectors.shape[1]
    assert result.errors[:3] == [None] * 3 and "not a recognised image" in result.errors[3]  # fails alone
    assert np.isnan(result.vectors[3]).all()
    for member, block in zip(pair.members, np.split(result.vectors[:3], [1280], axis=1)):
        alone = member.embed(images)
        np.testing.assert_allclose(block, alone / np.linalg.norm(alone, axis=1, keepdims=True), atol=1e-5)
    # Cached per member, under each member's own fingerprint: a member alone, and the ensemble again,
    # are served from the cache without adding entries.
    assert len(cache) == 2 * 3
    lite0 = create_encoder("efficientnet_lite0@96")
    np.testing.assert_allclose(lite0.embed(images, cache=cache), pair.members[0].embed(images), atol=1e-5)
    np.testing.assert_array_equal(pair.embed(images, cache=cache), result.vectors[:3])
    assert len(cache) == 2 * 3


def test_one_fingerprint_and_registries_refuse_another_ensemble(pair, photos, tmp_path):
    assert [m["name"] for m in pair.fingerprint["members"]] == ["efficientnet_lite0", "efficientnet_lite1"]
    assert encoder_from_fingerprint(pair.fingerprint).fingerprint == pair.fingerprint
    clf = FewShotClassifier(pair, progress=False)
    clf.register("coins", [photos["coins"]])
    clf.register("camera", [photos["camera"]])
    clf.save(tmp_path / "reg")
    again = FewShotClassifier.load(tmp_path / "reg")  # re-creates the ensemble from the fingerprint
    assert again.predict([photos["coins"]])[0].label == "coins"
    for other in ("efficientnet_lite0@96", "efficientnet_lite1@96+efficientnet_lite0@96",
                  "efficientnet_lite0@128+efficientnet_lite1@96"):
        with pytest.raises(EncoderMismatchError):
            FewShotClassifier.load(tmp_path / "reg", encoder=other)


def test_names_sizes_and_bad_arguments():
    assert split_encoder_name("a@260+b") == [("a", 260), ("b", None)]
    assert create_encoder("efficientnet_lite0@96").fingerprint["preprocess"]["input_size"] == [3, 96, 96]
    for bad in ("efficientnet_lite0+", "efficientnet_lite0@x", "efficientnet_lite0@8"):
        with pytest.raises(ValueError, match="bad encoder name"):
            create_encoder(bad)
    with pytest.raises(ValueError, match="ensemble"):
        create_encoder(PAIR, weights="some.safetensors")
    with pytest.raises(ValueError, match="pooled"):
        create_encoder(PAIR, stages=(2,), pool=2)


def test_onnxruntime_runs_every_member_with_the_same_vectors_and_fingerprint(pair, photos):
    pytest.importorskip("onnxruntime")
    import warnings

    from fewshot.embedding.runtime import min_cosine

    fast = create_encoder(PAIR, runtime="onnxruntime")
    images = [photos["coins"], photos["camera"], photos["astronaut"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no member fell back to torch
        vectors = fast.embed(images)
    assert fast.runtime == "onnxruntime" and all(m._onnx_wanted(1) for m in fast.members)
    assert fast.fingerprint == pair.fingerprint
    assert min_cosine(vectors, create_encoder(PAIR, runtime="torch").embed(images)) >= 0.9999
