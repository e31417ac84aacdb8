"""fewshot adapt: budget parsing, the domain checks, the search (real encoder, real Caltech photos), the saved
model and its unknown prior, the CLI with its errors and Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fewshot import FewShotClassifier, load_dataset, load_head
from fewshot.cli import main
from fewshot.learning.adapt import adapt, format_report, parse_budget, plot_report
from fewshot.learning.adapt.domain import check_domain
from fewshot.registry.calibration import CROSS_CLASS_QUANTILE, PRIOR_KEY


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_budget_reads_durations_and_refuses_nonsense():
    assert parse_budget("10m") == 600 and parse_budget("90s") == 90 and parse_budget("1.5h") == 5400
    assert parse_budget("45") == 45 and parse_budget(30) == 30
    for bad in ("", "ten minutes", "-5m", "0s", "10d", "99999h"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)


def test_too_few_classes_is_refused_and_single_images_are_dropped(tmp_path, caltech_subset):
    few = tmp_path / "few"
    for name in sorted(os.listdir(caltech_subset))[:3]:
        shutil.copytree(caltech_subset / name, few / name)
    with pytest.raises(ValueError, match="at least 4"):
        check_domain(load_dataset(few))
    lonely = tmp_path / "lonely"
    shutil.copytree(caltech_subset, lonely)
    single = sorted(lonely.iterdir())[0]
    for extra in sorted(single.iterdir())[1:]:
        extra.unlink()
    with pytest.warns(RuntimeWarning, match="fewer than 2 images"):
        kept = check_domain(load_dataset(lonely))
    assert single.name not in kept.classes and len(kept.classes) == len(os.listdir(caltech_subset)) - 1


@pytest.fixture(scope="module")
def adapted(caltech_subset):
    """One short adapt run on 8 Caltech classes (4 to learn from, 4 to validate on)."""
    return adapt(caltech_subset, budget="40s", seed=3, progress=False, episodes=100)


def test_adapt_tries_candidates_and_never_chooses_a_loser(adapted):
    frozen = adapted.candidates[0]
    assert frozen.phase == "baseline" and frozen.score is not None
    assert {c.phase for c in adapted.candidates} >= {"baseline", "features"}
    assert all(c.status in ("tried", "skipped", "failed") for c in adapted.candidates)
    assert all(c.note for c in adapted.candidates if c.status != "tried")  # each skip and failure says why
    chosen = next(c for c in adapted.candidates if c.name == adapted.chosen)
    if chosen is not frozen:  # a winner beats the frozen default beyond noise on the same episodes
        gain, ci = chosen.score.gain_over(frozen.score)
        assert gain - ci > 0
    assert adapted.seconds < 40 + 30  # the budget, plus the last candidate's scoring and the prior
    assert adapted.domain["train_classes"] == 4 and adapted.domain["val_classes"] == 4


def test_adapt_is_replayed_exactly_by_its_seed(adapted, caltech_subset):
    again = adapt(caltech_subset, budget="40s", seed=3, progress=False, episodes=100)
    assert np.array_equal(again.frozen.score.accuracy[1], adapted.frozen.score.accuracy[1])


def test_report_lists_every_candidate_and_plots(adapted, tmp_path):
    text = format_report(adapted)
    for c in adapted.candidates:
        assert c.name in text
    assert f"chosen: {adapted.chosen}" in text
    png = plot_report(adapted, tmp_path / "r.png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(json.dumps(adapted.to_dict()))["chosen"] == adapted.chosen


def test_the_model_carries_the_domain_prior_into_registries(adapted, tmp_path, caltech_subset):
    prior = adapted.model.metadata["unknown_prior"]
    assert len(prior) == len(CROSS_CLASS_QUANTILE) and prior != [list(r) for r in CROSS_CLASS_QUANTILE]
    assert [t for t, _ in prior] == [t for t, _ in CROSS_CLASS_QUANTILE]
    assert all(a[1] >= b[1] for a, b in zip(prior, prior[1:]))  # a higher target never raises the threshold
    from fewshot import save_head

    save_head(adapted.model, tmp_path / "model")
    model = load_head(tmp_path / "model")
    clf = FewShotClassifier(head=model)
    classes = sorted(p for p in Path(caltech_subset).iterdir())[:3]
    for folder in classes:  # a 1-shot registry: its threshold comes from the prior
        clf.register(folder.name, [sorted(folder.iterdir())[0]])
    clf.save(tmp_path / "reg")
    assert FewShotClassifier.load(tmp_path / "reg").registry_.metadata[PRIOR_KEY] == prior
    photo_prior = FewShotClassifier()
    for folder in classes:
        photo_prior.register(folder.name, [sorted(folder.iterdir())[0]])
    assert clf.calibration_.method == "cross-class"
    if adapted.model.metadata["encoder"] == photo_prior.encoder_.fingerprint and model.name == "identity" \
            and not model.center:  # the same features: only the prior differs
        assert clf.calibration_.one_shot_threshold != photo_prior.calibration_.one_shot_threshold


def test_cli_adapt_saves_a_model_that_predict_uses(tmp_path, capsys, caltech_subset):
    out = tmp_path / "model"
    code, stdout, err = run(capsys, "adapt", "--data", caltech_subset, "--out", out, "--budget", "25s", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["chosen"] and (out / "config.json").is_file() and (out / "adapt-report.png").is_file()
    assert load_head(out).metadata["adapt"]["chosen"] == summary["chosen"]
    folder = sorted(Path(caltech_subset).iterdir())[0]
    images = sorted(folder.iterdir())
    assert run(capsys, "register", tmp_path / "reg", "--head", out, "--class", folder.name, *images[:2])[0] == 0
    code, stdout, err = run(capsys, "predict", tmp_path / "reg", images[2], "--json")
    assert code == 0, err
    assert json.loads(stdout)[0]["label"] in (folder.name, None)
    code, _, err = run(capsys, "export", "--head", out, "--out", tmp_path / "bundle")
    assert code == 0 and (tmp_path / "bundle" / "encoder.onnx").is_file(), err
    code, _, err = run(capsys, "adapt", "--data", caltech_subset, "--out", out, "--budget", "25s")
    assert code != 0 and "--force" in err  # never replaces a model silently


def test_cli_adapt_bad_inputs_say_what_to_do_and_write_nothing(tmp_path, capsys, caltech_subset):
    few = tmp_path / "few"
    for name in sorted(os.listdir(caltech_subset))[:2]:
        shutil.copytree(caltech_subset / name, few / name)
    code, _, err = run(capsys, "adapt", "--data", few, "--out", tmp_path / "a")
    assert code != 0 and "at least 4" in err and not (tmp_path / "a").exists()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    code, _, err = run(capsys, "adapt", "--data", caltech_subset, "--unlabeled", junk, "--out", tmp_path / "b")
    assert code != 0 and "no image files" in err and not (tmp_path / "b").exists()
    code, _, err = run(capsys, "adapt", "--data", caltech_subset, "--out", tmp_path / "c", "--budget", "1s")
    assert code != 0 and "too short" in err and "--budget" in err and not (tmp_path / "c").exists()
    code, _, err = run(capsys, "adapt", "--data", caltech_subset, "--out", tmp_path / "d", "--budget", "soon")
    assert code != 0 and "budget" in err and not (tmp_path / "d").exists()


def test_ctrl_c_keeps_the_best_complete_candidate(tmp_path, caltech_subset):
    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-m", "fewshot", "adapt", "--data", str(caltech_subset), "--out",
                             str(out), "--budget", "5m"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "Lite0 final layer, centred" not in seen:  # the frozen default and a first candidate are complete
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    proc.send_signal(signal.SIGINT)
    stdout, rest = proc.communicate(timeout=120)
    assert proc.returncode == 0, seen + rest
    assert "interrupted" in stdout and (out / "config.json").is_file()
    assert load_head(out).metadata["adapt"]["interrupted"] is True


def test_ctrl_c_before_the_baseline_writes_nothing(tmp_path, caltech_subset):
    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-m", "fewshot", "adapt", "--data", str(caltech_subset), "--out",
                             str(out), "--budget", "5m", "--no-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    while "embedding" not in line:  # the frozen default is being embedded: nothing is scored yet
        assert line, "adapt ended before embedding"
        line = proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and not out.exists()
