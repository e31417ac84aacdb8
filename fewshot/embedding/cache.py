"""On-disk embedding cache, keyed by image content hash + encoder fingerprint.

Re-registering or re-evaluating the same images must not re-run the network. Entries live in one
SQLite file (stdlib, atomic, safe across threads and processes) as raw float32 bytes: nothing is
ever unpickled. The cache is an accelerator, never a source of truth: if the file is unusable,
fewshot warns once and carries on without it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import warnings
from pathlib import Path

import numpy as np

# SQLite caps the number of host parameters per statement; stay well below it.
_QUERY_CHUNK = 500
# How long a call waits for another process's write lock before going on without the cache: the cache
# only saves time, so waiting longer than an embedding would take is never worth it.
LOCK_WAIT_S = 1.0
# Embeddings are committed at least this often (rows, seconds), so an interrupted run keeps its work.
COMMIT_ROWS, COMMIT_SECONDS = 256, 5.0


def default_cache_path() -> Path:
    """``$FEWSHOT_CACHE_DIR`` or ``$XDG_CACHE_HOME/fewshot`` or ``~/.cache/fewshot``, file ``embeddings.sqlite``."""
    root = os.environ.get("FEWSHOT_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "fewshot")
    return Path(root) / "embeddings.sqlite"


class EmbeddingCache:
    """Maps (encoder fingerprint id, content digest) -> embedding vector."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._broken = False
        self._warned_locked = False

    def _connect(self) -> sqlite3.Connection | None:
        if self._conn is None and not self._broken:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=LOCK_WAIT_S, check_same_thread=False)
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("CREATE TABLE IF NOT EXISTS embeddings (encoder TEXT, digest TEXT, vector BLOB, "
                                 "PRIMARY KEY (encoder, digest))")
                except BaseException:
                    conn.close()
                    raise
                self._conn = conn
            except (sqlite3.Error, OSError) as exc:
                self._failed(exc)
        return self._conn

    def _failed(self, exc: Exception) -> None:
        """A busy cache (another process writing) is skipped for this call only; any other error
        disables it for good."""
        if _is_locked(exc):
            if not self._warned_locked:
                self._warned_locked = True
                warnings.warn(f"embedding cache {self.path} is locked by another process; continuing without "
                              f"it for now", RuntimeWarning, stacklevel=4)
            return
        self._disable(exc)

    def _disable(self, exc: Exception) -> None:
        self._broken = True
        warnings.warn(f"embedding cache {self.path} is unusable ({exc}); continuing without it. "
                      f"Delete the file or set FEWSHOT_CACHE_DIR to fix this.", RuntimeWarning, stacklevel=3)

    def get_many(self, encoder_id: str, digests: list[str], *, dim: int) -> dict[str, np.ndarray]:
        """Cached vectors for the digests that are present (entries of the wrong size or with NaN or
        infinity, e.g. a tampered file, are ignored: those images are embedded again)."""
        found: dict[str, np.ndarray] = {}
        with self._lock:
            conn = self._connect()
            if conn is None:
                return found
            try:
                for start in range(0, len(digests), _QUERY_CHUNK):
                    chunk = digests[start:start + _QUERY_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    query = f"SELECT digest, vector FROM embeddings WHERE encoder = ? AND digest IN ({marks})"
                    rows = conn.execute(query, [encoder_id, *chunk])
                    for digest, blob in rows:  # anything but dim finite float32s is ignored
                        if isinstance(blob, bytes) and len(blob) == 4 * dim:
                            vector = np.frombuffer(blob, dtype="<f4")
                            if np.isfinite(vector).all():
                                found[digest] = vector.copy()
            except sqlite3.Error as exc:
                self._failed(exc)
        return found

    def put_many(self, encoder_id: str, vectors: dict[str, np.ndarray]) -> None:
        """Store vectors (float32); finite ones only, so a bad vector can never be served later."""
        rows = [(encoder_id, d, np.asarray(v, dtype="<f4").tobytes()) for d, v in vectors.items()
                if np.all(np.isfinite(v))]
        if not rows:
            return
        with self._lock:
            conn = self._connect()
            if conn is None:
                return
            try:
                with conn:
                    conn.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)", rows)
            except sqlite3.Error as exc:
                self._failed(exc)

    def writer(self, encoder_id: str) -> "CacheWriter":
        """A buffer that commits vectors in chunks as they are added (see ``CacheWriter``)."""
        return CacheWriter(self, encoder_id)

    def __len__(self) -> int:
        with self._lock:
            conn = self._connect()
            return 0 if conn is None else conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class CacheWriter:
    """Collects fresh embeddings and commits them every ``COMMIT_ROWS`` rows or ``COMMIT_SECONDS``
    seconds, and on ``flush()``: a long run that is interrupted (Ctrl-C, a kill) keeps what it had
    embedded up to its last commit instead of nothing."""

    def __init__(self, cache: EmbeddingCache, encoder_id: str):
        self.cache, self.encoder_id = cache, encoder_id
        self._pending: dict[str, np.ndarray] = {}
        self._last = time.monotonic()

    def add(self, vectors: dict[str, np.ndarray]) -> None:
        self._pending.update(vectors)
        if len(self._pending) >= COMMIT_ROWS or time.monotonic() - self._last >= COMMIT_SECONDS:
            self.flush()

    def flush(self) -> None:
        pending, self._pending, self._last = self._pending, {}, time.monotonic()
        if pending:
            self.cache.put_many(self.encoder_id, pending)


def _is_locked(exc: Exception) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))
