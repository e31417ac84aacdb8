"""The scripts in examples/ run as a user would run them, on small real data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
