"""The torch-free encoder and head (cached ONNX exports, numpy preprocessing) give the torch path's answers: the same
labels and unknowns on known and unregistered images, similarities within 1e-4; bad images fail alone; ensembles and
heads run too; a model without a usable export falls back to torch with one warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fewshot import FewShotClassifier
from fewshot.cli import main
from fewshot.embedding.onnx_encoder import OnnxEncoder, cached_onnx_parts, export_onnx_parts
from fewshot.embedding.runtime import min_cosine

SIMILARITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def onnx_encoder(encoder) -> OnnxEncoder:
    export_onnx_parts(encoder)
    onnx, head = cached_onnx_parts(encoder.fingerprint, "cosine")
    assert head is None
    return onnx


def _assert_same_answers(torch_answers, onnx_answers) -> None:
    assert len(torch_answers) == len(onnx_answers)
    for t, o in zip(torch_answers, onnx_answers):
        assert (o.input, o.label, o.unknown, o.error) == (t.input, t.label, t.unknown, t.error)
        assert [label for label, _ in o.top_k] == [label for label, _ in t.top_k]
        assert abs(o.similarity - t.similarity) <= SIMILARITY_TOLERANCE


def test_embeddings_match_torch_and_a_bad_image_fails_alone(encoder, onnx_encoder, photos, corrupt_jpeg):
    items = [photos["chelsea"], corrupt_jpeg, photos["rocket"], photos["coins"]]
    expected, got = encoder.embed_batch(items), onnx_encoder.embed_batch(items, batch_size=2)
    assert got.ok.tolist() == expected.ok.tolist() == [True, False, True, True]
    assert got.errors[1] == expected.errors[1] and "broken.jpg" in got.errors[1]
    assert got.digests == expected.digests and got.sources == expected.sources
    assert np.isnan(got.vectors[1]).all()
    assert min_cosine(got.vectors[got.ok], expected.vectors[expected.ok]) > 0.99999
    assert np.abs(got.vectors[got.ok] - expected.vectors[expected.ok]).max() < 1e-3


def test_embedding_cache_is_shared_with_the_torch_encoder(encoder, onnx_encoder, photos, tmp_path):
    from fewshot.embedding.cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache.sqlite")
    first = onnx_encoder.embed_batch([photos["coffee"]], cache=cache)
    again = encoder.embed_batch([photos["coffee"]], cache=cache)  # a hit: the same fingerprint keys both
    assert np.array_equal(first.vectors, again.vectors)


def test_classifier_answers_as_torch_on_known_and_unknown_images(encoder, onnx_encoder, caltech_subset, tmp_path):
    classes = sorted(p.name for p in caltech_subset.iterdir())
    registered, unregistered = classes[:5], classes[5:]
    classifier = FewShotClassifier(encoder, cache=False)
    queries: list[Path] = []
    for label in registered:
        files = sorted((caltech_subset / label).glob("*.jpg"))
        classifier.register(label, files[:3])
        queries += files[3:]
    queries += [f for label in unregistered for f in sorted((caltech_subset / label).glob("*.jpg"))]
    classifier.save(tmp_path / "reg")
    torch_answers = FewShotClassifier.load(tmp_path / "reg", encoder=encoder, cache=False).predict(queries)
    onnx_answers = FewShotClassifier.load(tmp_path / "reg", encoder=onnx_encoder, cache=False).predict(queries)
    assert {p.unknown for p in torch_answers} == {True, False}  # the set holds both kinds of answers
    _assert_same_answers(torch_answers, onnx_answers)


def test_a_registry_with_a_head_runs_its_onnx_head(encoder, photos, views_of, tmp_path):
    from fewshot.learning.heads import create_head

    head = create_head("identity", encoder.dim)
    head.fit(encoder.embed([photos[n] for n in ("astronaut", "camera", "coins")]))
    head.metadata["encoder"] = encoder.fingerprint
    classifier = FewShotClassifier(head=head, cache=False)
    for label in ("chelsea", "coffee", "rocket"):
        classifier.register(label, views_of(photos[label], 3, seed=1))
    classifier.save(tmp_path / "reg")
    export_onnx_parts(encoder, head)
    onnx_encoder, onnx_head = cached_onnx_parts(classifier.fingerprint_, "cosine")
    assert onnx_head is not None and onnx_head.out_dim == head.out_dim
    queries = [v for label in ("chelsea", "coffee", "rocket") for v in views_of(photos[label], 2, seed=7)]
    queries += [photos["astronaut"], photos["camera"]]
    torch_answers = FewShotClassifier.load(tmp_path / "reg", cache=False).predict(queries)
    onnx_answers = FewShotClassifier.load(tmp_path / "reg", encoder=onnx_encoder, head=onnx_head,
                                          cache=False).predict(queries)
    _assert_same_answers(torch_answers, onnx_answers)


def test_an_ensemble_runs_every_members_export(photos):
    from fewshot import create_encoder

    ensemble = create_encoder("efficientnet_lite0+efficientnet_lite0@160")
    export_onnx_parts(ensemble)
    onnx, _ = cached_onnx_parts(ensemble.fingerprint, "cosine")
    assert len(onnx.networks) == 2 and onnx.dim == ensemble.dim and onnx.resize_size == ensemble.resize_size
    items = [photos["chelsea"], photos["coffee"], photos["rocket"]]
    assert min_cosine(onnx.embed_batch(items).vectors, ensemble.embed(items)) > 0.99999


def test_no_usable_export_means_torch_with_one_warning(monkeypatch, capsys, encoder, photos, tmp_path):
    classifier = FewShotClassifier(encoder, cache=False)
    classifier.register("cat", photos["chelsea"])
    classifier.register("coffee", photos["coffee"])
    classifier.save(tmp_path / "reg")
    blocked = tmp_path / "a-file"
    blocked.write_text("the cache folder cannot be made under a file")
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(blocked / "cache"))
    code = main(["predict", str(tmp_path / "reg"), str(photos["chelsea"]), "--no-cache"])
    out, err = capsys.readouterr()
    assert code == 0 and out.split("\t")[1] == "cat"
    warnings = [line for line in err.splitlines() if "runs with torch" in line]
    assert len(warnings) == 1 and warnings[0].startswith("fewshot: warning:"), err
