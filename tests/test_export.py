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
from fewshot.embedding.runtime import cached_encoder_onnx, min_cosine, session  # noqa: E402
from fewshot.export import export_bundle  # noqa: E402


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
    from fewshot.embedding.images import load_image

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


def test_grid_pooled_encoder_exports_and_matches_eager(tmp_path, capfd):
    """`--pool N` (the Omniglot recipe's features) exports: adaptive pooling becomes fixed averaging
    matrices for the known map sizes (8x8 and 4x4 to a 3x3 grid: uneven windows too)."""
    assert main(["export", "--stages", "2,3", "--pool", "3", "--input-size", "64", "--out", str(tmp_path / "out")]) == 0
    out = capfd.readouterr().out
    assert [line.split("\t")[0] for line in out.splitlines()] == ["encoder", "preprocess"]
    grid = create_encoder(stages=(2, 3), pool=3, input_size=64, runtime="torch")
    onnx = session(tmp_path / "out" / "encoder.onnx")
    for n in (1, 3):
        probe = grid.probe_batch(n)
        got = onnx.run(None, {"images": np.ascontiguousarray(probe.numpy())})[0]
        expected = grid._forward(probe).numpy()
        assert got.shape == (n, grid.dim) and min_cosine(got, expected) >= 0.9999
        np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())


def test_a_failed_export_prints_nothing_to_stdout_and_says_why_in_one_line(tmp_path, capfd):
    """torch's exporter prints its IR graph to file descriptor 1 from C++ when it fails; none of it may
    reach stdout (a `--json` command's output)."""
    import torch

    from fewshot.embedding.runtime import export_module
    from fewshot.errors import ExportError

    class UnevenAdaptivePool(torch.nn.Module):  # adaptive pooling 8x8 -> 3x3: the ONNX exporter refuses it
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 3).flatten(1)

    with pytest.raises(ExportError, match="could not export UnevenAdaptivePool to ONNX") as failure:
        export_module(UnevenAdaptivePool(), tmp_path / "m.onnx", torch.zeros(2, 3, 10, 10))
    assert "\n" not in str(failure.value)
    assert capfd.readouterr().out == ""
    assert list(tmp_path.iterdir()) == []


def _small_registry(path, photos, views_of):
    classifier = FewShotClassifier(cache=False)
    for name in ("coffee", "rocket", "chelsea"):
        classifier.register(name, views_of(photos[name], 2, seed=1))
    classifier.save(path)


def test_export_refuses_a_non_empty_folder_and_force_replaces_it_whole(encoder, photos, views_of, tmp_path, capsys):
    """A registry exported over a head export must not leave the old head.onnx behind to be applied."""
    head = create_head("protonet", encoder.dim, seed=3)
    head.metadata["encoder"] = encoder.fingerprint
    save_head(head, tmp_path / "head")
    _small_registry(tmp_path / "reg", photos, views_of)
    out = tmp_path / "out"
    assert main(["export", "--out", str(out), "--head", str(tmp_path / "head")]) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(["export", "--out", str(out), "--registry", str(tmp_path / "reg")]) == 1
    error = capsys.readouterr().err
    assert "is not empty" in error and "--force" in error and error.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == before  # refused: nothing touched
    assert main(["export", "--out", str(out), "--registry", str(tmp_path / "reg"), "--force"]) == 0
    listed = {entry["name"] for entry in json.loads((out / "bundle.json").read_text())["files"].values()}
    assert {p.name for p in out.iterdir()} == listed | {"bundle.json"}
    assert not (out / "head.onnx").exists() and not (out / "head.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no build folder left over


def test_export_files_get_the_permissions_the_umask_gives(encoder, photos, views_of, tmp_path):
    import os
    import stat

    _small_registry(tmp_path / "reg", photos, views_of)
    old = os.umask(0o022)
    try:
        assert main(["export", "--out", str(tmp_path / "out"), "--registry", str(tmp_path / "reg")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == dict.fromkeys(modes, 0o644) and "registry.json" in modes
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_registry_export_carries_the_fitted_calibration(photos, views_of, tmp_path):
    _small_registry(tmp_path / "reg", photos, views_of)
    assert main(["export", "--out", str(tmp_path / "out"), "--registry", str(tmp_path / "reg")]) == 0
    classifier = FewShotClassifier.load(tmp_path / "reg")
    info = json.loads((tmp_path / "out" / "registry.json").read_text())
    labels = json.loads((tmp_path / "out" / "labels.json").read_text())
    fitted = classifier.calibration_
    assert info["calibration"] == json.loads(json.dumps(fitted.to_dict()))
    assert info["temperature"] == pytest.approx(classifier.temperature_)
    counts = np.load(tmp_path / "out" / "counts.npy")
    assert counts.tolist() == [classifier.counts[label] for label in labels]
    thresholds = np.load(tmp_path / "out" / "thresholds.npy")
    assert thresholds.tolist() == [fitted.threshold_for(label, classifier.counts[label]) for label in labels]


def test_every_json_command_prints_json_on_uncached_images_with_a_grid_pooled_head(photos, tmp_path, capfd,
                                                                                   monkeypatch):
    """Runs past the "auto" runtime's threshold go through onnxruntime, exported on first use; with a grid
    pool that export once failed and printed torch's IR graph to stdout. Every `--json` command must print
    exactly one JSON document to stdout."""
    from PIL import Image

    from fewshot.embedding.model import _AUTO_MIN_IMAGES

    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached: export on first use
    data, support = tmp_path / "data", tmp_path / "support"
    per_class = _AUTO_MIN_IMAGES // len(photos) + 2
    for name, path in photos.items():
        with Image.open(path) as img:
            small = img.convert("RGB").resize((48, 48))
        for folder, count in ((data, per_class), (support, 2)):
            (folder / name).mkdir(parents=True)
            for i in range(count):  # distinct pixels: distinct images for the embedding cache
                small.rotate(i * 7 % 360).save(folder / name / f"{folder.name}{i}.png")
    head, reg = tmp_path / "head", tmp_path / "reg"
    grid = ["--stages", "2,3", "--pool", "3", "--input-size", "64"]
    commands = [
        ["train-head", "--data", data, "--head", "protonet", "--out", head, "--episodes", "4", "--val-every", "2",
         "--ways", "3", "--queries", "2", "--val-fraction", "0.5", "--force", *grid, "--json"],
        ["register", reg, "--head", head, "--folder", support],
        ["predict", reg, data, "--top-k", "2", "--no-cache", "--json"],
        ["calibrate", reg, "--background", data, "--no-cache", "--json"],
        ["evaluate", "--data", data, "--head", head, "--shots", "1", "--ways", "3", "--queries", "2", "--episodes",
         "3", "--no-cache", "--out", tmp_path / "eval", "--json"],
        ["doctor", reg, "--json"],
        ["classes", reg, "--json"],
        ["compare-encoders", "--data", data, "--encoder", "efficientnet_lite0@64", "--episodes", "3", "--ways", "3",
         "--speed-images", "0", "--no-cache", "--out", tmp_path / "compare", "--json"],
    ]
    for command in commands:
        status = main([str(arg) for arg in command])
        out, err = capfd.readouterr()
        assert status in (0, 1), (command, err)
        if "--json" in command:
            json.loads(out)  # one JSON document, nothing else
        assert "runtime='onnxruntime' is unavailable" not in err  # the grid-pooled network ran under onnxruntime
    encoders = [p for p in (tmp_path / "cache" / "onnx").glob("*.onnx") if not p.name.startswith("head-")]
    assert len(encoders) == 2  # grid-pooled Lite0, and Lite0 at 64 px
