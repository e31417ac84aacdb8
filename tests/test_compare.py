"""compare-encoders on a real folder of Caltech-101 photos (8 classes x 6), small input sizes."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fewshot.cli import main

ENCODERS = ["efficientnet_lite0@128", "efficientnet_lite0@128+efficientnet_lite1@128"]


def test_compare_encoders_ranks_them_on_the_same_episodes_with_a_png(caltech_subset, tmp_path, capsys):
    argv = ["compare-encoders", "--data", str(caltech_subset), "--episodes", "30", "--speed-images", "4"]
    for name in ENCODERS:
        argv += ["--encoder", name]
    assert main(argv + ["--json", "--out", str(tmp_path / "out")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["encoder"] for r in rows) == sorted(ENCODERS)
    assert [r["accuracy"] for r in rows] == sorted((r["accuracy"] for r in rows), reverse=True)  # best first
    dims = {r["encoder"]: r["dim"] for r in rows}
    assert dims == {ENCODERS[0]: 1280, ENCODERS[1]: 2560}
    for row in rows:
        assert (row["ways"], row["shots"], row["episodes"]) == (8, 1, 30)
        assert 0.5 < row["accuracy"] <= 1 and 0 < row["ci95"] < 0.2  # chance is 12.5%
        assert row["images_per_second"] > 0
    assert json.loads((tmp_path / "out" / "encoders.json").read_text()) == rows
    with Image.open(tmp_path / "out" / "encoders.png") as png:
        assert png.format == "PNG" and png.size[0] > 400

    # Seeded: a second run (now from the embedding cache) gives the same figures, as a table.
    assert main(argv + ["--out", str(tmp_path / "again")]) == 0
    table = capsys.readouterr().out
    for row in rows:
        assert f"| {row['encoder']} | {row['accuracy']:.1%} ± {row['ci95']:.1%} |" in table


def test_bad_ways_is_a_usage_error(caltech_subset, capsys):
    with pytest.raises(SystemExit):
        main(["compare-encoders", "--data", str(caltech_subset), "--ways", "none"])
    assert "--ways" in capsys.readouterr().err


def test_first_per_class_keeps_each_class_first_images(caltech_subset):
    from fewshot.evaluation.compare import first_per_class
    from fewshot.data.datasets import load_dataset

    data = load_dataset(caltech_subset)
    small = first_per_class(data, 2)
    assert small.classes == data.classes and len(small) == 2 * len(data.classes)
    for label in range(len(data.classes)):
        assert [n for n, y in zip(small.names, small.labels) if y == label] == \
            [n for n, y in zip(data.names, data.labels) if y == label][:2]
    with pytest.raises(ValueError, match="max_per_class"):
        first_per_class(data, 0)
