"""The fewshot command: thin over the API, clear one-line errors, documented exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fewshot.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def reg(tmp_path, capsys, photos):
    path = tmp_path / "shop.reg"
    for label in ["chelsea", "coffee", "rocket"]:
        code, out, _ = run(capsys, "register", path, "--class", label, photos[label])
        assert code == 0 and f"{label}: +1 image(s), 1 in total" in out
    return path


def test_register_creates_then_extends(reg, capsys, photos):
    code, out, _ = run(capsys, "register", reg, "--class", "coffee", photos["coffee"], photos["coins"])
    assert code == 0 and "coffee: +2 image(s), 3 in total" in out
    code, out, _ = run(capsys, "classes", reg, "--json")
    assert json.loads(out) == [{"label": "chelsea", "count": 1}, {"label": "coffee", "count": 3},
                               {"label": "rocket", "count": 1}]


def test_predict_json_schema(reg, capsys, photos, corrupt_jpeg):
    code, out, _ = run(capsys, "predict", reg, photos["chelsea"], corrupt_jpeg, "--top-k", "2", "--json")
    assert code == 1  # one input failed; the others are still answered
    results = json.loads(out)
    assert [set(r) for r in results] == [{"input", "label", "score", "similarity", "unknown", "top_k", "error"}] * 2
    good, bad = results
    assert good["label"] == "chelsea" and good["error"] is None and len(good["top_k"]) == 2
    assert good["unknown"] is False and good["similarity"] == pytest.approx(1.0, abs=1e-5)  # the registered photo
    assert set(good["top_k"][0]) == {"label", "score", "similarity"} and good["top_k"][0]["score"] == good["score"]
    assert bad["label"] is None and "broken.jpg" in bad["error"]


def test_predict_plain_text_and_threshold(reg, capsys, photos):
    code, out, _ = run(capsys, "predict", reg, photos["rocket"])
    assert code == 0 and out.split("\t")[1] == "rocket"
    code, out, _ = run(capsys, "predict", reg, photos["rocket"], "--threshold", "1.01")
    assert code == 0 and out.split("\t")[1] == "unknown"


def test_register_folder(tmp_path, capsys, photos):
    for label in ["coffee", "coins"]:
        (tmp_path / "data" / label).mkdir(parents=True)
        (tmp_path / "data" / label / photos[label].name).write_bytes(photos[label].read_bytes())
    code, out, _ = run(capsys, "register", tmp_path / "r", "--folder", tmp_path / "data")
    assert code == 0 and "saved" in out
    assert run(capsys, "classes", tmp_path / "r")[1].split() == ["coffee", "1", "coins", "1"]


def test_remove_and_rename_persist(reg, capsys):
    assert run(capsys, "rename", reg, "chelsea", "cat")[0] == 0
    assert run(capsys, "remove", reg, "--class", "rocket")[0] == 0
    assert run(capsys, "classes", reg)[1].split() == ["cat", "1", "coffee", "1"]
    code, _, err = run(capsys, "remove", reg, "--class", "rocket")
    assert code == 1 and "rocket" in err


def test_usage_errors_exit_2(tmp_path, capsys, photos):
    assert run(capsys, "register", tmp_path / "r", photos["coffee"])[0] == 2  # neither --class nor --folder
    assert run(capsys, "predict", tmp_path / "r", photos["coffee"], "--top-k", "0")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2


def test_runtime_errors_are_one_line_without_traceback(tmp_path, capsys, photos):
    code, out, err = run(capsys, "predict", tmp_path / "missing.reg", photos["coffee"])
    assert code == 1 and err.startswith("fewshot: error: no registry at") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_other_encoder_is_refused(reg, capsys, photos):
    code, _, err = run(capsys, "predict", reg, photos["coffee"], "--encoder", "tf_efficientnet_lite0",
                       "--weights", "/nonexistent.safetensors")
    assert code == 1 and "weights" in err


def test_console_script_runs_and_debug_shows_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "fewshot", "--debug", "classes", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "Traceback" in done.stderr
    done = subprocess.run([sys.executable, "-m", "fewshot", "info"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "efficientnet_lite0" in done.stdout and "torch threads" in done.stdout


def test_evaluate_open_set_protocol_reports_metrics_and_plots(tmp_path, capsys, caltech_subset):
    protocol = tmp_path / "open.toml"
    protocol.write_text('# open set on the test subset\nname = "open"\ndescription = "open set"\nways = 3\n'
                        'shots = 2\nqueries = 3\nunknown_ways = 3\nepisodes = 20\n')
    out = tmp_path / "result"
    code, text, _ = run(capsys, "evaluate", "--data", caltech_subset, "--protocol", protocol, "--out", out, "--json")
    assert code == 0
    result = json.loads(text)
    assert result["open_set"] is True and result["unknown_ways"] == 3 and result["episodes"] == 20
    assert {"auroc", "fpr_at_95tpr", "precision_at_90recall", "closed_set_accuracy", "open_set_accuracy",
            "expected_calibration_error"} <= set(result)
    assert set(result["auroc"]) == {"mean", "ci95"}
    assert json.loads((out / "result.json").read_text()) == result
    assert (out / "roc.png").stat().st_size > 0 and (out / "reliability.png").stat().st_size > 0
    code, _, err = run(capsys, "evaluate", "--data", caltech_subset, "--protocol", protocol, "--replay", "x.json")
    assert code == 2 and "replays exactly from its seed" in err
