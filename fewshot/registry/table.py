"""The Registry: named classes -> prototype vectors (running means, optional raw examples with their
sources, thumbnails, attachments), searchable by nearest prototype, saved and loaded crash-safely."""

from __future__ import annotations

import copy
import functools
import threading
import unicodedata
from pathlib import Path

import faiss
import numpy as np

from ..errors import DuplicateClassError, UnknownClassError
from .locking import WriterLock
from .index import AUTO, AUTO_FLAT_FLOATS, MIN_AUTO_THRESHOLD, IndexedSearch, index_kind
from ..checks import check_int
from .labels import UNRECORDED, ExampleSource, check_sources, json_copy, check_label, check_thumbnail
from .persistence import Persistence
from .vectors import MAX_DIM, METRICS, as_matrix, chunk_rows, divide_rows, grown_array, normalise_rows, row_norms


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


class Registry(IndexedSearch, Persistence):
    """Named classes -> prototype vectors, searchable by nearest prototype.

    dim: vector size. metric: "cosine" or "l2" (squared Euclidean). index: "auto" (default: exact
    ``Flat`` below ``auto_threshold`` prototypes; above, a scan of fast-scan PQ codes of a PCA
    projection, with exact re-scoring of the best candidates) or any FAISS factory string ("Flat",
    "HNSW32", "IVF1024,PQ32", ...), which is used as is.
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
                               else check_int(auto_threshold, "auto_threshold", MIN_AUTO_THRESHOLD))
            self._param_kind = "ivf"  # the parameters of the approximate index (ignored while exact)
        else:
            if auto_threshold is not None:
                raise ValueError(f"auto_threshold applies only to index='auto', not to {index!r}")
            self._threshold = None
            try:  # fail now on a bad factory string, not at the first search
                self._param_kind = index_kind(faiss.index_factory(self._dim, index, self._faiss_metric))
            except (RuntimeError, TypeError, MemoryError) as e:  # MemoryError: e.g. IVF999999999
                raise ValueError(f"invalid FAISS index factory string {index!r}: {e or 'out of memory'}") from None
        self._fingerprint = json_copy(fingerprint or {}, "fingerprint")
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
        # FAISS id -> one ExampleSource per example averaged (in the order of the stored examples);
        # only classes some of whose examples came with sources: bulk-loaded classes cost nothing.
        self._sources: dict[int, list[ExampleSource]] = {}
        # content digest -> FAISS ids of the classes holding it; built on first use, then kept up to date
        # (so that checking a registration for repeated images does not scan every class's sources)
        self._owners: dict[str, set[int]] | None = None
        self._thumbnails: dict[str, bytes] = {}  # label -> small JPEG (set_thumbnail), saved with the rest
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
            self._means = grown_array(self._means, cap)
            self._counts = grown_array(self._counts, cap)
            self._norm = grown_array(self._norm, cap)
            self._ids = grown_array(self._ids, cap)
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
            self._row_of_id = grown_array(self._row_of_id, max(self._next_id + n, 2 * len(self._row_of_id)), fill=-1)
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
        step = chunk_rows(self._dim)
        for a in range(0, len(rows), step):
            self._norm[rows[a:a + step]] = row_norms(self._means[rows[a:a + step]])

    # -- mutation
    def _prepare(self, label, vectors):
        """Validate everything before touching state, so a bad call changes nothing."""
        check_label(label)
        raw = as_matrix(vectors, self._dim, f"class {label!r}")
        unit = normalise_rows(raw, f"class {label!r}") if self._metric == "cosine" else raw
        return raw, unit

    @_saved
    def add(self, label: str, vectors, *, sources=None) -> None:
        """Create the class if new, else add examples to it. ``sources``: optionally one
        ``(source, digest)`` pair per vector (see ``ExampleSource``), kept with the class."""
        label = check_label(label)  # before the dict lookup, which an unhashable label would break
        with self._lock:
            if label in self._row_of:
                self.add_examples(label, vectors, sources=sources)
            else:
                self.add_class(label, vectors, sources=sources)

    @_saved
    def add_class(self, label: str, vectors, *, sources=None) -> None:
        label = check_label(label)
        raw, x = self._prepare(label, vectors)
        sources = check_sources(sources, len(raw), f"class {label!r}")
        with self._lock:
            if label in self._row_of:
                raise DuplicateClassError(f"class {label!r} already exists; use add_examples to "
                                          "add to it or rename/remove it first")
            rows = self._take_rows(1)
            self._commit_rows(rows, [label], x.mean(axis=0, dtype=np.float64).astype(np.float32)[None],
                              len(x), [raw])
            if sources is not None:
                self._record_sources(int(self._ids[rows[0]]), 0, len(sources), sources)
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
        labels = [check_label(label) for label in labels]
        x = as_matrix(vectors, self._dim, "add_many", copy=False)
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
            norms = row_norms(x)
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
                    divide_rows(x, norms, out=dest)
                else:
                    dest[...] = x
            else:
                self._means[rows] = divide_rows(x, norms) if norms is not None else x
            raw = None
            if self._store_examples:
                raw = np.array(x, dtype=np.float32)  # private copy of the raw vectors, one view per class
                raw = [raw[i:i + 1] for i in range(len(raw))]
            self._commit_rows(rows, labels, None, 1, raw)
            self._index_add(rows)

    @_saved
    def add_examples(self, label: str, vectors, *, sources=None) -> None:
        label = check_label(label)
        raw, x = self._prepare(label, vectors)
        sources = check_sources(sources, len(raw), f"class {label!r}")
        with self._lock:
            row = self._get(label)
            self._record_sources(int(self._ids[row]), int(self._counts[row]), len(raw), sources)
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
            for source in self._sources.pop(cid, ()):
                if self._owners is not None and source.digest is not None:
                    self._owners[source.digest].discard(cid)
            self._free.append(row)
            self._index_remove(cid)
            self._thumbnails.pop(label, None)

    @_saved
    def rename(self, old: str, new: str) -> None:
        new = check_label(new)
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
            if old in self._thumbnails:
                self._thumbnails[new] = self._thumbnails.pop(old)

    @_saved
    def set_thumbnail(self, label: str, data: bytes) -> None:
        """Keep ``data`` (a small encoded image, at most ``MAX_THUMBNAIL_BYTES``; the registry never
        decodes it) as class ``label``'s thumbnail, saved and checksummed with the registry. It follows
        the class through ``rename`` and goes with ``remove``."""
        check_thumbnail(data)
        with self._lock:
            self._get(label)
            self._thumbnails[label] = bytes(data)

    def thumbnail(self, label: str) -> bytes | None:
        """Class ``label``'s thumbnail (``set_thumbnail``), or None if it has none."""
        with self._lock:
            self._get(label)
            return self._thumbnails.get(label)

    def _record_sources(self, cid: int, count: int, n: int, sources: list[ExampleSource] | None) -> None:
        """Keep the sources of n examples added to a class of count examples (unrecorded where None)."""
        if sources is None and cid not in self._sources:
            return
        known = self._sources.setdefault(cid, [UNRECORDED] * count)
        known.extend(sources if sources is not None else [UNRECORDED] * n)
        if self._owners is not None:
            for source in sources or ():
                if source.digest is not None:
                    self._owners.setdefault(source.digest, set()).add(cid)

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
        return divide_rows(means, self._norm[rows]) if self._metric == "cosine" else means

    def prototypes(self, labels: list[str] | None = None) -> tuple[list[str], np.ndarray]:
        """(labels, (C, dim) float32 copy of the searched prototypes), in class order, or of ``labels``."""
        with self._lock:
            if labels is None:
                labels, rows = list(self._row_of), self._ordered_rows()
            else:
                labels, rows = list(labels), np.array([self._get(label) for label in labels], np.int64)
            out = np.empty((len(rows), self._dim), np.float32)
            step = chunk_rows(self._dim)
            for a in range(0, len(rows), step):
                out[a:a + step] = self._searched(rows[a:a + step])
        return labels, out

    def examples(self, label: str, rows=None) -> np.ndarray:
        """The stored examples of class ``label`` in the order they were added, or only its ``rows``
        (indices into that order; no copy of the other examples is made)."""
        if not self._store_examples:
            raise ValueError("this registry does not store examples; create it with store_examples=True")
        with self._lock:
            parts = self._examples[int(self._ids[self._get(label)])]
            if rows is None:
                return np.concatenate(parts)
            rows = np.asarray(rows, np.int64)
            starts = np.cumsum([0] + [len(p) for p in parts])
            part_of = np.searchsorted(starts, rows, side="right") - 1
            out = np.empty((len(rows), self._dim), np.float32)
            for k in np.unique(part_of).tolist():
                mine = part_of == k
                out[mine] = parts[k][rows[mine] - starts[k]]
            return out

    def sources(self, label: str) -> list[ExampleSource]:
        """One ``ExampleSource`` per example of class ``label``, in the order they were added (the
        order of ``examples(label)``; ``UNRECORDED`` where none was given), or [] if no example of
        the class came with a source."""
        with self._lock:
            return list(self._sources.get(int(self._ids[self._get(label)]), ()))

    def classes_by_digest(self, digests=None) -> dict[str, list[str]]:
        """Content digest -> the classes holding an example with that content (in class order), for
        every recorded digest or for those among ``digests`` that some class holds."""
        with self._lock:
            if self._owners is None:
                self._owners = {}
                for cid, known in self._sources.items():
                    for source in known:
                        if source.digest is not None:
                            self._owners.setdefault(source.digest, set()).add(cid)
            wanted = self._owners if digests is None else dict.fromkeys(d for d in digests if d in self._owners)
            # FAISS ids grow in class order (and compaction renumbers in class order): sorting them sorts classes.
            return {d: [self._labels[self._row_of_id[cid]] for cid in sorted(self._owners[d])]
                    for d in wanted if self._owners[d]}

    def nearest_examples(self, query, labels, n: int) -> list[tuple[str, ExampleSource, float]]:
        """The n stored examples of the classes ``labels`` nearest to the vector ``query``, best first:
        (label, its ExampleSource, score: cosine, or negative squared L2). Needs store_examples."""
        if not self._store_examples:
            raise ValueError("this registry does not store examples; create it with store_examples=True")
        q = as_matrix(query, self._dim, "query")
        if len(q) != 1:
            raise ValueError(f"query: expected one vector, got {len(q)}")
        q = normalise_rows(q, "query")[0] if self._metric == "cosine" else q[0]
        found: list[tuple[str, ExampleSource, float]] = []
        with self._lock:
            for label in dict.fromkeys(labels):
                x = self.examples(label).astype(np.float64)
                if self._metric == "cosine":
                    scores = (x @ q) / np.linalg.norm(x, axis=1)
                else:
                    scores = -((x - q) ** 2).sum(axis=1)
                best = np.argsort(-scores, kind="stable")[:n]
                sources = self.sources(label) or [UNRECORDED] * len(x)
                found += [(label, sources[i], float(scores[i])) for i in best.tolist()]
        return sorted(found, key=lambda item: -item[2])[:n]

    def mean(self, label: str) -> np.ndarray:
        """The running mean of class ``label``'s examples (of their unit vectors, for cosine): its
        prototype before normalisation. With ``count(label)`` it gives the prototype a class would
        have without one of its examples."""
        with self._lock:
            return self._means[self._get(label)].copy()
