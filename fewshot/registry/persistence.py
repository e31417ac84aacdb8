"""Saving and loading a Registry: ``save`` / ``load`` of a generation, and the bound mode of
``Registry.open`` (each change saved before it returns, under the writer lock)."""

from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path
from typing import TypeVar

import faiss
import numpy as np

from ..errors import RegistryFormatError, RegistrySaveError
from .locking import WriterLock, create_readers_lock, reader_pin
from .index import auto_outdated, check_flat_vectors, read_index_in_use, index_kind, load_index
from .labels import MAX_THUMBNAIL_BYTES, ExampleSource, check_sources, json_copy
from .manifest import FORMAT_VERSION, check_manifest_fingerprint, manifest_digest, read_manifest, seal_manifest
from .storage import (
    ATTACHMENT_KEY, FORMAT_NAME, MANIFEST, checked_attachments, fsync_dir, load_attachments, load_npy, npy_writer,
    npy_chunks, open_generation, read_verified_into, remove_other_generations, same_dir, saved_generation,
    unlink_quietly, write_atomic, lock_registry_dir,
)
from .vectors import all_finite, chunk_rows, row_norms

# The class these methods build and return: Registry, which mixes them in (this module does not import it).
RegistryT = TypeVar("RegistryT", bound="Persistence")


_LOAD_ATTEMPTS = 10  # reads racing a writer's saves retry this often before giving up


class Persistence:
    """The Registry's on-disk life (its state lives in ``Registry``)."""

    # -- bound mode: every change saved before it returns
    @classmethod
    def open(cls: type[RegistryT], path, dim: int | None = None, **options) -> RegistryT:
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
        lock = lock_registry_dir(path)
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

    def __enter__(self: RegistryT) -> RegistryT:
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
                      "metadata": json_copy(self.metadata, "metadata")}  # check before any write
            checked_attachments(self.attachments)
            mine = self._path is not None and same_dir(path, self._path)
            with contextlib.nullcontext() if mine else lock_registry_dir(path):
                self._save_locked(path, header)

    def _save_locked(self, path: Path, header: dict) -> None:
        gen = max(self._generation, saved_generation(path) or 0) + 1
        written: list[Path] = []
        try:
            create_readers_lock(path)
            rows = self._ordered_rows()
            files = self._write_data(path, gen, rows, written)
            fsync_dir(path)  # data file names are durable before the manifest points at them
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
            text = seal_manifest(manifest, indent=1 if len(rows) <= 10000 else None)
            write_atomic(path, MANIFEST, lambda f: f.write(text), [])
        except BaseException as e:
            for p in written:  # manifest.json untouched: the old registry stays current
                unlink_quietly(p)
            if not isinstance(e, Exception):
                raise
            hint = {errno.ENOSPC: "disk full? ", errno.EDQUOT: "disk quota exceeded? ",
                    errno.EFBIG: "file size limit reached? "}.get(getattr(e, "errno", None), "")
            raise RegistrySaveError(f"could not save the registry to {path}: {hint}{e}; the "
                                    "previously saved registry there is unchanged") from e
        self._generation = gen
        try:
            fsync_dir(path)
        except OSError as e:
            raise RegistrySaveError(f"saved the registry to {path}, but syncing the directory "
                                    f"failed ({e}); it may not survive a power loss") from e
        remove_other_generations(path, gen)

    def _write_data(self, path: Path, gen: int, rows: np.ndarray, written: list) -> dict:
        g = f"{gen:06d}"
        step = chunk_rows(self._dim)
        means = npy_chunks((len(rows), self._dim), np.float32,
                            lambda: (self._means[rows[a:a + step]] for a in range(0, len(rows), step)))
        index_bytes = faiss.serialize_index(self._index)  # uint8 array, written without a copy
        files = {"prototypes": write_atomic(path, f"prototypes-{g}.npy", means, written),
                 "index": write_atomic(path, f"index-{g}.faiss",
                                        lambda f: f.write(memoryview(index_bytes)), written)}  # noqa: F821
        del index_bytes
        if self._store_examples:
            per_class = [self._examples[i] for i in self._ids[rows].tolist()]
            examples = [e for ex in per_class for e in ex]
            ex = np.concatenate(examples) if examples else np.zeros((0, self._dim), np.float32)
            owner = np.repeat(self._ids[rows], [sum(len(e) for e in ex_) for ex_ in per_class]).astype(np.int64)
            files["examples"] = write_atomic(path, f"examples-{g}.npy", npy_writer(ex), written)
            files["example_class_ids"] = write_atomic(path, f"example_class_ids-{g}.npy",
                                                       npy_writer(owner), written)
        for name, data in self.attachments.items():
            files[ATTACHMENT_KEY + name] = write_atomic(path, f"attachment-{g}-{name}",
                                                          lambda f, data=data: f.write(data), written)
        table = [{"id": cid, "sources": [list(s) for s in self._sources[cid]]}
                 for cid in self._ids[rows].tolist() if cid in self._sources]
        text = json.dumps({"classes": table}, separators=(",", ":")).encode()
        files["provenance"] = write_atomic(path, f"provenance-{g}.json", lambda f: f.write(text), written)
        if self._thumbnails:
            blob, spans = _thumbnail_arrays([self._thumbnails.get(label, b"") for label in self._row_of])
            files["thumbnails"] = write_atomic(path, f"thumbnails-{g}.npy", npy_writer(blob), written)
            files["thumbnail_spans"] = write_atomic(path, f"thumbnail_spans-{g}.npy", npy_writer(spans), written)
        return files

    @classmethod
    def load(cls: type[RegistryT], path, *, expected_fingerprint: dict | None = None) -> RegistryT:
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
                    m = read_manifest(path)
                    opened = open_generation(path, m)
                if expected_fingerprint is not None:
                    check_manifest_fingerprint(path, m["fingerprint"],
                                       json_copy(expected_fingerprint, "expected_fingerprint"))
                return cls._from_manifest(path, m, opened)
            except RegistryFormatError:
                # Without the readers' lock (an older writer, no fcntl) a writer may have deleted this
                # generation's files: then read the new one. A file that is bad for good is reported.
                if m is None or attempt + 1 == _LOAD_ATTEMPTS or manifest_digest(mpath) == m["_digest"]:
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
            m = read_manifest(Path(path))
        return dict(zip(m["_labels"], m["_counts"].tolist()))

    @staticmethod
    def saved_fingerprint(path) -> tuple[dict, str]:
        """``(fingerprint, metric)`` of the registry saved at directory ``path``, read from its manifest alone
        (checked by its own checksum): what produced its vectors and how they compare, before loading them."""
        with reader_pin(Path(path)):
            m = read_manifest(Path(path))
        return m["fingerprint"], m["metric"]

    @classmethod
    def _from_manifest(cls: type[RegistryT], path: Path, m: dict, opened: dict) -> RegistryT:
        mpath = path / MANIFEST
        try:
            reg = cls(m["dim"], metric=m["metric"], index=m["index_factory"], fingerprint=m["fingerprint"],
                      auto_threshold=m.get("auto_threshold"), store_examples=m["store_examples"],
                      metadata=m["metadata"])
        except ValueError as e:
            raise RegistryFormatError(f"{mpath}: {e}") from None
        C, dim, labels = len(m["classes"]), m["dim"], m["_labels"]
        protos = load_npy(path, m["files"]["prototypes"], (C, dim), np.float32, opened)
        if not all_finite(protos):
            raise RegistryFormatError(f"{path / m['files']['prototypes']['name']}: non-finite prototype")
        ids = np.array(m["_ids"], dtype=np.int64)
        reg._means, reg._counts, reg._ids = protos, np.array(m["_counts"], dtype=np.int64), ids
        reg._norm = row_norms(protos)
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
        if "provenance" in m["files"]:
            reg._sources = _load_sources(path, m, opened)
        if "thumbnails" in m["files"]:  # registries saved before thumbnails existed have none
            reg._thumbnails = _load_thumbnails(path, m, labels, opened)
        reg.attachments = load_attachments(path, m, opened)
        reg._index = load_index(path, m, reg, opened)
        reg._in_use, reg._fallback = read_index_in_use(mpath, m, reg)
        reg._exact, reg._built_n = index_kind(reg._index) == "flat", C
        reg._stale, reg._generation = False, m["generation"]
        if auto_outdated(reg):
            reg._index, reg._stale = None, True
        if reg._sparse_ids():  # renumber; the next search rebuilds the index with the new ids
            reg._index, reg._stale = None, True
            reg._compact_ids()
        else:
            check_flat_vectors(path / m["files"]["index"]["name"], reg)
        return reg


def _thumbnail_arrays(thumbnails: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """All thumbnails as one uint8 array plus (offset, length) per class (length 0: none)."""
    lengths = np.array([len(t) for t in thumbnails], np.int64)
    spans = np.stack([np.cumsum(lengths) - lengths, lengths], axis=1)
    return np.frombuffer(b"".join(thumbnails), np.uint8), spans


def _load_thumbnails(path: Path, m: dict, labels: list[str], opened: dict) -> dict[str, bytes]:
    files = m["files"]
    spans = load_npy(path, files["thumbnail_spans"], (len(labels), 2), np.int64, opened)
    fname = path / files["thumbnail_spans"]["name"]
    if (spans < 0).any() or (spans[:, 1] > MAX_THUMBNAIL_BYTES).any():
        raise RegistryFormatError(f"{fname}: thumbnail lengths outside 0..{MAX_THUMBNAIL_BYTES}")
    blob = load_npy(path, files["thumbnails"], (int(spans[:, 1].sum()),), np.uint8, opened)
    if (spans.sum(axis=1) > len(blob)).any():
        raise RegistryFormatError(f"{fname}: thumbnail offsets outside the thumbnails file")
    return {label: blob[a:a + n].tobytes() for label, (a, n) in zip(labels, spans.tolist()) if n}


def _load_examples(path: Path, m: dict, reg: Persistence, opened: dict) -> None:
    files, dim = m["files"], reg.dim
    counts, ids = m["_counts"], m["_ids"]
    owner = load_npy(path, files["example_class_ids"], (int(counts.sum()),), np.int64, opened)
    ex = load_npy(path, files["examples"], (len(owner), dim), np.float32, opened)
    fname = path / files["examples"]["name"]
    if not all_finite(ex):
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


def _load_sources(path: Path, m: dict, opened: dict) -> dict[int, list[ExampleSource]]:
    """The provenance file: {"classes": [{"id": class id, "sources": [[source, digest], ...]}]},
    one pair per example of each class listed (classes without any recorded source are absent)."""
    fpath = path / m["files"]["provenance"]["name"]
    (data,) = read_verified_into(path, m["files"]["provenance"], lambda size: [np.empty(size, np.uint8)],
                                  opened)
    bad = f"{fpath}: not a valid provenance file"
    try:
        table = json.loads(data.tobytes())
    except (ValueError, RecursionError) as e:
        raise RegistryFormatError(f"{bad} ({e})") from None
    if not isinstance(table, dict) or not isinstance(table.get("classes"), list):
        raise RegistryFormatError(f"{bad} (expected an object with a 'classes' list)")
    count_of = dict(zip(m["_ids"].tolist(), m["_counts"].tolist()))
    sources: dict[int, list[ExampleSource]] = {}
    for entry in table["classes"]:
        cid = entry.get("id") if isinstance(entry, dict) else None
        if type(cid) is not int or cid not in count_of or cid in sources:
            raise RegistryFormatError(f"{bad} (unknown or repeated class id {cid!r:.40})")
        try:
            if not isinstance(entry.get("sources"), list):
                raise ValueError(f"class id {cid}: 'sources' must be a list")
            sources[cid] = check_sources(entry["sources"], count_of[cid], f"class id {cid}")
        except ValueError as e:
            raise RegistryFormatError(f"{bad} ({e})") from None
    return sources
