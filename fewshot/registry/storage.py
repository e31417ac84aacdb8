"""The registry's files on disk: atomic writes with checksums, generation-numbered data files, the
writer lock, and verified reads (size and sha256 checked before a data file is parsed)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from ..errors import RegistryFormatError, RegistrySaveError
from ..files import honour_umask, open_regular
from .locking import LOCK_FILE, READERS_LOCK_FILE, WriterLock, no_readers

FORMAT_NAME = "fewshot-registry"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 256 * 2**20  # a hostile manifest must not be able to exhaust memory
MAX_INT = 2**62  # upper bound for ids, counts and generations read from disk
_DATA_RE = re.compile(r"^(prototypes|index|examples|example_class_ids|provenance|thumbnails|thumbnail_spans)"
                      r"-(\d+)\.(npy|faiss|json)$")
# Attachments: small named files saved with the registry (e.g. a copy of its head), same checksums.
_ATTACHMENT_RE = re.compile(r"^(attachment)-(\d+)-([a-z0-9][a-z0-9_.-]{0,63})$")
ATTACHMENT_KEY = "attachment:"
MAX_ATTACHMENT_BYTES = 256 * 2**20
_TMP_PREFIX, _TMP_SUFFIX = ".fewshot-", ".tmp"


class _HashingWriter:
    """File wrapper that hashes and counts bytes as they are written."""

    def __init__(self, f):
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self._f.write(data)


def npy_writer(arr: np.ndarray) -> Callable[[BinaryIO], None]:
    """A ``write`` callback for ``write_atomic`` that saves ``arr`` as ``.npy`` (never pickled)."""
    return lambda f: np.save(f, arr, allow_pickle=False)


def write_atomic(directory: Path, name: str, write, written: list) -> dict:
    """Write via a temp file in the same dir, fsync, rename; return {"name", "sha256", "bytes"}."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{_TMP_PREFIX}{name}-", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            honour_umask(tmp)
            hw = _HashingWriter(f)
            write(hw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        unlink_quietly(Path(tmp))
        raise
    written.append(directory / name)
    return {"name": name, "sha256": hw.sha256.hexdigest(), "bytes": hw.size}


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (renames, new files) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(p: Path) -> None:
    """Remove a file if it is there; a failure is harmless (the manifest decides what is current)."""
    try:
        os.unlink(p)
    except OSError:
        pass  # best effort: a leftover file is harmless, the manifest decides what is current


def _is_ours(name: str) -> bool:
    return (bool(_DATA_RE.match(name) or _ATTACHMENT_RE.match(name)) or name in (LOCK_FILE, READERS_LOCK_FILE)
            or (name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX)))


def lock_registry_dir(path: Path) -> WriterLock:
    """Create the registry directory if needed (never in a folder of user data) and take its
    writer lock. A directory created here is removed again when the lock is released with nothing
    saved in it (a first register that failed or was interrupted leaves no empty registry behind)."""
    refuse = RegistrySaveError(f"{path} is not a fewshot registry; choose another path")
    try:
        if path.exists() and not path.is_dir():
            raise refuse
        created = _missing_folders(path)
        path.mkdir(parents=True, exist_ok=True)
        names = os.listdir(path)
        # Without a manifest, leftovers of a crashed first save are ours; anything else is the user's.
        if (not all(_is_ours(n) for n in names) if MANIFEST not in names
                else saved_generation(path) is None):
            raise refuse  # user data, or someone else's manifest.json: never overwrite it
        return WriterLock(path, on_release=(lambda: _remove_unsaved(created)) if created else None)
    except RegistrySaveError:
        raise
    except OSError as e:
        raise RegistrySaveError(f"could not prepare {path} for saving: {e}") from e


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_unsaved(folders: list[Path]) -> None:
    """Remove the registry folder ``folders[0]`` (and the parents created for it) if nothing was saved
    in it: no manifest, only our lock and temporary files. Best effort: a leftover is harmless."""
    try:
        names = os.listdir(folders[0])
        if MANIFEST in names or not all(_is_ours(n) for n in names):
            return
        for name in names:
            os.unlink(folders[0] / name)
        for folder in folders:
            os.rmdir(folder)
    except OSError:
        pass


def saved_generation(path: Path) -> int | None:
    """The generation of the registry saved at path (0: none), or None if its manifest.json is not
    a fewshot registry's."""
    try:
        old = json.loads(read_bounded(path / MANIFEST, MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        return 0
    except (ValueError, RecursionError):
        return None
    if not isinstance(old, dict) or old.get("format") != FORMAT_NAME:
        return None
    gen = old.get("generation")
    return gen if isinstance(gen, int) and not isinstance(gen, bool) and 0 <= gen < MAX_INT else 0


def same_dir(a: Path, b: Path) -> bool:
    """Whether two paths are the same directory (False if either cannot be reached)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def remove_other_generations(path: Path, gen: int) -> None:
    """Delete the files of older generations, unless a reader may still be opening them (then a later
    save deletes them)."""
    try:
        with no_readers(path) as alone:
            if not alone:
                return
            for name in os.listdir(path):
                m = _DATA_RE.match(name) or _ATTACHMENT_RE.match(name)
                if (m and int(m.group(2)) != gen) or (not m and _is_ours(name)
                                                      and name not in (LOCK_FILE, READERS_LOCK_FILE)):
                    unlink_quietly(path / name)
    except (OSError, RegistryFormatError):
        return  # best effort: leftovers are harmless, the manifest decides what is current


def npy_chunks(shape: tuple, dtype, chunks):
    """Write an .npy file from row chunks (no full-size temporary)."""
    def write(f):
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
        for chunk in chunks():
            f.write(memoryview(np.ascontiguousarray(chunk, dtype=dtype).reshape(-1).view(np.uint8)))
    return write


def _open_regular(fpath: Path):
    """Open a registry file for reading, refusing anything but a regular file (see ``fewshot.files``)."""
    f = open_regular(fpath)
    if f is None:
        raise RegistryFormatError(f"{fpath}: not a regular file")
    return f


def read_bounded(fpath: Path, limit: int) -> bytes:
    """The bytes of a regular file, refusing (RegistryFormatError) one larger than ``limit``."""
    with _open_regular(fpath) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise RegistryFormatError(f"{fpath}: larger than {limit} bytes; refusing to read it")
    return data
_READ_CHUNK = 64 * 2**20


def open_generation(path: Path, m: dict) -> dict:
    """{file name: open file} for every data file the manifest ``m`` names."""
    keys = (("prototypes", "index") + (("examples", "example_class_ids") if m["store_examples"] else ())
            + tuple(k for k in ("provenance", "thumbnails", "thumbnail_spans") if k in m["files"])
            + tuple(k for k in m["files"] if k.startswith(ATTACHMENT_KEY)))
    opened: dict = {}
    try:
        for key in keys:
            name = m["files"][key]["name"]
            if name in opened:
                continue
            try:
                opened[name] = _open_regular(path / name)
            except FileNotFoundError:
                raise RegistryFormatError(f"{path / name}: referenced by the manifest but missing") from None
            except OSError as e:
                raise RegistryFormatError(f"{path / name}: cannot be read ({e})") from None
    except BaseException:
        for f in opened.values():
            f.close()
        raise
    return opened


def read_verified_into(path: Path, entry: dict, split, opened: dict) -> list[np.ndarray]:
    """Read a data file (already open, in ``opened``) into buffers after checking its size, hashing as
    it streams in, and check the sha256 against the manifest before anything in it is parsed.
    ``split(size)`` returns the writable buffers that together take the whole file (so big arrays are
    read in place)."""
    fpath = path / entry["name"]
    try:
        f = opened[entry["name"]]
        f.seek(0)
        size = os.fstat(f.fileno()).st_size
        if size != entry["bytes"]:
            raise RegistryFormatError(f"{fpath}: size is {size} bytes, manifest says {entry['bytes']} "
                                      "(truncated or replaced?)")
        buffers = split(size)
        digest = hashlib.sha256()
        for buf in buffers:
            view = memoryview(buf.reshape(-1).view(np.uint8))
            for a in range(0, len(view), _READ_CHUNK):
                part = view[a:a + _READ_CHUNK]
                got = f.readinto(part)
                while got and got < len(part):  # short reads
                    more = f.readinto(part[got:])
                    if not more:
                        break
                    got += more
                if got != len(part):
                    raise RegistryFormatError(f"{fpath}: shorter than the {size} bytes it had "
                                              "(changed while reading?)")
                digest.update(part)
        if f.read(1):
            raise RegistryFormatError(f"{fpath}: longer than the manifest says (changed while reading?)")
    except OSError as e:
        raise RegistryFormatError(f"{fpath}: cannot be read ({e})") from None
    if digest.hexdigest() != entry["sha256"]:
        raise RegistryFormatError(f"{fpath}: sha256 mismatch (corrupted, or a file from "
                                  "another generation?)")
    return buffers


def checked_attachments(attachments) -> dict[str, bytes]:
    """``attachments`` (name -> bytes) if every name and size is allowed, else ValueError."""
    if not isinstance(attachments, dict):
        raise ValueError("attachments must be a dict of name -> bytes")
    for name, data in attachments.items():
        if not isinstance(name, str) or not _ATTACHMENT_RE.match(f"attachment-0-{name}"):
            raise ValueError(f"attachment name {name!r}: use 1-64 of a-z 0-9 _ . - (starting with a letter or digit)")
        if not isinstance(data, bytes) or len(data) > MAX_ATTACHMENT_BYTES:
            raise ValueError(f"attachment {name!r} must be bytes of at most {MAX_ATTACHMENT_BYTES} bytes")
    return attachments


def load_attachments(path: Path, m: dict, opened: dict) -> dict[str, bytes]:
    """The attachments a manifest lists, each verified against its size and sha256."""
    out = {}
    for key, entry in m["files"].items():
        if not key.startswith(ATTACHMENT_KEY):
            continue
        name = key[len(ATTACHMENT_KEY):]
        if not _ATTACHMENT_RE.match(f"attachment-0-{name}") or entry["bytes"] > MAX_ATTACHMENT_BYTES:
            raise RegistryFormatError(f"{path / MANIFEST}: bad attachment {name!r}")
        out[name] = read_verified_into(path, entry, lambda size: [np.empty(size, np.uint8)],
                                        opened)[0].tobytes()
    return out


def load_npy(path: Path, entry: dict, shape: tuple, dtype, opened: dict) -> np.ndarray:
    """The array of an .npy file, read straight into its final (owned, writable) array."""
    fpath = path / entry["name"]
    dtype = np.dtype(dtype)
    data_bytes = math.prod(shape) * dtype.itemsize

    bad = f"{fpath}: expected {dtype} array of shape {shape}"

    def split(size):  # called once the file's size is known: nothing bigger than it is allocated
        if not 10 <= size - data_bytes <= 2**16:  # magic + header, then exactly the data
            raise RegistryFormatError(f"{bad}, but the file has {size} bytes")
        return [np.empty(size - data_bytes, np.uint8), np.empty(shape, dtype)]

    buffers = read_verified_into(path, entry, split, opened)
    arr = buffers[1]
    header = io.BytesIO(buffers[0].tobytes())
    try:
        version = np.lib.format.read_magic(header)
        if version == (1, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(header)
        elif version == (2, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(header)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as e:  # noqa: BLE001 - any parse failure is a format error
        raise RegistryFormatError(f"{fpath}: not a valid .npy file ({e})") from None
    if header.tell() != len(buffers[0]) or got_dtype != dtype or tuple(got_shape) != tuple(shape) or (
            fortran and len(shape) > 1 and min(shape) > 1):
        raise RegistryFormatError(f"{bad}, got {got_dtype} {tuple(got_shape)}")
    return arr
