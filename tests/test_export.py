"""ONNX export and the onnxruntime runtime, with the real Lite0 encoder, real photos and real onnxruntime."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="export needs onnxruntime and onnx (fewshot's dependencies)")

from fewshot import (EncoderMismatchError, FewShotClassifier, Registry, create_encoder, create_head,  # noqa: E402
                     save_head)
from fewshot.cli import main  # noqa: E402
from fewshot.export import cached_encoder_onnx, export_bundle, min_cosine, session  # noqa: E402


@pytest.fixture(scope="module")
def bundle(encoder, caltech_subset, tmp_path_factory):
    """Encoder only, with int8 calibrated on classes the int8 test does not evaluate on."""
    out = tmp_path_factory.mktemp("bundle")
    calibration = sorted(caltech_subset.iterdir())[5:]
    return out, export_bundle(out, encoder=encoder, int8=True, calibration=calibration)


def test_encoder_onnx_has_a_dynamic_batch_and_matches_eager(bundle, encoder):
    _, files = bundle
    onnx = session(files["encoder"])
    for n in (1, 5):
        probe = encoder.probe_batch(n)
        got = onnx.run(None, {"images": np.ascontiguousarray(probe.numpy())})[0]
        expected = encoder.features_module()(probe).detach().numpy()
        assert got.shape == (n, encoder.dim)
        assert min_cosine(got, expected) >= 0.9999


def test_preprocessing_json_describes_the_encoder_input(bundle, encoder):
    out, _ = bundle
    cfg = json.loads((out / "preprocess.json").read_text())
    assert cfg["center_crop"] == [224, 224] and cfg["resize_shorter_to"] == encoder.resize_size
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5, 0.5, 0.5]
    assert cfg["fingerprint"] == encoder.fingerprint
    manifest = json.loads((out / "bundle.json").read_text())
    assert set(manifest["files"]) == {"encoder", "preprocess", "encoder_int8"}


def test_int8_encoder_keeps_the_nearest_prototype(bundle, encoder, caltech_subset):
    """int8: the nearest class prototype (5 Caltech classes, 2 shots) mostly stays the fp32 one (measured
    80% on 10 classes in benchmarks/export.py; 20% would be chance)."""
    _, files = bundle
    folders = sorted(caltech_subset.iterdir())[:5]
    support = {f.name: sorted(f.iterdir())[:2] for f in folders}
    queries = [p for f in folders for p in sorted(f.iterdir())[2:]]
    from fewshot.images import load_image

    def preprocessed(paths):
        import torch

        return np.ascontiguousarray(torch.stack([encoder.transform(load_image(p)) for p in paths]).numpy())

    fp32, int8 = session(files["encoder"]), session(files["encoder_int8"])
    agreement = []
    protos32 = {k: fp32.run(None, {"images": preprocessed(v)})[0].mean(0) for k, v in support.items()}
    protos8 = {k: int8.run(None, {"images": preprocessed(v)})[0].mean(0) for k, v in support.items()}
    q32 = fp32.run(None, {"images": preprocessed(queries)})[0]
    q8 = int8.run(None, {"images": preprocessed(queries)})[0]
    for a, b in zip(q32, q8):
        agreement.append(_nearest(a, protos32) == _nearest(b, protos8))
    assert np.mean(agreement) >= 0.6, f"int8 agreed on {np.mean(agreement):.0%} of {len(agreement)} queries"


def _nearest(vector, prototypes: dict) -> str:
    unit = vector / np.linalg.norm(vector)
    return max(prototypes, key=lambda k: float(unit @ prototypes[k] / np.linalg.norm(prototypes[k])))


def test_runtime_onnxruntime_embeds_like_eager_with_the_same_fingerprint(photos):
    fast = create_encoder(runtime="onnxruntime")
    eager = create_encoder(runtime="torch", compile="none")
    paths = list(photos.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: onnxruntime really ran
        got = fast.embed(paths)
    assert min_cosine(got, eager.embed(paths)) >= 0.9999
    assert fast.fingerprint == eager.fingerprint


def test_registry_built_with_one_runtime_works_with_the_other(photos, views_of, tmp_path):
    built = FewShotClassifier(create_encoder(runtime="onnxruntime"), cache=False)
    for name in ("coffee", "rocket", "chelsea"):
        built.register(name, views_of(photos[name], 3, seed=1))
    built.save(tmp_path / "reg")
    loaded = FewShotClassifier.load(tmp_path / "reg", encoder=create_encoder(runtime="torch"), cache=False)
    queries = [views_of(photos[n], 1, seed=7)[0] for n in ("coffee", "rocket", "chelsea")]
    assert [p.label for p in loaded.predict(queries)] == ["coffee", "rocket", "chelsea"]
    np.testing.assert_allclose([p.score for p in loaded.predict(queries)], [p.score for p in built.predict(queries)],
                               atol=1e-3)


def test_a_broken_onnx_model_falls_back_to_torch_with_a_warning(photos):
    encoder = create_encoder(runtime="onnxruntime")
    cached = cached_encoder_onnx(encoder)
    good = cached.read_bytes()
    try:
        cached.write_bytes(good[: len(good) // 2])  # a cache file cut short (disk full, killed export)
        with pytest.warns(RuntimeWarning, match="runtime='onnxruntime' is unavailable.*using torch"):
            got = encoder.embed([photos["coffee"]])
    finally:
        cached.write_bytes(good)
    expected = create_encoder(runtime="torch", compile="none").embed([photos["coffee"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_int8_without_calibration_images_is_refused(encoder, tmp_path):
    with pytest.raises(ValueError, match="calibration images"):
        export_bundle(tmp_path, encoder=encoder, int8=True)
    assert not (tmp_path / "encoder.onnx").exists()


def test_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="runtime must be one of"):
        create_encoder(runtime="tensorrt")


def test_registry_of_another_encoder_is_not_exported(encoder, tmp_path):
    other = Registry(encoder.dim, fingerprint={**encoder.fingerprint, "name": "other"})
    with pytest.raises(EncoderMismatchError, match="another encoder"):
        export_bundle(tmp_path / "out", encoder=encoder, registry=other)


def test_cli_export_with_a_head_writes_a_head_that_maps_like_torch(encoder, tmp_path, capsys):
    head = create_head("protonet", encoder.dim, seed=3)
    head.metadata["encoder"] = encoder.fingerprint
    save_head(head, tmp_path / "head")
    assert main(["export", "--out", str(tmp_path / "out"), "--head", str(tmp_path / "head")]) == 0
    assert "head.onnx" in capsys.readouterr().out
    x = np.random.default_rng(0).normal(size=(3, encoder.dim)).astype(np.float32)
    got = session(tmp_path / "out" / "head.onnx").run(None, {"embeddings": x})[0]
    np.testing.assert_allclose(got, head.transform(x), atol=1e-4)
    info = json.loads((tmp_path / "out" / "head.json").read_text())
    assert info["metric"] == head.metric and info["fingerprint"] == head.fingerprint


def test_cli_export_refuses_head_and_registry_together(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--out", str(tmp_path), "--head", "h", "--registry", "r"])
    assert exit_info.value.code == 2
