"""`fewshot demo` runs offline on bundled images and on a user's folder."""

from __future__ import annotations

from PIL import Image

from fewshot import FewShotClassifier
from fewshot.cli import main


def test_demo_on_bundled_images(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    digits, photos = (line for line in out.splitlines() if "accuracy" in line)
    assert float(digits.split("accuracy ")[1].split("%")[0]) > 40  # 10-way 5-shot, chance is 10%
    assert float(photos.split("accuracy ")[1].split("%")[0]) >= 90  # one-shot instances
    with Image.open(tmp_path / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 500
    assert len(FewShotClassifier.load(tmp_path / "registry").classes) == 10
    assert len(FewShotClassifier.load(tmp_path / "photos-registry").classes) == 12


def test_demo_on_a_users_folder(tmp_path, capsys, caltech_subset):
    assert main(["demo", "--data", str(caltech_subset), "--shots", "1", "--out", str(tmp_path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "accuracy" in line)
    assert line.startswith("your folder: 1-shot, 8 classes") and (tmp_path / "contact_sheet.png").is_file()


def test_demo_shows_progress_on_a_terminal(tmp_path, caltech_subset, run_on_a_terminal):
    code, out, terminal = run_on_a_terminal("demo", "--data", caltech_subset, "--shots", "1", "--out", tmp_path)
    assert code == 0 and "accuracy" in out
    assert "registering" in terminal and "predicting" in terminal


def test_contact_sheet_names_the_true_class_of_wrong_answers_and_says_what_is_left_out(tmp_path, photos):
    from fewshot.demo import caption, contact_sheet, sheet_title

    assert caption("cat", "cat") == "cat"
    assert "cat" in caption("dog", "cat") and "dog" in caption("dog", "cat")
    assert "unknown" in caption(None, "cat") and "cat" in caption(None, "cat")
    assert "12 of 40" in sheet_title(shown=12, total=40) and "of" not in sheet_title(shown=12, total=12)
    sheet = contact_sheet([(photos["coffee"], "rocket", "coffee"), (photos["rocket"], "rocket", "rocket")],
                          tmp_path / "sheet.png", total=5)
    with Image.open(sheet) as png:
        assert png.format == "PNG"
