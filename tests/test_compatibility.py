"""Files written by fewshot 0.1 still load and answer the same: registry, head, export bundle, Parquet embeddings.

The fixtures under tests/fixtures/v0_1/ were written by tests/fixtures/make_v0_1.py on commit 6b115aa; never
regenerate them with newer code (that would test nothing). Each test copies what it opens into tmp_path, since
opening a registry may create its lock files.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

V01 = Path(__file__).resolve().parent / "fixtures" / "v0_1"
EXPECTED = json.loads((V01 / "expected.json").read_text())
QUERIES = [V01 / q for q in EXPECTED["queries"]]
CLASSES = ["cat", "coffee", "rocket"]


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(V01 / name, tmp_path / name))


def test_registry_loads_and_predicts_as_0_1_did(tmp_path):
    from fewshot import FewShotClassifier

    clf = FewShotClassifier.load(_copy("registry", tmp_path), cache=False, progress=False)
    assert clf.classes == CLASSES
    assert clf.counts == {label: 3 for label in CLASSES}
    predictions = clf.predict(QUERIES, top_k=3)
    for got, want in zip(predictions, EXPECTED["predictions"]):
        assert got.label == want["label"]
        assert got.unknown == want["unknown"]
        assert got.similarity == pytest.approx(want["similarity"], abs=1e-4)
        assert got.score == pytest.approx(want["score"], abs=1e-4)
        assert [n[0] for n in got.top_k] == [n["label"] for n in want["top_k"]]


def test_registry_keeps_thumbnails_calibration_and_sources(tmp_path):
    from PIL import Image

    from fewshot import Registry

    reg = Registry.load(_copy("registry", tmp_path))
    for label in CLASSES:
        with Image.open(io.BytesIO(reg.thumbnail(label))) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 128
        assert [Path(s.source).name for s in reg.sources(label)] == ["0.jpg", "1.jpg", "2.jpg"]
    from fewshot import FewShotClassifier

    calibration = FewShotClassifier.load(tmp_path / "registry", cache=False).calibration_
    assert calibration.threshold is not None and -1.0 <= calibration.threshold <= 1.0


def test_head_loads_and_maps_queries_as_0_1_did(tmp_path, encoder):
    import torch

    from fewshot import load_head

    head = load_head(_copy("head", tmp_path))
    assert (head.name, head.in_dim, head.out_dim) == ("protonet", 1280, 16)
    assert head.metadata["encoder"] == encoder.fingerprint
    embeddings = np.load(V01 / "query_embeddings.npy", allow_pickle=False)
    np.testing.assert_allclose(encoder.embed(QUERIES, progress=False), embeddings, atol=1e-4)
    with torch.no_grad():
        vectors = head(torch.from_numpy(embeddings)).numpy()
    np.testing.assert_allclose(vectors, np.load(V01 / "query_head_vectors.npy", allow_pickle=False), atol=1e-5)


def test_export_bundle_files_read_and_classify_without_the_encoder_onnx(encoder):
    """The bundle minus its 13 MB encoder.onnx: every other listed file is intact, its fingerprint is today's
    encoder's, and head.onnx on today's embeddings puts each query nearest its class's prototype."""
    import onnxruntime as ort

    files = json.loads((V01 / "bundle" / "bundle.json").read_text())["files"]
    assert set(files) == {"encoder", "preprocess", "head", "head_info", "prototypes", "labels", "counts",
                          "thresholds", "registry"}
    for role, entry in files.items():
        if role == "encoder":
            continue
        data = (V01 / "bundle" / entry["name"]).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"], role
    preprocess = json.loads((V01 / "bundle" / "preprocess.json").read_text())
    assert preprocess["fingerprint"] == encoder.fingerprint
    labels = json.loads((V01 / "bundle" / "labels.json").read_text())
    assert labels == CLASSES
    prototypes = np.load(V01 / "bundle" / "prototypes.npy", allow_pickle=False)
    session = ort.InferenceSession(str(V01 / "bundle" / "head.onnx"), providers=["CPUExecutionProvider"])
    embeddings = encoder.embed(QUERIES, progress=False)
    (vectors,) = session.run(None, {session.get_inputs()[0].name: embeddings})
    distances = ((vectors[:, None, :] - prototypes[None]) ** 2).sum(-1)  # the head's metric is l2
    assert [labels[i] for i in distances.argmin(1)] == CLASSES
    np.testing.assert_allclose(vectors, np.load(V01 / "query_head_vectors.npy", allow_pickle=False), atol=1e-4)


def test_parquet_embeddings_read_and_register(tmp_path, encoder):
    from fewshot import Registry
    from fewshot.jobs import read_embeddings, register_embeddings

    table = read_embeddings(V01 / "embeddings.parquet")
    assert table.failed == 0 and table.vectors.shape == (9, 1280)
    assert sorted(table.labels) == sorted(CLASSES * 3)
    assert table.fingerprint == encoder.fingerprint
    reg = Registry(1280, fingerprint=encoder.fingerprint)
    assert register_embeddings(reg, V01 / "embeddings.parquet") == {"classes": 3, "failed": 0, "images": 9,
                                                                   "unlabelled": 0}
    assert reg.counts == {label: 3 for label in CLASSES}
    query = np.load(V01 / "query_embeddings.npy", allow_pickle=False)
    assert [r[0] for r in reg.search(query, k=1).labels] == CLASSES
