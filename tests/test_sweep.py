"""Shots sweep on your own folder: how many images per class are needed, with the real Lite0 encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fewshot.data.datasets import load_dataset
from fewshot.evaluation.sweep import shots_sweep


@pytest.fixture(scope="module")
def subset(caltech_subset):
    return load_dataset(caltech_subset)  # 8 Caltech-101 classes, 6 photos each


def test_rows_per_shot_count_from_one_embedding(subset, encoder, monkeypatch):
    calls, embed_batch = [], encoder.embed_batch

    def counting(items, **kw):  # the real encoder, counted
        calls.append(len(items))
        return embed_batch(items, **kw)

    monkeypatch.setattr(encoder, "embed_batch", counting)
    result = shots_sweep(subset, encoder, ways=5, shots=[5, 1, 2, 2], queries=1, episodes=40, seed=0)
    assert calls == [len(subset)]  # the folder is embedded once for all shot counts
    assert [r.shots for r in result.rows] == [1, 2, 5] and result.ways == 5 and not result.skipped
    assert all(r.classes == 8 for r in result.rows)
    # real photos, real features: 5-way Caltech is far above chance (20%) from one image per class
    assert result.rows[0].accuracy > 0.6 and 0 < result.rows[0].ci95 < 0.2
    assert result.rows[-1].accuracy >= result.rows[0].accuracy - 0.1
    assert all(r.open_set is None for r in result.rows)


def test_same_seed_replays_exactly(subset, encoder):
    def run():
        return shots_sweep(subset, encoder, ways=4, shots=[1, 3], queries=2, unknown_ways=2, episodes=15,
                           seed=7).to_dict()

    assert run() == run()


def test_open_set_rows_report_auroc_and_threshold_effect(subset, encoder):
    result = shots_sweep(subset, encoder, ways=3, shots=[1, 4], queries=2, unknown_ways=3, episodes=30, seed=0)
    assert result.ways == 3 and result.unknown_ways == 3 and not result.notes
    for row in result.rows:
        assert set(row.open_set) == {"auroc", "known_kept", "unknown_accepted"}
        assert row.open_set["auroc"]["mean"] > 0.6  # unregistered Caltech classes score lower than registered
        assert 0 <= row.open_set["unknown_accepted"]["mean"] < row.open_set["known_kept"]["mean"] <= 1
    text = result.table()
    assert "AUROC" in text and "unknowns accepted" in text and len(text.splitlines()) == 4


def test_too_many_shots_are_left_out_with_the_reason(subset, encoder):
    result = shots_sweep(subset, encoder, shots=[1, 10], queries=1, episodes=10)
    assert [r.shots for r in result.rows] == [1]
    assert "only 0 classes have 11+ images" in result.skipped[10]
    assert "10-shot left out: only 0 classes have 11+ images" in result.table()


def test_ways_capped_by_classes_with_enough_images_for_the_largest_shot_count(tmp_path, caltech_subset, encoder):
    folder = tmp_path / "mixed"  # 3 classes keep 6 photos, 5 keep only 3
    for i, source in enumerate(sorted(p for p in caltech_subset.iterdir() if p.is_dir())):
        (folder / source.name).mkdir(parents=True)
        for photo in sorted(source.glob("*.jpg"))[: 6 if i < 3 else 3]:
            (folder / source.name / photo.name).write_bytes(photo.read_bytes())
    result = shots_sweep(load_dataset(folder), encoder, ways=5, shots=[1, 4], queries=2, episodes=10)
    assert result.ways == 3 and [r.classes for r in result.rows] == [8, 3]
    assert result.notes == ["ways lowered from 5 to 3 for every row: only 3 classes have 6+ images "
                            "(4 shots + 2 queries)"]
    open_set = shots_sweep(load_dataset(folder), encoder, ways=5, shots=[1], queries=1, unknown_ways=5, episodes=5)
    assert open_set.ways == 3 and "8 classes minus 5 unknown ones" in open_set.notes[0]


def test_a_corrupt_image_is_left_out_and_the_sweep_goes_on(tmp_path, caltech_subset, encoder):
    folder = tmp_path / "with-corrupt"
    for source in sorted(p for p in caltech_subset.iterdir() if p.is_dir())[:5]:
        (folder / source.name).mkdir(parents=True)
        for photo in source.glob("*.jpg"):
            (folder / source.name / photo.name).write_bytes(photo.read_bytes())
    broken = next((folder).glob("*/*.jpg"))
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.warns(RuntimeWarning, match="1 of 30 images could not be read"):
        result = shots_sweep(load_dataset(folder), encoder, shots=[1, 5], queries=1, episodes=5)
    # the class of the broken photo is down to 5 photos: too few for 5 shots + 1 query, so 4-way rows
    assert [r.classes for r in result.rows] == [5, 4] and result.ways == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"shots": [0, 1]}, "shots must be positive integers"),
    ({"shots": []}, "shots must be positive integers"),
    ({"ways": 0}, "ways must be a positive integer"),
    ({"unknown_ways": 7}, "lower --unknown-ways"),
    ({"shots": [6], "queries": 1}, "no shot count in [6] can be sampled"),
    ({"target_tpr": 1.5}, "target"),
])
def test_bad_settings_say_what_to_change(subset, encoder, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        shots_sweep(subset, encoder, **{"queries": 1, "episodes": 5, **kwargs})


def test_save_writes_json_and_a_plot(subset, encoder, tmp_path):
    result = shots_sweep(subset, encoder, ways=3, shots=[1, 2], queries=2, unknown_ways=2, episodes=10)
    paths = result.save(tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert saved == json.loads(json.dumps(result.to_dict()))
    assert [r["shots"] for r in saved["rows"]] == [1, 2] and saved["dataset"] == subset.source
    assert saved["encoder"] == encoder.fingerprint
    with Image.open(paths["plot"]) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]  # accuracy and open-set panels side by side
        assert np.asarray(png.convert("L")).std() > 10  # something is drawn
