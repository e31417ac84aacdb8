"""Persistent class registry: per-class prototypes plus a FAISS index for top-k search.

The registry knows nothing of images or encoders: it takes and returns numpy arrays and keeps an
opaque JSON-able ``fingerprint`` of the encoder that produced them. It holds work users cannot
easily redo, so saving is crash-safe (generation-numbered data files, then an atomically replaced
manifest) and loading is paranoid (sizes and sha256 checked before any data file is parsed).
Nothing is ever unpickled: the formats are JSON, ``.npy`` with ``allow_pickle=False`` and
``faiss.serialize_index`` bytes.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .errors import (
    DuplicateClassError,
    EncoderMismatchError,
    RegistryFormatError,
    RegistrySaveError,
    UnknownClassError,
)

METRICS = ("cosine", "l2")  # "l2" = squared Euclidean
FORMAT_VERSION = 1
FORMAT_NAME = "fewshot-registry"
MANIFEST = "manifest.json"
MAX_DIM = 65536
MAX_LABEL_LEN = 1024
MAX_MANIFEST_BYTES = 256 * 2**20  # a hostile manifest must not be able to exhaust memory
_MAX_INT = 2**62  # upper bound for ids, counts and generations read from disk
_DATA_RE = re.compile(r"^(prototypes|index|examples|example_class_ids)-(\d+)\.(npy|faiss)$")
_TMP_PREFIX, _TMP_SUFFIX = ".fewshot-", ".tmp"
_MISMATCH_HINT = ("load it with the encoder it was built with (FewShotClassifier.load picks it "
                  "automatically) or re-register the classes with this encoder")


@dataclass(frozen=True)
class SearchResult:
    labels: list[list[str]]  # per query, best first
    scores: np.ndarray  # (n_queries, k') float32, higher is closer: cosine or -squared L2


@dataclass
class _Class:
    id: int  # stable FAISS id, never reused within a registry
    count: int
    mean: np.ndarray  # (dim,) float32 running mean (of unit vectors for cosine)
    examples: list  # raw float32 (n, dim) arrays, only if store_examples


# ---------------------------------------------------------------- validation helpers

def _check_label(label) -> str:
    if not isinstance(label, str) or not label or "\0" in label or len(label) > MAX_LABEL_LEN:
        raise ValueError(f"invalid class label {label!r}: a label must be a non-empty string of at "
                         f"most {MAX_LABEL_LEN} characters without NUL")
    return label


def _as_matrix(vectors, dim: int, what: str) -> np.ndarray:
    """Return a fresh C-contiguous (n, dim) float32 copy, or raise ValueError naming `what`."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is caught below
            arr = np.array(vectors, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: vectors must be a numeric array ({e})") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"{what}: expected shape (dim,) or (n, dim) with n >= 1, got {arr.shape}")
    if arr.shape[1] != dim:
        raise ValueError(f"{what}: expected dim {dim}, got {arr.shape[1]}; "
                         "vectors must come from the same encoder")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: vectors contain NaN or infinity")
    return np.ascontiguousarray(arr)


def _normalise(x: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what}: a zero vector has no direction, so cosine similarity is undefined")
    return (x / norms).astype(np.float32)


def _json_copy(obj, what: str):
    """Deep copy through JSON, which also proves the object can be saved."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from None


# ---------------------------------------------------------------- the registry

class Registry:
    """Named classes -> prototype vectors, searchable by nearest prototype."""

    def __init__(self, dim: int, *, metric: str = "cosine", index: str = "Flat",
                 fingerprint: dict | None = None, store_examples: bool = False,
                 metadata: dict | None = None):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= MAX_DIM:
            raise ValueError(f"dim must be an integer in 1..{MAX_DIM}, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if fingerprint is not None and not isinstance(fingerprint, dict):
            raise ValueError("fingerprint must be a dict describing the encoder")
        self._dim, self._metric, self._factory = int(dim), metric, index
        self._faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        try:  # fail now on a bad factory string, not at the first search
            faiss.index_factory(self._dim, index, self._faiss_metric)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"invalid FAISS index factory string {index!r}: {e}") from None
        self._fingerprint = _json_copy(fingerprint or {}, "fingerprint")
        self._store_examples = bool(store_examples)
        self.metadata = copy.deepcopy(metadata) if metadata is not None else {}
        self._classes: dict[str, _Class] = {}  # insertion order = class order
        self._label_of_id: dict[int, str] = {}
        self._next_id = 0
        self._generation = 0
        self._index = None
        self._stale = True  # index must be (re)built from the prototypes before use
        self._fallback = False  # index is an exact flat stand-in for an untrainable one
        self._lock = threading.RLock()

    # -- read-only properties
    dim = property(lambda self: self._dim)
    metric = property(lambda self: self._metric)
    index_factory = property(lambda self: self._factory)
    fingerprint = property(lambda self: copy.deepcopy(self._fingerprint))
    store_examples = property(lambda self: self._store_examples)
    generation = property(lambda self: self._generation)

    @property
    def classes(self) -> list[str]:
        with self._lock:
            return list(self._classes)

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return {label: c.count for label, c in self._classes.items()}

    def __len__(self) -> int:
        return len(self._classes)

    def __contains__(self, label) -> bool:
        return isinstance(label, str) and label in self._classes

    def __repr__(self) -> str:
        return (f"Registry(dim={self._dim}, metric={self._metric!r}, index={self._factory!r}, "
                f"classes={len(self)}, generation={self._generation})")

    # -- mutation
    def _prepare(self, label, vectors):
        """Validate everything before touching state, so a bad call changes nothing."""
        _check_label(label)
        raw = _as_matrix(vectors, self._dim, f"class {label!r}")
        unit = _normalise(raw, f"class {label!r}") if self._metric == "cosine" else raw
        return raw, unit

    def add(self, label: str, vectors) -> None:
        """Create the class if new, else add examples to it."""
        _check_label(label)  # before the dict lookup, which an unhashable label would break
        with self._lock:
            if label in self._classes:
                self.add_examples(label, vectors)
            else:
                self.add_class(label, vectors)

    def add_class(self, label: str, vectors) -> None:
        raw, x = self._prepare(label, vectors)
        with self._lock:
            if label in self._classes:
                raise DuplicateClassError(f"class {label!r} already exists; use add_examples to "
                                          "add to it or rename/remove it first")
            c = _Class(self._next_id, len(x), x.mean(axis=0, dtype=np.float64).astype(np.float32),
                       [raw] if self._store_examples else [])
            self._next_id += 1
            self._classes[label] = c
            self._label_of_id[c.id] = label
            self._index_add(c)

    def add_examples(self, label: str, vectors) -> None:
        raw, x = self._prepare(label, vectors)
        with self._lock:
            c = self._get(label)
            # Exact running mean from (mean, count): adding never needs the old examples.
            mean = c.mean.astype(np.float64)
            n = len(x)
            mean += (x.sum(axis=0, dtype=np.float64) - n * mean) / (c.count + n)
            c.mean, c.count = mean.astype(np.float32), c.count + n
            if self._store_examples:
                c.examples.append(raw)
            if self._index_remove(c.id):
                self._index_add(c)

    def remove(self, label: str) -> None:
        with self._lock:
            c = self._get(label)
            del self._classes[label], self._label_of_id[c.id]
            self._index_remove(c.id)

    def rename(self, old: str, new: str) -> None:
        _check_label(new)
        with self._lock:
            c = self._get(old)
            if new == old:
                return
            if new in self._classes:
                raise DuplicateClassError(f"cannot rename {old!r} to {new!r}: {new!r} already exists")
            # Rebuild the dict to keep the class at its position; the FAISS id is unchanged.
            self._classes = {(new if k == old else k): v for k, v in self._classes.items()}
            self._label_of_id[c.id] = new

    def _get(self, label) -> _Class:
        try:
            return self._classes[label]
        except (KeyError, TypeError):
            raise UnknownClassError(f"no class {label!r} in the registry; known classes: "
                                    f"{len(self._classes)} (see Registry.classes)") from None

    # -- reading
    def _searched(self, c: _Class) -> np.ndarray:
        """The vector that goes into the index: the normalised mean for cosine."""
        if self._metric == "l2":
            return c.mean
        norm = np.linalg.norm(c.mean.astype(np.float64))
        # A mean of unit vectors can cancel to zero (e.g. v and -v): it then matches nothing.
        return (c.mean / norm).astype(np.float32) if norm > 0 else np.zeros_like(c.mean)

    def prototypes(self) -> tuple[list[str], np.ndarray]:
        with self._lock:
            labels = list(self._classes)
            rows = [self._searched(c) for c in self._classes.values()]
        return labels, (np.stack(rows) if rows else np.zeros((0, self._dim), np.float32))

    def examples(self, label: str) -> np.ndarray:
        if not self._store_examples:
            raise ValueError("this registry does not store examples; create it with store_examples=True")
        with self._lock:
            return np.concatenate(self._get(label).examples)

    def search(self, queries, k: int) -> SearchResult:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        q = _as_matrix(queries, self._dim, "queries")
        if self._metric == "cosine":
            q = _normalise(q, "queries")
        with self._lock:
            if not self._classes:
                raise ValueError("registry has no classes; register some first")
            self._ensure_index()
            dist, ids = self._index.search(q, min(int(k), len(self._classes)))
            labels = [[self._label_of_id[int(i)] for i in row if i != -1] for row in ids]
        scores = dist if self._metric == "cosine" else -dist  # higher is always closer
        # Approximate indexes may return fewer hits (id -1): those slots score -inf.
        return SearchResult(labels, np.where(ids == -1, -np.inf, scores).astype(np.float32))

    # -- FAISS index maintenance
    def _build_index(self):
        labels, protos = self.prototypes()
        ids = np.array([self._classes[lb].id for lb in labels], dtype=np.int64)
        inner, self._fallback = faiss.index_factory(self._dim, self._factory, self._faiss_metric), False
        if not inner.is_trained:
            try:
                if len(protos) == 0:
                    raise RuntimeError("nothing to train on")
                inner.train(protos)
            except RuntimeError:
                # Too few prototypes to train (IVF needs >= nlist, PQ >= 256): search exactly with a
                # flat index for now; the next mutation marks it stale so training is retried.
                inner, self._fallback = faiss.IndexFlat(self._dim, self._faiss_metric), True
        self._index = faiss.IndexIDMap2(inner)
        if len(ids):
            self._index.add_with_ids(protos, ids)
        self._stale = False

    def _ensure_index(self):
        if self._stale:
            self._build_index()

    def _index_add(self, c: _Class):
        if self._fallback:
            self._stale = True  # more prototypes: training may now succeed
        if not self._stale:
            self._index.add_with_ids(self._searched(c)[None], np.array([c.id], dtype=np.int64))

    def _index_remove(self, class_id: int) -> bool:
        """Remove one id; False (index marked stale) where the index cannot remove (HNSW)."""
        if self._stale:
            return False
        try:
            self._index.remove_ids(np.array([class_id], dtype=np.int64))
            return True
        except RuntimeError:
            self._stale = True
            return False

    # -- persistence
    def save(self, path) -> None:
        """Write the registry to directory `path`; a crash leaves the old or the new one loadable."""
        path = Path(path)
        with self._lock:
            self._ensure_index()
            header = {"fingerprint": self._fingerprint,
                      "metadata": _json_copy(self.metadata, "metadata")}  # check before any write
            gen = max(self._generation, _prepare_dir(path)) + 1
            written: list[Path] = []
            try:
                files = self._write_data(path, gen, written)
                _fsync_dir(path)  # data file names are durable before the manifest points at them
                manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                            "generation": gen, "dim": self._dim, "metric": self._metric,
                            "index_factory": self._factory, "store_examples": self._store_examples,
                            **header, "next_id": self._next_id,
                            "classes": [{"label": lb, "id": c.id, "count": c.count}
                                        for lb, c in self._classes.items()],
                            "files": files}
                text = json.dumps(manifest, indent=1, allow_nan=False).encode()
                _write_atomic(path, MANIFEST, lambda f: f.write(text), [])
            except BaseException as e:
                for p in written:  # manifest.json untouched: the old registry stays current
                    _unlink_quietly(p)
                if not isinstance(e, Exception):
                    raise
                hint = "disk full? " if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else ""
                raise RegistrySaveError(f"could not save the registry to {path}: {hint}{e}; the "
                                        "previously saved registry there is unchanged") from e
            self._generation = gen
            try:
                _fsync_dir(path)
            except OSError as e:
                raise RegistrySaveError(f"saved the registry to {path}, but syncing the directory "
                                        f"failed ({e}); it may not survive a power loss") from e
            _remove_other_generations(path, gen)

    def _write_data(self, path: Path, gen: int, written: list) -> dict:
        g = f"{gen:06d}"
        classes = list(self._classes.values())
        means = np.stack([c.mean for c in classes]) if classes else np.zeros((0, self._dim), np.float32)
        index_bytes = faiss.serialize_index(self._index).tobytes()
        files = {"prototypes": _write_atomic(path, f"prototypes-{g}.npy", _npy(means), written),
                 "index": _write_atomic(path, f"index-{g}.faiss", lambda f: f.write(index_bytes), written)}
        if self._store_examples:
            examples = [e for c in classes for e in c.examples]
            ex = np.concatenate(examples) if examples else np.zeros((0, self._dim), np.float32)
            owner = np.array([c.id for c in classes for e in c.examples for _ in range(len(e))],
                             dtype=np.int64)
            files["examples"] = _write_atomic(path, f"examples-{g}.npy", _npy(ex), written)
            files["example_class_ids"] = _write_atomic(path, f"example_class_ids-{g}.npy",
                                                       _npy(owner), written)
        return files

    @classmethod
    def load(cls, path, *, expected_fingerprint: dict | None = None) -> "Registry":
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise RegistryFormatError(f"no registry at {path} ({mpath} not found); "
                                      "create one with fewshot register")
        m = _parse_manifest(mpath)
        if expected_fingerprint is not None:
            _check_fingerprint(path, m["fingerprint"], _json_copy(expected_fingerprint, "expected_fingerprint"))
        try:
            reg = cls(m["dim"], metric=m["metric"], index=m["index_factory"], fingerprint=m["fingerprint"],
                      store_examples=m["store_examples"], metadata=m["metadata"])
        except ValueError as e:
            raise RegistryFormatError(f"{mpath}: {e}") from None
        C, dim, classes = len(m["classes"]), m["dim"], m["classes"]
        protos = _load_npy(path, m["files"]["prototypes"], (C, dim), np.float32)
        if not np.isfinite(protos).all():
            raise RegistryFormatError(f"{path / m['files']['prototypes']['name']}: non-finite prototype")
        for row, entry in zip(protos, classes):
            reg._classes[entry["label"]] = _Class(entry["id"], entry["count"], row.copy(), [])
            reg._label_of_id[entry["id"]] = entry["label"]
        if reg._store_examples:
            _load_examples(path, m, reg)
        reg._index = _load_index(path, m, reg)
        # An untrainable index saved as its flat stand-in must keep retrying training.
        fresh = faiss.index_factory(dim, reg._factory, reg._faiss_metric)
        reg._fallback = not fresh.is_trained and type(faiss.downcast_index(reg._index.index)) is not type(fresh)
        reg._stale, reg._next_id, reg._generation = False, m["next_id"], m["generation"]
        return reg


# ---------------------------------------------------------------- writing helpers

class _HashingWriter:
    """File wrapper that hashes and counts bytes as they are written."""

    def __init__(self, f):
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)


def _npy(arr: np.ndarray):
    return lambda f: np.save(f, arr, allow_pickle=False)


def _write_atomic(directory: Path, name: str, write, written: list) -> dict:
    """Write via a temp file in the same dir, fsync, rename; return {"name", "sha256", "bytes"}."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{_TMP_PREFIX}{name}-", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            hw = _HashingWriter(f)
            write(hw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        _unlink_quietly(Path(tmp))
        raise
    written.append(directory / name)
    return {"name": name, "sha256": hw.sha256.hexdigest(), "bytes": hw.size}


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass  # best effort: a leftover file is harmless, the manifest decides what is current


def _is_ours(name: str) -> bool:
    return bool(_DATA_RE.match(name)) or (name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX))


def _prepare_dir(path: Path) -> int:
    """Refuse to clobber user data; create the dir; return the generation already saved there."""
    refuse = RegistrySaveError(f"{path} is not a fewshot registry; choose another path")
    try:
        if path.exists() and not path.is_dir():
            raise refuse
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            return 0
        names = os.listdir(path)
        if MANIFEST not in names:
            # Leftovers of a crashed first save are ours; anything else is the user's.
            if not all(_is_ours(n) for n in names):
                raise refuse
            return 0
        try:
            old = json.loads(_read_bounded(path / MANIFEST, MAX_MANIFEST_BYTES))
        except (ValueError, RecursionError):
            old = None
        if not isinstance(old, dict) or old.get("format") != FORMAT_NAME:
            raise refuse  # someone else's manifest.json: never overwrite it
        gen = old.get("generation")
        return gen if isinstance(gen, int) and not isinstance(gen, bool) and 0 <= gen < _MAX_INT else 0
    except RegistrySaveError:
        raise
    except OSError as e:
        raise RegistrySaveError(f"could not prepare {path} for saving: {e}") from e


def _remove_other_generations(path: Path, gen: int) -> None:
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        m = _DATA_RE.match(name)
        if (m and int(m.group(2)) != gen) or (not m and _is_ours(name)):
            _unlink_quietly(path / name)


# ---------------------------------------------------------------- loading helpers

def _read_bounded(fpath: Path, limit: int) -> bytes:
    with open(fpath, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise RegistryFormatError(f"{fpath}: larger than {limit} bytes; refusing to read it")
    return data


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
        m = json.loads(_read_bounded(mpath, MAX_MANIFEST_BYTES))
    except (ValueError, RecursionError) as e:
        if isinstance(e, RegistryFormatError):
            raise
        raise RegistryFormatError(f"{mpath}: not valid JSON ({e})") from None
    except OSError as e:
        raise RegistryFormatError(f"{mpath}: cannot be read ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise RegistryFormatError(f"{mpath}: not a fewshot registry manifest")
    version = _int_field(m, "format_version", 1, _MAX_INT, mpath)
    if version > FORMAT_VERSION:
        raise RegistryFormatError(f"{mpath}: written by a newer fewshot (format {version}); upgrade fewshot")
    _int_field(m, "generation", 0, _MAX_INT, mpath)
    _int_field(m, "dim", 1, MAX_DIM, mpath)
    if _field(m, "metric", str, mpath) not in METRICS:
        raise RegistryFormatError(f"{mpath}: unknown metric {m['metric']!r}")
    _field(m, "index_factory", str, mpath)
    store = _field(m, "store_examples", bool, mpath)
    _field(m, "fingerprint", dict, mpath)
    _field(m, "metadata", dict, mpath)
    next_id = _int_field(m, "next_id", 0, _MAX_INT, mpath)
    labels, ids = set(), set()
    for entry in _field(m, "classes", list, mpath):
        if not isinstance(entry, dict):
            raise RegistryFormatError(f"{mpath}: each class must be an object")
        label = _field(entry, "label", str, mpath)
        try:
            _check_label(label)
        except ValueError as e:
            raise RegistryFormatError(f"{mpath}: {e}") from None
        cid = _int_field(entry, "id", 0, next_id - 1, mpath)
        _int_field(entry, "count", 1, _MAX_INT, mpath)
        if label in labels or cid in ids:
            raise RegistryFormatError(f"{mpath}: duplicate class label {label!r} or id {cid}")
        labels.add(label)
        ids.add(cid)
    files = _field(m, "files", dict, mpath)
    for key in ("prototypes", "index") + (("examples", "example_class_ids") if store else ()):
        entry = _field(files, key, dict, mpath)
        name = _field(entry, "name", str, mpath)
        if (not name or name in (".", "..", MANIFEST) or "/" in name or "\\" in name
                or "\0" in name or os.path.basename(name) != name):
            raise RegistryFormatError(f"{mpath}: file name {name!r} is not a plain file name in the registry")
        digest = _field(entry, "sha256", str, mpath)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise RegistryFormatError(f"{mpath}: bad sha256 for {name!r}")
        _int_field(entry, "bytes", 0, _MAX_INT, mpath)
    return m


def _check_fingerprint(path: Path, stored: dict, expected: dict) -> None:
    if stored == expected:
        return

    def name(fp):
        return fp["name"] if isinstance(fp.get("name"), str) else json.dumps(fp, sort_keys=True)

    a, b = name(stored), name(expected)
    if a == b:  # same model name, different details: show the details
        a, b = json.dumps(stored, sort_keys=True), json.dumps(expected, sort_keys=True)
    raise EncoderMismatchError(f"the registry at {path} was built with encoder {a}, but the encoder "
                               f"in use is {b}; {_MISMATCH_HINT}")


def _read_verified(path: Path, entry: dict) -> bytes:
    """Read a data file after checking size, then sha256, against the manifest."""
    fpath = path / entry["name"]
    try:
        size = os.stat(fpath).st_size
        if size != entry["bytes"]:
            raise RegistryFormatError(f"{fpath}: size is {size} bytes, manifest says {entry['bytes']} "
                                      "(truncated or replaced?)")
        data = _read_bounded(fpath, entry["bytes"])
    except FileNotFoundError:
        raise RegistryFormatError(f"{fpath}: referenced by the manifest but missing") from None
    except OSError as e:
        raise RegistryFormatError(f"{fpath}: cannot be read ({e})") from None
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise RegistryFormatError(f"{fpath}: sha256 mismatch (corrupted, or a file from "
                                  "another generation?)")
    return data


def _load_npy(path: Path, entry: dict, shape: tuple, dtype) -> np.ndarray:
    fpath = path / entry["name"]
    data = _read_verified(path, entry)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a format error
        raise RegistryFormatError(f"{fpath}: not a valid .npy file ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(dtype) or arr.shape != shape:
        got = (arr.dtype, arr.shape) if isinstance(arr, np.ndarray) else type(arr).__name__
        raise RegistryFormatError(f"{fpath}: expected {np.dtype(dtype)} array of shape {shape}, got {got}")
    return arr


def _load_examples(path: Path, m: dict, reg: Registry) -> None:
    files, dim = m["files"], reg.dim
    owner = _load_npy(path, files["example_class_ids"], (sum(c["count"] for c in m["classes"]),), np.int64)
    ex = _load_npy(path, files["examples"], (len(owner), dim), np.float32)
    fname = path / files["examples"]["name"]
    if not np.isfinite(ex).all():
        raise RegistryFormatError(f"{fname}: non-finite example")
    for label, c in reg._classes.items():
        rows = ex[owner == c.id]
        if len(rows) != c.count:
            raise RegistryFormatError(f"{fname}: class {label!r} has {len(rows)} examples, "
                                      f"manifest count is {c.count}")
        c.examples = [rows.copy()]


def _load_index(path: Path, m: dict, reg: Registry):
    fpath = path / m["files"]["index"]["name"]
    data = _read_verified(path, m["files"]["index"])
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy())
    except Exception as e:  # noqa: BLE001 - any parse failure is a format error
        raise RegistryFormatError(f"{fpath}: not a valid FAISS index ({e})") from None
    if not isinstance(index, faiss.IndexIDMap2) or index.d != reg.dim or index.metric_type != reg._faiss_metric:
        raise RegistryFormatError(f"{fpath}: index type, dim or metric does not match the manifest")
    ids = faiss.vector_to_array(index.id_map)
    if index.ntotal != len(reg) or set(ids.tolist()) != set(reg._label_of_id) or len(ids) != len(reg):
        raise RegistryFormatError(f"{fpath}: index holds {index.ntotal} vectors / ids that do not "
                                  f"match the {len(reg)} classes of the manifest")
    return index
