"""The registry's manifest: its format version, the checksum it keeps of itself (the seal), and the
paranoid parse of every field a hostile or corrupted file could get wrong."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import EncoderMismatchError, RegistryFormatError
from .labels import MAX_LABEL_LEN, is_unicode, check_label
from .storage import ATTACHMENT_KEY, MAX_INT, FORMAT_NAME, MANIFEST, MAX_MANIFEST_BYTES, read_bounded
from .vectors import MAX_DIM, METRICS

# 2: "index_in_use" / "auto_threshold" fields; IVF indexes keep their own ids.
# 3: "manifest_sha256", the manifest's checksum of itself (see seal_manifest).
# 4: a "provenance" file: where each registered example came from (see ExampleSource).
FORMAT_VERSION = 4
_MAX_FACTORY_NUMBER = 2**22  # e.g. IVF lists: 4M lists would already suit billions of classes
_MISMATCH_HINT = ("load it with the encoder it was built with (FewShotClassifier.load picks it "
                  "automatically) or re-register the classes with this encoder")


def seal_manifest(manifest: dict, indent: int | None) -> bytes:
    """The manifest's JSON text, its first field the sha256 of the text without that field, so that
    a flipped bit in a label or a count is caught like one in a data file."""
    body = json.dumps(manifest, indent=indent, allow_nan=False).encode()
    return b'{"manifest_sha256": "%s",%s' % (hashlib.sha256(body).hexdigest().encode(), body[1:])


def _check_seal(mpath: Path, raw: bytes, m: dict) -> None:
    if "manifest_sha256" not in m:
        if m["format_version"] >= 3:
            raise RegistryFormatError(f"{mpath}: missing field 'manifest_sha256'")
        return  # formats 1 and 2 had no checksum
    digest = m["manifest_sha256"]
    prefix = b'{"manifest_sha256": "%s",' % str(digest).encode()
    body = hashlib.sha256(b"{")
    body.update(memoryview(raw)[len(prefix):])
    if not (isinstance(digest, str) and raw.startswith(prefix) and body.hexdigest() == digest):
        raise RegistryFormatError(f"{mpath}: checksum mismatch (corrupted, or edited by hand?)")


def manifest_digest(mpath: Path) -> str | None:
    """sha256 of a manifest file, or None if it cannot be read (readers compare generations by it)."""
    try:
        return hashlib.sha256(read_bounded(mpath, MAX_MANIFEST_BYTES)).hexdigest()
    except (OSError, RegistryFormatError):
        return None


def _field(obj: dict, key: str, types, where: Path):
    if key not in obj:
        raise RegistryFormatError(f"{where}: missing field {key!r}")
    v = obj[key]
    if not isinstance(v, types) or (isinstance(v, bool) and types is int):
        raise RegistryFormatError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def _int_field(obj: dict, key: str, lo: int, hi: int, where: Path) -> int:
    v = _field(obj, key, int, where)
    if not lo <= v <= hi:
        raise RegistryFormatError(f"{where}: field {key!r} = {v} is outside {lo}..{hi}")
    return v


def _parse_manifest(mpath: Path) -> dict:
    try:
        raw = read_bounded(mpath, MAX_MANIFEST_BYTES)
        m = json.loads(raw)
    except (ValueError, RecursionError) as e:
        if isinstance(e, RegistryFormatError):
            raise
        raise RegistryFormatError(f"{mpath}: not valid JSON ({e})") from None
    except OSError as e:
        raise RegistryFormatError(f"{mpath}: cannot be read ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise RegistryFormatError(f"{mpath}: not a fewshot registry manifest")
    version = _int_field(m, "format_version", 1, MAX_INT, mpath)
    if version > FORMAT_VERSION:
        raise RegistryFormatError(f"{mpath}: written by a newer fewshot (format {version}); upgrade fewshot")
    _check_seal(mpath, raw, m)
    m["_digest"] = hashlib.sha256(raw).hexdigest()
    _int_field(m, "generation", 0, MAX_INT, mpath)
    _int_field(m, "dim", 1, MAX_DIM, mpath)
    if _field(m, "metric", str, mpath) not in METRICS:
        raise RegistryFormatError(f"{mpath}: unknown metric {m['metric']!r}")
    _check_factory(_field(m, "index_factory", str, mpath), mpath)
    if version >= 2:
        _check_factory(_field(m, "index_in_use", str, mpath), mpath)
        if m.get("auto_threshold") is not None:
            _field(m, "auto_threshold", int, mpath)
    store = _field(m, "store_examples", bool, mpath)
    _field(m, "fingerprint", dict, mpath)
    _field(m, "metadata", dict, mpath)
    next_id = _int_field(m, "next_id", 0, MAX_INT, mpath)
    entries = _field(m, "classes", list, mpath)
    fast = _classes_fast(entries, next_id)
    if fast is None:
        _classes_slow(entries, next_id, mpath)  # raises with the precise reason
        raise RegistryFormatError(f"{mpath}: invalid class table")
    m["_labels"], m["_ids"], m["_counts"] = fast
    files = _field(m, "files", dict, mpath)
    if version >= 4:
        _field(files, "provenance", dict, mpath)
    optional = ("provenance",) if "provenance" in files else ()  # format 4 has one; older ones may
    optional += ("thumbnails", "thumbnail_spans") if "thumbnails" in files else ()
    attached = tuple(k for k in files if isinstance(k, str) and k.startswith(ATTACHMENT_KEY))
    for key in ("prototypes", "index") + (("examples", "example_class_ids") if store else ()) + optional + attached:
        entry = _field(files, key, dict, mpath)
        name = _field(entry, "name", str, mpath)
        if (not name or name in (".", "..", MANIFEST) or "/" in name or "\\" in name
                or "\0" in name or os.path.basename(name) != name or not is_unicode(name)):
            raise RegistryFormatError(f"{mpath}: file name {name!r} is not a plain file name in the registry")
        digest = _field(entry, "sha256", str, mpath)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise RegistryFormatError(f"{mpath}: bad sha256 for {name!r}")
        _int_field(entry, "bytes", 0, MAX_INT, mpath)
    return m


def _check_factory(factory: str, mpath: Path) -> None:
    """FAISS allocates what a factory string asks for ("IVF999999999,Flat": ~50 GB of empty lists)
    before anything can be checked against the data, so a manifest's must ask for a plausible size."""
    if len(factory) > 200 or any(int(n) > _MAX_FACTORY_NUMBER for n in re.findall(r"\d+", factory)):
        raise RegistryFormatError(f"{mpath}: implausible index factory string {factory[:200]!r}")


def _classes_fast(entries: list, next_id: int):
    """(labels, ids, counts) if every class entry is valid, else None; vectorised for big registries."""
    if not all(type(e) is dict for e in entries):
        return None
    try:
        labels = [e["label"] for e in entries]
        ids = [e["id"] for e in entries]
        counts = [e["count"] for e in entries]
    except KeyError:
        return None
    if not (all(type(v) is str for v in labels) and all(type(v) is int for v in ids)
            and all(type(v) is int for v in counts)):
        return None
    if (any(not v or len(v) > MAX_LABEL_LEN or "\0" in v for v in labels) or len(set(labels)) != len(labels)
            or not is_unicode("".join(labels))):
        return None
    try:
        id_arr, count_arr = np.array(ids, dtype=np.int64), np.array(counts, dtype=np.int64)
    except OverflowError:
        return None
    if len(ids) and (id_arr.min() < 0 or id_arr.max() > next_id - 1 or count_arr.min() < 1
                     or count_arr.max() > MAX_INT or len(np.unique(id_arr)) != len(id_arr)):
        return None
    return labels, id_arr, count_arr


def _classes_slow(entries: list, next_id: int, mpath: Path) -> None:
    labels, ids = set(), set()
    for entry in entries:
        if not isinstance(entry, dict):
            raise RegistryFormatError(f"{mpath}: each class must be an object")
        label = _field(entry, "label", str, mpath)
        try:
            check_label(label)
        except ValueError as e:
            raise RegistryFormatError(f"{mpath}: {e}") from None
        cid = _int_field(entry, "id", 0, next_id - 1, mpath)
        _int_field(entry, "count", 1, MAX_INT, mpath)
        if label in labels or cid in ids:
            raise RegistryFormatError(f"{mpath}: duplicate class label {label!r} or id {cid}")
        labels.add(label)
        ids.add(cid)


def check_manifest_fingerprint(path: Path, stored: dict, expected: dict) -> None:
    """Raise EncoderMismatchError unless the stored encoder fingerprint is the expected one."""
    if stored == expected:
        return

    def name(fp):
        return fp["name"] if isinstance(fp.get("name"), str) else json.dumps(fp, sort_keys=True)

    a, b = name(stored), name(expected)
    if a == b:  # same model name, different details: show the details
        a, b = json.dumps(stored, sort_keys=True), json.dumps(expected, sort_keys=True)
    raise EncoderMismatchError(f"the registry at {path} was built with encoder {a}, but the encoder "
                               f"in use is {b}; {_MISMATCH_HINT}")


def read_manifest(path: Path) -> dict:
    """The registry's manifest, read within its size limit and checked (seal, fields, files)."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise RegistryFormatError(f"no registry at {path} ({mpath} not found); create one with fewshot register")
    return _parse_manifest(mpath)
