"""Honest "unknown": the registry's self-fitted threshold, on real photos with the real encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fewshot import FewShotClassifier
from fewshot.cli import main
from fewshot.registry.calibration import (PER_CLASS_MIN_EXAMPLES, Calibration, calibrate, current_calibration,
                                          fit_calibration, fit_temperature, leave_one_out_scores, stored_calibration)
from fewshot.registry import Registry


def folders(root):
    return {d.name: sorted(d.glob("*.jpg")) for d in sorted(root.iterdir()) if d.is_dir()}


@pytest.fixture(scope="module")
def shop(caltech_subset, encoder):
    """4 Caltech classes registered from 5 photos each; their 6th photo and 4 other classes held out."""
    classes = folders(caltech_subset)
    registered, others = list(classes)[:4], list(classes)[4:]
    clf = FewShotClassifier(encoder, cache=False, progress=False)
    for label in registered:
        clf.register(label, classes[label][:5])
    known = [(label, classes[label][5]) for label in registered]
    unknown = [path for label in others for path in classes[label]]
    return clf, known, unknown


def test_leave_one_out_estimates_the_full_prototype_score():
    # Two unit examples at 90 degrees: the other one (the query stand-in) scores 0 against it, and
    # cos(x, mean) = 0.5 / |mean| = 0.5 / sqrt(0.5) for the full 2-example prototype.
    x = np.eye(2)
    np.testing.assert_allclose(leave_one_out_scores(x), [0.0, 0.0])
    three = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    expected_dot = [((three[j] / np.linalg.norm(three[j])) @ np.delete(three / np.linalg.norm(three, axis=1)[:, None],
                                                                      j, 0).mean(0)) for j in range(3)]
    mean_norm = np.linalg.norm((three / np.linalg.norm(three, axis=1)[:, None]).mean(0))
    np.testing.assert_allclose(leave_one_out_scores(three), np.array(expected_dot) / mean_norm)


def test_calibration_sources_follow_the_examples_available():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    one_shot = [c[None] + 0.1 * rng.normal(size=(1, 16)) for c in centres]
    fitted = fit_calibration(list("abcde"), one_shot)
    assert fitted.method == "cross-class" and fitted.threshold == fitted.one_shot_threshold
    many = [c + 0.3 * rng.normal(size=(PER_CLASS_MIN_EXAMPLES, 16)) for c in centres[:2]] + one_shot[2:]
    fitted = fit_calibration(list("abcde"), many, target_tpr=0.9)
    assert fitted.method == "leave-one-out" and set(fitted.per_class) == {"a", "b"}
    assert fitted.threshold_for("c", 1) == fitted.one_shot_threshold and fitted.temperature > 0
    with pytest.raises(ValueError, match="target_tpr"):
        fit_calibration(list("abcde"), many, target_tpr=1.5)


def test_unregistered_objects_come_back_unknown_and_registered_ones_named(shop):
    clf, known, unknown = shop
    assert clf.calibration_.method == "leave-one-out"
    answers = clf.predict([path for _, path in known])
    assert [p.label for p in answers] == [label for label, _ in known]
    assert not any(p.unknown for p in answers)
    strangers = clf.predict(unknown)
    rejected = np.mean([p.unknown and p.label is None for p in strangers])
    assert rejected >= 0.5, f"only {rejected:.0%} of photos of unregistered objects were called unknown"
    for p in strangers:  # an unknown answer still says how close the nearest class came
        assert p.similarity == pytest.approx(p.similarities[0]) and p.top_k[0][0] in clf.classes


def test_threshold_override_and_switching_unknown_off(shop):
    clf, known, unknown = shop
    try:
        clf.unknown = False
        assert all(p.label is not None and not p.unknown for p in clf.predict(unknown))
        clf.unknown, clf.unknown_threshold = True, 1.01  # nothing is that similar
        assert all(p.unknown for p in clf.predict([path for _, path in known]))
        clf.unknown_threshold = -1.0
        assert not any(p.unknown for p in clf.predict(unknown))
    finally:
        clf.unknown, clf.unknown_threshold = True, None


def test_threshold_is_saved_and_refitted_on_add_remove_rename(tmp_path, caltech_subset, encoder):
    classes = folders(caltech_subset)
    path = tmp_path / "shop.reg"
    with FewShotClassifier.open(path, encoder=encoder, cache=False, progress=False) as clf:
        for label in list(classes)[:3]:
            clf.register(label, classes[label][:3])
        fitted = clf.calibration_
    saved = Registry.load(path)
    assert stored_calibration(saved) == fitted  # saved with the registry, and still fits it
    assert FewShotClassifier.load(path, encoder=encoder).calibration_ == fitted

    with FewShotClassifier.open(path, encoder=encoder, cache=False, progress=False) as clf:
        clf.register(list(classes)[3], classes[list(classes)[3]][:3])
        grown = stored_calibration(Registry.load(path))
        assert grown is not None and grown != fitted and grown.signature != fitted.signature
        clf.rename(list(classes)[0], "renamed")
        renamed = stored_calibration(Registry.load(path))
        assert renamed is not None and renamed.signature != grown.signature
    code = main(["remove", str(path), "--class", "renamed"])
    assert code == 0
    after = Registry.load(path)
    assert "renamed" not in after.classes and stored_calibration(after) is not None


def test_a_registry_changed_behind_the_classifiers_back_is_refitted_when_loaded(tmp_path):
    """Changes through the raw Registry API leave the stored fit stale; loading refits it."""
    reg = Registry(8, store_examples=True)
    rng = np.random.default_rng(1)
    for label in "abc":
        reg.add(label, rng.normal(size=(3, 8)))
    first = calibrate(reg)
    reg.add("d", rng.normal(size=(3, 8)))  # raw registry API: no refit
    assert stored_calibration(reg) is None
    reg.save(tmp_path / "r")
    refitted = current_calibration(Registry.load(tmp_path / "r"))  # what FewShotClassifier.load uses
    assert refitted.signature != first.signature and refitted.method == "leave-one-out"


def test_cli_predict_json_reports_similarity_and_unknown(tmp_path, capsys, caltech_subset, photos):
    classes = folders(caltech_subset)
    path = tmp_path / "shop.reg"
    for label in list(classes)[:3]:
        assert main(["register", str(path), "--class", label] + [str(p) for p in classes[label][:4]]) == 0
    capsys.readouterr()
    query = classes[list(classes)[0]][5]
    assert main(["predict", str(path), str(query), str(photos["astronaut"]), "--json", "--top-k", "2"]) == 0
    known, stranger = json.loads(capsys.readouterr().out)
    assert {"similarity", "unknown"} <= set(known) and known["unknown"] is False
    assert known["label"] == list(classes)[0]
    assert [set(t) for t in known["top_k"]] == [{"label", "score", "similarity"}] * 2
    assert known["similarity"] == known["top_k"][0]["similarity"] > known["top_k"][1]["similarity"]
    assert stranger["unknown"] is True and stranger["label"] is None
    assert main(["predict", str(path), str(photos["astronaut"]), "--json", "--no-unknown"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] in classes
    assert main(["predict", str(path), str(query), "--json", "--threshold", "0.999"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["unknown"] is True


def test_cli_calibrate_with_target_and_background(tmp_path, capsys, caltech_subset):
    classes = folders(caltech_subset)
    path = tmp_path / "shop.reg"
    for label in list(classes)[:3]:
        assert main(["register", str(path), "--class", label] + [str(p) for p in classes[label][:4]]) == 0
    capsys.readouterr()
    background = caltech_subset / list(classes)[-1]
    assert main(["calibrate", str(path), "--target-tpr", "0.8", "--background", str(background), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target_tpr"] == 0.8 and 0.0 <= summary["background_accepted"] <= 1.0
    stored = stored_calibration(Registry.load(path))
    assert stored.target_tpr == 0.8 and stored.background_accepted == summary["background_accepted"]
    registry = Registry.load(path)
    loose = fit_calibration(registry.classes, [registry.examples(lab) for lab in registry.classes], target_tpr=0.95)
    assert stored.threshold > loose.threshold  # keeping fewer knowns means a stricter threshold
    with pytest.raises(SystemExit) as exit_info:  # a usage error
        main(["calibrate", str(path), "--target-tpr", "2"])
    assert exit_info.value.code == 2 and "--target-tpr" in capsys.readouterr().err


def test_calibration_round_trips_through_a_dict():
    c = Calibration(0.9, 0.5, 0.4, {"a": 0.6}, 0.05, "leave-one-out", "x", 0.1)
    assert Calibration.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_l2_registries_calibrate_on_negative_squared_distances():
    rng = np.random.default_rng(2)
    reg = Registry(8, metric="l2", store_examples=True)
    for label, centre in zip("abcd", 5 * rng.normal(size=(4, 8))):
        reg.add(label, centre + rng.normal(size=(6, 8)))
    fitted = calibrate(reg)
    assert fitted.method == "leave-one-out" and fitted.threshold < 0 and fitted.temperature > 0
    # A fresh example of class "a" is accepted, a point far from every class is not.
    near = reg.search(reg.examples("a").mean(axis=0) + 0.1, 1).scores[0, 0]
    far = reg.search(np.full(8, 100.0), 1).scores[0, 0]
    assert near >= fitted.threshold > far


def test_temperature_fit_on_a_large_registry_is_bounded():
    rng = np.random.default_rng(3)
    examples = [c + 0.5 * rng.normal(size=(3, 32)) for c in rng.normal(size=(300, 32))]
    fitted = fit_calibration([str(i) for i in range(300)], examples)
    assert 1e-3 <= fitted.temperature <= 10.0


def test_a_malformed_stored_fit_is_refitted_not_trusted():
    reg = Registry(8, store_examples=True)
    rng = np.random.default_rng(4)
    for label in "abc":
        reg.add(label, rng.normal(size=(3, 8)))
    good = calibrate(reg)
    for bad in ({"threshold": "0.5"}, {"per_class": {"a": None}}, {"temperature": -1.0}, {"target_tpr": 2.0}):
        reg.metadata["unknown"] = {**good.to_dict(), **bad}
        assert stored_calibration(reg) is None
        assert current_calibration(reg) == good  # refitted from the examples


def test_temperature_stays_honest_when_every_held_out_example_is_named_right():
    rng = np.random.default_rng(5)
    examples = [c + 0.05 * rng.normal(size=(3, 16)) for c in 3 * np.eye(16)[:5]]  # far apart: all right
    temperature = fit_temperature(examples)
    x = np.concatenate([e / np.linalg.norm(e, axis=1, keepdims=True) for e in examples])
    prototypes = np.stack([e.mean(0) / np.linalg.norm(e.mean(0)) for e in examples])
    logits = x @ prototypes.T / temperature
    top = np.exp(logits - logits.max(1, keepdims=True))
    confidence = (1 / top.sum(1)).mean()
    # 15 of 15 right: Jeffreys' 15.5/16, not the certainty a likelihood fit would claim.
    assert confidence == pytest.approx(15.5 / 16, abs=0.01)


def test_a_class_of_thousands_of_examples_calibrates_in_bounded_memory():
    import tracemalloc

    rng = np.random.default_rng(6)
    reg = Registry(16, store_examples=True)
    reg.add("big", rng.normal(size=(4000, 16)) + 3)  # every pair scored: 4000 x 4000 matrices, ~400 MB
    reg.add("small", rng.normal(size=(30, 16)) - 3)
    tracemalloc.start()
    try:
        fitted = calibrate(reg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"calibration peaked at {peak / 2**20:.0f} MB"
    assert set(fitted.per_class) == {"big", "small"} and fitted.temperature > 0
    assert calibrate(reg) == fitted  # the samples are seeded: the same fit every time


def test_classes_below_the_sampling_caps_calibrate_exactly_as_before():
    # Figures of the fit that scored every example and every pair (before sampling existed).
    rng = np.random.default_rng(1)
    expected = {"cosine": (0.9168849546648781, 0.9107980354861208, 0.9158276210905953, 0.9545133918613137,
                           0.004063462540132064),
                "l2": (-45.52962665144502, -90.46289277036814, -42.56864231469942, -45.287734710476656,
                       1.9335065627716228)}
    for metric, (pooled, one_shot, c3, c4, temperature) in expected.items():
        examples = [rng.normal(size=(n, 32)).astype(np.float32) + i for i, n in enumerate([1, 2, 5, 30, 150, 3])]
        fitted = fit_calibration([f"c{i}" for i in range(6)], examples, metric)
        assert (fitted.threshold, fitted.one_shot_threshold) == pytest.approx((pooled, one_shot), rel=1e-12)
        assert fitted.per_class == pytest.approx({"c3": c3, "c4": c4}, rel=1e-12)
        assert fitted.temperature == pytest.approx(temperature, rel=1e-4)  # float64 now where l2 summed float32


def test_a_domain_prior_keeps_its_target_share_of_one_shot_queries():
    from fewshot.registry.calibration import CROSS_CLASS_QUANTILE, fit_prior

    rng = np.random.default_rng(0)
    known = rng.normal(0.6, 0.1, 5000)  # same-class 1-shot scores of a far domain: lower than photos'
    cross = rng.normal(0.4, 0.1, 5000)
    prior = fit_prior(known, cross)
    assert [t for t, _ in prior] == [t for t, _ in CROSS_CLASS_QUANTILE]
    for target, level in prior:  # the threshold it implies keeps about the target share of known queries
        kept = np.mean(known >= np.quantile(cross, level))
        assert abs(kept - target) < 0.02
    with pytest.raises(ValueError, match="at least"):
        fit_prior([0.5], cross)


def test_a_registry_with_its_own_prior_uses_it_and_an_edited_one_falls_back():
    from fewshot.registry.calibration import CROSS_CLASS_QUANTILE, PRIOR_KEY, check_prior

    rng = np.random.default_rng(1)
    reg = Registry(16)
    for i in range(6):  # one example per class: the threshold is the prior's
        reg.add(f"c{i}", rng.normal(size=(1, 16)).astype(np.float32))
    photo = calibrate(reg).one_shot_threshold
    reg.metadata[PRIOR_KEY] = [[0.5, 0.9], [0.8, 0.7], [0.9, 0.5], [0.95, 0.3], [0.99, 0.1]]
    own = calibrate(reg).one_shot_threshold
    assert own < photo  # a lower quantile of the same cross-class scores
    reg.metadata[PRIOR_KEY] = [[0.9, 2.0], "x"]
    assert calibrate(reg).one_shot_threshold == photo
    with pytest.raises(ValueError, match="1-shot prior"):
        check_prior([[0.95, 0.5]])
    assert check_prior(CROSS_CLASS_QUANTILE) == CROSS_CLASS_QUANTILE
