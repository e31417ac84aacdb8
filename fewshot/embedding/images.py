"""Turn any user input into an RGB ``PIL.Image``, safely.

This is the only place in fewshot that decodes images; the encoder, classifier and CLI all call it.
Every item succeeds or fails on its own with an ``ImageError`` whose one-line message names the item
(``describe(item)``) and says what went wrong; ``load_images`` carries a batch on past bad items.

Accepted inputs: a file path (str / os.PathLike), encoded file bytes (bytes / bytearray / memoryview),
a ``PIL.Image.Image`` or a numpy array.

Conversion rules (always the same, so embeddings are reproducible):

* EXIF orientation is applied, so a phone photo tagged "rotate 90" equals the physically rotated one.
  A corrupt EXIF block is ignored (the pixels are kept as stored) rather than failing the image.
* Animated GIF / WebP / APNG: the first frame. (A PIL image passed in: the frame it is currently on.)
* Transparency (RGBA, LA, PA, P or L/RGB with a ``transparency`` entry) is composited over WHITE.
* L and 1 are replicated to RGB; CMYK, YCbCr, LAB and HSV use Pillow's conversion to RGB.
* 16-bit grayscale (modes ``I;16*`` and ``I``, e.g. 16-bit PNG): value / 257, rounded, clipped to 0..255,
  so 65535 -> 255. Mode ``F`` is assumed to hold floats in [0, 1]: value * 255, clipped.
* Arrays: HxW, HxWx1, HxWx3 or HxWx4 (alpha over white). uint8 as is; bool -> 0/255; uint16 -> / 257;
  float -> assumed in [0, 1], * 255 and clipped (NaN/inf rejected); other integers clipped to 0..255.
* Only the decoders behind ``IMAGE_EXTENSIONS`` are used (JPEG, PNG, BMP, GIF, TIFF, WebP, PPM/PGM/PBM),
  whatever the file name says: exotic Pillow plugins (EPS runs Ghostscript) never see untrusted files.
* Paths must be regular files (symlinks are followed): a FIFO or a device is refused, never read.
* Decompression-bomb protection stays on: an image with more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels
  is refused before its pixels are decoded. Truncated files fail (LOAD_TRUNCATED_IMAGES is not set).
* Work after decoding is bounded by the output size, not the input's shape: ``limit_aspect`` crops
  images longer than ``MAX_ASPECT_RATIO`` times their width (or the reverse) around their centre
  before they are resized, since a resize that scales the short side up first would blow a 1 x 30000
  strip up to 256 x 7,680,000 pixels. The encoder's preprocessing applies it to every image.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError
from ..files import open_regular

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# Longest side at most this many times the shortest before resizing. Preprocessing that scales the
# short side to S and centre-crops S (or less) never looks beyond the central S x S, so an 8:1 centre
# crop changes nothing it sees while capping a resize's output at 8 S^2 pixels.
MAX_ASPECT_RATIO = 8
ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # Pillow decoders we allow
_FORMATS_TEXT = "JPEG, PNG, BMP, GIF, TIFF, WebP or PPM/PGM/PBM"
_PATHS = (str, os.PathLike)
_BYTES = (bytes, bytearray, memoryview)
_SINGLE = _PATHS + _BYTES + (Image.Image, np.ndarray)  # never iterated as a collection
_ORIENTATION = 0x0112  # EXIF tag


# --- inputs -------------------------------------------------------------------------------------


def expand_inputs(inputs: ImageInput | Iterable[ImageInput]) -> list:
    """One input or an iterable of inputs -> flat list of items; directories become their image files.

    Directories are walked recursively (symlinked folders followed once), hidden names ('.x') skipped,
    files kept by suffix (case-insensitive) and sorted by path. Anything else, including a path that does
    not exist, is kept as one item so that it fails later on its own with a clear message.
    """
    items = [inputs] if isinstance(inputs, _SINGLE) else list(inputs)
    out: list = []
    for item in items:
        if isinstance(item, _PATHS) and os.path.isdir(item):
            out.extend(_image_files(os.fsdecode(item)))
        else:
            out.append(item)
    return out


def _image_files(top: str) -> list[str]:
    found, seen = [], set()
    for root, dirs, files in os.walk(top, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a folder linked twice
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            os.path.join(root, name)
            for name in files
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found, key=lambda p: Path(p).parts)  # folder by folder, not '/' vs '.' byte order


class NamedBytes(bytes):
    """Encoded image bytes that remember where they came from (e.g. ``data.zip:cat/001.jpg``),
    so messages about them name the source; otherwise plain ``bytes``."""

    def __new__(cls, data: bytes, name: str):
        obj = super().__new__(cls, data)
        obj.name = name
        return obj


def describe(item: Any) -> str:
    """Short human label for messages and reports: the path as given, or a summary of in-memory data."""
    if isinstance(item, _PATHS):
        return os.fsdecode(item)
    if isinstance(item, NamedBytes):
        return item.name
    if isinstance(item, _BYTES):
        return f"<bytes: {memoryview(item).nbytes} B>"
    if isinstance(item, Image.Image):
        return f"<PIL image {item.width}x{item.height} {item.mode}>"
    if isinstance(item, np.ndarray):
        return f"<array {item.shape} {item.dtype}>"
    return f"<{type(item).__name__}>"


def digest_or_error(item: ImageInput) -> tuple[str | None, str | None]:
    """(``content_digest(item)``, None), or (None, the message) for an item that cannot be read."""
    try:
        return content_digest(item), None
    except ImageError as exc:
        return None, str(exc)


def content_digest(item: ImageInput) -> str:
    """sha256 hex of an item's content, used as an embedding-cache key.

    Paths and bytes hash the raw encoded bytes (no decode, so a file and its bytes agree). PIL images hash
    mode, size, palette, transparency, EXIF orientation and pixels; arrays hash dtype, shape and data.
    """
    label, h = describe(item), hashlib.sha256()
    try:
        if isinstance(item, _PATHS):
            with _open_file(item, label) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        elif isinstance(item, _BYTES):
            h.update(bytes(item) if isinstance(item, memoryview) else item)
        elif isinstance(item, Image.Image):
            palette = bytes(item.getpalette() or []) if item.mode in ("P", "PA") else b""
            head = f"pil|{item.mode}|{item.size}|{item.info.get('transparency')!r}|{_orientation(item)}|"
            h.update(head.encode() + palette)
            h.update(item.tobytes())
        elif isinstance(item, np.ndarray):
            _check_dtype(item, label)
            h.update(f"array|{item.dtype.str}|{item.shape}|".encode())
            h.update(np.ascontiguousarray(item).tobytes())
        else:
            raise ImageError(_unsupported_type(item, label))
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{label}: {_explain(exc)}") from exc
    return h.hexdigest()


# --- decoding -----------------------------------------------------------------------------------


def load_image(item: ImageInput, *, min_size: int | None = None) -> Image.Image:
    """Decode one item to a new RGB PIL image (fully loaded, file closed). Raises ImageError on any failure.

    ``min_size`` is a JPEG speed hint: the decoder may downscale by 2, 4 or 8 while keeping the shorter
    side >= min_size (when it was to begin with). Other formats ignore it.
    """
    _check_min_size(min_size)
    label = describe(item)
    try:
        if isinstance(item, _PATHS):
            with _open_file(item, label) as f:
                return _decode(f, label, min_size)
        if isinstance(item, _BYTES):
            return _decode(io.BytesIO(item), label, min_size)
        if isinstance(item, Image.Image):
            return _to_rgb(_apply_orientation(item), label)
        if isinstance(item, np.ndarray):
            return _to_rgb(_array_to_image(item, label), label)
    except ImageError:
        raise
    except Exception as exc:  # Pillow raises many types for bad data; none may escape un-wrapped
        raise ImageError(f"{label}: {_explain(exc)}") from exc
    raise ImageError(_unsupported_type(item, label))


def decoded_size(item: str | os.PathLike | bytes, *, min_size: int | None = None) -> tuple[int, int]:
    """(width, height) that ``load_image(item, min_size=min_size)`` decodes to, from the file's header
    alone (no pixels are decoded): the stored size, or for a JPEG the reduced size its draft gives.
    Raises ImageError where ``load_image`` would fail on the header (not an image, a bomb)."""
    _check_min_size(min_size)
    label = describe(item)
    try:
        with _open_file(item, label) if isinstance(item, _PATHS) else io.BytesIO(item) as fp:
            with Image.open(fp, formats=_FORMATS) as img:
                if min_size and img.format in ("JPEG", "MPO"):
                    img.draft("RGB", (min_size, min_size))  # as _decode does: changes the size, decodes nothing
                return img.size
    except Exception as exc:
        raise ImageError(f"{label}: {_explain(exc)}") from exc


def limit_aspect(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """``image`` itself, or its centre cropped so that its long side is at most ``max_ratio`` times its
    short side: bounds the pixels a resize to a fixed short side can create (see the module notes)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    keep = int(max_ratio * max(short, 1))
    if long <= keep:
        return image
    start = (long - keep) // 2
    box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
    return image.crop(box)


def _decode(fp: Any, label: str, min_size: int | None) -> Image.Image:
    with Image.open(fp, formats=_FORMATS) as img:
        _check_pixels(img.size, label)  # header only so far: refuse bombs before decoding pixels
        if min_size and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (min_size, min_size))
        img.load()
        return _to_rgb(_apply_orientation(img), label)  # always a new image, independent of the file


def _check_pixels(size: tuple[int, int], label: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS  # read at call time: users may raise it
    if limit is not None and size[0] * size[1] > limit:
        raise ImageError(f"{label}: {_bomb_text(f'{size[0]} x {size[1]} pixels')}")


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        if _orientation(img) not in (None, 1):
            return ImageOps.exif_transpose(img)
    except Exception:  # corrupt EXIF must not cost the user a good photo
        pass
    return img


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(_ORIENTATION)
    except Exception:
        return None


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    if img.mode.startswith("I"):  # 16-bit (or 32-bit int) grayscale
        wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
        return Image.fromarray(_to_uint8(wide, label)).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), label)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # returns a copy even when already RGB


def _array_to_image(arr: np.ndarray, label: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.size == 0 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(
            f"{label}: unsupported array shape; expected HxW, HxWx1, HxWx3 or HxWx4 "
            "(convert CHW with arr.transpose(1, 2, 0))"
        )
    return Image.fromarray(np.ascontiguousarray(_to_uint8(arr, label)))  # L, RGB or RGBA


def _check_dtype(arr: np.ndarray, label: str) -> None:
    if arr.dtype.kind not in "biuf":
        raise ImageError(
            f"{label}: unsupported array dtype {arr.dtype}; use uint8, uint16, bool, other integers "
            "or floats in [0, 1]"
        )


def _to_uint8(arr: np.ndarray, label: str) -> np.ndarray:
    _check_dtype(arr, label)
    kind, size = arr.dtype.kind, arr.dtype.itemsize  # kind+size, so big-endian uint16 counts too
    if kind == "u" and size == 1:
        return arr
    if kind == "b":
        return arr.astype(np.uint8) * np.uint8(255)
    if kind == "u" and size == 2:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)  # rounded; 65535 -> 255
    if kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(f"{label}: array contains NaN or infinity; expected floats in [0, 1]")
        return np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


# --- messages -----------------------------------------------------------------------------------


def _check_min_size(min_size: Any) -> None:
    if min_size is not None and (isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1):
        raise ValueError(f"min_size must be a positive integer or None, got {min_size!r}")


def _open_file(path: Any, label: str):
    """Open an image path for reading; a FIFO or a device is refused (see ``fewshot.files``)."""
    _refuse_directory(path, label)
    f = open_regular(path)
    if f is None:
        raise ImageError(f"{label}: not a regular file (a device, FIFO or socket); pass image files")
    return f


def _refuse_directory(path: Any, label: str) -> None:
    if os.path.isdir(path):
        raise ImageError(f"{label}: is a directory; use expand_inputs() to list the images inside it")


def _unsupported_type(item: Any, label: str) -> str:
    return (
        f"{label}: unsupported input type {type(item).__name__}; "
        "pass a file path, encoded bytes, a PIL image or a numpy array"
    )


def _bomb_text(amount: str) -> str:
    return (
        f"{amount} exceeds the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS); raise that limit if you trust this file"
    )


def _explain(exc: BaseException) -> str:
    """What went wrong, on one line, with a hint where there is a useful one."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied; check the file's permissions"
    if isinstance(exc, UnidentifiedImageError):
        return f"not a recognised image file (expected {_FORMATS_TEXT})"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        found = re.search(r"\((\d+) pixels\)", detail)  # Pillow refused it itself, inside Image.open
        return _bomb_text(f"{found.group(1)} pixels" if found else "the image size")
    if isinstance(exc, MemoryError):
        return "not enough memory to decode this image"
    if isinstance(exc, (OSError, EOFError, SyntaxError, struct.error)):
        return f"truncated or corrupt image data ({detail}); re-export or re-download the file"
    return f"cannot convert image ({type(exc).__name__}: {detail})"


# --- batches ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    """Outcome of one item of ``load_images``: a value, or a one-line error message."""

    source: str  # describe(item)
    value: Any | None  # the RGB image, or transform(image); None on failure
    error: str | None  # one-line message on failure

    @property
    def ok(self) -> bool:
        return self.error is None


def load_images(
    items: Iterable[ImageInput],
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    min_size: int | None = None,
    workers: int | None = None,
    prefetch: int | None = None,
) -> Iterator[LoadResult]:
    """Decode (and transform) items in worker threads; yield LoadResults lazily, in input order.

    At most ``prefetch`` (default 4 * workers) items are taken from ``items`` ahead of the consumer, so a
    long stream never sits in memory at once. ``workers`` defaults to min(4, cpu count); 0 or 1 decodes in
    the calling thread. A failure in decoding or in ``transform`` fails only that item; bad arguments
    raise ValueError / TypeError right away.
    """
    _check_min_size(min_size)
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    prefetch = 4 * max(workers, 1) if prefetch is None else prefetch
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    if isinstance(items, _SINGLE):  # one item, not e.g. the characters of a path
        items = [items]
    load = partial(load_one, transform=transform, min_size=min_size)
    if workers <= 1:
        return (load(item) for item in items)  # a generator, so close() works as in the threaded case
    return _load_threaded(iter(items), load, workers, prefetch)


def load_one(item: Any, *, transform: Callable | None, min_size: int | None) -> LoadResult:
    """One item decoded (and transformed): a LoadResult with the image, or with the error that fails
    this item alone."""
    source = describe(item)
    try:
        image = load_image(item, min_size=min_size)
    except ImageError as exc:
        return LoadResult(source, None, " ".join(str(exc).split()))
    except Exception as exc:  # should not happen; still only this item fails
        return LoadResult(source, None, f"{source}: {type(exc).__name__}: {' '.join(str(exc).split())}")
    if transform is None:
        return LoadResult(source, image, None)
    try:
        return LoadResult(source, transform(image), None)
    except Exception as exc:
        detail = " ".join(str(exc).split())
        return LoadResult(source, None, f"{source}: transform failed ({type(exc).__name__}: {detail})")


def _load_threaded(items: Iterator, load: Callable, workers: int, prefetch: int) -> Iterator[LoadResult]:
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fewshot-images")
    try:
        pending = deque(pool.submit(load, item) for item in islice(items, prefetch))
        while pending:
            yield pending.popleft().result()
            for item in islice(items, 1):  # the consumer is back: top the window up again
                pending.append(pool.submit(load, item))
    finally:  # also on early break / close(): drop queued work, wait for the running few
        pool.shutdown(wait=True, cancel_futures=True)
