"""The scripts in examples/ run as a user would run them, on small real data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_register_and_predict_on_caltech(caltech_subset):
    out = run_example("register_and_predict.py", caltech_subset, "--shots", "2")
    accuracy = float(out.strip().splitlines()[-1].split("=")[1].strip(" %")) / 100
    assert accuracy >= 0.75


def test_save_reload_extend(tmp_path, photos, views_of):
    queries = []
    for i, view in enumerate(views_of(photos["coffee"], 1, 0) + views_of(photos["rocket"], 1, 1)):
        queries.append(tmp_path / f"q{i}.png")
        view.save(queries[-1])
    out = run_example("save_reload_extend.py", tmp_path / "shop.reg", "--first", photos["coffee"],
                      "--second", photos["rocket"], "--query", *queries)
    labels = [line.split()[1] for line in out.strip().splitlines()]
    assert labels == ["first", "second"]


def test_train_and_evaluate_head(omniglot_small):
    out = run_example("train_and_evaluate_head.py", omniglot_small, "--head", "protonet", "--episodes", "100",
                      "--stages", "2", "--pool", "2", "--input-size", "64", "--test-fraction", "0.4")
    raw, trained = (float(line.split("accuracy ")[1].split("%")[0]) for line in out.splitlines()
                    if line.startswith("unseen classes"))
    assert trained > raw


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippets(containing: str) -> list[str]:
    """The README's ```python blocks (dedented, as inside list items) that contain ``containing``."""
    import re
    import textwrap

    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", README.read_text(), flags=re.S | re.M)
    return [textwrap.dedent(code) for _, code in blocks if containing in code]


@pytest.mark.parametrize("marker", ["clf = FewShotClassifier()", "with FewShotClassifier.open("])
def test_readme_classifier_snippets_run_as_written(marker, tmp_path, photos, views_of):
    """The README's Python API and durability snippets, run in a folder holding the files they name."""
    (tmp_path / "photos" / "plate").mkdir(parents=True)
    for i, view in enumerate(views_of(photos["coffee"], 3, seed=0), start=1):
        view.save(tmp_path / f"mug{i}.jpg")
    for i, view in enumerate(views_of(photos["coins"], 2, seed=1), start=1):
        view.save(tmp_path / "photos" / "plate" / f"plate{i}.jpg")
        view.save(tmp_path / f"plate{i}.jpg")
    views_of(photos["coffee"], 1, seed=2)[0].save(tmp_path / "query.jpg")
    views_of(photos["coins"], 1, seed=3)[0].save(tmp_path / "other.png")
    (snippet,) = readme_snippets(marker)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr
