"""Class labels, example sources and thumbnails: what the registry accepts as class data, checked
before anything changes."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import NamedTuple


MAX_LABEL_LEN = 1024
MAX_SOURCE_LEN = 4096  # characters of an example's source name (a path; Linux's PATH_MAX)
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
MAX_THUMBNAIL_BYTES = 64 * 2**10  # a class thumbnail is a small JPEG; the registry keeps its bytes opaque


class ExampleSource(NamedTuple):
    """Where one registered example came from: ``source``, the name it was registered under (a path
    as given, or a description of in-memory data), and ``digest``, the sha256 hex of its content
    (the image file's bytes). Either is None where it was not recorded (vectors added without
    sources, or registries saved before format 4)."""

    source: str | None
    digest: str | None
UNRECORDED = ExampleSource(None, None)


def check_label(label) -> str:
    """Labels are any non-empty text of at most MAX_LABEL_LEN characters without NUL, valid Unicode
    (no lone surrogates, such as an undecodable folder name gives). They are never used as file names,
    so "/", ".." or newlines are just characters. Returns the label in Unicode NFC form: "café" typed
    and "café" from a folder name in decomposed form (macOS) are the same class."""
    if (not isinstance(label, str) or not label or "\0" in label or len(label) > MAX_LABEL_LEN
            or not is_unicode(label)):
        raise ValueError(f"invalid class label {_preview(label)}: a label must be a non-empty string of at "
                         f"most {MAX_LABEL_LEN} characters without NUL or lone surrogates")
    return unicodedata.normalize("NFC", label)


def _preview(value, limit: int = 60) -> str:
    """``repr(value)``, cut to its first ``limit`` characters when long: errors never echo a huge value."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)[:limit * 4]


def check_sources(sources, n: int, what: str) -> list[ExampleSource] | None:
    """None, or n ExampleSource (pairs of source name and sha256 hex digest, each str or None)."""
    if sources is None:
        return None
    if isinstance(sources, (str, bytes)) or not hasattr(sources, "__len__") or len(sources) != n:
        raise ValueError(f"{what}: sources must be a list of {n} (source, digest) pairs, one per vector")
    out = []
    for item in sources:
        try:
            if not isinstance(item, (tuple, list)):
                raise TypeError
            source, digest = item
        except (TypeError, ValueError):
            raise ValueError(f"{what}: each source must be a (source, digest) pair, got {item!r:.80}") from None
        if source is not None and (not isinstance(source, str) or len(source) > MAX_SOURCE_LEN or "\0" in source):
            raise ValueError(f"{what}: a source name must be a string of at most {MAX_SOURCE_LEN} characters "
                             f"without NUL, got {source!r:.80}")
        if digest is not None and (not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest)):
            raise ValueError(f"{what}: a digest must be 64 lowercase hex digits (sha256), got {digest!r:.80}")
        out.append(ExampleSource(source, digest))
    return out


def is_unicode(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_thumbnail(data) -> bytes:
    """``data`` if it can be a class thumbnail (1 to MAX_THUMBNAIL_BYTES bytes), else ValueError."""
    if not isinstance(data, (bytes, bytearray)) or not 0 < len(data) <= MAX_THUMBNAIL_BYTES:
        raise ValueError(f"a thumbnail must be 1 to {MAX_THUMBNAIL_BYTES} bytes of encoded image data")
    return data


def json_copy(obj, what: str):
    """Deep copy through JSON, which also proves the object can be saved."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from None


