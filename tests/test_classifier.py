"""FewShotClassifier end to end: real Lite0, real photos, real files on disk."""

from __future__ import annotations

import pytest

from fewshot import EncoderMismatchError, FewShotClassifier, ImageError, UnknownClassError, create_encoder


@pytest.fixture
def classifier(encoder, photos):
    clf = FewShotClassifier(encoder)
    for label, path in photos.items():
        clf.register(label, path)
    return clf


def test_one_shot_instances_are_recognised_from_new_views(classifier, photos, views_of):
    queries, truth = [], []
    for seed, (label, path) in enumerate(photos.items()):
        queries += views_of(path, 2, seed)
        truth += [label, label]
    predictions = classifier.predict(queries, top_k=3)
    assert [p.label for p in predictions] == truth
    for p in predictions:
        assert p.error is None and len(p.top_k) == 3
        assert p.top_k[0] == (p.label, p.score)
        assert [s for _, s in p.top_k] == sorted((s for _, s in p.top_k), reverse=True)
        assert 0 < sum(s for _, s in p.top_k) <= 1 + 1e-6


def test_register_more_examples_grows_the_class(classifier, photos, views_of):
    report = classifier.register("chelsea", views_of(photos["chelsea"], 3, seed=1))
    assert (report.added, report.total, report.errors) == (3, 4, [])
    assert classifier.counts["chelsea"] == 4


def test_corrupt_image_fails_alone_in_register_and_predict(classifier, photos, corrupt_jpeg, views_of):
    report = classifier.register("coins", [corrupt_jpeg, *views_of(photos["coins"], 1, seed=2)])
    assert report.added == 1 and len(report.errors) == 1 and "broken.jpg" in report.errors[0]
    predictions = classifier.predict([photos["coffee"], corrupt_jpeg, photos["rocket"]])
    assert [p.label for p in predictions] == ["coffee", None, "rocket"]
    assert predictions[1].error and "broken.jpg" in predictions[1].input


def test_register_with_no_usable_image_changes_nothing(classifier, corrupt_jpeg):
    before = classifier.counts
    with pytest.raises(ImageError, match="none of the 1 images"):
        classifier.register("ghost", [corrupt_jpeg])
    assert classifier.counts == before and "ghost" not in classifier.classes


def test_save_load_round_trip_predicts_identically(tmp_path, classifier, photos, views_of):
    queries = views_of(photos["astronaut"], 2, seed=3) + views_of(photos["camera"], 2, seed=4)
    before = classifier.predict(queries, top_k=4)
    classifier.save(tmp_path / "shop.reg")
    loaded = FewShotClassifier.load(tmp_path / "shop.reg")
    assert loaded.classes == classifier.classes and loaded.counts == classifier.counts
    after = loaded.predict(queries, top_k=4)
    for a, b in zip(before, after):
        assert a.label == b.label
        assert [lab for lab, _ in a.top_k] == [lab for lab, _ in b.top_k]
        assert a.score == pytest.approx(b.score, abs=1e-5)


def test_registry_from_another_encoder_is_refused(tmp_path, classifier):
    classifier.save(tmp_path / "shop.reg")
    other = create_encoder(stages=(3,))
    with pytest.raises(EncoderMismatchError, match="efficientnet_lite0"):
        FewShotClassifier.load(tmp_path / "shop.reg", encoder=other)


def test_remove_and_rename_persist(tmp_path, classifier, photos):
    classifier.remove("rocket")
    classifier.rename("chelsea", "cat")
    classifier.save(tmp_path / "r")
    loaded = FewShotClassifier.load(tmp_path / "r")
    assert "rocket" not in loaded.classes and "cat" in loaded.classes and "chelsea" not in loaded.classes
    assert loaded.predict([photos["chelsea"]])[0].label == "cat"
    with pytest.raises(UnknownClassError):
        loaded.remove("rocket")


def test_unknown_threshold_answers_none_and_persists(tmp_path, classifier, photos):
    classifier.unknown_threshold = 1.5  # no cosine similarity reaches it
    prediction = classifier.predict([photos["coffee"]])[0]
    assert prediction.label is None and prediction.top_k[0][0] == "coffee"
    classifier.save(tmp_path / "r")
    assert FewShotClassifier.load(tmp_path / "r").unknown_threshold == 1.5


def test_top_k_is_capped_and_validated(classifier, photos):
    assert len(classifier.predict([photos["coins"]], top_k=50)[0].top_k) == len(classifier.classes)
    for bad in [0, -1, 1.5, True]:
        with pytest.raises(ValueError, match="top_k"):
            classifier.predict([photos["coins"]], top_k=bad)


def test_predict_before_register_says_what_to_do(encoder, photos):
    with pytest.raises(ValueError, match="register"):
        FewShotClassifier(encoder).predict([photos["coins"]])


def test_register_folder_and_caltech_one_shot(caltech_subset, encoder):
    """Real Caltech-101 photos: one image per class registered, the others recognised."""
    from fewshot.data.datasets import class_folders, support_query_split

    support, query = support_query_split(class_folders(caltech_subset), shots=1, seed=0)
    clf = FewShotClassifier(encoder)
    for label, paths in support.items():
        clf.register(label, paths)
    paths = [p for ps in query.values() for p in ps]
    truth = [label for label, ps in query.items() for _ in ps]
    accuracy = sum(p.label == t for p, t in zip(clf.predict(paths), truth)) / len(truth)
    assert accuracy >= 0.75, accuracy
    folder_clf = FewShotClassifier(encoder)
    reports = folder_clf.register_folder(caltech_subset)
    assert sorted(r.label for r in reports) == sorted(support) and all(r.added == 6 for r in reports)


LITE0_FINGERPRINT = {"name": "efficientnet_lite0", "architecture": "tf_efficientnet_lite0",
                     "weights_sha256": "0" * 64, "features": {"stages": None, "pool": "avg", "dim": 1280},
                     "preprocess": {"input_size": [3, 224, 224], "interpolation": "bicubic",
                                    "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875}}


def _resealed_registry(path, fingerprint: dict, settings: dict):
    """A registry whose manifest an attacker rewrote and re-sealed (the checksum is no signature)."""
    import numpy as np

    from fewshot.registry import Registry

    reg = Registry(1280, fingerprint=fingerprint, metadata={"classifier": settings})
    reg.add("a", np.ones((1, 1280), np.float32))
    reg.save(path)
    return path


@pytest.mark.parametrize("change, settings, message", [
    (lambda fp: fp["preprocess"].update(input_size=[3, 20000, 20000]), {}, "input_size"),
    (lambda fp: fp["preprocess"].update(input_size="big"), {}, "input_size"),
    (lambda fp: fp["features"].update(stages="0,1"), {}, "stages"),
    (lambda fp: fp["features"].update(pool=[1]), {}, "pool"),
    (lambda fp: fp.update(name=["efficientnet_lite0"]), {}, "name"),
    (lambda fp: None, {"weights": "/proc/self/status"}, "weights"),
    (lambda fp: None, {"weights": 42}, "weights"),
    (lambda fp: None, {"temperature": "hot"}, "temperature"),
    (lambda fp: None, {"support_views": "rotate"}, "support_views"),
])
def test_manifest_settings_are_checked_before_the_encoder_is_created(tmp_path, change, settings, message):
    """Fields of a registry's manifest that drive encoder creation are validated first: input_size
    20000 used to take 8 GB, wrong types gave a raw TypeError, and any file was read as weights."""
    import copy
    import resource
    import time

    from fewshot.errors import RegistryFormatError, WeightsError

    fingerprint = copy.deepcopy(LITE0_FINGERPRINT)
    change(fingerprint)
    path = _resealed_registry(tmp_path / "r", fingerprint, settings)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(WeightsError if settings.get("weights") == "/proc/self/status" else RegistryFormatError,
                       match=message):
        FewShotClassifier.load(path)
    assert time.monotonic() - start < 5
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024 < 300
@pytest.fixture
def saved_head(tmp_path, encoder):
    from fewshot.learning.heads import create_head, save_head

    head = create_head("protonet", encoder.dim, seed=0)
    head.metadata["encoder"] = encoder.fingerprint
    return save_head(head, tmp_path / "head")


def test_registry_keeps_its_own_copy_of_the_head(tmp_path, encoder, photos, saved_head):
    """Retraining a head into the same folder (or deleting it) must not break registries built with it."""
    import shutil

    from fewshot.learning.heads import create_head, save_head

    clf = FewShotClassifier(encoder, head=saved_head)
    for label in ["chelsea", "coffee", "rocket"]:
        clf.register(label, photos[label])
    clf.save(tmp_path / "shop.reg")
    before = [p.top_k for p in clf.predict([photos["coffee"], photos["chelsea"]])]
    retrained = create_head("protonet", encoder.dim, seed=1)
    retrained.metadata["encoder"] = encoder.fingerprint
    save_head(retrained, saved_head)  # a new head in the old head's folder
    loaded = FewShotClassifier.load(tmp_path / "shop.reg", encoder=encoder)
    assert [p.top_k for p in loaded.predict([photos["coffee"], photos["chelsea"]])] == before
    shutil.rmtree(saved_head)
    shutil.copytree(tmp_path / "shop.reg", tmp_path / "moved.reg")  # portable: works anywhere
    moved = FewShotClassifier.load(tmp_path / "moved.reg", encoder=encoder)
    assert moved.predict(photos["rocket"])[0].label == "rocket"


def test_registry_saved_with_only_a_head_path_still_loads(tmp_path, encoder, photos, saved_head):
    from fewshot.registry import Registry

    clf = FewShotClassifier(encoder, head=saved_head)
    clf.register("coffee", photos["coffee"])
    clf.save(tmp_path / "old.reg")
    reg = Registry.load(tmp_path / "old.reg")
    reg.attachments.clear()  # as registries saved before heads were copied into them
    reg.save(tmp_path / "old.reg")
    assert FewShotClassifier.load(tmp_path / "old.reg", encoder=encoder).predict(photos["coffee"])[0].label == "coffee"


@pytest.mark.parametrize("setting", [{"metric": "dot"}, {"temperature": 0}, {"temperature": float("nan")},
                                     {"unknown_threshold": float("inf")}, {"unknown_threshold": float("nan")}])
def test_bad_settings_are_refused_when_given(setting):
    with pytest.raises(ValueError, match=next(iter(setting))):
        FewShotClassifier(**setting)


# -- repeated images, explanations

def test_registering_the_same_image_again_is_skipped_and_reported(classifier, photos, views_of):
    report = classifier.register("chelsea", [photos["chelsea"], *views_of(photos["chelsea"], 1, seed=5),
                                             photos["coins"], photos["coins"]])
    assert (report.added, report.total) == (2, 3)  # the view and one coins photo; the count is not inflated
    assert len(report.warnings) >= 2
    assert f"skipped {str(photos['chelsea'])!r}" in report.warnings[0] and "already registered" in report.warnings[0]
    assert f"skipped {str(photos['coins'])!r}" in report.warnings[1] and "given twice" in report.warnings[1]
    again = classifier.register("chelsea", photos["chelsea"])  # everything already there: nothing changes
    assert (again.added, again.total) == (0, 3) and again.warnings


def test_explain_names_the_nearest_registered_examples(tmp_path, encoder, photos, views_of):
    import hashlib

    files = {}
    for label in ["chelsea", "coffee", "rocket"]:
        for i, view in enumerate(views_of(photos[label], 2, seed=10)):
            files[tmp_path / f"{label}-{i}.png"] = label
            view.save(tmp_path / f"{label}-{i}.png")
    clf = FewShotClassifier(encoder, store_examples=True)
    for label in ["chelsea", "coffee", "rocket"]:
        clf.register(label, [p for p, lab in files.items() if lab == label])
    clf.save(tmp_path / "shop.reg")
    clf = FewShotClassifier.load(tmp_path / "shop.reg")  # sources survive save and load
    (p,) = clf.predict(views_of(photos["coffee"], 1, seed=11), top_k=2, explain=3)
    assert p.label == "coffee" and len(p.neighbours) == 3
    first = p.neighbours[0]
    assert first.label == "coffee" and files[tmp_path / first.source.rsplit("/", 1)[-1]] == "coffee"
    assert first.digest == hashlib.sha256((tmp_path / first.source.rsplit("/", 1)[-1]).read_bytes()).hexdigest()
    assert [n.similarity for n in p.neighbours] == sorted((n.similarity for n in p.neighbours), reverse=True)
    assert {n.label for n in p.neighbours} <= {lab for lab, _ in p.top_k}
    assert p.to_dict()["neighbours"][0] == {"label": "coffee", "source": first.source, "digest": first.digest,
                                            "similarity": first.similarity}
    (plain,) = clf.predict(views_of(photos["coffee"], 1, seed=11))
    assert plain.neighbours is None and "neighbours" not in plain.to_dict()


def test_explain_without_stored_examples_gives_no_neighbours(encoder, photos):
    clf = FewShotClassifier(encoder, store_examples=False)
    for label in ["rocket", "coffee"]:
        clf.register(label, photos[label])
    (p,) = clf.predict(photos["rocket"], explain=2)
    assert p.neighbours == []
    with pytest.raises(ValueError, match="explain"):
        clf.predict(photos["rocket"], explain=-1)
def test_register_saves_a_thumbnail_with_the_examples_in_one_save(tmp_path, encoder, photos):
    from fewshot.registry import Registry
    from fewshot.registry.thumbnails import make_thumbnail

    with FewShotClassifier.open(tmp_path / "r", encoder=encoder, cache=False) as clf:
        clf.register("cat", [photos["chelsea"]], thumbnail=make_thumbnail(photos["chelsea"]))
        with pytest.raises(ValueError, match="thumbnail"):
            clf.register("coffee", [photos["coffee"]], thumbnail=b"")  # refused: the examples are not kept either
    saved = Registry.load(tmp_path / "r")
    assert saved.classes == ["cat"] and saved.thumbnail("cat")[:2] == b"\xff\xd8"


def _unit(x):
    import numpy as np

    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flip_support_views_keep_one_example_per_image_averaged_with_its_mirror(encoder, photos):
    import numpy as np

    from fewshot.embedding.images import load_image

    flip = FewShotClassifier(encoder, support_views="flip", cache=False)
    report = flip.register("cat", photos["chelsea"])
    assert (report.added, report.total, flip.counts) == (1, 1, {"cat": 1})  # the mirror is no extra image
    as_is = encoder.embed([photos["chelsea"]])
    mirrored = encoder.embed([np.asarray(load_image(photos["chelsea"]))[:, ::-1]])
    expected = (_unit(as_is) + _unit(mirrored)) / 2
    assert np.allclose(flip.registry_.examples("cat"), expected, atol=1e-5)
    plain = FewShotClassifier(encoder, cache=False)
    plain.register("cat", photos["chelsea"])
    assert not np.allclose(plain.registry_.examples("cat"), expected, atol=1e-3)
    # Queries are embedded once, as they are: the photo itself is still nearest its own class.
    assert flip.predict([photos["chelsea"]])[0].top_k[0][0] == "cat"


def test_support_views_are_recorded_and_a_reloaded_registry_registers_the_same_way(tmp_path, encoder, photos):
    import numpy as np

    flip = FewShotClassifier(encoder, support_views="flip", cache=False)
    flip.register("cat", photos["chelsea"])
    flip.save(tmp_path / "r")
    loaded = FewShotClassifier.load(tmp_path / "r", encoder=encoder, cache=False)
    assert loaded.support_views == "flip"
    flip.register("cup", photos["coffee"])
    loaded.register("cup", photos["coffee"])
    assert np.allclose(loaded.registry_.examples("cup"), flip.registry_.examples("cup"), atol=1e-6)
    assert FewShotClassifier.load(tmp_path / "r", encoder=encoder, support_views="none").support_views == "none"


def test_bad_support_views_setting_is_refused_when_given():
    with pytest.raises(ValueError, match="support_views must be one of"):
        FewShotClassifier(support_views="mirror")
