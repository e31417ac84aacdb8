"""Tests of fewshot.embedding.images: every image is generated here with Pillow / numpy; no network."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.errors import ImageError
from fewshot.embedding.images import (
    IMAGE_EXTENSIONS,
    LoadResult,
    content_digest,
    decoded_size,
    describe,
    expand_inputs,
    load_image,
    load_images,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def opened_mode_and_frames(path: Path) -> tuple[str, int]:
    with Image.open(path) as img:
        return img.mode, getattr(img, "n_frames", 1)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def asymmetric(w: int = 6, h: int = 4) -> np.ndarray:
    """An RGB array whose every rotation / flip is distinguishable."""
    return np.arange(w * h * 3, dtype=np.uint8).reshape(h, w, 3) * 3


def jpeg_path(tmp_path: Path, size=(64, 48), name="photo.jpg") -> Path:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = RED
    arr[:, size[0] // 2 :] = BLUE
    return save(Image.fromarray(arr), tmp_path / name, quality=95)


# --- conversion rules -----------------------------------------------------------------------------


@pytest.mark.parametrize("orientation, turns", [(6, -1), (8, 1), (3, 2)])  # np.rot90: + is counter-clockwise
def test_exif_orientation_equals_physically_rotated(tmp_path, orientation, turns):
    stored = asymmetric()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(Image.fromarray(stored), tmp_path / "tagged.png", exif=exif)  # lossless: exact pixels
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.rot90(stored, turns))


def test_exif_orientation_on_a_jpeg_photo(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = RED  # left half red -> after rotating clockwise, the top half is red
    arr[:, 40:] = BLUE
    img = load_image(save(Image.fromarray(arr), tmp_path / "phone.jpg", exif=exif, quality=95))
    assert img.size == (40, 80)
    assert np.abs(pixels(img)[10, 20] - RED).max() < 16
    assert np.abs(pixels(img)[70, 20] - BLUE).max() < 16


def test_rgba_over_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(10, 20, 30, 0), (0, 255, 0, 255), (0, 0, 0, 128)])
    out = pixels(load_image(save(rgba, tmp_path / "a.png")))
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == GREEN
    assert np.abs(out[0, 2] - 127).max() <= 1


def test_la_over_white(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putdata([(40, 0), (40, 255)])
    out = pixels(load_image(save(la, tmp_path / "la.png")))
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == (40, 40, 40)


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparency_over_white(tmp_path, suffix):
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, *RED, *BLUE] + [0] * 759)
    p.putdata([1, 2])
    out = pixels(load_image(save(p, tmp_path / f"p{suffix}", transparency=2)))
    assert tuple(out[0, 0]) == RED
    assert tuple(out[0, 1]) == WHITE


def test_rgb_with_trns_colour_over_white(tmp_path):
    img = Image.new("RGB", (2, 1), BLUE)
    img.putpixel((1, 0), RED)
    out = pixels(load_image(save(img, tmp_path / "trns.png", transparency=BLUE)))
    assert tuple(out[0, 0]) == WHITE and tuple(out[0, 1]) == RED


def test_palette_without_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([*GREEN, *BLUE] + [0] * 762)
    p.putdata([0, 1])
    img = load_image(save(p, tmp_path / "p.png"))
    assert img.mode == "RGB" and tuple(pixels(img)[0, 0]) == GREEN and tuple(pixels(img)[0, 1]) == BLUE


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert opened_mode_and_frames(path)[0] == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB"
    assert np.abs(pixels(img)[8, 8] - RED).max() < 8


@pytest.mark.parametrize("mode, value, expected", [
    ("LAB", (255, 128, 128), WHITE), ("HSV", (0, 255, 255), RED), ("YCbCr", (76, 85, 255), RED)])
def test_other_colour_spaces(mode, value, expected):
    assert np.abs(pixels(load_image(Image.new(mode, (1, 1), value)))[0, 0] - expected).max() <= 2


def test_grayscale_and_bilevel_replicate(tmp_path):
    gray = load_image(save(Image.new("L", (2, 2), 77), tmp_path / "g.png"))
    assert tuple(pixels(gray)[0, 0]) == (77, 77, 77)
    bilevel = load_image(save(Image.new("1", (2, 2), 1), tmp_path / "b.pbm"))
    assert tuple(pixels(bilevel)[1, 1]) == WHITE


def test_16_bit_png_scaled_to_8_bit(tmp_path):
    path = save(Image.fromarray(np.array([[65535, 0, 128 * 257, 1000]], np.uint16)), tmp_path / "deep.png")
    assert opened_mode_and_frames(path)[0].startswith("I")  # really a 16-bit file
    assert pixels(load_image(path))[0, :, 0].tolist() == [255, 0, 128, 4]


def test_float_mode_image_assumed_0_to_1():
    img = Image.fromarray(np.array([[0.0, 0.8, 1.0, 7.0]], np.float32))
    assert img.mode == "F"
    assert pixels(load_image(img))[0, :, 1].tolist() == [0, 204, 255, 255]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_gives_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE, GREEN)]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    assert opened_mode_and_frames(path)[1] == 3
    assert np.abs(pixels(load_image(path))[4, 4] - RED).max() <= 2


def test_one_by_one_image(tmp_path):
    img = load_image(save(Image.new("RGB", (1, 1), BLUE), tmp_path / "dot.bmp"))
    assert img.size == (1, 1) and tuple(pixels(img)[0, 0]) == BLUE


def test_min_size_downscales_large_jpeg_but_keeps_shorter_side(tmp_path):
    path = save(Image.new("RGB", (4000, 3000), (90, 120, 150)), tmp_path / "big.jpg")
    img = load_image(path, min_size=256)
    assert 256 <= min(img.size) < 3000
    assert img.size == (500, 375)  # the biggest power-of-two reduction Pillow's draft offers is 1/8
    assert load_image(path, min_size=2000).size == (4000, 3000)  # 1/2 would make 1500 < 2000


def test_min_size_ignored_for_non_jpeg_and_small_images(tmp_path):
    assert load_image(save(Image.new("RGB", (600, 400)), tmp_path / "p.png"), min_size=64).size == (600, 400)
    assert load_image(jpeg_path(tmp_path), min_size=1000).size == (64, 48)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_min_size_must_be_positive_int(tmp_path, bad):
    with pytest.raises(ValueError):
        load_image(jpeg_path(tmp_path), min_size=bad)


def test_result_is_a_new_image(tmp_path):
    original = Image.new("RGB", (4, 4), RED)
    out = load_image(original)
    assert out is not original
    out.putpixel((0, 0), BLUE)
    assert original.getpixel((0, 0)) == RED


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_file_is_closed_after_loading(tmp_path):
    good, junk = jpeg_path(tmp_path), tmp_path / "junk.png"
    junk.write_text("not an image")
    load_image(good)
    with pytest.raises(ImageError):
        load_image(junk)
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert str(good.resolve()) not in open_files and str(junk.resolve()) not in open_files


# --- bad data ------------------------------------------------------------------------------------


def _assert_fails(item, *phrases):
    with pytest.raises(ImageError) as info:
        load_image(item)
    message = str(info.value)
    assert message.startswith(describe(item) + ": ")
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message
    return message


def test_zero_byte_text_and_html_files_are_not_images(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("just some text\n")
    (tmp_path / "page.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    for name in ("empty.jpg", "notes.png", "page.jpg"):
        _assert_fails(tmp_path / name, str(tmp_path / name), "not a recognised image file")
    _assert_fails(b"<html></html>", "<bytes: 13 B>", "not a recognised image file")


def test_truncated_jpeg_fails(tmp_path):
    data = jpeg_path(tmp_path, size=(256, 256)).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    _assert_fails(cut, str(cut), "truncated")
    _assert_fails(data[: len(data) // 2], "truncated")


def test_missing_path_and_directory(tmp_path):
    _assert_fails(tmp_path / "nope.jpg", str(tmp_path / "nope.jpg"), "no such file")
    _assert_fails(str(tmp_path), "expand_inputs")


def test_unsupported_input_type():
    _assert_fails(12345, "unsupported input type int")


def test_format_outside_the_allowlist_is_refused(tmp_path):
    path = save(Image.new("RGB", (4, 4)), tmp_path / "icon.ico")  # Pillow can read it; we do not
    _assert_fails(path, "not a recognised image file")


@pytest.mark.parametrize("limit, amount", [(1000, "pixels"), (6000, "100 x 100 pixels")])
def test_decompression_bomb_refused(tmp_path, monkeypatch, limit, amount):
    # 1000: 10000 px > 2 * limit, Pillow raises inside Image.open; 6000: only Pillow's warning range.
    path = save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    filters = list(warnings.filters)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # keep test output quiet
        message = _assert_fails(path, amount, f"decompression-bomb limit of {limit} pixels", "MAX_IMAGE_PIXELS")
    assert Image.MAX_IMAGE_PIXELS == limit  # not changed behind the user's back
    assert warnings.filters == filters
    assert "raise that limit" in message


def test_bomb_warning_promoted_to_error_is_still_an_image_error(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        _assert_fails(path, "decompression-bomb limit of 6000 pixels")


# --- arrays --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arr, expected", [
    (np.full((2, 3), 7, np.uint8), (7, 7, 7)),
    (np.full((2, 3, 1), 7, np.uint8), (7, 7, 7)),
    (np.full((2, 3, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
    (np.full((2, 3, 4), (1, 2, 3, 255), np.uint8), (1, 2, 3)),
    (np.full((2, 3, 4), (1, 2, 3, 0), np.uint8), WHITE),
    (np.ones((2, 3), bool), WHITE),
    (np.full((2, 3, 3), (65535, 0, 257 * 100), np.uint16), (255, 0, 100)),
    (np.full((2, 3, 3), (0.0, 0.8, 1.0), np.float32), (0, 204, 255)),
    (np.full((2, 3, 3), (-1.0, 0.25, 3.0), np.float64), (0, 64, 255)),
    (np.full((2, 3, 3), (-5, 100, 300), np.int64), (0, 100, 255)),
    (np.full((2, 3), 65535, ">u2"), WHITE),
])
def test_accepted_arrays(arr, expected):
    img = load_image(arr)
    assert img.mode == "RGB" and img.size == (3, 2)
    assert tuple(pixels(img)[1, 2]) == expected


@pytest.mark.parametrize("arr, phrase", [
    (np.zeros((3, 8, 8), np.uint8), "arr.transpose(1, 2, 0)"),
    (np.zeros((1, 8, 8, 3), np.uint8), "HxWx3"),
    (np.zeros((0, 8, 3), np.uint8), "HxWx3"),
    (np.zeros(8, np.uint8), "HxWx3"),
    (np.full((2, 2), np.nan, np.float32), "NaN"),
    (np.full((2, 2), np.inf), "NaN or infinity"),
    (np.full((2, 2), "x", object), "dtype"),
])
def test_rejected_arrays(arr, phrase):
    _assert_fails(arr, phrase)


# --- inputs, labels, digests ----------------------------------------------------------------------


def test_describe():
    assert describe("a/b.jpg") == "a/b.jpg" and describe(Path("a/b.jpg")) == "a/b.jpg"
    assert describe(b"\0" * 1234) == "<bytes: 1234 B>"
    assert describe(Image.new("RGB", (640, 480))) == "<PIL image 640x480 RGB>"
    assert describe(np.zeros((480, 640, 3), np.uint8)) == "<array (480, 640, 3) uint8>"


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".webp", ".tiff", ".pbm"} <= IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


def test_expand_inputs_walks_directories(tmp_path):
    root = tmp_path / "data"
    for rel in ["b/c/2.JPG", "a/1.png", "0.webp", "b/3.TIFF", ".hidden/x.png", "b/.dot.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        save(Image.new("RGB", (2, 2)), root / rel, format="PNG")
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    missing = tmp_path / "missing.jpg"
    found = expand_inputs([root, missing, root / "empty"])
    rels = [os.path.relpath(p, root) for p in found[:-1]]
    assert rels == ["0.webp", os.path.join("a", "1.png"), os.path.join("b", "3.TIFF"), os.path.join("b", "c", "2.JPG")]
    assert found[-1] == missing  # kept, fails later on its own
    assert expand_inputs(str(root / "empty")) == []


def test_expand_inputs_single_items_are_not_iterated(tmp_path):
    assert expand_inputs("photo.jpg") == ["photo.jpg"]
    assert expand_inputs(b"abc") == [b"abc"]
    img, arr = Image.new("RGB", (2, 2)), np.zeros((2, 2))
    assert expand_inputs(img)[0] is img and expand_inputs(arr)[0] is arr
    assert expand_inputs(iter(["x.png", img])) == ["x.png", img]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_expand_inputs_survives_a_symlink_loop(tmp_path):
    save(Image.new("RGB", (2, 2)), tmp_path / "a.png")
    os.symlink(tmp_path, tmp_path / "loop")
    assert expand_inputs(tmp_path) == [str(tmp_path / "a.png")]


def test_content_digest(tmp_path):
    path = jpeg_path(tmp_path)
    other = save(Image.new("RGB", (4, 4)), tmp_path / "other.png")
    data = path.read_bytes()
    assert content_digest(path) == content_digest(str(path)) == content_digest(data)
    assert content_digest(data) == content_digest(bytearray(data)) == content_digest(memoryview(data))
    assert content_digest(path) != content_digest(other)
    assert len(content_digest(path)) == 64
    a, b = np.arange(12, dtype=np.uint8).reshape(3, 4), np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert content_digest(a) == content_digest(b) == content_digest(np.asfortranarray(a))
    assert content_digest(a) != content_digest(a.astype(np.uint16))
    assert content_digest(a) != content_digest(a.reshape(4, 3))
    red, red2, blue = (Image.new("RGB", (3, 3), c) for c in (RED, RED, BLUE))
    assert content_digest(red) == content_digest(red2) != content_digest(blue)
    assert content_digest(red) != content_digest(red.convert("RGBA"))


def test_content_digest_of_palette_images_includes_the_palette():
    p1, p2 = Image.new("P", (2, 2), 0), Image.new("P", (2, 2), 0)
    p1.putpalette(list(RED) * 256)
    p2.putpalette(list(BLUE) * 256)
    assert content_digest(p1) != content_digest(p2)


def test_content_digest_errors(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        content_digest(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="expand_inputs"):
        content_digest(tmp_path)
    with pytest.raises(ImageError, match="unsupported input type"):
        content_digest(3.5)


# --- batches -------------------------------------------------------------------------------------


def _mixed_batch(tmp_path):
    good_jpg = jpeg_path(tmp_path)
    good_png = save(Image.new("RGBA", (5, 5), (0, 0, 0, 0)), tmp_path / "clear.png")
    (tmp_path / "junk.jpg").write_text("<html>")
    return [good_jpg, tmp_path / "missing.png", np.zeros((4, 4, 3), np.uint8), tmp_path / "junk.jpg",
            good_png, np.zeros((3, 4, 4, 4)), Image.new("L", (3, 3), 9)]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_load_images_mixed_batch_in_order(tmp_path, workers):
    items = _mixed_batch(tmp_path)
    results = list(load_images(items, workers=workers, prefetch=2))
    assert all(isinstance(r, LoadResult) for r in results)
    assert [r.source for r in results] == [describe(i) for i in items]
    assert [r.ok for r in results] == [True, False, True, False, True, False, True]
    for item, result in zip(items, results):
        if result.ok:
            assert result.error is None
            assert result.value.tobytes() == load_image(item).tobytes()
        else:
            assert result.value is None and result.error.startswith(result.source + ": ")
    assert "no such file" in results[1].error and "not a recognised" in results[3].error


def test_transform_failure_fails_only_that_item(tmp_path):
    items = [Image.new("RGB", (2, 2), c) for c in (RED, GREEN, BLUE)]

    def transform(img):
        if img.getpixel((0, 0)) == GREEN:
            raise RuntimeError("boom")
        return img.size

    results = list(load_images(items, transform=transform, workers=2))
    assert [r.value for r in results] == [(2, 2), None, (2, 2)]
    assert results[1].error == "<PIL image 2x2 RGB>: transform failed (RuntimeError: boom)"


@pytest.mark.parametrize("workers", [0, 2])
def test_load_images_is_lazy_and_bounded(workers):
    pulled, transformed = [], []

    def source():
        for i in range(100):
            pulled.append(i)
            yield np.full((2, 2), i, np.uint8)

    results = load_images(source(), transform=lambda img: transformed.append(1) or img, workers=workers,
                          prefetch=3)
    assert pulled == []  # nothing happens before the first result is asked for
    first = next(results)
    assert first.ok and first.value.getpixel((0, 0)) == (0, 0, 0)
    assert len(pulled) <= 3 and len(transformed) <= 3
    rest = list(results)
    assert [r.value.getpixel((0, 0))[0] for r in rest] == list(range(1, 100))


def test_load_images_early_stop_does_not_hang():
    results = load_images((np.zeros((2, 2), np.uint8) for _ in range(1000)), workers=4)
    assert next(results).ok
    results.close()


def test_load_images_single_path_is_one_item(tmp_path):
    results = list(load_images(str(jpeg_path(tmp_path))))
    assert len(results) == 1 and results[0].ok


def test_load_images_validates_arguments_eagerly():
    with pytest.raises(ValueError):
        load_images([], workers=-1)
    with pytest.raises(ValueError):
        load_images([], prefetch=0)
    with pytest.raises(ValueError):
        load_images([], min_size=0)
    with pytest.raises(TypeError):
        load_images([], transform="resize")


def test_limit_aspect_crops_only_extreme_strips_around_their_centre():
    from fewshot.embedding.images import MAX_ASPECT_RATIO, limit_aspect

    photo = Image.new("RGB", (400, 300))
    assert limit_aspect(photo) is photo
    tall = Image.fromarray(np.arange(30000, dtype=np.uint8).reshape(30000, 1) % 251)
    cropped = limit_aspect(tall)
    assert cropped.size == (1, MAX_ASPECT_RATIO)
    start = (30000 - MAX_ASPECT_RATIO) // 2
    np.testing.assert_array_equal(np.asarray(cropped)[:, 0], np.asarray(tall)[start:start + MAX_ASPECT_RATIO, 0])
    assert limit_aspect(Image.new("L", (100000, 3))).size == (3 * MAX_ASPECT_RATIO, 3)


def test_decoded_size_reads_the_header_and_the_jpeg_draft(tmp_path):
    big = Image.linear_gradient("L").resize((2000, 1000))
    png, jpg = io.BytesIO(), io.BytesIO()
    big.save(png, format="PNG")
    big.convert("RGB").save(jpg, format="JPEG")
    assert decoded_size(png.getvalue(), min_size=224) == (2000, 1000)  # PNG decodes at full size
    assert decoded_size(jpg.getvalue()) == (2000, 1000)
    assert decoded_size(jpg.getvalue(), min_size=224) == (500, 250)  # as load_image(min_size=224) decodes
    assert load_image(jpg.getvalue(), min_size=224).size == (500, 250)
    (tmp_path / "a.jpg").write_bytes(jpg.getvalue())
    assert decoded_size(tmp_path / "a.jpg", min_size=224) == (500, 250)
    with pytest.raises(ImageError, match="not a recognised image"):
        decoded_size(b"shopping list")
