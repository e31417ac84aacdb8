"""Registry hygiene (fewshot.registry.hygiene): real Lite0 embeddings of real photos and Caltech-101 images."""

from __future__ import annotations

import pytest

from fewshot import FewShotClassifier
from fewshot.registry.hygiene import DUPLICATE_IMAGE, MISLABELLED, NEAR_DUPLICATE, diagnose, near_duplicate_classes


@pytest.fixture
def caltech(caltech_subset):
    return {folder.name: sorted(folder.glob("*.jpg")) for folder in sorted(caltech_subset.iterdir())}


def test_an_image_filed_under_the_wrong_class_is_warned_and_found_by_doctor(encoder, caltech):
    clf = FewShotClassifier(encoder, store_examples=True)
    for label, paths in caltech.items():
        if label != "umbrella":
            clf.register(label, paths[:4])
    intruder = caltech["strawberry"][5]
    report = clf.register("umbrella", [*caltech["umbrella"][:4], intruder])
    (warning,) = [w for w in report.warnings if "looks more like" in w]
    assert str(intruder) in warning and "'umbrella' looks more like class 'strawberry'" in warning
    found = [f for f in clf.doctor() if f.kind == MISLABELLED]
    assert [(f.source, f.classes) for f in found] == [(str(intruder), ("umbrella", "strawberry"))]
    assert found[0].similarity - found[0].own_similarity >= 0.15 and len(found[0].digest) == 64
    clf.remove("umbrella")
    assert diagnose(clf.registry_) == []  # the correctly labelled classes raise nothing


def test_a_class_registered_twice_under_two_names_is_a_near_duplicate(encoder, photos, views_of):
    clf = FewShotClassifier(encoder)
    assert clf.register("chelsea", views_of(photos["chelsea"], 3, seed=0)).warnings == []
    assert clf.register("coffee", views_of(photos["coffee"], 3, seed=1)).warnings == []
    report = clf.register("tabby", views_of(photos["chelsea"], 3, seed=2))  # other crops of the same cat
    (warning,) = report.warnings
    assert "classes 'chelsea' and 'tabby' look like near-duplicates" in warning
    (finding,) = near_duplicate_classes(clf.registry_)
    assert finding.kind == NEAR_DUPLICATE and finding.classes == ("chelsea", "tabby") and finding.similarity >= 0.9
    assert clf.doctor() == [finding]


def test_the_same_image_in_two_classes_is_warned_and_listed(encoder, photos):
    clf = FewShotClassifier(encoder)
    clf.register("coffee", [photos["coffee"], photos["rocket"]])
    report = clf.register("espresso", photos["coffee"])
    assert report.added == 1  # added (another class may rightly hold it), but said
    assert any(f"the same image {str(photos['coffee'])!r}" in w and "'coffee', 'espresso'" in w
               for w in report.warnings)
    duplicates = [f for f in clf.doctor() if f.kind == DUPLICATE_IMAGE]
    assert [(f.classes, f.source) for f in duplicates] == [(("coffee", "espresso"), str(photos["coffee"]))]
    clf.remove("espresso")
    assert [f for f in clf.doctor() if f.kind == DUPLICATE_IMAGE] == []


def test_distinct_photos_give_a_clean_bill_of_health(encoder, photos, views_of):
    clf = FewShotClassifier(encoder, store_examples=True)
    for seed, (label, path) in enumerate(photos.items()):
        assert clf.register(label, views_of(path, 3, seed)).warnings == []
    assert clf.doctor() == []
