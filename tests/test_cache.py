"""The embedding cache: exact round trip, never serves bad entries, never breaks user work."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot import EmbeddingCache
from fewshot.embedding.cache import default_cache_path


def test_round_trip_and_keys_are_per_encoder(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.sqlite")
    v = np.arange(4, dtype=np.float32)
    cache.put_many("enc-a", {"d1": v})
    assert np.array_equal(cache.get_many("enc-a", ["d1", "d2"], dim=4)["d1"], v)
    assert cache.get_many("enc-b", ["d1"], dim=4) == {}
    assert cache.get_many("enc-a", ["d1"], dim=8) == {}  # wrong size is ignored, not served


def test_persists_across_instances(tmp_path):
    EmbeddingCache(tmp_path / "c.sqlite").put_many("e", {"d": np.ones(3, np.float32)})
    assert len(EmbeddingCache(tmp_path / "c.sqlite")) == 1


def test_non_finite_vectors_are_not_stored(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.sqlite")
    cache.put_many("e", {"bad": np.array([np.nan, 1, 2], np.float32), "good": np.ones(3, np.float32)})
    assert set(cache.get_many("e", ["bad", "good"], dim=3)) == {"good"}


def test_unusable_cache_file_warns_and_work_goes_on(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    cache = EmbeddingCache(path)
    with pytest.warns(RuntimeWarning, match="unusable"):
        assert cache.get_many("e", ["d"], dim=3) == {}
    cache.put_many("e", {"d": np.ones(3, np.float32)})  # silently a no-op now


def test_default_location_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path))
    assert default_cache_path() == tmp_path / "embeddings.sqlite"


def test_cache_locked_by_another_process_is_skipped_after_a_short_wait(tmp_path):
    """Another process holding the cache's write lock must not stall a one-image predict for half a
    minute: fewshot waits briefly, warns once, goes on without the cache, and uses it again later."""
    import subprocess
    import sys
    import time

    path = tmp_path / "c.sqlite"
    EmbeddingCache(path).put_many("e", {"old": np.ones(3, np.float32)})
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cache = EmbeddingCache(path)
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match="locked") as caught:
            assert set(cache.get_many("e", ["old"], dim=3)) == {"old"}  # reading needs no write lock
            cache.put_many("e", {"new": np.ones(3, np.float32)})
            cache.put_many("e", {"newer": np.ones(3, np.float32)})
        assert time.monotonic() - start < 6
        assert len([w for w in caught if "locked" in str(w.message)]) == 1  # one warning, not one per call
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    cache.put_many("e", {"new": np.full(3, 2, np.float32)})  # the lock is gone: the cache works again
    assert set(cache.get_many("e", ["old", "new"], dim=3)) == {"old", "new"}
