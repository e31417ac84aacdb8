"""The real Lite0 encoder: offline ImageNet weights, frozen, batched, fingerprinted, cached."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot import EmbeddingCache, Encoder, ImageError, WeightsError, create_encoder
from fewshot.embedding.encoders import _packaged_weights_path, read_state_dict, weights_digest

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


def test_cache_skips_the_network_for_seen_images(tmp_path, photos, monkeypatch):
    encoder = create_encoder(runtime="torch")  # the eager network, whatever sessions earlier tests opened
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


# -- speed options: compiled network, parallel streams, batched preprocessing --------------------------


def test_preprocessing_split_gives_the_exact_timm_transform(encoder, photos):
    from fewshot.embedding.images import load_image

    images = [load_image(photos[name], min_size=encoder.resize_size) for name in ("chelsea", "rocket")]
    batch = encoder._batch_step([encoder._image_step(image) for image in images])
    assert torch.equal(batch, torch.stack([encoder.transform(image) for image in images]))
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_torchscript_matches_eager_and_keeps_the_fingerprint(encoder, photos):
    paths = list(photos.values())
    compiled = create_encoder(compile="torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a fallback nor TorchScript's deprecation notice reaches users
        vectors = compiled.embed(paths, batch_size=4)  # 6 images: the last batch is padded
    assert compiled._compiled[("torchscript",)] is not None
    np.testing.assert_allclose(vectors, encoder.embed(paths), rtol=1e-4, atol=1e-4)
    assert compiled.fingerprint == encoder.fingerprint and compiled.fingerprint_id == encoder.fingerprint_id


def test_auto_compiles_once_and_only_for_large_calls(photos, monkeypatch):
    import fewshot.embedding.model as encoders

    monkeypatch.setattr(encoders, "_AUTO_MIN_IMAGES", 4)
    builds = []
    original = encoders.Encoder._build
    monkeypatch.setattr(encoders.Encoder, "_build", lambda self, *a: builds.append(a) or original(self, *a))
    auto = create_encoder(runtime="torch")  # compile="auto" is the default (torch runtime: see the next test)
    paths = list(photos.values())
    auto.embed(paths[:2])
    assert builds == []  # small call: eager, no compile to wait for
    first = auto.embed(paths)
    again = auto.embed(paths)
    assert [b[0] for b in builds] == ["torchscript"]  # built once per encoder, not per call
    np.testing.assert_allclose(first, again, rtol=1e-6, atol=1e-6)


def _count_builds(monkeypatch) -> list:
    import fewshot.embedding.model as encoders

    builds = []
    original = encoders.Encoder._build
    monkeypatch.setattr(encoders.Encoder, "_build", lambda self, *a: builds.append(a) or original(self, *a))
    return builds


def test_default_runtime_exports_for_large_calls_then_uses_onnxruntime_for_every_call(encoder, photos, monkeypatch,
                                                                                    tmp_path):
    pytest.importorskip("onnxruntime")
    import fewshot.embedding.model as encoders
    from fewshot.embedding.runtime import encoder_onnx_path

    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path))  # no export cached yet
    monkeypatch.setattr(encoders, "_EXPORT_MIN_IMAGES", 4)
    builds = _count_builds(monkeypatch)
    auto = create_encoder()  # runtime="auto" is the default
    paths = list(photos.values())
    auto.embed(paths[:2])
    assert builds == [] and not encoder_onnx_path(auto.fingerprint_id).exists()  # small call: eager, no export
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # onnxruntime passed its check: no fallback warning
        first = auto.embed(paths)
        one = auto.embed(paths[:1])  # the session is there now: even one image runs on it
    assert encoder_onnx_path(auto.fingerprint_id).is_file()
    assert [b[0] for b in builds] == ["onnxruntime"]  # built once per encoder, not per call
    assert auto._onnx_wanted(1)
    np.testing.assert_allclose(first, encoder.embed(paths), atol=1e-4)
    np.testing.assert_allclose(one, first[:1], atol=1e-5)


def test_default_runtime_uses_a_cached_export_for_calls_of_a_handful_of_images(encoder, photos, monkeypatch):
    pytest.importorskip("onnxruntime")
    import fewshot.embedding.model as encoders
    from fewshot.embedding.runtime import cached_encoder_onnx

    cached_encoder_onnx(encoder)  # exported before, e.g. by an earlier registration
    monkeypatch.setattr(encoders, "_ONNX_MIN_IMAGES", 3)
    builds = _count_builds(monkeypatch)
    auto = create_encoder()
    paths = list(photos.values())
    auto.embed(paths[:2])
    assert builds == []  # below a handful: the session is not worth opening
    vectors = auto.embed(paths[:3])
    assert [b[0] for b in builds] == ["onnxruntime"]
    np.testing.assert_allclose(vectors, encoder.embed(paths[:3]), atol=1e-4)
    assert create_encoder(runtime="torch")._onnx_wanted(1000) is False


def test_failed_compilation_falls_back_to_eager_with_a_warning(encoder, photos, monkeypatch):
    import fewshot.embedding.model as encoders

    def broken(module, mode, probe):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(encoders, "_compile_features", broken)
    paths = list(photos.values())[:3]
    for mode in ["torchscript", "inductor"]:
        fallback = create_encoder(compile=mode)
        with pytest.warns(RuntimeWarning, match=f"compile='{mode}' is unavailable .*no C\\+\\+ compiler.*eager"):
            vectors = fallback.embed(paths)
        np.testing.assert_allclose(vectors, encoder.embed(paths), rtol=1e-5, atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once; later calls go straight to eager
            fallback.embed(paths)


def test_compiled_module_that_disagrees_with_eager_is_not_used(encoder, photos, monkeypatch):
    import fewshot.embedding.model as encoders

    monkeypatch.setattr(encoders, "_compile_features", lambda module, mode, probe: lambda batch: module(batch) + 1)
    wrong = create_encoder(compile="torchscript")
    with pytest.warns(RuntimeWarning, match="differ from eager mode"):
        vectors = wrong.embed([photos["coffee"]])
    np.testing.assert_allclose(vectors, encoder.embed([photos["coffee"]]), rtol=1e-5, atol=1e-5)


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile must be one of 'none', 'torchscript', 'inductor', 'auto'"):
        create_encoder(compile="fast")


def test_streams_restore_torch_threads_and_do_not_change_embeddings(encoder, photos):
    import threading

    paths = list(photos.values())
    before = torch.get_num_threads()
    one, two = encoder.embed(paths, workers=1), encoder.embed(paths, workers=2, batch_size=1)
    np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-4)
    assert torch.get_num_threads() == before
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before]  # new threads get the user's setting back too
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        encoder.embed(paths, workers=0)


@pytest.mark.slow
def test_inductor_matches_eager_without_recompiling_for_partial_batches():
    """torch.compile on timm's tiny test network (seconds, not the minute Lite0 takes to compile)."""
    from torch._dynamo.utils import counters

    compiled = create_encoder("test_efficientnet", pretrained=False, compile="inductor")
    eager = Encoder(compiled.model, name="test_efficientnet", compile="none")
    images = [np.random.default_rng(i).integers(0, 256, (90, 120, 3), dtype=np.uint8) for i in range(7)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = compiled.embed(images, batch_size=4, workers=2)  # batches of 4 and 3 (padded to 4)
    if any("using eager mode" in str(w.message) for w in caught):
        pytest.skip(f"torch.compile is unavailable here: {[str(w.message) for w in caught]}")
    graphs = counters["stats"]["unique_graphs"]
    again = compiled.embed(images[:5], batch_size=4, workers=2)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation, whatever the call's size
    np.testing.assert_allclose(first, eager.embed(images, workers=2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(again, first[:5], rtol=1e-5, atol=1e-5)
    assert compiled.fingerprint == eager.fingerprint
    assert weights_digest(compiled.model) == compiled.fingerprint["weights_sha256"]  # freezing left the weights be


def test_cache_keeps_what_was_embedded_before_an_interrupt(encoder, tmp_path, monkeypatch):
    """Ctrl-C part way through a long embedding run keeps the batches already embedded in the cache,
    so running it again starts where it stopped."""
    images = [np.full((24, 24, 3), v, np.uint8) for v in range(0, 240, 8)]  # 30 distinct images
    cache = EmbeddingCache(tmp_path / "c.sqlite")
    real, calls = encoder._embed_rows, []

    def interrupted_after_four_batches(*args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder, "_embed_rows", interrupted_after_four_batches)
    with pytest.raises(KeyboardInterrupt):
        encoder.embed(images, batch_size=3, cache=cache, workers=1)
    monkeypatch.undo()
    assert len(cache) == 12  # four batches of three
    again = encoder.embed_batch(images, batch_size=3, cache=cache, workers=1)
    assert np.isfinite(again.vectors).all() and len(cache) == 30


def test_cropping_long_strips_leaves_what_the_network_sees(encoder):
    """Strips longer than 8:1 are centre-cropped before resizing (to bound the work); preprocessing
    only ever looks at their centre, so the embedding is the one the uncropped strip gives."""
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 480, 3), dtype=np.uint8))
    uncropped = encoder._forward(encoder.transform(strip)[None]).numpy()[0]
    got = encoder.embed([strip], workers=1)[0]
    assert float(np.dot(got, uncropped) / np.linalg.norm(got) / np.linalg.norm(uncropped)) > 0.999
def test_hub_encoder_fails_at_once_when_offline(capfd):
    """No internet: one clear error, not a minute of hub retries (weights already cached would still load)."""
    import socket

    from fewshot.errors import WeightsError

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        pytest.skip("the Hugging Face hub is reachable: this checks the offline path")
    except OSError:
        pass
    with pytest.raises(WeightsError, match="--weights FILE"):
        create_encoder("resnet18")
    assert "Retry" not in capfd.readouterr().err


def test_prepared_inputs_embed_like_the_inputs_and_only_with_their_encoder(encoder, photos):
    from fewshot.errors import ImageError

    paths = [photos["coffee"], photos["rocket"]]
    prepared = [encoder.prepare(path) for path in paths]
    result = encoder.embed_batch([*prepared, create_encoder("efficientnet_lite0@96").prepare(photos["coins"])])
    np.testing.assert_array_equal(result.vectors[:2], encoder.embed(paths))
    assert result.sources[:2] == [str(p) for p in paths] and result.digests[:2] == [p.digest for p in prepared]
    assert "prepared for another encoder" in result.errors[2] and np.isnan(result.vectors[2]).all()
    with pytest.raises(ImageError, match="not a recognised image"):
        encoder.prepare(b"not an image")
