"""Persistent class registry: per-class prototypes plus a FAISS index for top-k search.

The registry knows nothing of images or encoders: it takes and returns numpy arrays and keeps an
opaque JSON-able ``fingerprint`` of the encoder that produced them. It holds work users cannot
easily redo, so saving is crash-safe (generation-numbered data files, then an atomically replaced
manifest, fsynced in that order) and loading is paranoid (sizes and sha256 checked before any data
file is parsed; the manifest checks itself). ``Registry.open`` binds a registry to its directory:
each change is saved before it returns, under a writer lock (``fewshot.locking``) that keeps a
second writer out while readers go on; readers pin the generation they read (a shared lock held only
while they open its files) and writers delete older generations only when no reader is opening them,
so a reader gets a complete generation however big the registry and however often it is saved.
Nothing is ever unpickled: the formats are JSON, ``.npy`` read without pickle, and
``faiss.serialize_index`` bytes.

Scale: prototypes live in one growable ``(capacity, dim)`` float32 array (measured ~1.1x
``4 * dim`` bytes per class at 1M x 1280, index included), so a million classes load and save in
seconds without per-class array objects. With ``index="auto"`` (the default) searches are exact
(FAISS ``Flat``) while the registry is small, and from ``auto_threshold`` prototypes on use an
inverted file with 4-bit fast-scan product quantisation (``IVF{~2*sqrt(n)},PQ{dim/8}x4fs``, dim/2
bytes a prototype; HNSW was slower to build, 2x the memory, and no more accurate per ms here). The
candidates of an approximate index are re-scored exactly against the stored prototypes, so scores
are always exact; only the candidate set is approximate. ``benchmarks/registry_scale.py`` has the
recall, speed and memory figures behind these choices.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import hashlib
import io
import json
import math
import os
import re
import tempfile
import threading
import unicodedata
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
from .files import honour_umask, open_regular
from .locking import LOCK_FILE, READERS_LOCK_FILE, WriterLock, create_readers_lock, no_readers, reader_pin

METRICS = ("cosine", "l2")  # "l2" = squared Euclidean
# 2: "index_in_use" / "auto_threshold" fields; IVF indexes keep their own ids.
# 3: "manifest_sha256", the manifest's checksum of itself (see _seal).
FORMAT_VERSION = 3
FORMAT_NAME = "fewshot-registry"
MANIFEST = "manifest.json"
MAX_DIM = 65536
MAX_LABEL_LEN = 1024
MAX_MANIFEST_BYTES = 256 * 2**20  # a hostile manifest must not be able to exhaust memory
_MAX_INT = 2**62  # upper bound for ids, counts and generations read from disk
_DATA_RE = re.compile(r"^(prototypes|index|examples|example_class_ids)-(\d+)\.(npy|faiss)$")
# Attachments: small named files saved with the registry (e.g. a copy of its head), same checksums.
_ATTACHMENT_RE = re.compile(r"^(attachment)-(\d+)-([a-z0-9][a-z0-9_.-]{0,63})$")
_ATTACHMENT_KEY = "attachment:"
MAX_ATTACHMENT_BYTES = 256 * 2**20
_TMP_PREFIX, _TMP_SUFFIX = ".fewshot-", ".tmp"
_LOAD_ATTEMPTS = 10  # reads racing a writer's saves retry this often before giving up
_MAX_FACTORY_NUMBER = 2**22  # e.g. IVF lists: 4M lists would already suit billions of classes
_MISMATCH_HINT = ("load it with the encoder it was built with (FewShotClassifier.load picks it "
                  "automatically) or re-register the classes with this encoder")

# -- index="auto"
AUTO = "auto"
# Exact search scans every prototype: a single query costs ~0.16 ms per million float32 values on
# 2 CPU cores (quiet machine; up to ~2x that on a busy one), so "auto" stays exact up to ~2 ms:
# 12 Mi values, i.e. 9,830 prototypes at dim 1280 (measured 2.0 ms at 10,000) and 24,576 at dim
# 512 (benchmarks/registry_scale.py --flat-sweep).
AUTO_FLAT_FLOATS = 12 * 2**20
MIN_AUTO_THRESHOLD = 256  # below this an inverted file has too little to train on
AUTO_TRAIN_PER_LIST = 40  # k-means training sample: 40 prototypes per list (FAISS asks >= 39)
AUTO_RERANK = 128  # approximate candidates re-scored exactly by default (at least 2 * k)
AUTO_SCAN_CODES = 65536  # PQ codes scanned per query by default (sets nprobe from the list sizes)
_CHUNK_FLOATS = 2**22  # rows are normalised / copied in chunks of about 16 MiB of float32
# Searches of fewer queries than this run on one OpenMP thread: a parallel region waits for every
# thread, and when another process holds the other cores that wait is whole scheduler ticks (single
# exact queries measured 4-24 ms instead of 1.5 ms on 2 busy cores). Bigger batches use them all.
SERIAL_SEARCH_BELOW = 64


@dataclass(frozen=True)
class SearchResult:
    labels: list[list[str]]  # per query, best first
    scores: np.ndarray  # (n_queries, k') float32, higher is closer: cosine or -squared L2


# ---------------------------------------------------------------- validation helpers

def _check_label(label) -> str:
    """Labels are any non-empty text of at most MAX_LABEL_LEN characters without NUL, valid Unicode
    (no lone surrogates, such as an undecodable folder name gives). They are never used as file names,
    so "/", ".." or newlines are just characters. Returns the label in Unicode NFC form: "café" typed
    and "café" from a folder name in decomposed form (macOS) are the same class."""
    if (not isinstance(label, str) or not label or "\0" in label or len(label) > MAX_LABEL_LEN
            or not _is_unicode(label)):
        raise ValueError(f"invalid class label {label!r}: a label must be a non-empty string of at "
                         f"most {MAX_LABEL_LEN} characters without NUL or lone surrogates")
    return unicodedata.normalize("NFC", label)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _chunk_rows(dim: int) -> int:
    return max(1, _CHUNK_FLOATS // max(1, dim))


def _all_finite(arr: np.ndarray) -> bool:
    """np.isfinite(arr).all() without a full-size boolean temporary."""
    step = _chunk_rows(arr.shape[1]) if arr.ndim == 2 else len(arr) or 1
    return all(np.isfinite(arr[a:a + step]).all() for a in range(0, len(arr), step))


def _as_matrix(vectors, dim: int, what: str, *, copy: bool = True) -> np.ndarray:
    """Return a C-contiguous (n, dim) float32 array (a fresh copy unless copy=False and the input
    already is one), or raise ValueError naming `what`."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is caught below
            arr = np.array(vectors, dtype=np.float32, copy=True if copy else None, order="C")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: vectors must be a numeric array ({e})") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"{what}: expected shape (dim,) or (n, dim) with n >= 1, got {arr.shape}")
    if arr.shape[1] != dim:
        raise ValueError(f"{what}: expected dim {dim}, got {arr.shape[1]}; "
                         "vectors must come from the same encoder")
    if not _all_finite(arr):
        raise ValueError(f"{what}: vectors contain NaN or infinity")
    return np.ascontiguousarray(arr)


def _norms(x: np.ndarray) -> np.ndarray:
    """Row norms in float64, chunked (no full-size float64 copy)."""
    step = _chunk_rows(x.shape[1])
    return np.concatenate([np.linalg.norm(x[a:a + step].astype(np.float64), axis=1)
                           for a in range(0, len(x), step)]) if len(x) else np.zeros(0)


def _normalise(x: np.ndarray, what: str) -> np.ndarray:
    norms = _norms(x)
    if (norms == 0).any():
        raise ValueError(f"{what}: a zero vector has no direction, so cosine similarity is undefined")
    return _divide_rows(x, norms)


def _divide_rows(x: np.ndarray, norms: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32(x / norms) computed in float64, chunked; rows with norm 0 become zeros."""
    out = np.empty(x.shape, np.float32) if out is None else out
    step = _chunk_rows(x.shape[1])
    for a in range(0, len(x), step):
        n = norms[a:a + step, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a:a + step] = np.where(n > 0, x[a:a + step] / n, 0.0)
    return out


def _json_copy(obj, what: str):
    """Deep copy through JSON, which also proves the object can be saved."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from None


def _check_int(value, what: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{what} must be an integer >= {lo}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------- FAISS helpers

def _auto_nlist(n: int) -> int:
    """Inverted lists for n prototypes: the power of two nearest 2*sqrt(n), with >= 40 per list."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, 2 * math.sqrt(n)))))
    while nlist > 1 and nlist * AUTO_TRAIN_PER_LIST > n:
        nlist //= 2
    return nlist


def _auto_nprobe(nlist: int, ntotal: int) -> int:
    """Lists visited per query by default: enough to scan ~AUTO_SCAN_CODES codes (a fixed time
    budget, ~1.5 ms at 1M x 1280 on 2 busy cores), at least 16: the most recall for that time."""
    return min(nlist, max(16, math.ceil(AUTO_SCAN_CODES * nlist / max(1, ntotal))))


def _auto_codec(dim: int) -> str:
    """4-bit fast-scan PQ: about 8 dimensions per sub-quantiser (dim/2 bytes a vector), but at least
    32 sub-quantisers (2-4 dimensions each) for small dims, where coarser codes miss neighbours."""
    target = max(dim / 8, min(dim / 2, 32))
    m = next(m for m in range(max(1, math.ceil(target)), dim + 1) if dim % m == 0)
    return f"PQ{m}x4fs"


def _auto_factory(n: int, dim: int, threshold: int) -> str:
    return "Flat" if n < threshold else f"IVF{_auto_nlist(n)},{_auto_codec(dim)}"


@contextlib.contextmanager
def _openmp_threads(n: int | None):
    """Run the block with n OpenMP threads for FAISS; the setting is the calling thread's own
    (an OpenMP ICV) and is restored after, so other threads and later calls are unaffected."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _inner(index):
    """The index under an IndexIDMap2, downcast (an IVF index holds its own ids: no wrapper)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def _kind(index) -> str:
    """'flat' (exact), 'ivf', 'hnsw' or 'other' (approximate without search parameters)."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    if faiss.try_extract_index_ivf(inner) is not None:
        return "ivf"
    if hasattr(inner, "hnsw"):
        return "hnsw"
    return "other"


_PARAMS = {"flat": {}, "ivf": {"nprobe": 1, "max_codes": 0, "rerank": 1},
           "hnsw": {"efSearch": 1, "rerank": 1}, "other": {"rerank": 1}}  # name -> minimum value


# ---------------------------------------------------------------- the registry

def _saved(method):
    """Mark a mutating method: on a registry opened with ``Registry.open``, the change is saved
    before the call returns (once, by the outermost call or batch). Each method checks its arguments
    before it changes anything, so a call that raises has changed nothing and there is nothing to save."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self._path is None:
            return method(self, *args, **kwargs)
        with self._lock:
            self._depth += 1
            try:
                result = method(self, *args, **kwargs)
            finally:
                self._depth -= 1
            if self._depth == 0:
                self._persist()
            return result
    return wrapper


class Registry:
    """Named classes -> prototype vectors, searchable by nearest prototype.

    dim: vector size. metric: "cosine" or "l2" (squared Euclidean). index: "auto" (default: exact
    ``Flat`` below ``auto_threshold`` prototypes, an IVF + fast-scan PQ index with exact re-scoring
    above) or any FAISS factory string ("Flat", "HNSW32", "IVF1024,PQ32", ...), which is used as is.
    auto_threshold: prototypes at which "auto" switches to the approximate index (default:
    ``AUTO_FLAT_FLOATS // dim``, 9,830 at dim 1280). The switch, and the re-sizing of the inverted
    file each time the registry grows or shrinks 4x, happens in one lazy rebuild at the next
    search, never once per added class. fingerprint: JSON-able description of the encoder.
    store_examples: keep every raw example vector, not only the running means.

    Thread-safe: every method takes the registry's lock; searches see a consistent registry.
    ``Registry.open(path, dim, ...)`` gives a registry that saves each change before returning.

    Labels are any non-empty text of at most ``MAX_LABEL_LEN`` characters without NUL; vectors must
    be finite, of dimension ``dim`` (and not zero for cosine); ``search`` k must be >= 1 (more than
    the number of classes returns them all). Anything else raises ``ValueError`` and changes nothing.
    """

    def __init__(self, dim: int, *, metric: str = "cosine", index: str = AUTO,
                 auto_threshold: int | None = None, fingerprint: dict | None = None,
                 store_examples: bool = False, metadata: dict | None = None):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= MAX_DIM:
            raise ValueError(f"dim must be an integer in 1..{MAX_DIM}, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if fingerprint is not None and not isinstance(fingerprint, dict):
            raise ValueError("fingerprint must be a dict describing the encoder")
        if not isinstance(index, str):
            raise ValueError(f"index must be 'auto' or a FAISS index factory string, got {index!r}")
        self._dim, self._metric, self._factory = int(dim), metric, index
        self._faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        self._auto = index == AUTO
        if self._auto:
            self._threshold = (max(MIN_AUTO_THRESHOLD, AUTO_FLAT_FLOATS // self._dim) if auto_threshold is None
                               else _check_int(auto_threshold, "auto_threshold", MIN_AUTO_THRESHOLD))
            self._param_kind = "ivf"  # the parameters of the approximate index (ignored while exact)
        else:
            if auto_threshold is not None:
                raise ValueError(f"auto_threshold applies only to index='auto', not to {index!r}")
            self._threshold = None
            try:  # fail now on a bad factory string, not at the first search
                self._param_kind = _kind(faiss.index_factory(self._dim, index, self._faiss_metric))
            except (RuntimeError, TypeError, MemoryError) as e:  # MemoryError: e.g. IVF999999999
                raise ValueError(f"invalid FAISS index factory string {index!r}: {e or 'out of memory'}") from None
        self._fingerprint = _json_copy(fingerprint or {}, "fingerprint")
        self._store_examples = bool(store_examples)
        self.metadata = copy.deepcopy(metadata) if metadata is not None else {}
        # name -> bytes, saved beside the data with its checksum; names match _ATTACHMENT_RE's last group
        self.attachments: dict[str, bytes] = {}
        # Per-class state lives in rows of growable arrays; a removed class's row is reused.
        self._row_of: dict[str, int] = {}  # label -> row; insertion order = class order
        self._labels: list[str | None] = []  # row -> label (None: free row)
        self._free: list[int] = []  # free rows
        self._means = np.zeros((0, self._dim), np.float32)  # row -> running mean (of unit vectors for cosine)
        self._counts = np.zeros(0, np.int64)  # row -> examples averaged
        self._norm = np.zeros(0, np.float64)  # row -> norm of the mean (for normalising and re-scoring)
        # FAISS ids are never reused while an index holds them; a full rebuild renumbers them densely
        # when removals have left the id space much larger than the registry (see _compact_ids).
        self._ids = np.zeros(0, np.int64)  # row -> FAISS id
        self._row_of_id = np.zeros(0, np.int64)  # FAISS id -> row (-1: gone)
        self._examples: dict[int, list] = {}  # FAISS id -> raw float32 (n, dim) arrays, if store_examples
        self._next_id = 0
        self._generation = 0
        self._index = None
        self._in_use = None  # factory string of self._index
        self._exact = True  # self._index is a flat (exact) index
        self._built_n = 0  # classes when the index was built (or loaded)
        self._stale = True  # index must be (re)built from the prototypes before use
        self._fallback = False  # index is an exact flat stand-in for an untrainable one
        self._lock = threading.RLock()
        # Bound mode (Registry.open): the directory every change is saved to, and its writer lock.
        self._path: Path | None = None
        self._writer_lock: WriterLock | None = None
        self._depth = 0  # nesting of mutating calls and batches; the outermost one saves

    # -- read-only properties
    dim = property(lambda self: self._dim)
    metric = property(lambda self: self._metric)
    index_factory = property(lambda self: self._factory, doc="The index asked for: 'auto' or a factory string.")
    auto_threshold = property(lambda self: self._threshold, doc="Prototypes at which 'auto' turns approximate.")
    fingerprint = property(lambda self: copy.deepcopy(self._fingerprint))
    store_examples = property(lambda self: self._store_examples)
    generation = property(lambda self: self._generation)

    @property
    def index_in_use(self) -> str:
        """Factory string of the index that searches use. The index is (re)built lazily: while it is
        out of date this is the one the next search will build (a trainable index that cannot be
        trained yet, e.g. IVF with fewer prototypes than lists, is then replaced by "Flat")."""
        with self._lock:
            return self._planned() if self._stale else self._in_use

    @property
    def classes(self) -> list[str]:
        with self._lock:
            return list(self._row_of)

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(zip(self._row_of, self._counts[self._ordered_rows()].tolist()))

    def count(self, label: str) -> int:
        """Examples averaged into class ``label`` (O(1); ``counts`` builds a dict of every class)."""
        with self._lock:
            return int(self._counts[self._get(label)])

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, label) -> bool:
        return isinstance(label, str) and (label in self._row_of
                                           or unicodedata.normalize("NFC", label) in self._row_of)

    def __repr__(self) -> str:
        return (f"Registry(dim={self._dim}, metric={self._metric!r}, index={self._factory!r}, "
                f"classes={len(self)}, generation={self._generation})")

    # -- row storage
    def _ordered_rows(self) -> np.ndarray:
        return np.fromiter(self._row_of.values(), dtype=np.int64, count=len(self._row_of))

    def _take_rows(self, n: int) -> np.ndarray:
        """Rows for n new classes (free rows first), growing the arrays; no bookkeeping yet."""
        reuse = self._free[len(self._free) - min(n, len(self._free)):]
        top = len(self._labels)
        need = top + n - len(reuse)
        if need > len(self._means):
            cap = max(need, 64, len(self._means) + len(self._means) // (2 if len(self._means) < 2**16 else 8))
            self._means = _grown(self._means, cap)
            self._counts = _grown(self._counts, cap)
            self._norm = _grown(self._norm, cap)
            self._ids = _grown(self._ids, cap)
        return np.concatenate([np.array(reuse[::-1], np.int64), np.arange(top, need, dtype=np.int64)])

    def _commit_rows(self, rows: np.ndarray, labels: list[str], means: np.ndarray | None,
                     counts, raw_examples=None) -> None:
        """Bookkeeping for new classes whose rows came from _take_rows (means may be pre-written)."""
        n = len(rows)
        reused = min(n, len(self._free))
        del self._free[len(self._free) - reused:]
        self._labels.extend([None] * (int(rows.max()) + 1 - len(self._labels) if n else 0))
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        if self._next_id + n > len(self._row_of_id):
            self._row_of_id = _grown(self._row_of_id, max(self._next_id + n, 2 * len(self._row_of_id)), fill=-1)
        if means is not None:
            self._means[rows] = means
        self._update_norms(rows)
        self._counts[rows] = counts
        self._ids[rows] = ids
        self._row_of_id[ids] = rows
        self._next_id += n
        for label, row in zip(labels, rows.tolist()):
            self._row_of[label] = row
            self._labels[row] = label
        if self._store_examples and raw_examples is not None:
            for i, cid in enumerate(ids.tolist()):
                self._examples[cid] = [raw_examples[i]]

    def _update_norms(self, rows: np.ndarray) -> None:
        step = _chunk_rows(self._dim)
        for a in range(0, len(rows), step):
            self._norm[rows[a:a + step]] = _norms(self._means[rows[a:a + step]])

    # -- mutation
    def _prepare(self, label, vectors):
        """Validate everything before touching state, so a bad call changes nothing."""
        _check_label(label)
        raw = _as_matrix(vectors, self._dim, f"class {label!r}")
        unit = _normalise(raw, f"class {label!r}") if self._metric == "cosine" else raw
        return raw, unit

    @_saved
    def add(self, label: str, vectors) -> None:
        """Create the class if new, else add examples to it."""
        label = _check_label(label)  # before the dict lookup, which an unhashable label would break
        with self._lock:
            if label in self._row_of:
                self.add_examples(label, vectors)
            else:
                self.add_class(label, vectors)

    @_saved
    def add_class(self, label: str, vectors) -> None:
        label = _check_label(label)
        raw, x = self._prepare(label, vectors)
        with self._lock:
            if label in self._row_of:
                raise DuplicateClassError(f"class {label!r} already exists; use add_examples to "
                                          "add to it or rename/remove it first")
            rows = self._take_rows(1)
            self._commit_rows(rows, [label], x.mean(axis=0, dtype=np.float64).astype(np.float32)[None],
                              len(x), [raw])
            self._index_add(rows)

    @_saved
    def add_many(self, labels, vectors) -> None:
        """Add ``len(labels)`` new classes at once, one vector each (row i of ``vectors`` is the
        single example of ``labels[i]``): the bulk-load path, vectorised, one FAISS add.

        Everything is checked before anything changes (labels, duplicates among them or with
        existing classes, shape, NaN, zero vectors for cosine). Equivalent to calling
        ``add_class(label, vector)`` for each pair, in order.
        """
        if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
            raise ValueError("labels must be a list of class labels, one per row of vectors")
        labels = [_check_label(label) for label in labels]
        x = _as_matrix(vectors, self._dim, "add_many", copy=False)
        if len(x) != len(labels):
            raise ValueError(f"add_many: {len(labels)} labels but {len(x)} vectors; give one vector per label")
        if len(set(labels)) != len(labels):
            seen, dup = set(), None
            for label in labels:
                if label in seen:
                    dup = label
                    break
                seen.add(label)
            raise DuplicateClassError(f"add_many: label {dup!r} is given more than once")
        norms = None
        if self._metric == "cosine":
            norms = _norms(x)
            if (norms == 0).any():
                bad = labels[int(np.flatnonzero(norms == 0)[0])]
                raise ValueError(f"class {bad!r}: a zero vector has no direction, so cosine similarity "
                                 "is undefined")
        with self._lock:
            clash = next((label for label in labels if label in self._row_of), None)
            if clash is not None:
                raise DuplicateClassError(f"class {clash!r} already exists; use add_examples to add to "
                                          "it or rename/remove it first")
            rows = self._take_rows(len(labels))
            # Write the means straight into their rows (sorted runs are slices: no gather copy).
            if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (len(rows) == 1 or (np.diff(rows) == 1).all()):
                dest = self._means[rows[0]:rows[-1] + 1]
                if norms is not None:
                    _divide_rows(x, norms, out=dest)
                else:
                    dest[...] = x
            else:
                self._means[rows] = _divide_rows(x, norms) if norms is not None else x
            raw = None
            if self._store_examples:
                raw = np.array(x, dtype=np.float32)  # private copy of the raw vectors, one view per class
                raw = [raw[i:i + 1] for i in range(len(raw))]
            self._commit_rows(rows, labels, None, 1, raw)
            self._index_add(rows)

    @_saved
    def add_examples(self, label: str, vectors) -> None:
        label = _check_label(label)
        raw, x = self._prepare(label, vectors)
        with self._lock:
            row = self._get(label)
            # Exact running mean from (mean, count): adding never needs the old examples.
            mean = self._means[row].astype(np.float64)
            count, n = int(self._counts[row]), len(x)
            mean += (x.sum(axis=0, dtype=np.float64) - n * mean) / (count + n)
            self._means[row], self._counts[row] = mean.astype(np.float32), count + n
            self._update_norms(np.array([row]))
            cid = int(self._ids[row])
            if self._store_examples:
                self._examples[cid].append(raw)
            if self._index_remove(cid):
                self._index_add(np.array([row], np.int64))

    @_saved
    def remove(self, label: str) -> None:
        with self._lock:
            row = self._get(label)
            cid = int(self._ids[row])
            label = self._labels[row]
            del self._row_of[label]
            self._labels[row] = None
            self._row_of_id[cid] = -1
            self._counts[row] = 0
            self._examples.pop(cid, None)
            self._free.append(row)
            self._index_remove(cid)

    @_saved
    def rename(self, old: str, new: str) -> None:
        new = _check_label(new)
        with self._lock:
            row = self._get(old)
            old = self._labels[row]
            if new == old:
                return
            if new in self._row_of:
                raise DuplicateClassError(f"cannot rename {old!r} to {new!r}: {new!r} already exists")
            # Rebuild the dict to keep the class at its position; the FAISS id is unchanged.
            self._row_of = {(new if k == old else k): v for k, v in self._row_of.items()}
            self._labels[row] = new

    def _get(self, label) -> int:
        try:
            return self._row_of[label]
        except (KeyError, TypeError):
            pass
        try:
            return self._row_of[unicodedata.normalize("NFC", label)]
        except (KeyError, TypeError):
            raise UnknownClassError(f"no class {label!r} in the registry; known classes: "
                                    f"{len(self._row_of)} (see Registry.classes)") from None

    # -- reading
    def _searched(self, rows: np.ndarray) -> np.ndarray:
        """The vectors that go into the index for these rows: the normalised means for cosine (a mean
        of unit vectors can cancel to zero, e.g. v and -v: it then stays zero and matches nothing)."""
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
            means = self._means[rows[0]:rows[-1] + 1]  # a view: no copy for l2
        else:
            means = self._means[rows]
        return _divide_rows(means, self._norm[rows]) if self._metric == "cosine" else means

    def prototypes(self) -> tuple[list[str], np.ndarray]:
        """(labels, (C, dim) float32 copy of the searched prototypes), in class order."""
        with self._lock:
            labels = list(self._row_of)
            rows = self._ordered_rows()
            out = np.empty((len(rows), self._dim), np.float32)
            step = _chunk_rows(self._dim)
            for a in range(0, len(rows), step):
                out[a:a + step] = self._searched(rows[a:a + step])
        return labels, out

    def examples(self, label: str) -> np.ndarray:
        if not self._store_examples:
            raise ValueError("this registry does not store examples; create it with store_examples=True")
        with self._lock:
            return np.concatenate(self._examples[int(self._ids[self._get(label)])])

    def search(self, queries, k: int, *, params: dict | None = None) -> SearchResult:
        """The k nearest classes of each query, best first, with exact scores.

        params: per-call search parameters of the index in use, e.g. ``{"nprobe": 32}`` (IVF,
        including "auto"), ``{"efSearch": 128}`` (HNSW), and for any approximate index
        ``{"rerank": 512}``: how many candidates to re-score exactly (default
        ``max(128, 2 * k)``). They are ignored while the index is exact (a small "auto" registry).
        "auto" defaults to the nprobe that scans ~65k codes (every list of a small registry, 1/16
        of the lists at 1M): recall@1 vs exact search is ~1.0 on clustered embeddings, but on
        diffuse ones (1-shot prototypes of very varied classes) ~0.70 at 1M (~0.88 at 100k); more
        nprobe and rerank buy recall for time, see ``benchmarks/registry_scale.py --sweep``.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        params = self._check_params(params)
        q = _as_matrix(queries, self._dim, "queries")
        if self._metric == "cosine":
            q = _normalise(q, "queries")
        with self._lock:
            if not self._row_of:
                raise ValueError("registry has no classes; register some first")
            self._ensure_index()
            k = min(int(k), len(self._row_of))
            with _openmp_threads(1 if len(q) < SERIAL_SEARCH_BELOW else None):
                if self._exact:
                    dist, ids = self._index.search(q, k)
                    scores = dist if self._metric == "cosine" else -dist  # higher is always closer
                else:
                    n_cand = min(len(self._row_of), max(k, params.pop("rerank", max(AUTO_RERANK, 2 * k))))
                    _, cand = self._index.search(q, n_cand, params=self._faiss_params(params))
                    scores, ids = self._rescore(q, cand, k)
            labels = [[self._labels[r] for r in self._row_of_id[row[row != -1]].tolist()] for row in ids]
        # Approximate indexes may return fewer hits (id -1): those slots score -inf.
        return SearchResult(labels, np.where(ids == -1, -np.inf, scores).astype(np.float32))

    def _check_params(self, params) -> dict:
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise ValueError(f"params must be a dict of search parameters, got {type(params).__name__}")
        valid = _PARAMS[self._param_kind]
        unknown = sorted(str(p) for p in params if p not in valid)
        if unknown:
            names = ", ".join(sorted(valid)) if valid else "none (this index is exact)"
            raise ValueError(f"unknown search parameter(s) {', '.join(unknown)} for index "
                             f"{self._factory!r}; valid ones: {names}")
        return {name: _check_int(v, f"search parameter {name}", valid[name]) for name, v in params.items()}

    def _faiss_params(self, params: dict):
        if self._fallback or not (params or self._auto):
            return None
        inner = _inner(self._index)
        if "efSearch" in params:
            return faiss.SearchParametersHNSW(efSearch=params["efSearch"])
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is None:
            return None
        default = _auto_nprobe(ivf.nlist, ivf.ntotal) if self._auto else ivf.nprobe
        return faiss.SearchParametersIVF(nprobe=params.get("nprobe", default),
                                         max_codes=params.get("max_codes", ivf.max_codes))

    def _rescore(self, q: np.ndarray, cand: np.ndarray, k: int):
        """Exact scores of the candidate ids against the stored means; the k best per query."""
        nq, n_cand = cand.shape
        out_ids = np.full((nq, k), -1, np.int64)
        out_scores = np.full((nq, k), -np.inf, np.float32)
        step = max(1, _CHUNK_FLOATS // max(1, n_cand * self._dim))
        for a in range(0, nq, step):
            ids, qs = cand[a:a + step], q[a:a + step]
            ok = ids != -1
            rows = self._row_of_id[np.where(ok, ids, 0)]
            ok &= rows != -1
            rows = np.where(ok, rows, 0)
            # einsum, not matmul: BLAS would start threads for one query, which stalls for whole
            # scheduler ticks (4-8 ms) when another process holds the other cores.
            dots = np.einsum("bcd,bd->bc", self._means[rows], qs).astype(np.float64)
            norms = self._norm[rows]
            if self._metric == "cosine":
                s = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
            else:
                s = 2 * dots - norms ** 2 - (qs.astype(np.float64) ** 2).sum(1)[:, None]
            s = np.where(ok, s, -np.inf)
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            best = np.take_along_axis(s, top, axis=1)
            out_scores[a:a + step] = best
            out_ids[a:a + step] = np.where(np.isfinite(best), np.take_along_axis(ids, top, axis=1), -1)
        return out_scores, out_ids

    # -- FAISS index maintenance
    def _planned(self) -> str:
        return _auto_factory(len(self._row_of), self._dim, self._threshold) if self._auto else self._factory

    def _sparse_ids(self) -> bool:
        return self._next_id > 2 * len(self._row_of) + 1024

    def _compact_ids(self) -> None:
        """Renumber the FAISS ids 0..C-1 in class order (only while no index holds the old ones)."""
        rows = self._ordered_rows()
        old = self._ids[rows]
        new = np.arange(len(rows), dtype=np.int64)
        self._ids[rows] = new
        self._row_of_id = np.full(max(1024, len(rows)), -1, np.int64)
        self._row_of_id[new] = rows
        if self._store_examples:
            self._examples = {n: self._examples[o] for o, n in zip(old.tolist(), new.tolist())}
        self._next_id = len(rows)

    def _build_index(self):
        self._index, self._stale = None, True  # the old index goes first (memory; ids renumbered below)
        if self._sparse_ids():
            self._compact_ids()
        rows = self._ordered_rows()
        factory = self._planned()
        inner, fallback = faiss.index_factory(self._dim, factory, self._faiss_metric), False
        if not inner.is_trained:
            try:
                if len(rows) == 0:
                    raise RuntimeError("nothing to train on")
                self._train(inner, rows)
            except RuntimeError:
                # Too few prototypes to train (IVF needs >= nlist, PQ >= 256): search exactly with a
                # flat index for now; the next mutation marks it stale so training is retried.
                inner, fallback, factory = faiss.IndexFlat(self._dim, self._faiss_metric), True, "Flat"
        # IVF indexes store ids themselves and remove by id; wrapped in an IndexIDMap2 their removal
        # would shift the wrapper's id table out of step with the lists.
        index = inner if faiss.try_extract_index_ivf(inner) is not None else faiss.IndexIDMap2(inner)
        self._add_to(index, rows)
        self._index, self._in_use, self._fallback, self._built_n = index, factory, fallback, len(rows)
        self._exact = _kind(index) == "flat"
        self._stale = False

    def _train(self, inner, rows: np.ndarray) -> None:
        ivf = faiss.try_extract_index_ivf(inner)
        cap = AUTO_TRAIN_PER_LIST * ivf.nlist if self._auto and ivf is not None else 2**18
        if len(rows) > cap:  # a fixed-seed sample: the same prototypes give the same index
            rows = np.sort(np.random.default_rng(0).choice(rows, cap, replace=False))
        if self._auto and ivf is not None:
            ivf.nprobe = _auto_nprobe(ivf.nlist, len(rows))  # saved with the index; searches recompute it
            # Unit vectors, inner product: spherical k-means (unit centroids). Plain k-means with
            # inner-product assignment lets a few long centroids take most vectors (lists 100x the
            # median measured on clustered data, and a search then scans them all).
            ivf.cp.spherical = self._metric == "cosine"
        inner.train(self._searched(rows))

    def _add_to(self, index, rows: np.ndarray) -> None:
        step = _chunk_rows(self._dim) * 4
        for a in range(0, len(rows), step):
            index.add_with_ids(self._searched(rows[a:a + step]), self._ids[rows[a:a + step]])

    def _ensure_index(self):
        if self._stale:
            self._build_index()

    def _auto_outgrown(self) -> bool:
        """Whether "auto" should rebuild: exact index past the threshold, or an inverted file whose
        number of lists no longer fits the registry's size (it grew or shrank 4x since it was built)."""
        n = len(self._row_of)
        if self._exact:
            return n >= self._threshold
        if n < self._threshold // 2:
            return True  # back to exact search (hysteresis: no flapping around the threshold)
        return n >= 4 * self._built_n or 4 * n <= self._built_n

    def _index_add(self, rows: np.ndarray):
        if self._fallback or self._next_id > 4 * len(self._row_of) + 2**20:
            self._stale = True  # more prototypes: training may now succeed; or ids to compact
        if not self._stale and self._auto and self._auto_outgrown():
            self._stale = True  # one rebuild at the next search, not one per add
        if not self._stale:
            self._add_to(self._index, rows)

    def _index_remove(self, class_id: int) -> bool:
        """Remove one id; False (index marked stale) where the index cannot remove it in place."""
        if self._stale:
            return False
        inner = _inner(self._index)
        # IndexIDMap2 compacts its id table on removal, which matches only indexes that shift
        # their codes the same way (flat codes); HNSW cannot remove at all.
        if isinstance(self._index, faiss.IndexIDMap2) and not isinstance(inner, faiss.IndexFlatCodes):
            self._stale = True
            return False
        try:
            self._index.remove_ids(np.array([class_id], dtype=np.int64))
        except RuntimeError:
            self._stale = True
            return False
        if self._auto and self._auto_outgrown():
            self._stale = True
            return False
        return True

    # -- bound mode: every change saved before it returns
    @classmethod
    def open(cls, path, dim: int | None = None, **options) -> "Registry":
        """Open the registry at directory ``path`` for writing, creating it if there is none yet
        (``dim`` and ``options`` as for ``Registry(...)``; an existing registry is loaded as saved, and
        ``dim``, ``metric`` and ``fingerprint``, if given, must match it).

        Every change (add, add_class, add_many, add_examples, remove, rename) is saved atomically
        before the call returns, so a change that returned survives a crash or a kill. If that save
        fails, ``RegistrySaveError`` is raised and the change is undone in memory too (reloaded from
        ``path``). ``with reg.batch():`` saves several changes once. The registry holds ``path``'s
        writer lock until ``close()`` (or the end of a ``with Registry.open(...)`` block, or the
        process's death); another writer gets ``RegistryLockedError`` at once. Readers
        (``Registry.load``) take no lock and see the last completed save.
        """
        path = Path(path)
        lock = _lock_dir(path)
        try:
            if (path / MANIFEST).is_file():
                reg = cls.load(path, expected_fingerprint=options.get("fingerprint"))
                for name, value in (("dim", dim), ("metric", options.get("metric"))):
                    if value is not None and value != getattr(reg, name):
                        raise ValueError(f"the registry at {path} has {name} {getattr(reg, name)!r}, not "
                                         f"{value!r}; open it without {name}= or use another path")
            elif dim is None:
                raise RegistryFormatError(f"no registry at {path}; pass dim (and options) to create one")
            else:
                reg = cls(dim, **options)
        except BaseException:
            lock.release()
            raise
        reg._bind(path, lock)
        return reg

    def _bind(self, path: Path, lock: WriterLock) -> None:
        with self._lock:
            if self._path is not None:
                lock.release()
                raise ValueError(f"this registry is already open for writing at {self._path}")
            self._path, self._writer_lock = Path(path), lock

    @property
    def path(self) -> Path | None:
        """The directory this registry saves every change to (``Registry.open``), else None."""
        return self._path

    def close(self) -> None:
        """Release the writer lock; changes are no longer saved automatically (the registry stays
        usable in memory). Everything that returned has been saved already."""
        with self._lock:
            if self._writer_lock is not None:
                self._writer_lock.release()
            self._path, self._writer_lock = None, None

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def batch(self):
        """Group changes of a registry opened with ``Registry.open``: they are saved once, when the
        block ends, and if the block raises they are all undone (the last save is reloaded). Nested
        batches join the outermost one. On other registries this does nothing."""
        if self._path is None:
            yield self
            return
        with self._lock:
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._revert()
                raise
            self._depth -= 1
            if self._depth == 0:
                self._persist()

    def _persist(self) -> None:
        try:
            self.save(self._path)
        except BaseException:
            self._revert()  # what returned must be what is on disk, so a failed change is undone
            raise

    def _revert(self) -> None:
        """Make the registry in memory the one saved at self._path again."""
        path = self._path
        try:
            if (path / MANIFEST).is_file():
                fresh = type(self).load(path)
            else:  # never saved: back to empty
                fresh = type(self)(self._dim, metric=self._metric, index=self._factory,
                                   auto_threshold=self._threshold if self._auto else None,
                                   fingerprint=self._fingerprint, store_examples=self._store_examples,
                                   metadata=self.metadata)
        except Exception as e:
            self.close()
            raise RegistrySaveError(f"a change to the registry at {path} failed and reloading it failed "
                                    f"too ({e}); the registry was closed: open it again") from e
        keep = {"_lock", "_path", "_writer_lock", "_depth"}
        self.__dict__.update({k: v for k, v in fresh.__dict__.items() if k not in keep})

    # -- persistence
    def save(self, path) -> None:
        """Write the registry to directory `path`; a crash leaves the old or the new one loadable.

        Takes `path`'s writer lock for the duration (``RegistryLockedError`` if another writer has
        it open). Raises ``RegistrySaveError`` (disk full, I/O error, ...) with the previously saved
        registry there unchanged, and no temporary files left behind."""
        path = Path(path)
        with self._lock:
            self._ensure_index()
            header = {"fingerprint": self._fingerprint,
                      "metadata": _json_copy(self.metadata, "metadata")}  # check before any write
            _checked_attachments(self.attachments)
            mine = self._path is not None and _same_dir(path, self._path)
            with contextlib.nullcontext() if mine else _lock_dir(path):
                self._save_locked(path, header)

    def _save_locked(self, path: Path, header: dict) -> None:
        gen = max(self._generation, _saved_generation(path) or 0) + 1
        written: list[Path] = []
        try:
            create_readers_lock(path)
            rows = self._ordered_rows()
            files = self._write_data(path, gen, rows, written)
            _fsync_dir(path)  # data file names are durable before the manifest points at them
            ids, counts = self._ids[rows].tolist(), self._counts[rows].tolist()
            manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                        "generation": gen, "dim": self._dim, "metric": self._metric,
                        "index_factory": self._factory, "index_in_use": self._in_use,
                        "auto_threshold": self._threshold, "store_examples": self._store_examples,
                        **header, "next_id": self._next_id,
                        "classes": [{"label": lb, "id": i, "count": c}
                                    for lb, i, c in zip(self._row_of, ids, counts)],
                        "files": files}
            # Large registries: no indentation (a million classes: ~50 MB instead of ~70 MB).
            text = _seal(manifest, indent=1 if len(rows) <= 10000 else None)
            _write_atomic(path, MANIFEST, lambda f: f.write(text), [])
        except BaseException as e:
            for p in written:  # manifest.json untouched: the old registry stays current
                _unlink_quietly(p)
            if not isinstance(e, Exception):
                raise
            hint = {errno.ENOSPC: "disk full? ", errno.EDQUOT: "disk quota exceeded? ",
                    errno.EFBIG: "file size limit reached? "}.get(getattr(e, "errno", None), "")
            raise RegistrySaveError(f"could not save the registry to {path}: {hint}{e}; the "
                                    "previously saved registry there is unchanged") from e
        self._generation = gen
        try:
            _fsync_dir(path)
        except OSError as e:
            raise RegistrySaveError(f"saved the registry to {path}, but syncing the directory "
                                    f"failed ({e}); it may not survive a power loss") from e
        _remove_other_generations(path, gen)

    def _write_data(self, path: Path, gen: int, rows: np.ndarray, written: list) -> dict:
        g = f"{gen:06d}"
        step = _chunk_rows(self._dim)
        means = _npy_chunks((len(rows), self._dim), np.float32,
                            lambda: (self._means[rows[a:a + step]] for a in range(0, len(rows), step)))
        index_bytes = faiss.serialize_index(self._index)  # uint8 array, written without a copy
        files = {"prototypes": _write_atomic(path, f"prototypes-{g}.npy", means, written),
                 "index": _write_atomic(path, f"index-{g}.faiss",
                                        lambda f: f.write(memoryview(index_bytes)), written)}  # noqa: F821
        del index_bytes
        if self._store_examples:
            per_class = [self._examples[i] for i in self._ids[rows].tolist()]
            examples = [e for ex in per_class for e in ex]
            ex = np.concatenate(examples) if examples else np.zeros((0, self._dim), np.float32)
            owner = np.repeat(self._ids[rows], [sum(len(e) for e in ex_) for ex_ in per_class]).astype(np.int64)
            files["examples"] = _write_atomic(path, f"examples-{g}.npy", _npy(ex), written)
            files["example_class_ids"] = _write_atomic(path, f"example_class_ids-{g}.npy",
                                                       _npy(owner), written)
        for name, data in self.attachments.items():
            files[_ATTACHMENT_KEY + name] = _write_atomic(path, f"attachment-{g}-{name}",
                                                          lambda f, data=data: f.write(data), written)
        return files

    @classmethod
    def load(cls, path, *, expected_fingerprint: dict | None = None) -> "Registry":
        """Read the registry saved at directory ``path`` (a save in progress is not seen, and no writer
        deletes the files of the generation being read). Every file is checked (size, sha256, the
        manifest's own checksum, shapes, ids) before it is parsed; any problem raises
        ``RegistryFormatError`` naming the file."""
        path = Path(path)
        mpath = path / MANIFEST
        for attempt in range(_LOAD_ATTEMPTS):
            m, opened = None, {}
            try:
                # No writer deletes a generation's files between our reading its manifest and opening
                # them; once open, they stay readable whatever the writer does next.
                with reader_pin(path):
                    m = _read_manifest(path)
                    opened = _open_generation(path, m)
                if expected_fingerprint is not None:
                    _check_fingerprint(path, m["fingerprint"],
                                       _json_copy(expected_fingerprint, "expected_fingerprint"))
                return cls._from_manifest(path, m, opened)
            except RegistryFormatError:
                # Without the readers' lock (an older writer, no fcntl) a writer may have deleted this
                # generation's files: then read the new one. A file that is bad for good is reported.
                if m is None or attempt + 1 == _LOAD_ATTEMPTS or _manifest_digest(mpath) == m["_digest"]:
                    raise
            finally:
                for f in opened.values():
                    f.close()
        raise AssertionError("unreachable")

    @staticmethod
    def saved_counts(path) -> dict[str, int]:
        """``{label: count}`` of the registry saved at directory ``path``, read from its manifest alone
        (checked by the manifest's own checksum): listing a big registry's classes reads no prototypes."""
        with reader_pin(Path(path)):
            m = _read_manifest(Path(path))
        return dict(zip(m["_labels"], m["_counts"].tolist()))

    @classmethod
    def _from_manifest(cls, path: Path, m: dict, opened: dict) -> "Registry":
        mpath = path / MANIFEST
        try:
            reg = cls(m["dim"], metric=m["metric"], index=m["index_factory"], fingerprint=m["fingerprint"],
                      auto_threshold=m.get("auto_threshold"), store_examples=m["store_examples"],
                      metadata=m["metadata"])
        except ValueError as e:
            raise RegistryFormatError(f"{mpath}: {e}") from None
        C, dim, labels = len(m["classes"]), m["dim"], m["_labels"]
        protos = _load_npy(path, m["files"]["prototypes"], (C, dim), np.float32, opened)
        if not _all_finite(protos):
            raise RegistryFormatError(f"{path / m['files']['prototypes']['name']}: non-finite prototype")
        ids = np.array(m["_ids"], dtype=np.int64)
        reg._means, reg._counts, reg._ids = protos, np.array(m["_counts"], dtype=np.int64), ids
        reg._norm = _norms(protos)
        reg._row_of = dict(zip(labels, range(C)))
        reg._labels = list(labels)
        reg._next_id = m["next_id"]
        if reg._sparse_ids():  # mostly removed ids (or a hostile next_id): no id table that large
            reg._row_of_id = np.zeros(0, np.int64)
        else:
            reg._row_of_id = np.full(max(1024, m["next_id"]), -1, np.int64)
            reg._row_of_id[ids] = np.arange(C)
        if reg._store_examples:
            _load_examples(path, m, reg, opened)
        reg.attachments = _load_attachments(path, m, opened)
        reg._index = _load_index(path, m, reg, opened)
        reg._in_use, reg._fallback = _index_in_use(mpath, m, reg)
        reg._exact, reg._built_n = _kind(reg._index) == "flat", C
        reg._stale, reg._generation = False, m["generation"]
        if reg._sparse_ids():  # renumber; the next search rebuilds the index with the new ids
            reg._index, reg._stale = None, True
            reg._compact_ids()
        else:
            _check_flat_vectors(path / m["files"]["index"]["name"], reg)
        return reg


def _grown(arr: np.ndarray, cap: int, fill=0) -> np.ndarray:
    """arr with room for cap rows. In place where numpy can (realloc: large blocks are moved by the
    OS, not copied, so growing a 5 GB array does not need 10 GB); the registry never lets views of
    its arrays escape its lock, which is what makes ``refcheck=False`` safe here."""
    old = len(arr)
    if arr.flags.owndata and arr.base is None and arr.flags.c_contiguous:
        try:
            arr.resize((cap,) + arr.shape[1:], refcheck=False)
            if fill:
                arr[old:] = fill
            return arr
        except (ValueError, MemoryError):
            pass
    new = np.full((cap,) + arr.shape[1:], fill, arr.dtype)
    new[:old] = arr
    return new


# ---------------------------------------------------------------- writing helpers

class _HashingWriter:
    """File wrapper that hashes and counts bytes as they are written."""

    def __init__(self, f):
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self._f.write(data)


def _npy(arr: np.ndarray):
    return lambda f: np.save(f, arr, allow_pickle=False)


def _write_atomic(directory: Path, name: str, write, written: list) -> dict:
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
    return (bool(_DATA_RE.match(name) or _ATTACHMENT_RE.match(name)) or name in (LOCK_FILE, READERS_LOCK_FILE)
            or (name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX)))


def _lock_dir(path: Path) -> WriterLock:
    """Create the registry directory if needed (never in a folder of user data) and take its
    writer lock."""
    refuse = RegistrySaveError(f"{path} is not a fewshot registry; choose another path")
    try:
        if path.exists() and not path.is_dir():
            raise refuse
        path.mkdir(parents=True, exist_ok=True)
        names = os.listdir(path)
        # Without a manifest, leftovers of a crashed first save are ours; anything else is the user's.
        if (not all(_is_ours(n) for n in names) if MANIFEST not in names
                else _saved_generation(path) is None):
            raise refuse  # user data, or someone else's manifest.json: never overwrite it
        return WriterLock(path)
    except RegistrySaveError:
        raise
    except OSError as e:
        raise RegistrySaveError(f"could not prepare {path} for saving: {e}") from e


def _saved_generation(path: Path) -> int | None:
    """The generation of the registry saved at path (0: none), or None if its manifest.json is not
    a fewshot registry's."""
    try:
        old = json.loads(_read_bounded(path / MANIFEST, MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        return 0
    except (ValueError, RecursionError):
        return None
    if not isinstance(old, dict) or old.get("format") != FORMAT_NAME:
        return None
    gen = old.get("generation")
    return gen if isinstance(gen, int) and not isinstance(gen, bool) and 0 <= gen < _MAX_INT else 0


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _remove_other_generations(path: Path, gen: int) -> None:
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
                    _unlink_quietly(path / name)
    except (OSError, RegistryFormatError):
        return  # best effort: leftovers are harmless, the manifest decides what is current


def _npy_chunks(shape: tuple, dtype, chunks):
    """Write an .npy file from row chunks (no full-size temporary)."""
    def write(f):
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
        for chunk in chunks():
            f.write(memoryview(np.ascontiguousarray(chunk, dtype=dtype).reshape(-1).view(np.uint8)))
    return write


# ---------------------------------------------------------------- loading helpers

def _open_regular(fpath: Path):
    """Open a registry file for reading, refusing anything but a regular file (see ``fewshot.files``)."""
    f = open_regular(fpath)
    if f is None:
        raise RegistryFormatError(f"{fpath}: not a regular file")
    return f


def _read_bounded(fpath: Path, limit: int) -> bytes:
    with _open_regular(fpath) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise RegistryFormatError(f"{fpath}: larger than {limit} bytes; refusing to read it")
    return data


def _seal(manifest: dict, indent: int | None) -> bytes:
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


def _manifest_digest(mpath: Path) -> str | None:
    try:
        return hashlib.sha256(_read_bounded(mpath, MAX_MANIFEST_BYTES)).hexdigest()
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
        raw = _read_bounded(mpath, MAX_MANIFEST_BYTES)
        m = json.loads(raw)
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
    _check_seal(mpath, raw, m)
    m["_digest"] = hashlib.sha256(raw).hexdigest()
    _int_field(m, "generation", 0, _MAX_INT, mpath)
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
    next_id = _int_field(m, "next_id", 0, _MAX_INT, mpath)
    entries = _field(m, "classes", list, mpath)
    fast = _classes_fast(entries, next_id)
    if fast is None:
        _classes_slow(entries, next_id, mpath)  # raises with the precise reason
        raise RegistryFormatError(f"{mpath}: invalid class table")
    m["_labels"], m["_ids"], m["_counts"] = fast
    files = _field(m, "files", dict, mpath)
    attached = tuple(k for k in files if isinstance(k, str) and k.startswith(_ATTACHMENT_KEY))
    for key in ("prototypes", "index") + (("examples", "example_class_ids") if store else ()) + attached:
        entry = _field(files, key, dict, mpath)
        name = _field(entry, "name", str, mpath)
        if (not name or name in (".", "..", MANIFEST) or "/" in name or "\\" in name
                or "\0" in name or os.path.basename(name) != name or not _is_unicode(name)):
            raise RegistryFormatError(f"{mpath}: file name {name!r} is not a plain file name in the registry")
        digest = _field(entry, "sha256", str, mpath)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise RegistryFormatError(f"{mpath}: bad sha256 for {name!r}")
        _int_field(entry, "bytes", 0, _MAX_INT, mpath)
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
            or not _is_unicode("".join(labels))):
        return None
    try:
        id_arr, count_arr = np.array(ids, dtype=np.int64), np.array(counts, dtype=np.int64)
    except OverflowError:
        return None
    if len(ids) and (id_arr.min() < 0 or id_arr.max() > next_id - 1 or count_arr.min() < 1
                     or count_arr.max() > _MAX_INT or len(np.unique(id_arr)) != len(id_arr)):
        return None
    return labels, id_arr, count_arr


def _classes_slow(entries: list, next_id: int, mpath: Path) -> None:
    labels, ids = set(), set()
    for entry in entries:
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


_READ_CHUNK = 64 * 2**20


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise RegistryFormatError(f"no registry at {path} ({mpath} not found); create one with fewshot register")
    return _parse_manifest(mpath)


def _open_generation(path: Path, m: dict) -> dict:
    """{file name: open file} for every data file the manifest ``m`` names."""
    keys = (("prototypes", "index") + (("examples", "example_class_ids") if m["store_examples"] else ())
            + tuple(k for k in m["files"] if k.startswith(_ATTACHMENT_KEY)))
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


def _read_verified_into(path: Path, entry: dict, split, opened: dict) -> list[np.ndarray]:
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


def _checked_attachments(attachments) -> dict[str, bytes]:
    if not isinstance(attachments, dict):
        raise ValueError("attachments must be a dict of name -> bytes")
    for name, data in attachments.items():
        if not isinstance(name, str) or not _ATTACHMENT_RE.match(f"attachment-0-{name}"):
            raise ValueError(f"attachment name {name!r}: use 1-64 of a-z 0-9 _ . - (starting with a letter or digit)")
        if not isinstance(data, bytes) or len(data) > MAX_ATTACHMENT_BYTES:
            raise ValueError(f"attachment {name!r} must be bytes of at most {MAX_ATTACHMENT_BYTES} bytes")
    return attachments


def _load_attachments(path: Path, m: dict, opened: dict) -> dict[str, bytes]:
    out = {}
    for key, entry in m["files"].items():
        if not key.startswith(_ATTACHMENT_KEY):
            continue
        name = key[len(_ATTACHMENT_KEY):]
        if not _ATTACHMENT_RE.match(f"attachment-0-{name}") or entry["bytes"] > MAX_ATTACHMENT_BYTES:
            raise RegistryFormatError(f"{path / MANIFEST}: bad attachment {name!r}")
        out[name] = _read_verified_into(path, entry, lambda size: [np.empty(size, np.uint8)],
                                        opened)[0].tobytes()
    return out


def _load_npy(path: Path, entry: dict, shape: tuple, dtype, opened: dict) -> np.ndarray:
    """The array of an .npy file, read straight into its final (owned, writable) array."""
    fpath = path / entry["name"]
    dtype = np.dtype(dtype)
    data_bytes = math.prod(shape) * dtype.itemsize

    bad = f"{fpath}: expected {dtype} array of shape {shape}"

    def split(size):  # called once the file's size is known: nothing bigger than it is allocated
        if not 10 <= size - data_bytes <= 2**16:  # magic + header, then exactly the data
            raise RegistryFormatError(f"{bad}, but the file has {size} bytes")
        return [np.empty(size - data_bytes, np.uint8), np.empty(shape, dtype)]

    buffers = _read_verified_into(path, entry, split, opened)
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


def _load_examples(path: Path, m: dict, reg: Registry, opened: dict) -> None:
    files, dim = m["files"], reg.dim
    counts, ids = m["_counts"], m["_ids"]
    owner = _load_npy(path, files["example_class_ids"], (int(counts.sum()),), np.int64, opened)
    ex = _load_npy(path, files["examples"], (len(owner), dim), np.float32, opened)
    fname = path / files["examples"]["name"]
    if not _all_finite(ex):
        raise RegistryFormatError(f"{fname}: non-finite example")
    order = np.argsort(owner, kind="stable")  # each class's examples together, in file order
    sorted_owner = owner[order]
    starts, ends = np.searchsorted(sorted_owner, ids, "left"), np.searchsorted(sorted_owner, ids, "right")
    wrong = np.flatnonzero(ends - starts != counts)
    if len(wrong):
        i = int(wrong[0])
        raise RegistryFormatError(f"{fname}: class {m['_labels'][i]!r} has {int(ends[i] - starts[i])} "
                                  f"examples, manifest count is {int(counts[i])}")
    ex = ex[order]
    reg._examples = {cid: [ex[a:b]] for cid, a, b in zip(ids.tolist(), starts.tolist(), ends.tolist())}


def _index_ids(index) -> np.ndarray:
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map)
    ivf = faiss.extract_index_ivf(index)
    inv, parts = ivf.invlists, []
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n:
            ptr = inv.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, n).copy())
            inv.release_ids(lst, ptr)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _load_index(path: Path, m: dict, reg: Registry, opened: dict):
    fpath = path / m["files"]["index"]["name"]
    (data,) = _read_verified_into(path, m["files"]["index"], lambda size: [np.empty(size, np.uint8)], opened)
    try:
        index = faiss.deserialize_index(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is a format error
        raise RegistryFormatError(f"{fpath}: not a valid FAISS index ({e})") from None
    del data
    wrapped = isinstance(index, faiss.IndexIDMap2) or faiss.try_extract_index_ivf(index) is not None
    if not wrapped or index.d != reg.dim or index.metric_type != reg._faiss_metric:
        raise RegistryFormatError(f"{fpath}: index type, dim or metric does not match the manifest")
    ids = _index_ids(index)
    if index.ntotal != len(reg) or len(ids) != len(reg) or not np.array_equal(np.sort(ids), np.sort(reg._ids)):
        raise RegistryFormatError(f"{fpath}: index holds {index.ntotal} vectors / ids that do not "
                                  f"match the {len(reg)} classes of the manifest")
    return index


def _check_flat_vectors(fpath: Path, reg: Registry) -> None:
    """A flat index scores queries with its own copies of the prototypes: they must be exactly the
    prototypes, or a query would get the wrong class at a perfect score (an index out of step with
    its metadata, mem0#7117). Approximate indexes need no check: their candidates are re-scored
    against the prototypes."""
    if reg._stale or not isinstance(reg._index, faiss.IndexIDMap2):
        return
    inner = faiss.downcast_index(reg._index.index)
    if not isinstance(inner, faiss.IndexFlat):
        return
    n = inner.ntotal
    stored = faiss.rev_swig_ptr(inner.get_xb(), n * reg.dim).reshape(n, reg.dim) if n else None
    rows = reg._row_of_id[faiss.vector_to_array(reg._index.id_map)]
    step = _chunk_rows(reg.dim)
    for a in range(0, n, step):
        if not np.array_equal(stored[a:a + step], reg._searched(rows[a:a + step])):
            raise RegistryFormatError(f"{fpath}: the index's vectors are not the prototypes of "
                                      f"{MANIFEST} and the prototypes file")


def _same_type(a, b) -> bool:
    return type(a) is type(b) or (isinstance(a, faiss.IndexFlat) and isinstance(b, faiss.IndexFlat))


def _index_in_use(mpath: Path, m: dict, reg: Registry) -> tuple[str, bool]:
    """(factory string of the loaded index, whether it is a flat stand-in for an untrainable one),
    after checking that the index file is of the kind the manifest says."""
    loaded = _inner(reg._index)

    def built(factory):
        try:
            return faiss.index_factory(reg.dim, factory, reg._faiss_metric)
        except (RuntimeError, TypeError, MemoryError) as e:
            raise RegistryFormatError(f"{mpath}: invalid index_in_use {factory!r}: {e or 'out of memory'}") from None

    in_use = m.get("index_in_use")
    if in_use is None:  # format 1: the factory asked for, or its flat stand-in
        in_use = reg._factory if _same_type(loaded, built(reg._factory)) else "Flat"
    if (not reg._auto and in_use not in (reg._factory, "Flat")) or not _same_type(loaded, built(in_use)):
        raise RegistryFormatError(f"{mpath}: the index file is not the {in_use!r} index the manifest "
                                  f"names (index_factory {reg._factory!r})")
    return in_use, not reg._auto and in_use != reg._factory
