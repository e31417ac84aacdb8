"""The real Lite0 encoder: offline ImageNet weights, frozen, batched, fingerprinted, cached."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot import EmbeddingCache, ImageError, WeightsError, create_encoder
from fewshot.encoders import _packaged_weights_path, read_state_dict

TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


def imagenet_top3(encoder, path) -> list[int]:
    """ImageNet classes of an image: our pooled embedding through the packaged classifier layer."""
    state = read_state_dict(_packaged_weights_path("efficientnet_lite0"))
    logits = encoder.embed([path]) @ state["_fc.weight"].numpy().T + state["_fc.bias"].numpy()
    return list(np.argsort(-logits[0])[:3])


def test_offline_weights_are_the_real_imagenet_weights(encoder, photos):
    assert set(imagenet_top3(encoder, photos["chelsea"])) <= {TABBY, TIGER_CAT, EGYPTIAN_CAT}
    assert imagenet_top3(encoder, photos["coffee"])[0] == ESPRESSO


def test_embed_shape_dtype_and_frozen(encoder, photos):
    vectors = encoder.embed(list(photos.values()))
    assert vectors.shape == (len(photos), encoder.dim) == (len(photos), 1280)
    assert vectors.dtype == np.float32 and np.isfinite(vectors).all()
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_batch_size_does_not_change_embeddings(encoder, photos):
    paths = list(photos.values())
    np.testing.assert_allclose(encoder.embed(paths, batch_size=1), encoder.embed(paths, batch_size=4),
                               rtol=1e-4, atol=1e-4)


def test_views_of_one_photo_are_closer_than_other_photos(encoder, photos, views_of):
    cat = encoder.embed(views_of(photos["chelsea"], 2, seed=0))
    coffee = encoder.embed([photos["coffee"]])[0]
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(cat[0], cat[1]) > cos(cat[0], coffee) + 0.2


def test_fingerprint_names_model_weights_and_preprocessing(encoder):
    fp = encoder.fingerprint
    assert fp["name"] == "efficientnet_lite0" and fp["architecture"] == "tf_efficientnet_lite0"
    assert len(fp["weights_sha256"]) == 64
    assert fp["preprocess"]["input_size"] == [3, 224, 224] and fp["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert fp["preprocess"]["interpolation"] == "bicubic"


def test_intermediate_stages_give_pooled_stage_features(encoder, photos):
    staged = create_encoder(stages=(2, 3))
    assert staged.dim == 40 + 112
    assert staged.fingerprint != encoder.fingerprint
    assert staged.fingerprint["weights_sha256"] == encoder.fingerprint["weights_sha256"]
    assert staged.embed([photos["coins"]]).shape == (1, 152)
    with pytest.raises(ValueError, match="stages must be indices"):
        create_encoder(stages=(9,))


def test_bad_image_fails_alone(encoder, photos, corrupt_jpeg):
    good = [photos["chelsea"], photos["coffee"]]
    result = encoder.embed_batch([good[0], corrupt_jpeg, good[1]])
    assert result.ok.tolist() == [True, False, True]
    assert "broken.jpg" in result.errors[1] and np.isnan(result.vectors[1]).all()
    np.testing.assert_allclose(result.vectors[[0, 2]], encoder.embed(good), rtol=1e-4, atol=1e-4)
    with pytest.raises(ImageError, match="1 of 3 inputs failed"):
        encoder.embed([good[0], corrupt_jpeg, good[1]])


def test_accepts_paths_bytes_pil_and_arrays(encoder, photos):
    path = photos["rocket"]
    pil = Image.open(path).convert("RGB")
    vectors = encoder.embed([path, path.read_bytes(), pil, np.asarray(pil)])
    np.testing.assert_allclose(vectors[1:], np.repeat(vectors[:1], 3, axis=0), rtol=1e-3, atol=1e-3)


def test_local_weights_file_safetensors_and_torch(tmp_path, encoder, photos):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in encoder.model.state_dict().items()}
    save_file(state, tmp_path / "lite0.safetensors")
    torch.save(state, tmp_path / "lite0.pth")
    for file in ["lite0.safetensors", "lite0.pth"]:
        local = create_encoder("tf_efficientnet_lite0", weights=tmp_path / file)
        assert local.fingerprint["weights_sha256"] == encoder.fingerprint["weights_sha256"]
        np.testing.assert_allclose(local.embed([photos["coins"]]), encoder.embed([photos["coins"]]), atol=1e-5)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save({"conv_stem.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="do not fit"):
        create_encoder("tf_efficientnet_lite0", weights=tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="not found"):
        create_encoder("tf_efficientnet_lite0", weights=tmp_path / "missing.pth")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned-by-weights",))


def test_pickled_code_in_a_weights_file_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pth", "wb") as fh:
        pickle.dump({"conv_stem.weight": _Exploit()}, fh)
    with pytest.raises(WeightsError):
        create_encoder("tf_efficientnet_lite0", weights="evil.pth")
    assert not (tmp_path / "pwned-by-weights").exists()


def test_unknown_encoder_name_says_what_to_use():
    with pytest.raises(ValueError, match="unknown encoder 'no_such_model'"):
        create_encoder("no_such_model")


def test_cache_skips_the_network_for_seen_images(tmp_path, encoder, photos, monkeypatch):
    cache = EmbeddingCache(tmp_path / "cache.sqlite")
    paths = list(photos.values())[:3]
    first = encoder.embed(paths, cache=cache)
    assert len(cache) == 3
    calls = []
    original = encoder._forward
    monkeypatch.setattr(encoder, "_forward", lambda batch: calls.append(len(batch)) or original(batch))
    again = encoder.embed(paths + [photos["camera"]], cache=cache)
    assert calls == [1]  # only the unseen image ran through the network
    np.testing.assert_array_equal(again[:3], first)
    staged = create_encoder(stages=(3,))
    assert staged.embed(paths, cache=cache).shape == (3, 112)  # other fingerprint: no false hit
