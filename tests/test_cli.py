"""The fewshot command: thin over the API, clear one-line errors, documented exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    code, out, err = run(capsys, "register", reg, "--class", "coffee", photos["coffee"], photos["coins"])
    # the coffee photo is registered already: skipped and said (one line), so the count is not doubled
    assert code == 0 and "coffee: +1 image(s), 2 in total" in out
    assert err.splitlines() == [f"fewshot: warning: skipped {str(photos['coffee'])!r}: the same image (sha256 "
                                f"{err.split('sha256 ')[1][:12]}) is already registered in class 'coffee'"]
    code, out, _ = run(capsys, "classes", reg, "--json")
    assert json.loads(out) == [{"label": "chelsea", "count": 1}, {"label": "coffee", "count": 2},
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
    code, out, _ = run(capsys, "predict", reg, photos["astronaut"], "--threshold", "1")  # nothing is that sure
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
    assert done.returncode == 0 and "efficientnet_lite0" in done.stdout and "cpu cores usable" in done.stdout


def test_classes_lists_from_the_manifest_without_reading_prototypes(tmp_path, capsys):
    """`fewshot classes` on a big registry must not load every prototype: it works with the data
    files unreadable, and lists exactly what was saved."""
    import numpy as np

    from fewshot.registry import Registry

    reg = Registry(8)
    reg.add_many([f"c{i}" for i in range(5)], np.eye(5, 8, dtype=np.float32))
    reg.save(tmp_path / "r")
    for data in (tmp_path / "r").glob("*-0*.*"):
        data.write_bytes(b"garbage")
    assert main(["classes", str(tmp_path / "r"), "--json"]) == 0
    assert [row["label"] for row in json.loads(capsys.readouterr().out)] == [f"c{i}" for i in range(5)]


def test_text_output_escapes_control_characters_and_marks_a_class_named_unknown(tmp_path, capsys, photos):
    reg = tmp_path / "r"
    hostile = "cat\nfake-class\t99\x1b]0;pwned\x07"
    for label, photo in [(hostile, "chelsea"), ("unknown", "coffee")]:
        assert run(capsys, "register", reg, "--class", label, photos[photo])[0] == 0
    code, out, _ = run(capsys, "classes", reg)
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert out.splitlines() == ['"cat\\nfake-class\\t99\\x1b]0;pwned\\x07"\t1', '"unknown"\t1']
    code, out, _ = run(capsys, "predict", reg, photos["astronaut"], "--threshold", "1")
    fields = out.splitlines()[0].split("\t")
    assert fields[1] == "unknown" and '"unknown" ' in fields[-1]  # the answer vs the class of that name
    code, out, _ = run(capsys, "predict", reg, photos["coffee"])
    assert code == 0 and out.split("\t")[1] == '"unknown"' and "\x1b" not in out
    assert run(capsys, "classes", reg, "--json")[1].count("\\u001b") == 1  # JSON keeps the exact label


def test_classes_into_a_closed_pipe_exits_quietly(tmp_path):
    from fewshot.registry import Registry

    reg = Registry(4)
    reg.add_many([f"class {i}" for i in range(20000)], np.ones((20000, 4), np.float32))
    reg.save(tmp_path / "big.reg")
    proc = subprocess.Popen([sys.executable, "-m", "fewshot", "classes", str(tmp_path / "big.reg")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"class 0\t1\n"
    proc.stdout.close()  # what `| head -1` does
    assert proc.wait(timeout=60) == 0 and proc.stderr.read() == b""


def test_train_head_refuses_to_replace_a_head_without_force(tmp_path, capsys):
    out = tmp_path / "heads" / "mine"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    code, _, err = run(capsys, "train-head", "--data", tmp_path / "nodata", "--head", "protonet", "--out", out)
    assert code == 2 and "--force" in err and (out / "config.json").read_text() == "{}"


def test_errors_name_cli_options_not_python_calls(reg, tmp_path, capsys, photos):
    not_a_registry = tmp_path / "afile.txt"
    not_a_registry.write_text("hello")
    code, _, err = run(capsys, "predict", not_a_registry, photos["coffee"])
    assert code == 1 and "not a registry" in err and "fewshot register" not in err
    code, _, err = run(capsys, "register", reg, "--class", "", photos["coffee"])
    assert code != 0 and "label" in err and "--folder" not in err
    code, _, err = run(capsys, "remove", reg, "--class", "nope")
    assert code == 1 and f"fewshot classes {reg}" in err and "Registry." not in err
    for label in ["chelsea", "coffee", "rocket"]:
        assert run(capsys, "remove", reg, "--class", label)[0] == 0
    code, _, err = run(capsys, "predict", reg, photos["coffee"])
    assert code == 1 and f"fewshot register {reg} --class" in err and "register(" not in err


def test_registry_whose_weights_are_gone_names_the_option(tmp_path, capsys, photos, encoder):
    from safetensors.torch import save_file

    weights = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, weights)
    reg = tmp_path / "r"
    assert run(capsys, "register", reg, "--class", "coffee", photos["coffee"], "--encoder", "tf_efficientnet_lite0",
               "--weights", weights)[0] == 0
    weights.unlink()
    code, _, err = run(capsys, "predict", reg, photos["coffee"])
    assert code == 1 and "--weights FILE" in err and "weights=" not in err


def test_dataset_errors_say_what_is_missing(tmp_path, capsys):
    repo = Path(__file__).resolve().parents[1]
    code, _, err = run(capsys, "evaluate", "--data", tmp_path, "--protocol", repo / "episodes" / "omniglot-runs.toml")
    assert code == 1 and str(tmp_path / "omniglot" / "runs") in err
    for label in ["a", "b", "c"]:
        (tmp_path / "junk" / label).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "junk" / label / f"{i}.png").write_bytes(b"not a png")
    protocol = tmp_path / "p.toml"
    protocol.write_text("ways = 2\nshots = 1\nqueries = 1\nepisodes = 2\n")
    code, _, err = run(capsys, "evaluate", "--data", tmp_path / "junk", "--protocol", protocol)
    assert code == 1 and "none of the 6 images" in err and "1-D" not in err


def test_within_group_on_a_flat_dataset_names_the_option(caltech_subset, tmp_path, capsys):
    code, _, err = run(capsys, "train-head", "--data", caltech_subset, "--head", "protonet", "--within-group",
                       "--out", tmp_path / "h")
    assert code == 1 and "--within-group" in err and "val_groups" not in err


def test_options_that_would_be_ignored_are_refused(reg, tmp_path, capsys, photos):
    code, _, err = run(capsys, "predict", reg, photos["coffee"], "--stages", "2")
    assert code == 2 and "--stages" in err
    for option in (["--metric", "l2"], ["--index", "HNSW32"], ["--no-store-examples"]):
        code, _, err = run(capsys, "register", reg, "--class", "coffee", photos["coffee"], *option)
        assert code == 2 and option[0].replace("--no-", "--") in err
    assert run(capsys, "register", reg, "--class", "coffee", photos["coffee"], "--metric", "cosine")[0] == 0
    for threshold in ["nan", "inf", "-inf"]:
        code, _, err = run(capsys, "predict", reg, photos["coffee"], "--threshold", threshold)
        assert code == 2 and "--threshold" in err
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "predict", reg, tmp_path / "empty", photos["coffee"])
    assert code == 1 and "no images" in err and str(tmp_path / "empty") in err and "coffee" in out


def test_register_folder_follows_what_class_follows_and_says_what_it_skips(tmp_path, photos, views_of):
    data = tmp_path / "data"
    (data / "rocket").mkdir(parents=True)
    (data / "rocket" / "r.jfif").write_bytes(photos["rocket"].read_bytes())  # a JPEG by another name
    (tmp_path / "elsewhere").mkdir()
    views_of(photos["rocket"], 1, seed=4)[0].save(tmp_path / "elsewhere" / "r2.jpg")  # another photo of it
    (data / "rocket" / "linked").symlink_to(tmp_path / "elsewhere")
    (data / "coffee").mkdir()
    (data / "coffee" / "c.png").write_bytes(photos["coffee"].read_bytes())
    (data / "stray.png").write_bytes(photos["chelsea"].read_bytes())
    done = subprocess.run([sys.executable, "-m", "fewshot", "register", str(tmp_path / "r"), "--folder", str(data)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "rocket: +2 image(s)" in done.stdout and "coffee: +1 image(s)" in done.stdout
    assert done.stderr.splitlines() == [line for line in done.stderr.splitlines() if line.startswith("fewshot: ")]
    assert "stray.png" in done.stderr and "warnings.warn" not in done.stderr


def test_protocol_errors_name_the_protocol_and_key(tmp_path, capsys, omniglot_small):
    protocol = tmp_path / "my-split.toml"
    protocol.write_text('ways = 2\n[split]\nby = "class"\ntest = ["nope", "nada"]\n')
    code, _, err = run(capsys, "evaluate", "--data", omniglot_small, "--protocol", protocol)
    assert code == 1 and "my-split" in err and "split.test" in err and "'nope'" in err
    protocol.write_text("ways = 5000\n")
    code, _, err = run(capsys, "evaluate", "--data", omniglot_small, "--protocol", protocol, "--stages", "2",
                       "--pool", "2", "--input-size", "64")
    assert code == 1 and "my-split" in err and "ways" in err


def test_doctor_exit_status_text_and_json(reg, capsys, photos):
    code, out, _ = run(capsys, "doctor", reg)
    assert code == 0 and out.strip().endswith("0 finding(s) in 3 classes")
    code, _, err = run(capsys, "register", reg, "--class", "cat", photos["chelsea"])
    assert code == 0 and "near-duplicates" in err and "is in classes 'chelsea', 'cat'" in err
    assert all(line.startswith("fewshot: warning: ") for line in err.splitlines())
    code, out, _ = run(capsys, "doctor", reg)
    assert code == 1 and out.splitlines()[-1].startswith("2 finding(s) in 4 classes")
    code, out, _ = run(capsys, "doctor", reg, "--json")
    report = json.loads(out)
    assert code == 1 and report["classes"] == 4 and report["stores_examples"] is True
    assert [(f["kind"], f["classes"]) for f in report["findings"]] == [
        ("near_duplicate_classes", ["chelsea", "cat"]), ("duplicate_image", ["chelsea", "cat"])]
    assert report["findings"][1]["source"] == str(photos["chelsea"]) and len(report["findings"][1]["digest"]) == 64


def test_predict_explain(tmp_path, capsys, photos, views_of):
    path = tmp_path / "ex.reg"
    for label in ["chelsea", "rocket"]:
        code, _, _ = run(capsys, "register", path, "--store-examples", "--class", label, photos[label])
        assert code == 0
    query = tmp_path / "query.png"
    views_of(photos["rocket"], 1, seed=3)[0].save(query)
    code, out, _ = run(capsys, "predict", path, query, "--explain", "--json", "--neighbours", "1")
    (result,) = json.loads(out)
    assert code == 0 and [n["source"] for n in result["neighbours"]] == [str(photos["rocket"])]
    code, out, _ = run(capsys, "predict", path, query, "--explain")
    assert code == 0 and out.splitlines()[1].startswith("\tnear 'rocket' ") and str(photos["rocket"]) in out


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


def test_evaluate_own_folder_sweeps_shots_without_a_protocol(tmp_path, capsys, caltech_subset):
    out = tmp_path / "sweep"
    argv = ["evaluate", "--data", caltech_subset, "--ways", 3, "--shots", "1,2,10", "--queries", 2,
            "--unknown-ways", 2, "--episodes", 12, "--seed", 3, "--out", out]
    code, text, _ = run(capsys, *argv, "--json")
    assert code == 0
    result = json.loads(text)
    assert [r["shots"] for r in result["rows"]] == [1, 2] and "10" in result["skipped"]
    assert result["ways"] == 3 and result["unknown_ways"] == 2 and result["episodes"] == 12 and result["seed"] == 3
    assert {"accuracy", "ci95", "auroc", "known_kept", "unknown_accepted"} <= set(result["rows"][0])
    assert json.loads((out / "shots.json").read_text()) == result
    assert (out / "shots.png").stat().st_size > 0
    code, table, _ = run(capsys, *argv, "--force")  # the same --out again: its results are replaced
    assert code == 0 and "3-way, 2 queries per class, 12 episodes per row, seed 3" in table
    assert "10-shot left out: only 0 classes have 12+ images" in table and f"wrote {out / 'shots.json'}" in table


def test_evaluate_own_folder_errors_say_what_to_change(tmp_path, capsys, caltech_subset):
    code, _, err = run(capsys, "evaluate", "--data", caltech_subset, "--shots", "1,x")
    assert code == 2 and "positive integers separated by commas" in err
    code, _, err = run(capsys, "evaluate", "--data", caltech_subset, "--shots", "8", "--queries", "1")
    assert code == 1 and "lower --queries or add images" in err
    protocol = tmp_path / "p.toml"
    protocol.write_text('name = "p"\nways = 3\nshots = 1\nqueries = 1\nepisodes = 5\n')
    code, _, err = run(capsys, "evaluate", "--data", caltech_subset, "--protocol", protocol, "--shots", "1,5")
    assert code == 2 and "--shots set the episodes of a folder sweep" in err


def test_register_support_views_flip_is_kept_by_the_registry_for_later_registers(tmp_path, capsys, photos):
    from fewshot import FewShotClassifier
    from fewshot.cli import SUPPORT_VIEWS_CHOICES
    from fewshot.embedding.views import SUPPORT_VIEWS

    assert SUPPORT_VIEWS_CHOICES == SUPPORT_VIEWS
    reg = tmp_path / "r"
    code, out, _ = run(capsys, "register", reg, "--class", "cat", photos["chelsea"], "--support-views", "flip")
    assert code == 0 and "+1 image(s), 1 in total" in out  # the mirror is averaged in, not counted
    code, out, _ = run(capsys, "register", reg, "--class", "cup", photos["coffee"])  # no flag: the registry's
    loaded = FewShotClassifier.load(reg)
    assert code == 0 and loaded.support_views == "flip" and loaded.counts == {"cat": 1, "cup": 1}
    plain = FewShotClassifier(loaded.encoder_, cache=False)
    plain.register("cup", photos["coffee"])
    assert not np.allclose(loaded.registry_.examples("cup"), plain.registry_.examples("cup"), atol=1e-3)
    assert run(capsys, "evaluate", "--runs", tmp_path, "--support-views", "flip")[0] == 2
    assert run(capsys, "register", reg, "--from-embeddings", tmp_path / "emb", "--support-views", "flip")[0] == 2


def test_a_failed_first_register_leaves_no_registry_folder_behind(tmp_path, capsys, photos):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a photo")
    (tmp_path / "empty").mkdir()
    reg = tmp_path / "new" / "shop.reg"
    for argv in (["--class", "cat", tmp_path / "typo.jpg"], ["--class", "cat", not_an_image],
                 ["--folder", tmp_path / "empty"]):
        code, out, err = run(capsys, "register", reg, *argv)
        assert code == 1 and err and "saved" not in out
        assert not (tmp_path / "new").exists(), sorted(p.name for p in reg.iterdir())
    code, _, err = run(capsys, "classes", reg)
    assert code == 1 and "no registry at" in err and "create one with `fewshot register" in err
    code, out, _ = run(capsys, "register", reg, "--class", "cat", photos["chelsea"])
    assert code == 0 and f"saved {reg} (1 classes)" in out


def test_paths_with_terminal_escapes_are_printed_escaped(tmp_path, capsys, photos):
    hostile = tmp_path / "evil\x1b[31m\rname.jpg"  # ESC turns the terminal red, CR rewrites the line
    hostile.write_text("not a photo")
    reg = tmp_path / "reg"
    for paths in ([photos["chelsea"], hostile], [hostile]):  # one bad file among good ones, then alone
        code, out, err = run(capsys, "register", reg, "--class", "cat", *paths)
        assert code == 1 and "evil\\x1b[31m" in err and "name.jpg" in err, err
        assert "\x1b" not in out + err and "\r" not in out + err


def test_bad_target_tpr_is_a_usage_error_in_one_line(tmp_path, capsys):
    for argv in (["calibrate", tmp_path / "r", "--target-tpr", "1.5"],
                 ["evaluate", "--data", tmp_path, "--target-tpr", "nan"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "--target-tpr" in err and "[0.5, 1)" in err and len(err.strip().splitlines()) == 1


def test_option_typos_get_a_suggestion_and_abbreviations_are_refused(tmp_path, capsys):
    from fewshot.cli import build_parser

    code, _, err = run(capsys, "predict", tmp_path / "r", "x.jpg", "--thresh", "0.5")
    assert code == 2 and err.strip().endswith("(did you mean --threshold?)") and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "predict", tmp_path / "r", "x.jpg", "--top", "2")  # once taken for --top-k
    assert code == 2 and "did you mean --top-k?" in err
    parser = build_parser()
    assert parser.allow_abbrev is False and all(p.allow_abbrev is False for p in parser.commands.values())


def test_another_encoder_name_is_refused_before_it_is_created_naming_its_input_size(reg, capsys, photos):
    code, _, err = run(capsys, "predict", reg, photos["coffee"], "--encoder", "efficientnet_lite1")
    assert code == 1 and "not efficientnet_lite1 (240 px)" in err and "efficientnet_lite0 (weights" in err
    code, _, err = run(capsys, "predict", reg, photos["coffee"], "--encoder", "resnet18")  # not offline: no download
    assert code == 1 and "not resnet18 (224 px)" in err and "download" not in err


def test_an_unknown_answer_shows_its_similarity_against_the_threshold_not_a_probability(reg, capsys, photos):
    code, out, _ = run(capsys, "predict", reg, photos["astronaut"], "--threshold", "0.9", "--json")
    (answer,) = json.loads(out)
    assert answer["unknown"] is True and answer["label"] is None  # --json keeps its shape
    code, out, _ = run(capsys, "predict", reg, photos["astronaut"], "--threshold", "0.9")
    fields = out.rstrip("\n").split("\t")
    nearest = answer["top_k"][0]["label"]
    assert code == 0 and fields[1] == "unknown"
    assert fields[2] == f"(nearest: {nearest}, similarity {answer['similarity']:.3f} < 0.900)"
    assert f"{answer['score']:.3f}" not in fields[2]


def test_calibrate_says_what_it_saved_where(reg, capsys):
    code, out, _ = run(capsys, "calibrate", reg, "--target-tpr", "0.9")
    assert code == 0 and out.splitlines()[-1] == f"saved the thresholds and temperature in {reg} (predict uses " \
                                                 "them from now on)"


def test_evaluate_keeps_earlier_results_and_says_where_new_ones_went(tmp_path, capsys, caltech_subset, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", "--data", caltech_subset, "--ways", 3, "--shots", 1, "--queries", 2, "--episodes", 3]
    first = Path("evaluation") / caltech_subset.name / "shots" / "raw"  # the default, in the working folder
    assert run(capsys, *argv)[0] == 0
    before = (first / "shots.json").read_text()
    code, out, _ = run(capsys, *argv, "--seed", 1)
    assert code == 0 and f"wrote {first.parent / 'raw-2' / 'shots.json'}" in out
    assert (first / "shots.json").read_text() == before  # the first run's results are still there
    code, _, err = run(capsys, *argv, "--out", first)
    assert code == 2 and "--force" in err and (first / "shots.json").read_text() == before
    code, _, err = run(capsys, *argv, "--seed", 2, "--out", first, "--force", "--json")
    assert code == 0 and f"wrote {first / 'shots.json'}" in err and json.loads((first / "shots.json").read_text())[
        "seed"] == 2


def test_one_class_folder_error_gives_advice_that_applies(tmp_path, capsys, photos, views_of):
    (tmp_path / "one" / "cat").mkdir(parents=True)
    for i, view in enumerate(views_of(photos["chelsea"], 6, seed=1)):
        view.save(tmp_path / "one" / "cat" / f"{i}.png")
    code, _, err = run(capsys, "evaluate", "--data", tmp_path / "one", "--episodes", 2)
    assert code == 1 and "add class folders" in err
    assert "--unknown-ways" not in err and "unknown_ways" not in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_says_what_was_kept_and_how_to_go_on(tmp_path, capsys, photos, views_of):
    import fcntl
    import pty
    import re
    import signal
    import struct
    import termios

    reg = tmp_path / "r"
    assert run(capsys, "register", reg, "--class", "rocket", photos["rocket"])[0] == 0
    (tmp_path / "many").mkdir()
    for i, view in enumerate(views_of(photos["chelsea"], 90, seed=2)):  # a bar, and seconds of work to interrupt
        view.save(tmp_path / "many" / f"{i}.jpg")
    primary, secondary = pty.openpty()  # Ctrl-C is a terminal's: stderr on one, so the bar shows when work starts
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a sized one: tqdm draws
    proc = subprocess.Popen([sys.executable, "-m", "fewshot", "register", str(reg), "--class", "cat",
                             str(tmp_path / "many"), "--no-cache"], stdout=subprocess.PIPE, stderr=secondary)
    os.close(secondary)
    shown = b""
    while not re.search(rb"\| [1-9]\d*/90 ", shown):  # images embedded, others still to go
        chunk = os.read(primary, 65536)
        assert chunk, shown
        shown += chunk
    proc.send_signal(signal.SIGINT)
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the command has closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    assert proc.wait(timeout=60) == 130 and proc.stdout.read() == b""
    assert b"Traceback" not in shown
    assert shown.decode(errors="replace").rstrip().endswith(
        f"fewshot: interrupted: {reg} is as this command found it (1 class(es), 1 image(s)): a register is saved at "
        "its end: run the same command again")
    assert run(capsys, "classes", reg)[1].split() == ["rocket", "1"]


def test_training_that_diverges_ends_in_one_line_not_a_traceback(caltech_subset, tmp_path, capsys):
    code, _, err = run(capsys, "train-head", "--data", caltech_subset, "--head", "protonet", "--lr", "1e30",
                       "--ways", "3", "--episodes", "40", "--val-every", "20", "--out", tmp_path / "h")
    assert code == 1 and err.startswith("fewshot: error: training diverged") and "lower lr" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "h").exists()
