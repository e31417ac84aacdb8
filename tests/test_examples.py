"""The scripts in examples/ run as a user would run them, on small real data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_snippets(containing: str, page: Path = README) -> list[str]:
    """The ```python blocks of the README or a docs page (dedented, as inside list items) that contain
    ``containing``."""
    import re
    import textwrap

    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", page.read_text(), flags=re.S | re.M)
    return [textwrap.dedent(code) for _, code in blocks if containing in code]


@pytest.mark.parametrize(("page", "marker"), [
    ("README.md", "clf = FewShotClassifier()"),
    ("docs/quickstart.md", "clf = FewShotClassifier()"),
    ("docs/register-predict.md", "clf = FewShotClassifier()"),
    ("docs/durability.md", "with FewShotClassifier.open("),
])
def test_readme_classifier_snippets_run_as_written(page, marker, tmp_path, photos, views_of):
    """The README's example and the docs' Python API and durability snippets, run in a folder holding the
    files they name."""
    (tmp_path / "photos" / "plate").mkdir(parents=True)
    for i, view in enumerate(views_of(photos["coffee"], 3, seed=0), start=1):
        view.save(tmp_path / f"mug{i}.jpg")
    for i, view in enumerate(views_of(photos["coins"], 2, seed=1), start=1):
        view.save(tmp_path / "photos" / "plate" / f"plate{i}.jpg")
        view.save(tmp_path / f"plate{i}.jpg")
    views_of(photos["coffee"], 1, seed=2)[0].save(tmp_path / "query.jpg")
    views_of(photos["coins"], 1, seed=3)[0].save(tmp_path / "other.png")
    (snippet,) = readme_snippets(marker, ROOT / page)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def exported(caltech_subset, tmp_path_factory):
    """A registry of 5 Caltech classes (3 photos each), its export, and queries: the other photos of those
    classes (known) and photos of 3 classes never registered (unknown)."""
    from fewshot import FewShotClassifier
    from fewshot.cli import main

    folders = sorted(caltech_subset.iterdir())
    root = tmp_path_factory.mktemp("exported")
    classifier = FewShotClassifier(cache=False)
    for folder in folders[:5]:
        classifier.register(folder.name, sorted(folder.iterdir())[:3])
    classifier.save(root / "shop.reg")
    assert main(["export", "--registry", str(root / "shop.reg"), "--out", str(root / "bundle")]) == 0
    known = [p for folder in folders[:5] for p in sorted(folder.iterdir())[3:]]
    unknown = [p for folder in folders[5:] for p in sorted(folder.iterdir())]
    return root, known, unknown


# Runs a script and writes its own peak RSS (VmHWM) to $FEWSHOT_PEAK_FILE at exit. The rusage of a child is no
# use here: its ru_maxrss starts from the forking test process's RSS, gigabytes late in a full run.
PEAK_LAUNCHER = """
import atexit, os, runpy, sys

def write_peak():
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(os.environ["FEWSHOT_PEAK_FILE"], "w") as out:
        out.write(str(kib * 1024))

atexit.register(write_peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_onnx_predict(*args) -> tuple[int, str, str, int]:
    """Run the example as a user would: exit status, stdout, stderr and its peak memory (RSS, bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak"
        done = subprocess.run([sys.executable, "-c", PEAK_LAUNCHER, str(EXAMPLES / "onnx_predict.py"),
                               *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, "FEWSHOT_PEAK_FILE": str(peak_file)})
        return done.returncode, done.stdout, done.stderr, int(peak_file.read_text())


def test_onnx_predict_answers_as_fewshot_predict_on_known_and_unknown_images(exported):
    """The same label or "unknown" as `fewshot predict`, from the registry's fitted thresholds, and the same
    top-1 similarity."""
    import json

    from fewshot import FewShotClassifier

    root, known, unknown = exported
    queries = known + unknown
    status, out, err, _ = run_onnx_predict(root / "bundle", *queries, "--json")
    assert status == 0, err
    exported_answers = json.loads(out)
    expected = FewShotClassifier.load(root / "shop.reg").predict(queries, top_k=3)
    assert sum(p.unknown for p in expected[len(known):]) >= len(unknown) // 2  # the test sees "unknown" answers
    assert [(a["label"], a["unknown"]) for a in exported_answers] == [(p.label, p.unknown) for p in expected]
    assert np.allclose([a["similarity"] for a in exported_answers], [p.similarity for p in expected], atol=1e-4)
    assert np.allclose([a["score"] for a in exported_answers], [p.score for p in expected], atol=0.02)
    # Neither torch nor fewshot's torch side: run it in a fresh interpreter and look.
    code = (f"import sys, runpy\nsys.argv = ['onnx_predict.py', {str(root / 'bundle')!r}, {str(queries[0])!r}]\n"
            f"try:\n    runpy.run_path({str(EXAMPLES / 'onnx_predict.py')!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('MODULES', 'torch' in sys.modules, sorted(m for m in sys.modules if m.startswith('fewshot')))")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip().splitlines()[-1] == (
        "MODULES False ['fewshot', 'fewshot.embedding', 'fewshot.embedding.images', 'fewshot.errors', 'fewshot.files', "
        "'fewshot.lazy']"
    ), probe.stderr  # fewshot.embedding: the stage's lazy __init__ (with fewshot.lazy), which imports nothing else


def test_onnx_predict_reads_only_what_bundle_json_lists(exported, tmp_path):
    """A stale head.onnx left in the folder is not applied; a file that is not the one listed is refused."""
    import json
    import shutil

    root, known, _ = exported
    bundle = tmp_path / "bundle"
    shutil.copytree(root / "bundle", bundle)
    shutil.copy(bundle / "encoder.onnx", bundle / "head.onnx")  # an earlier export's leftover
    status, out, err, _ = run_onnx_predict(bundle, known[0], "--json")
    assert status == 0, err
    _, reference, _, _ = run_onnx_predict(root / "bundle", known[0], "--json")
    assert json.loads(out) == json.loads(reference)
    thresholds = bundle / "thresholds.npy"
    thresholds.write_bytes(thresholds.read_bytes()[:-8] + np.float64(-1.0).tobytes())  # same size, other bytes
    status, out, err, _ = run_onnx_predict(bundle, known[0])
    assert status == 1 and out == ""
    assert "thresholds.npy" in err and "sha256" in err and err.count("\n") == 1


def test_onnx_predict_fails_per_image_with_bounded_memory(exported, tmp_path, corrupt_jpeg):
    """A 1 x 30000 strip is decoded under fewshot's rules (bounded work); a corrupt file fails alone."""
    import json

    from PIL import Image

    root, known, _ = exported
    strip = tmp_path / "strip.png"
    Image.new("L", (1, 30000), 128).save(strip, optimize=True)
    status, out, err, peak = run_onnx_predict(root / "bundle", known[0], strip, corrupt_jpeg, known[1], "--json")
    answers = json.loads(out)
    assert status == 1, err  # as `fewshot predict` with a failed image
    assert [a["input"] for a in answers] == [str(p) for p in (known[0], strip, corrupt_jpeg, known[1])]
    assert [a["error"] is None for a in answers] == [True, True, False, True]
    assert "truncated or corrupt" in answers[2]["error"] and answers[3]["similarity"] is not None  # answered
    assert peak < 1.5e9, f"peak memory {peak / 1e9:.2f} GB"
