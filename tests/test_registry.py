"""Tests of fewshot.registry: search correctness, running means, persistence, crash safety, threads."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time

import faiss
import numpy as np
import pytest

from fewshot.errors import (
    DuplicateClassError,
    EncoderMismatchError,
    RegistryFormatError,
    RegistrySaveError,
    UnknownClassError,
)
from fewshot.registry.locking import LOCK_FILE, READERS_LOCK_FILE
from fewshot.registry import Registry, SearchResult
from fewshot.registry import index as registry_index
from fewshot.registry.manifest import seal_manifest

DIM = 16


def rng(seed=0):
    return np.random.default_rng(seed)


def filled(metric="cosine", n_classes=20, seed=0, **kw) -> tuple[Registry, dict]:
    """A registry with n_classes random classes of 1..4 examples each; returns it and the examples."""
    g = rng(seed)
    reg = Registry(DIM, metric=metric, **kw)
    data = {}
    for i in range(n_classes):
        data[f"class-{i}"] = g.normal(size=(int(g.integers(1, 5)), DIM)).astype(np.float32)
        reg.add(f"class-{i}", data[f"class-{i}"])
    return reg, data


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force(data: dict, queries, metric):
    """Reference: (labels, (C,) prototypes, (Q, C) scores) computed with plain numpy in float64."""
    labels = list(data)
    if metric == "cosine":
        protos = unit(np.stack([unit(data[lb]).mean(axis=0) for lb in labels]))
        return labels, protos, unit(queries) @ protos.T
    protos = np.stack([np.asarray(data[lb], np.float64).mean(axis=0) for lb in labels])
    return labels, protos, -((queries[:, None, :] - protos[None]) ** 2).sum(-1)


def assert_matches_brute_force(res: SearchResult, data, queries, metric, k):
    labels, _, ref = brute_force(data, queries, metric)
    kk = min(k, len(labels))
    assert res.scores.shape == (len(queries), kk) and res.scores.dtype == np.float32
    for q in range(len(queries)):
        expected = np.sort(ref[q])[::-1][:kk]
        np.testing.assert_allclose(res.scores[q], expected, rtol=1e-4, atol=1e-4)
        # Each returned label really has the score reported (robust to near-ties).
        got = [ref[q][labels.index(lb)] for lb in res.labels[q]]
        np.testing.assert_allclose(got, res.scores[q], rtol=1e-4, atol=1e-4)
        assert len(set(res.labels[q])) == kk


# ---------------------------------------------------------------- search and means

@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_search_equals_numpy_brute_force(metric):
    reg, data = filled(metric, n_classes=30)
    queries = rng(1).normal(size=(25, DIM)).astype(np.float32)
    for k in (1, 5, 30):
        assert_matches_brute_force(reg.search(queries, k), data, queries, metric, k)
    # 1-D query gives one row
    res = reg.search(queries[0], 3)
    assert len(res.labels) == 1 and res.scores.shape == (1, 3)


def test_l2_scores_are_negative_squared_distances():
    reg = Registry(2, metric="l2")
    reg.add("origin", [0.0, 0.0])
    reg.add("far", [3.0, 4.0])
    res = reg.search([[3.0, 4.0]], 2)
    assert res.labels == [["far", "origin"]]
    np.testing.assert_allclose(res.scores, [[0.0, -25.0]])


def test_hnsw_top1_agrees_on_easy_set_and_survives_removal():
    g = rng(2)
    centers = g.normal(size=(40, DIM)).astype(np.float32) * 10
    reg = Registry(DIM, index="HNSW32")
    for i, c in enumerate(centers):
        reg.add(f"c{i}", c + g.normal(size=(3, DIM)).astype(np.float32) * 0.1)
    queries = centers + g.normal(size=centers.shape).astype(np.float32) * 0.1
    assert [r[0] for r in reg.search(queries, 1).labels] == [f"c{i}" for i in range(40)]
    reg.remove("c0")  # HNSW cannot remove: index is rebuilt on the next search
    reg.add_examples("c1", centers[1])
    top = [r[0] for r in reg.search(queries, 1).labels]
    assert "c0" not in top and top[1:] == [f"c{i}" for i in range(1, 40)]


def test_ivf_falls_back_to_exact_then_trains():
    reg, data = filled("l2", n_classes=2, index="IVF4,Flat")
    q = rng(3).normal(size=(5, DIM)).astype(np.float32)
    assert_matches_brute_force(reg.search(q, 2), data, q, "l2", 2)  # too few to train: exact
    g = rng(4)
    for i in range(2, 60):
        data[f"class-{i}"] = g.normal(size=(2, DIM)).astype(np.float32)
        reg.add(f"class-{i}", data[f"class-{i}"])
    res = reg.search(q, 1)  # trained IVF now; exact on the vectors it probes
    assert len(res.labels) == 5 and all(lb in data for row in res.labels for lb in row)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_running_mean_equals_mean_of_all_examples(metric):
    g = rng(5)
    batches = [g.normal(size=(n, DIM)).astype(np.float32) for n in (3, 1, 5)]
    reg = Registry(DIM, metric=metric)
    reg.add_class("a", batches[0])
    reg.add_examples("a", batches[1][0])  # 1-D
    reg.add("a", batches[2])
    every = np.concatenate(batches)
    expected = every.mean(0) if metric == "l2" else unit(unit(every).mean(0))
    labels, protos = reg.prototypes()
    assert labels == ["a"] and protos.dtype == np.float32
    np.testing.assert_allclose(protos[0], expected, rtol=1e-5, atol=1e-6)
    assert reg.counts == {"a": 9}


def test_k_larger_than_classes_returns_all():
    reg, data = filled(n_classes=3)
    res = reg.search(rng(6).normal(size=(2, DIM)), 10)
    assert res.scores.shape == (2, 3)
    assert all(sorted(row) == sorted(data) for row in res.labels)
    assert np.all(np.diff(res.scores, axis=1) <= 1e-6)  # best first


# ---------------------------------------------------------------- argument errors

def test_bad_arguments_raise_value_errors():
    reg, _ = filled(n_classes=2)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be"):
            reg.search(np.ones(DIM), k)
    with pytest.raises(ValueError, match=f"expected dim {DIM}, got 7; vectors must come from the same encoder"):
        reg.search(np.ones(7), 1)
    with pytest.raises(ValueError, match="expected dim"):
        reg.add("new", np.ones((2, DIM + 1)))
    bad = np.ones((2, DIM))
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="'nanclass'.*NaN"):
        reg.add("nanclass", bad)
    with pytest.raises(ValueError, match="NaN or infinity"):
        reg.search(np.full(DIM, np.inf), 1)
    with pytest.raises(ValueError, match="zero vector"):
        reg.add("zero", np.zeros(DIM))
    for label in ("", "a\0b", "x" * 1025, 3, None, ["a"]):
        with pytest.raises(ValueError, match="non-empty string of at most 1024"):
            reg.add(label, np.ones(DIM))
    assert reg.classes == ["class-0", "class-1"]  # failed calls changed nothing
    with pytest.raises(ValueError, match="does not store examples"):
        reg.examples("class-0")
    with pytest.raises(ValueError, match="registry has no classes; register some first"):
        Registry(DIM).search(np.ones(DIM), 1)


def test_class_errors_and_odd_labels():
    reg, _ = filled(n_classes=2)
    with pytest.raises(DuplicateClassError):
        reg.add_class("class-0", np.ones(DIM))
    with pytest.raises(UnknownClassError):
        reg.add_examples("nope", np.ones(DIM))
    with pytest.raises(UnknownClassError):
        reg.remove("nope")
    with pytest.raises(UnknownClassError):
        reg.rename("nope", "x")
    with pytest.raises(DuplicateClassError):
        reg.rename("class-0", "class-1")
    for label in ("../../etc/passwd", "a/b", "ünïcødé ☃", "x" * 1024):  # labels are data, not paths
        reg.add(label, rng(7).normal(size=DIM))
        assert label in reg


# ---------------------------------------------------------------- persistence

def test_save_load_round_trip(tmp_path):
    reg, data = filled(n_classes=12, fingerprint={"name": "enc-a", "dim": DIM}, metadata={"k": 3})
    queries = rng(8).normal(size=(10, DIM)).astype(np.float32)
    before = reg.search(queries, 4)
    assert reg.generation == 0
    reg.save(tmp_path / "reg")
    assert reg.generation == 1
    loaded = Registry.load(tmp_path / "reg", expected_fingerprint={"name": "enc-a", "dim": DIM})
    after = loaded.search(queries, 4)
    assert after.labels == before.labels
    np.testing.assert_array_equal(after.scores, before.scores)
    assert loaded.counts == reg.counts and loaded.classes == reg.classes
    assert loaded.metadata == {"k": 3} and loaded.fingerprint == {"name": "enc-a", "dim": DIM}
    assert loaded.generation == 1 and loaded.dim == DIM and loaded.metric == "cosine"
    np.testing.assert_array_equal(loaded.prototypes()[1], reg.prototypes()[1])
    # keeps working, generation continues, old generation files are cleaned up
    loaded.add("extra", queries[0])
    loaded.save(tmp_path / "reg")
    assert loaded.generation == 2 and Registry.load(tmp_path / "reg").generation == 2
    assert sorted(os.listdir(tmp_path / "reg")) == [READERS_LOCK_FILE, LOCK_FILE, "index-000002.faiss",
                                                    "manifest.json", "prototypes-000002.npy", "provenance-000002.json"]


def test_remove_rename_persist(tmp_path):
    reg, data = filled("l2", n_classes=5)
    reg.remove("class-1")
    reg.rename("class-2", "renamed/../x")
    reg.save(tmp_path / "r")
    loaded = Registry.load(tmp_path / "r")
    assert loaded.classes == ["class-0", "renamed/../x", "class-3", "class-4"]
    data["renamed/../x"] = data.pop("class-2")
    del data["class-1"]
    q = rng(9).normal(size=(6, DIM))
    assert_matches_brute_force(loaded.search(q, 4), data, q, "l2", 4)
    loaded.add("class-1", np.ones(DIM))  # a removed name can come back, with a fresh id
    loaded.save(tmp_path / "r")
    assert Registry.load(tmp_path / "r").counts["class-1"] == 1


def test_store_examples_round_trip(tmp_path):
    reg, data = filled("cosine", n_classes=4, store_examples=True)
    extra = rng(10).normal(size=(2, DIM)).astype(np.float32)
    reg.add_examples("class-0", extra)
    reg.save(tmp_path / "r")
    loaded = Registry.load(tmp_path / "r")
    assert loaded.store_examples
    np.testing.assert_array_equal(loaded.examples("class-0"), np.concatenate([data["class-0"], extra]))
    for label in ("class-1", "class-3"):
        np.testing.assert_array_equal(loaded.examples(label), data[label])
        assert loaded.examples(label).dtype == np.float32


# ---------------------------------------------------------------- paranoid loading

@pytest.fixture
def saved(tmp_path):
    reg, _ = filled(n_classes=6, fingerprint={"name": "enc-a"})
    path = tmp_path / "reg"
    reg.save(path)
    return reg, path


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def write_manifest(path, m):
    """Write an edited manifest with a valid checksum, so the checks behind the checksum are reached."""
    m = {k: v for k, v in m.items() if k != "manifest_sha256"}
    (path / "manifest.json").write_bytes(seal_manifest(m, indent=1))


def test_load_refuses_truncated_prototypes(saved):
    _, path = saved
    f = path / "prototypes-000001.npy"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(RegistryFormatError, match="prototypes-000001.npy"):
        Registry.load(path)


def test_load_refuses_flipped_bit_in_index(saved):
    _, path = saved
    f = path / "index-000001.faiss"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(RegistryFormatError, match="index-000001.faiss"):
        Registry.load(path)


def test_load_refuses_file_swapped_from_older_generation(saved, tmp_path):
    reg, path = saved
    old_copy = tmp_path / "old-prototypes.npy"
    shutil.copy(path / "prototypes-000001.npy", old_copy)  # gen 1 is deleted by the next save
    reg.add_examples("class-0", np.ones(DIM))
    reg.save(path)
    assert not (path / "prototypes-000001.npy").exists()
    shutil.copy(old_copy, path / "prototypes-000002.npy")  # same size, different content
    with pytest.raises(RegistryFormatError, match="prototypes-000002.npy"):
        Registry.load(path)


@pytest.mark.parametrize("field,value,message", [
    ("format_version", 99, "newer fewshot \\(format 99\\); upgrade fewshot"),
    ("dim", -1, "'dim'"),
    ("dim", 10**12, "'dim'"),
    ("dim", "16", "'dim'"),
    ("format", "something-else", "not a fewshot registry"),
])
def test_load_refuses_bad_manifest_fields(saved, field, value, message):
    _, path = saved
    m = manifest(path)
    m[field] = value
    write_manifest(path, m)
    with pytest.raises(RegistryFormatError, match=message) as e:
        Registry.load(path)
    assert "manifest.json" in str(e.value)


def test_load_refuses_bad_classes_and_file_names(saved):
    _, path = saved
    good = manifest(path)
    for mutate in (lambda m: m["classes"][0].update(count=0),
                   lambda m: m["classes"][1].update(id=m["classes"][0]["id"]),
                   lambda m: m["classes"][0].update(id=m["next_id"]),
                   lambda m: m["classes"][1].update(label=m["classes"][0]["label"]),
                   lambda m: m["classes"][0].update(label=""),
                   lambda m: m["files"]["prototypes"].update(name="../x"),
                   lambda m: m["files"]["index"].update(name="/etc/passwd"),
                   lambda m: m.pop("files")):
        m = json.loads(json.dumps(good))
        mutate(m)
        write_manifest(path, m)
        with pytest.raises(RegistryFormatError, match="manifest.json"):
            Registry.load(path)


def test_load_refuses_missing_and_garbage(saved, tmp_path):
    _, path = saved
    with pytest.raises(RegistryFormatError, match="no registry at .*create one with fewshot register"):
        Registry.load(tmp_path / "nothing-here")
    (path / "index-000001.faiss").unlink()
    with pytest.raises(RegistryFormatError, match="index-000001.faiss.*missing"):
        Registry.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(RegistryFormatError, match="manifest.json.*not valid JSON"):
        Registry.load(path)


def test_fingerprint_mismatch_names_both_encoders(saved):
    _, path = saved
    with pytest.raises(EncoderMismatchError) as e:
        Registry.load(path, expected_fingerprint={"name": "enc-b"})
    msg = str(e.value)
    assert "enc-a" in msg and "enc-b" in msg
    assert "load it with the encoder it was built with" in msg and "re-register" in msg
    assert Registry.load(path, expected_fingerprint={"name": "enc-a"}).fingerprint == {"name": "enc-a"}


# ---------------------------------------------------------------- crash-safe saving

def fsync_failing_for(monkeypatch, needle):
    """Make os.fsync raise ENOSPC for file descriptors whose path contains `needle`."""
    real = os.fsync

    def fake(fd):
        if needle in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fake)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to identify files")


@pytest.mark.parametrize("needle", ["prototypes-000002", "index-000002", "manifest.json"])
def test_failed_save_leaves_previous_registry(saved, monkeypatch, needle):
    reg, path = saved
    before_files = sorted(os.listdir(path))
    q = rng(11).normal(size=(4, DIM))
    before = Registry.load(path).search(q, 3)
    reg.add("new-class", np.ones(DIM))
    fsync_failing_for(monkeypatch, needle)
    with pytest.raises(RegistrySaveError, match="disk full\\?") as e:
        reg.save(path)
    assert str(path) in str(e.value)
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == before_files  # no temp or new-generation files remain
    loaded = Registry.load(path)
    assert "new-class" not in loaded and loaded.generation == 1
    assert loaded.search(q, 3).labels == before.labels
    # in-memory registry unchanged and usable; a later save works
    assert "new-class" in reg and reg.generation == 1
    reg.save(path)
    assert "new-class" in Registry.load(path)


def test_refuses_to_save_over_user_data(tmp_path):
    reg, _ = filled(n_classes=2)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"precious")
    with pytest.raises(RegistrySaveError, match="is not a fewshot registry; choose another path"):
        reg.save(tmp_path / "photos")
    assert os.listdir(tmp_path / "photos") == ["cat.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RegistrySaveError, match="not a fewshot registry"):
        reg.save(tmp_path / "file")
    reg.save(tmp_path / "a" / "b" / "new")  # parents are created
    assert Registry.load(tmp_path / "a" / "b" / "new").classes == reg.classes


# ---------------------------------------------------------------- threads

def test_readers_search_while_writer_mutates():
    reg, _ = filled(n_classes=3)
    ever = set(reg.classes)
    lock = threading.Lock()
    errors, stop = [], threading.Event()
    queries = rng(12).normal(size=(8, DIM))

    def reader():
        try:
            while not stop.is_set():
                res = reg.search(queries, 4)
                with lock:
                    seen = set(ever)
                for row in res.labels:
                    assert row and set(row) <= seen, row
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    g, i, deadline = rng(13), 0, time.monotonic() + 1.0
    while time.monotonic() < deadline:
        label = f"dyn-{i}"
        with lock:
            ever.add(label)
        reg.add(label, g.normal(size=(2, DIM)))
        if i % 2:
            reg.remove(f"dyn-{i - 1}")
        i += 1
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert i > 10


# ---------------------------------------------------------------- scale: auto index, params, add_many

ADIM = 32


def clustered(n, seed=0, dim=ADIM, n_centres=40, spread=0.35):
    """Unit vectors around a few fixed centres, like embeddings of related classes (seed: the sample)."""
    centres = unit(rng(1234).normal(size=(n_centres, dim)))
    g = rng(seed)
    x = centres[g.integers(0, n_centres, n)] + spread * unit(g.normal(size=(n, dim)))
    return unit(x).astype(np.float32)


def auto_registry(n, metric="cosine", threshold=2000, seed=0, **kw):
    x = clustered(n, seed=seed)
    if metric == "l2":
        x *= 3
    reg = Registry(ADIM, metric=metric, auto_threshold=threshold, **kw)
    reg.add_many([f"p{i}" for i in range(n)], x)
    return reg, x


def exact_top(x, queries, metric, k=1):
    s = unit(queries) @ unit(x).T if metric == "cosine" else -((queries[:, None] - x[None]) ** 2).sum(-1)
    return np.argsort(-s, axis=1, kind="stable")[:, :k], s


def test_auto_defaults_follow_dim():
    assert Registry(1280).index_factory == "auto" and Registry(1280).auto_threshold == 9830
    assert Registry(512).auto_threshold == 24576
    assert Registry(16, index="HNSW32").auto_threshold is None
    with pytest.raises(ValueError, match="auto_threshold applies only to index='auto'"):
        Registry(16, index="Flat", auto_threshold=1000)
    for bad in (0, 10, 2.5, True, "1000"):
        with pytest.raises(ValueError, match="auto_threshold must be an integer >= 256"):
            Registry(16, auto_threshold=bad)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_auto_switches_once_past_threshold_and_stays_correct(metric, monkeypatch):
    reg, x = auto_registry(1990, metric)
    queries = np.concatenate([x[:100] + 0.3 * rng(1).normal(size=(100, ADIM)) / np.sqrt(ADIM),
                              clustered(100, seed=9)]).astype(np.float32)  # near prototypes, and novel
    assert reg.index_in_use == "Flat"
    res = reg.search(queries, 3)
    top, s = exact_top(x, queries, metric, 3)
    assert [row[0] for row in res.labels] == [f"p{i}" for i in top[:, 0]]  # exact below the threshold
    builds = []
    real_build = Registry._build_index
    monkeypatch.setattr(Registry, "_build_index", lambda self: (builds.append(len(self)), real_build(self)))
    more = clustered(600, seed=2) * (3 if metric == "l2" else 1)
    for i, v in enumerate(more):  # one at a time, searching after each add
        reg.add_class(f"q{i}", v)
        reg.search(queries[:2], 1)
    assert builds == [2000]  # crossing the threshold rebuilt once, later adds went in incrementally
    assert reg.index_in_use.startswith("IVF") and reg.index_in_use.endswith(",PQ16x4fs")
    assert reg.index_factory == "auto"
    every = np.concatenate([x, more])
    names = [f"p{i}" for i in range(len(x))] + [f"q{i}" for i in range(len(more))]
    res = reg.search(queries, 5)
    top, s = exact_top(every, queries, metric, 5)
    recall = np.mean([row[0] == names[t] for row, t in zip(res.labels, top[:, 0])])
    assert recall >= 0.98, recall
    # scores are exact (re-scored against the stored prototypes), best first
    got = np.array([[s[q, names.index(lb)] for lb in row] for q, row in enumerate(res.labels)])
    np.testing.assert_allclose(res.scores, got, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(res.scores, axis=1) <= 1e-6)


def test_auto_goes_back_to_exact_and_regrows():
    reg, _ = auto_registry(2100, threshold=1000)
    reg.search(np.ones(ADIM), 1)
    first = reg.index_in_use
    assert first.startswith("IVF")
    for i in range(1700):  # far below threshold / 2: exact again at the next search
        reg.remove(f"p{i}")
    reg.search(np.ones(ADIM), 1)
    assert reg.index_in_use == "Flat"
    reg.add_many([f"n{i}" for i in range(8000)], clustered(8000, seed=5))
    reg.search(np.ones(ADIM), 1)
    assert reg.index_in_use.startswith("IVF") and reg.index_in_use != first  # more lists for 4x more


def test_search_params_per_call():
    reg, x = auto_registry(3000)
    queries = clustered(60, seed=11)
    top, _ = exact_top(x, queries, "cosine")
    default = reg.search(queries, 4)
    nlist = int(reg.index_in_use.split(",")[0][3:])
    wide = reg.search(queries, 4, params={"nprobe": nlist, "rerank": 3000})  # every list, every candidate
    assert [row[0] for row in wide.labels] == [f"p{i}" for i in top[:, 0]]
    narrow = reg.search(queries, 4, params={"nprobe": 1, "rerank": 4})
    assert narrow.scores.shape == (60, 4)
    again = reg.search(queries, 4)  # per call: nothing stuck
    assert again.labels == default.labels
    np.testing.assert_array_equal(again.scores, default.scores)
    with pytest.raises(ValueError, match="unknown search parameter.*efSearch.*valid ones: max_codes, nprobe, rerank"):
        reg.search(queries, 1, params={"efSearch": 64})
    for bad in ({"nprobe": 0}, {"nprobe": 2.5}, {"rerank": "many"}):
        with pytest.raises(ValueError, match="search parameter"):
            reg.search(queries, 1, params=bad)
    with pytest.raises(ValueError, match="params must be a dict"):
        reg.search(queries, 1, params=[("nprobe", 4)])
    small, _ = auto_registry(50)  # "auto" while still exact: the approximate index's params are accepted
    assert small.search(queries, 2, params={"nprobe": 4}).labels == small.search(queries, 2).labels
    flat, _ = filled(index="Flat", n_classes=3)
    with pytest.raises(ValueError, match="valid ones: none"):
        flat.search(np.ones(DIM), 1, params={"nprobe": 4})
    hnsw = Registry(ADIM, index="HNSW32")
    hnsw.add_many([f"p{i}" for i in range(500)], x[:500])
    top, _ = exact_top(x[:500], queries, "cosine")
    res = hnsw.search(queries, 1, params={"efSearch": 256})
    assert [row[0] for row in res.labels] == [f"p{i}" for i in top[:, 0]]
    with pytest.raises(ValueError, match="valid ones: efSearch, rerank"):
        hnsw.search(queries, 1, params={"nprobe": 4})


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_add_many_equals_repeated_add_class(metric):
    g = rng(20)
    vectors = g.normal(size=(300, DIM)).astype(np.float32)
    labels = [f"c{i}" for i in range(300)]
    one = Registry(DIM, metric=metric, store_examples=True)
    many = Registry(DIM, metric=metric, store_examples=True)
    for label, v in zip(labels, vectors):
        one.add_class(label, v)
    many.add_many(labels[:100], vectors[:100])
    many.add_many(labels[100:], list(vectors[100:]))  # any array-like
    assert many.classes == one.classes and many.counts == one.counts
    np.testing.assert_array_equal(many.prototypes()[1], one.prototypes()[1])
    np.testing.assert_array_equal(many.examples("c7"), one.examples("c7"))
    q = g.normal(size=(20, DIM))
    a, b = one.search(q, 5), many.search(q, 5)
    assert a.labels == b.labels
    np.testing.assert_array_equal(a.scores, b.scores)


def test_add_many_checks_everything_before_changing_anything():
    reg, _ = filled(n_classes=3)
    before = (reg.classes, reg.prototypes()[1].copy())
    v = rng(21).normal(size=(3, DIM))
    nan = v.copy()
    nan[2, 1] = np.nan
    zero = v.copy()
    zero[1] = 0
    for labels, vectors, error, match in [
            (["a", "b", "a"], v, DuplicateClassError, "'a' is given more than once"),
            (["a", "b", "class-1"], v, DuplicateClassError, "'class-1' already exists"),
            (["a", "b", "c"], nan, ValueError, "NaN or infinity"),
            (["a", "b", "c"], zero, ValueError, "'b'.*zero vector"),
            (["a", "b"], v, ValueError, "2 labels but 3 vectors"),
            (["a", "b", "c"], v[:, :5], ValueError, "expected dim"),
            (["a", "", "c"], v, ValueError, "non-empty string"),
            ("abc", v, ValueError, "labels must be a list")]:
        with pytest.raises(error, match=match):
            reg.add_many(labels, vectors)
        assert reg.classes == before[0]
        np.testing.assert_array_equal(reg.prototypes()[1], before[1])
    reg.add_many(["a", "b", "c"], v)
    assert reg.classes[-3:] == ["a", "b", "c"] and reg.count("b") == 1


def test_rows_of_removed_classes_are_reused(tmp_path):
    reg, data = filled("l2", n_classes=30)
    for i in range(0, 30, 3):
        reg.remove(f"class-{i}")
        del data[f"class-{i}"]
    new = rng(22).normal(size=(15, DIM)).astype(np.float32)
    reg.add_many([f"new-{i}" for i in range(15)], new)
    data.update({f"new-{i}": new[i:i + 1] for i in range(15)})
    q = rng(23).normal(size=(10, DIM))
    assert_matches_brute_force(reg.search(q, 6), data, q, "l2", 6)
    reg.save(tmp_path / "r")
    loaded = Registry.load(tmp_path / "r")
    assert loaded.classes == reg.classes == list(data)
    assert_matches_brute_force(loaded.search(q, 6), data, q, "l2", 6)


def test_save_load_restores_index_in_use(tmp_path):
    reg, x = auto_registry(2500, threshold=1000)
    queries = clustered(40, seed=12)
    before = reg.search(queries, 10)
    in_use = reg.index_in_use
    reg.save(tmp_path / "r")
    m = manifest(tmp_path / "r")
    assert m["index_factory"] == "auto" and m["index_in_use"] == in_use and m["auto_threshold"] == 1000
    loaded = Registry.load(tmp_path / "r")
    assert loaded.index_factory == "auto" and loaded.index_in_use == in_use and loaded.auto_threshold == 1000
    after = loaded.search(queries, 10)
    assert after.labels == before.labels
    np.testing.assert_array_equal(after.scores, before.scores)
    p = {"nprobe": 2, "rerank": 20}
    assert loaded.search(queries, 10, params=p).labels == reg.search(queries, 10, params=p).labels
    loaded.add_many(["extra"], queries[:1])  # keeps working incrementally
    assert loaded.search(queries[:1], 1).labels == [["extra"]] and loaded.index_in_use == in_use
    # the manifest must name the index that is really in the file
    m["index_in_use"] = "Flat"
    write_manifest(tmp_path / "r", m)
    with pytest.raises(RegistryFormatError, match="not the 'Flat' index the manifest names"):
        Registry.load(tmp_path / "r")


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_auto_projects_wide_embeddings_and_scans_every_code(metric, monkeypatch, tmp_path):
    """Above AUTO_PCA_DIM dims "auto" codes a principal-direction projection, scans all codes and
    re-scores exactly: the top-1 is almost always the exact one, single queries agree with batches,
    and a saved registry answers the same."""
    monkeypatch.setattr(registry_index, "AUTO_PCA_DIM", 16)  # ADIM 32 stands in for 1280
    reg, x = auto_registry(3000, metric, threshold=1000)
    queries = np.concatenate([x[:60] + 0.3 * rng(3).normal(size=(60, ADIM)) / np.sqrt(ADIM),
                              clustered(60, seed=13)]).astype(np.float32)
    res = reg.search(queries, 3)
    assert reg.index_in_use.startswith("PCAR16,IVF") and reg.index_in_use.endswith(",PQ8x4fs")
    top, _ = exact_top(x, queries, metric, 3)
    recall = np.mean([row[0] == f"p{i}" for row, i in zip(res.labels, top[:, 0])])
    assert recall >= 0.98, recall  # half the dimensions projected away here (1280 -> 512 in use)
    singles = [reg.search(q[None], 3) for q in queries[:20]]  # lists split over threads
    repeats = [reg.search(queries[:8], 10) for _ in range(5)]  # the same answer every time
    assert all(r.labels == repeats[0].labels and np.array_equal(r.scores, repeats[0].scores) for r in repeats)
    assert [r.labels[0] for r in singles] == res.labels[:20]
    np.testing.assert_array_equal(np.concatenate([r.scores for r in singles]), res.scores[:20])
    if metric == "cosine":  # principal directions of the uncentred prototypes: nothing subtracted
        pca = faiss.downcast_VectorTransform(reg._index.chain.at(0))
        assert np.abs(faiss.vector_to_array(pca.mean)).max() < 1e-6
    reg.save(tmp_path / "r")
    loaded = Registry.load(tmp_path / "r")
    assert loaded.index_in_use == reg.index_in_use
    again = loaded.search(queries, 3)
    assert again.labels == res.labels
    np.testing.assert_array_equal(again.scores, res.scores)


def test_auto_index_of_an_older_scheme_is_rebuilt_on_load(tmp_path, monkeypatch):
    """A registry saved with the inverted lists of 8-dimension codes that "auto" built before gets
    today's index at its next search, with the same answers as exact search."""
    reg, x = auto_registry(2500, threshold=1000)
    with monkeypatch.context() as m:
        m.setattr(registry_index, "_auto_codec", lambda dim: f"PQ{dim // 8}x4fs")
        reg.search(x[:1], 1)
        assert reg.index_in_use.endswith(",PQ4x4fs")
        reg.save(tmp_path / "r")
    loaded = Registry.load(tmp_path / "r")
    assert loaded.index_in_use.endswith(",PQ16x4fs")  # planned: rebuilt at the next search
    queries = clustered(30, seed=15)
    top, _ = exact_top(x, queries, "cosine")
    assert [row[0] for row in loaded.search(queries, 1).labels] == [f"p{i}" for i in top[:, 0]]
    loaded.save(tmp_path / "r")
    assert manifest(tmp_path / "r")["index_in_use"] == loaded.index_in_use


def test_loads_format_1_registries(tmp_path):
    reg, data = filled(n_classes=5, index="Flat")
    reg.save(tmp_path / "r")
    m = manifest(tmp_path / "r")
    m["format_version"] = 1
    del m["index_in_use"], m["auto_threshold"]
    write_manifest(tmp_path / "r", m)
    loaded = Registry.load(tmp_path / "r")
    assert loaded.index_in_use == "Flat" and loaded.index_factory == "Flat"
    q = rng(24).normal(size=(4, DIM))
    assert_matches_brute_force(loaded.search(q, 3), data, q, "cosine", 3)


def test_ivf_removal_keeps_ids_in_step():
    """IVF indexes remove in place by id (an IndexIDMap2 wrapper would shift its ids)."""
    g = rng(25)
    reg = Registry(DIM, metric="l2", index="IVF8,Flat")
    data = {f"c{i}": g.normal(size=(1, DIM)).astype(np.float32) for i in range(600)}
    reg.add_many(list(data), np.concatenate(list(data.values())))
    reg.search(np.ones(DIM), 1)
    assert reg.index_in_use == "IVF8,Flat"
    for i in range(0, 600, 7):
        reg.remove(f"c{i}")
        del data[f"c{i}"]
    reg.add_examples("c1", np.ones(DIM))
    data["c1"] = np.concatenate([data["c1"], np.ones((1, DIM), np.float32)])
    q = g.normal(size=(10, DIM))
    assert_matches_brute_force(reg.search(q, 5, params={"nprobe": 8}), data, q, "l2", 5)


def test_readers_search_while_auto_index_switches():
    reg, x = auto_registry(240, threshold=256)
    queries = clustered(8, seed=13)
    errors, stop = [], threading.Event()

    def reader():
        try:
            while not stop.is_set():
                res = reg.search(queries, 3)
                assert all(len(row) == 3 and len(set(row)) == 3 for row in res.labels)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    more = clustered(400, seed=14)
    for i in range(0, 400, 4):
        reg.add_many([f"m{j}" for j in range(i, i + 4)], more[i:i + 4])
        reg.add_examples(f"m{i}", more[i + 1])
        if i % 8:
            reg.remove(f"m{i - 4}")
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert reg.index_in_use.startswith("IVF")


def test_ids_are_renumbered_after_heavy_churn(tmp_path):
    reg, data = filled("l2", n_classes=5)
    g = rng(26)
    for i in range(1500):  # add and remove: the id space grows, the registry does not
        reg.add(f"tmp-{i}", g.normal(size=DIM))
        reg.remove(f"tmp-{i}")
    q = g.normal(size=(6, DIM))
    assert_matches_brute_force(reg.search(q, 3), data, q, "l2", 3)  # rebuilt with dense ids
    assert reg._next_id == 5
    reg.save(tmp_path / "r")
    m = manifest(tmp_path / "r")
    m["next_id"] = 2**61  # a huge (or hostile) id space must not allocate a table that large
    write_manifest(tmp_path / "r", m)
    loaded = Registry.load(tmp_path / "r")
    assert_matches_brute_force(loaded.search(q, 3), data, q, "l2", 3)


@pytest.mark.parametrize("factory", ["IVF8,Flat", "HNSW16", "IVF4,PQ4x4fs"])
def test_save_load_other_indexes(tmp_path, factory):
    g = rng(27)
    data = {f"c{i}": g.normal(size=(1, DIM)).astype(np.float32) for i in range(400)}
    reg = Registry(DIM, metric="l2", index=factory)
    reg.add_many(list(data), np.concatenate(list(data.values())))
    q = g.normal(size=(8, DIM))
    before = reg.search(q, 5)
    reg.save(tmp_path / "r")
    loaded = Registry.load(tmp_path / "r")
    assert loaded.index_in_use == factory == loaded.index_factory
    after = loaded.search(q, 5)
    assert after.labels == before.labels
    np.testing.assert_array_equal(after.scores, before.scores)
    loaded.remove("c3")
    assert all("c3" not in row for row in loaded.search(q, 5).labels)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_honour_the_umask(tmp_path, umask):
    """A registry saved under umask 022 can be read by other users (and under 077 cannot)."""
    reg = Registry(4, store_examples=True)
    reg.add("a", np.ones((2, 4), np.float32))
    old = os.umask(umask)
    try:
        reg.save(tmp_path / "reg")
    finally:
        os.umask(old)
    assert (tmp_path / "reg").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in (tmp_path / "reg").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name
def test_labels_are_unicode_nfc_normalised(tmp_path):
    """A folder named café in decomposed form (macOS) and the café a user types are one class."""
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    reg = Registry(4)
    reg.add(decomposed, np.ones((1, 4), np.float32))
    assert reg.classes == [composed] and composed in reg and decomposed in reg
    reg.add(composed, np.ones((1, 4), np.float32))
    assert reg.count(decomposed) == 2
    reg.rename(composed, "the\u0301")
    assert reg.classes == ["th\u00e9"]
    reg.save(tmp_path / "r")
    loaded = Registry.load(tmp_path / "r")
    loaded.remove("the\u0301")
    assert loaded.classes == []


def test_attachments_are_saved_checksummed_and_replaced_by_generation(tmp_path):
    reg = Registry(4)
    reg.add("a", np.ones((1, 4), np.float32))
    reg.attachments["head-config.json"] = b'{"x": 1}'
    reg.save(tmp_path / "r")
    reg.attachments["head-config.json"] = b'{"x": 2}'
    reg.save(tmp_path / "r")
    assert Registry.load(tmp_path / "r").attachments == {"head-config.json": b'{"x": 2}'}
    stored = [p for p in (tmp_path / "r").iterdir() if p.name.startswith("attachment-")]
    assert len(stored) == 1  # the previous generation's copy is gone
    stored[0].write_bytes(b'{"x": 3}')
    with pytest.raises(RegistryFormatError, match="sha256"):
        Registry.load(tmp_path / "r")
    reg.attachments["../escape"] = b""
    with pytest.raises(ValueError, match="attachment name"):
        reg.save(tmp_path / "r")
# -- where examples came from (format 4 provenance file)

def digest_of(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def test_sources_follow_their_class_through_remove_rename_save_and_load(tmp_path):
    reg = Registry(DIM, store_examples=True)
    g = rng(40)
    reg.add("a", g.normal(size=(2, DIM)), sources=[("a0.jpg", digest_of("a0")), ("a1.jpg", None)])
    reg.add("b", g.normal(size=(1, DIM)))  # no sources: nothing recorded
    reg.add("b", g.normal(size=(1, DIM)), sources=[("b1.jpg", digest_of("b1"))])
    reg.add("c", g.normal(size=(1, DIM)), sources=[("c0.jpg", digest_of("c0"))])
    assert reg.sources("a") == [("a0.jpg", digest_of("a0")), ("a1.jpg", None)]
    assert reg.sources("b") == [(None, None), ("b1.jpg", digest_of("b1"))]  # aligned with examples("b")
    reg.remove("a")
    reg.rename("c", "see")
    reg.save(tmp_path / "r")
    loaded = Registry.load(tmp_path / "r")
    assert loaded.sources("b") == reg.sources("b") and loaded.sources("see") == [("c0.jpg", digest_of("c0"))]
    assert loaded.classes_by_digest() == {digest_of("b1"): ["b"], digest_of("c0"): ["see"]}
    for i in range(3000):  # removals renumber the ids at the next search: sources must follow
        loaded.add(f"tmp{i}", g.normal(size=(1, DIM)), sources=[(f"t{i}.jpg", digest_of("c0"))])
    assert loaded.classes_by_digest([digest_of("c0")])[digest_of("c0")][:3] == ["see", "tmp0", "tmp1"]
    for i in range(3000):
        loaded.remove(f"tmp{i}")
    loaded.search(g.normal(size=(1, DIM)), 1)
    assert loaded.sources("see") == [("c0.jpg", digest_of("c0"))] and loaded.sources("b")[1].source == "b1.jpg"
    loaded.add("b", g.normal(size=(1, DIM)), sources=[("b2.jpg", digest_of("c0"))])
    assert loaded.classes_by_digest() == {digest_of("b1"): ["b"], digest_of("c0"): ["b", "see"]}
    assert loaded.classes_by_digest(["f" * 64, digest_of("b1")]) == {digest_of("b1"): ["b"]}


def test_bad_sources_are_refused_and_change_nothing():
    reg = Registry(DIM)
    for bad, message in [([("x.jpg", "abc")], "64 lowercase hex"), ([("x.jpg", None)] * 2, "list of 1"),
                         (["x.jpg"], "pair"), ([("x" * 5000, None)], "at most 4096")]:
        with pytest.raises(ValueError, match=message):
            reg.add("a", np.ones(DIM), sources=bad)
    assert "a" not in reg


def test_format_3_registries_without_provenance_still_load(tmp_path):
    reg, data = filled(n_classes=4, store_examples=True)
    reg.save(tmp_path / "r")
    m = manifest(tmp_path / "r")
    del m["files"]["provenance"]
    m["format_version"] = 3
    write_manifest(tmp_path / "r", m)
    loaded = Registry.load(tmp_path / "r")
    assert loaded.classes == reg.classes and loaded.sources(reg.classes[0]) == []
    loaded.add(reg.classes[0], np.ones(DIM), sources=[("new.jpg", digest_of("new"))])
    assert loaded.sources(reg.classes[0])[-1] == ("new.jpg", digest_of("new"))
    loaded.save(tmp_path / "r")  # upgraded
    assert manifest(tmp_path / "r")["format_version"] == 4
    m["format_version"] = 4  # but format 4 must have the file
    write_manifest(tmp_path / "r", m)
    with pytest.raises(RegistryFormatError, match="missing field 'provenance'"):
        Registry.load(tmp_path / "r")


def test_provenance_file_is_covered_by_the_checksum(tmp_path):
    reg = Registry(DIM)
    reg.add("a", np.ones(DIM), sources=[("a.jpg", digest_of("a"))])
    reg.save(tmp_path / "r")
    (name,) = [n for n in os.listdir(tmp_path / "r") if n.startswith("provenance-")]
    data = bytearray((tmp_path / "r" / name).read_bytes())
    data[data.index(b"a.jpg")] ^= 0x01  # "a.jpg" -> "`.jpg": still valid JSON
    (tmp_path / "r" / name).write_bytes(bytes(data))
    with pytest.raises(RegistryFormatError, match=f"{name}: sha256 mismatch"):
        Registry.load(tmp_path / "r")
def test_thumbnails_are_saved_checksummed_and_follow_their_class(tmp_path):
    reg, _ = filled(n_classes=3)
    jpeg_like = {"class-0": b"\xff\xd8 zero", "class-2": b"\xff\xd8 two" * 50}
    for label, data in jpeg_like.items():
        reg.set_thumbnail(label, data)
    reg.save(tmp_path / "r")
    loaded = Registry.load(tmp_path / "r")
    assert [loaded.thumbnail(c) for c in ("class-0", "class-1", "class-2")] == [
        jpeg_like["class-0"], None, jpeg_like["class-2"]]
    with Registry.open(tmp_path / "r") as bound:  # each change saved: the thumbnail moves and goes with it
        bound.rename("class-2", "renamed")
        bound.remove("class-0")
    loaded = Registry.load(tmp_path / "r")
    assert loaded.thumbnail("renamed") == jpeg_like["class-2"]
    assert loaded.thumbnail("class-1") is None and "class-0" not in loaded
    with pytest.raises(UnknownClassError):
        loaded.set_thumbnail("nope", b"x")
    for bad in (b"", "text", b"x" * (64 * 1024 + 1)):
        with pytest.raises(ValueError, match="thumbnail"):
            loaded.set_thumbnail("class-1", bad)
    # A flipped byte in the thumbnails file is caught like one in any data file.
    name = manifest(tmp_path / "r")["files"]["thumbnails"]["name"]
    data = bytearray((tmp_path / "r" / name).read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "r" / name).write_bytes(bytes(data))
    with pytest.raises(RegistryFormatError, match="sha256"):
        Registry.load(tmp_path / "r")


def test_registries_without_thumbnails_load_and_write_no_thumbnail_files(tmp_path):
    reg, _ = filled(n_classes=2)
    reg.save(tmp_path / "r")
    assert "thumbnails" not in manifest(tmp_path / "r")["files"]
    assert not [n for n in os.listdir(tmp_path / "r") if n.startswith("thumbnail")]
    assert Registry.load(tmp_path / "r").thumbnail("class-0") is None


def test_examples_and_prototypes_of_a_subset_read_only_what_is_asked():
    rng = np.random.default_rng(7)
    reg = Registry(4, store_examples=True)
    for chunk in (rng.normal(size=(3, 4)), rng.normal(size=(1, 4)), rng.normal(size=(5, 4))):
        reg.add("a", chunk)  # three chunks, as three registers leave them
    reg.add("b", rng.normal(size=(2, 4)))
    rows = [0, 2, 3, 4, 8]  # across every chunk boundary
    np.testing.assert_array_equal(reg.examples("a", rows), reg.examples("a")[rows])
    labels, protos = reg.prototypes(["b", "a"])
    _, every = reg.prototypes()
    assert labels == ["b", "a"] and np.array_equal(protos, every[::-1])
