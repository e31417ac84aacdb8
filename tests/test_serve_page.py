"""The web page of ``fewshot serve`` in a real browser: Debian's headless Chromium driven by Playwright.

Adds two classes by uploading photos, recognises a third photo, renames and removes a class, shows a
server error in words, works from the keyboard and on a phone-sized screen, and saves screenshots
(``FEWSHOT_PAGE_SCREENSHOT=docs/serve-page.png`` also writes the README's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

from serve_server import start_server  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing; CI must install Debian's chromium (see .ci/run)")
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium to run the browser test")
    try:
        import playwright  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("Playwright for Python is not installed: pip install -e '.[test]'")
    return CHROMIUM


@pytest.fixture(scope="module")
def photo_files(photos, views_of, tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("page-photos")
    out = {}
    for label, source, seed in (("cat", "chelsea", 1), ("coffee", "coffee", 2)):
        out[label] = []
        for i, view in enumerate(views_of(photos[source], 4, seed=seed)):
            path = root / f"{label}-{i}.jpg"
            view.save(path, quality=90)
            out[label].append(path)
    (root / "notes.jpg").write_text("not a photo")
    out["text"] = [root / "notes.jpg"]
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, encoder, photos):
    from fewshot import FewShotClassifier

    registry = tmp_path_factory.mktemp("page") / "reg"
    with FewShotClassifier.open(registry, encoder=encoder, cache=False) as clf:
        clf.register("camera", [photos["camera"]])  # as the CLI registers: no thumbnail
    srv = start_server(registry)
    yield srv
    srv.stop()


@pytest.fixture
def page(chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(chromium), headless=True, args=FLAGS,
            viewport={"width": 1200, "height": 900})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        context.close()


def add_class(page, label: str, paths: list[Path]) -> None:
    page.fill("#add-label", label)
    page.set_input_files("#add-files", [str(p) for p in paths])
    page.click("#add-submit")
    page.wait_for_selector(f'li.class[data-label="{label}"]')


def bar_labels(page) -> list[str]:
    return [b.inner_text() for b in page.locator(".result .bar .label").all()]


def test_add_recognise_rename_remove_in_the_browser(page, server, photo_files, tmp_path):
    page.goto(server.url)
    page.wait_for_selector('li.class[data-label="camera"]')
    add_class(page, "cat", photo_files["cat"][:3])
    add_class(page, "coffee", photo_files["coffee"][:3])
    assert page.inner_text('li.class[data-label="cat"] .count') == "3 images"
    page.wait_for_function("document.querySelectorAll('li.class img[src^=\"blob:\"]').length === 2")  # thumbnails
    # The class registered without a thumbnail shows a placeholder, not a broken image.
    assert page.locator('li.class[data-label="camera"] .noimg').inner_text().upper() == "C"
    assert page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth === 0).length") == 0

    page.set_input_files("#predict-files", str(photo_files["cat"][3]))
    page.wait_for_selector(".result .answer")
    assert page.inner_text(".result .answer") == "cat"
    assert {"cat", "coffee"} <= set(bar_labels(page))

    row = page.locator('li.class[data-label="coffee"]')
    row.get_by_role("button", name="Rename").click()
    row.get_by_label("new name for coffee").fill("espresso")
    row.get_by_role("button", name="Save").click()
    page.wait_for_selector('li.class[data-label="espresso"]')
    page.wait_for_selector('.result .bar .label:text-is("espresso")')  # the result on screen follows
    assert "coffee" not in bar_labels(page) and page.inner_text(".result .answer") == "cat"
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if os.environ.get("FEWSHOT_PAGE_SCREENSHOT"):
        page.screenshot(path=os.environ["FEWSHOT_PAGE_SCREENSHOT"], full_page=True)

    remove = page.locator('li.class[data-label="espresso"]').get_by_role("button", name="Remove")
    remove.click()
    remove.click()  # the second press confirms
    page.wait_for_selector('li.class[data-label="espresso"]', state="detached")
    page.wait_for_selector('.result .bar .label:text-is("espresso")', state="detached")
    assert page.locator("li.class").count() == 2
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_an_unknown_answer_shows_no_class_probability(page, server, tmp_path):
    page.goto(server.url)
    page.wait_for_load_state("networkidle")
    page.evaluate("""() => document.getElementById("results").replaceChildren(resultCard(
        {input: "odd.jpg", label: null, unknown: true, score: 0.97, similarity: 0.31, error: null,
         top_k: [{label: "cat", score: 0.97, similarity: 0.31}, {label: "camera", score: 0.03, similarity: 0.12}]},
        new Blob(["x"], {type: "image/jpeg"})))""")
    card = page.locator(".result")
    assert card.locator(".answer").inner_text() == "Unknown: none of the classes"
    assert card.locator(".bar").count() == 0 and "%" not in card.inner_text()  # no 97% bar for "cat"
    assert card.locator(".nearest li").all_inner_texts() == ["cat: similarity 0.310", "camera: similarity 0.120"]
    card.screenshot(path=str(tmp_path / "unknown.png"))


def test_server_errors_are_shown_in_words(page, server, photo_files):
    page.goto(server.url)
    page.fill("#add-label", "notes")
    page.set_input_files("#add-files", str(photo_files["text"][0]))
    page.click("#add-submit")
    status = page.locator("#status")
    status.wait_for(state="visible")
    assert "none of the 1 images" in status.inner_text() and "not a recognised image" in status.inner_text()


def test_keyboard_and_phone_sized_screen(page, server, photo_files, tmp_path):
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(server.url)
    page.wait_for_load_state("networkidle")
    page.focus("#add-label")
    page.keyboard.type("mug")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "add-files"  # the drop zone's file input
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")  # opens the file picker from the keyboard
    chooser.value.set_files(str(photo_files["coffee"][0]))
    page.wait_for_selector("#add-pending img")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    recognise, classes = page.locator("#predict-panel").bounding_box(), page.locator("#class-list").bounding_box()
    assert recognise["y"] < classes["y"]  # Recognise comes before the class list, not below all of it
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
