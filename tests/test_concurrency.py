"""Concurrency (issue #5, property 6): readers while a writer changes and saves the registry, and
one writer at a time per registry directory.

Readers (threads searching or predicting, threads loading the directory) must never fail and must
only ever see states that existed; a second writer (another process, or the CLI) must fail at once
with a lock error naming the holder; a killed writer must not leave a stale lock.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fewshot import FewShotClassifier
from fewshot.errors import RegistryFormatError, RegistryLockedError
from fewshot.registry import Registry

HERE = Path(__file__).resolve().parent
DIM = 32
WRITER_SECONDS = 3.0
READERS = 4


def unit_vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class History:
    """The states the writer has completed, each a {label: vector id}; readers note how many there
    were before and after each answer, so the answer must fit one of the states in between."""

    def __init__(self, state: dict):
        self.states = [dict(state)]

    def completed(self) -> int:
        return len(self.states) - 1

    def candidates(self, before: int, after: int) -> list[dict]:
        # the change after `after` may already be applied (it is saved before it returns)
        return self.states[before:after + 2]


def top_k(state: dict, vectors: np.ndarray, queries: np.ndarray, k: int):
    labels = list(state)
    scores = queries.astype(np.float64) @ vectors[[state[lb] for lb in labels]].astype(np.float64).T
    order = np.argsort(-scores, axis=1)[:, :k]
    return [[labels[j] for j in row] for row in order], np.take_along_axis(scores, order, axis=1)


def run_threads(readers, writer) -> None:
    threads = [threading.Thread(target=r) for r in readers]
    for t in threads:
        t.start()
    try:
        writer()
    finally:
        for t in threads:
            t.join(timeout=60)


def test_readers_only_ever_see_states_that_existed(tmp_path):
    """READERS threads search while one writer adds, renames and removes classes of a registry
    opened for writing (each change saved before it returns). Every answer must be exactly the
    top-k, labels and scores, of a state that existed during the search."""
    vectors = unit_vectors(400, seed=1)
    queries = unit_vectors(6, seed=2)
    reg = Registry.open(tmp_path / "r", DIM, index="Flat")
    reg.add_many([f"v{i}" for i in range(5)], vectors[:5])
    history = History({f"v{i}": i for i in range(5)})
    stop, errors, answers = threading.Event(), [], []

    def reader():
        try:
            while not stop.is_set():
                before = history.completed()
                found = reg.search(queries, 3)
                answers.append((before, history.completed(), found.labels, found.scores))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def writer():
        rng = np.random.default_rng(3)
        state, next_vector, deadline = dict(history.states[0]), 5, time.monotonic() + WRITER_SECONDS
        try:
            while time.monotonic() < deadline and next_vector < len(vectors):
                action = rng.choice(["add", "remove", "rename"]) if len(state) > 3 else "add"
                if action == "add":
                    label = f"v{next_vector}"
                    reg.add(label, vectors[next_vector])
                    state[label] = next_vector
                    next_vector += 1
                else:
                    label = list(state)[int(rng.integers(len(state)))]
                    if action == "remove":
                        reg.remove(label)
                        del state[label]
                    else:
                        reg.rename(label, f"{label}'")
                        state[f"{label}'"] = state.pop(label)
                history.states.append(dict(state))
        finally:
            stop.set()

    run_threads([reader] * READERS, writer)
    reg.close()
    assert not errors, errors[0]
    for before, after, labels, scores in answers:
        fits = False
        for state in history.candidates(before, after):
            want_labels, want_scores = top_k(state, vectors, queries, 3)
            if labels == want_labels and np.allclose(scores, want_scores, atol=1e-5):
                fits = True
                break
        assert fits, f"answer {labels} fits none of the states {before}..{after + 1}"
    assert set(Registry.load(tmp_path / "r").classes) == set(history.states[-1])
    print(f"\n{READERS} reader threads x {WRITER_SECONDS:.0f} s: {len(answers)} answers checked against "
          f"{history.completed()} writer changes (each saved)")
    assert history.completed() >= 20 and len(answers) >= 20


def test_loading_while_a_writer_saves_never_fails(tmp_path):
    """Readers that load the directory (as `fewshot predict` does) while a writer saves: a load that
    read the manifest of a generation the writer then replaced reads the new one instead of failing
    on its deleted files."""
    path = tmp_path / "r"
    vectors = unit_vectors(400, seed=4)
    reg = Registry.open(path, DIM)
    reg.add_many([f"v{i}" for i in range(5)], vectors[:5])
    seen, errors, stop = [], [], threading.Event()
    states = [frozenset(reg.classes)]

    def reader():
        try:
            while not stop.is_set():
                seen.append(frozenset(Registry.load(path).classes))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def writer():
        try:
            deadline, i = time.monotonic() + WRITER_SECONDS, 5
            while time.monotonic() < deadline and i < len(vectors):
                reg.add(f"v{i}", vectors[i])
                states.append(frozenset(reg.classes))
                reg.remove(f"v{i - 3}")
                states.append(frozenset(reg.classes))
                i += 1
        finally:
            stop.set()

    run_threads([reader] * 2, writer)
    reg.close()
    assert not errors, errors[0]
    assert len(seen) >= 20
    assert set(seen) <= set(states)  # every load gave a state that was saved
    print(f"\n2 loader threads x {WRITER_SECONDS:.0f} s: {len(seen)} loads during {len(states) - 1} saved "
          f"changes")


OPEN_SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from registry_child import import_registry_only
registry = import_registry_only()
start = time.monotonic()
try:
    reg = registry.Registry.open(sys.argv[2])
except Exception as e:
    print(type(e).__name__, round(time.monotonic() - start, 3), e, flush=True)
    sys.exit(0)
print("opened", flush=True)
if len(sys.argv) > 3:
    time.sleep(float(sys.argv[3]))
"""


def open_in_other_process(path: Path, hold: float | None = None):
    args = [sys.executable, "-c", OPEN_SCRIPT, str(HERE), str(path)] + ([str(hold)] if hold else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_writer_process_fails_fast_naming_the_holder(tmp_path):
    import os

    path = tmp_path / "r"
    with Registry.open(path, DIM) as reg:
        reg.add("a", np.ones(DIM))
        other = open_in_other_process(path)
        out, err = other.communicate(timeout=60)
        name, seconds, message = out.split(" ", 2)
        assert name == "RegistryLockedError", (out, err)
        assert float(seconds) < 1.0 and f"process {os.getpid()}" in message and "wait for it" in message
        assert Registry.load(path).classes == ["a"]  # readers need no lock
        with pytest.raises(RegistryLockedError, match="this process"):
            Registry.open(path)  # another writer in the same process is refused too
        with pytest.raises(RegistryLockedError):
            Registry(DIM).save(path)  # and so is a plain save over it
    other = open_in_other_process(path)  # closed: the lock is free again
    assert other.communicate(timeout=60)[0].strip() == "opened"


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "r"
    Registry(DIM).save(path)
    holder = open_in_other_process(path, hold=60)
    assert holder.stdout.readline().strip() == "opened"
    with pytest.raises(RegistryLockedError, match=f"process {holder.pid}"):
        Registry.open(path)
    holder.kill()  # SIGKILL: no chance to clean up
    holder.wait(timeout=30)
    with Registry.open(path) as reg:
        reg.add("after", np.ones(DIM))


def test_cli_writers_take_the_lock_and_readers_do_not(tmp_path, capsys, encoder, photos):
    from fewshot.cli import main

    path = tmp_path / "shop.reg"
    with FewShotClassifier.open(path, encoder=encoder, cache=False) as clf:
        clf.register("cat", photos["chelsea"])
        clf.register("mug", photos["coffee"])
        for argv in (["remove", str(path), "--class", "cat"], ["rename", str(path), "cat", "kitty"],
                     ["register", str(path), "--class", "rocket", str(photos["rocket"]), "--no-cache"]):
            assert main(argv) == 1
            err = capsys.readouterr().err
            assert "is open for writing by this process" in err and len(err.strip().splitlines()) == 1
        assert main(["classes", str(path)]) == 0
        assert capsys.readouterr().out.split() == ["cat", "1", "mug", "1"]
        assert main(["predict", str(path), str(photos["coffee"]), "--no-cache"]) == 0
        assert capsys.readouterr().out.split("\t")[1] == "mug"
    assert main(["remove", str(path), "--class", "cat"]) == 0


def test_predict_threads_with_the_real_encoder_while_classes_change(tmp_path, encoder, photos, views_of):
    """Two threads predict real photos with the real encoder while a writer registers and removes
    classes (of other photos' views): each photo's own class, registered from that very photo, must
    win every time at the same score, and every label must be a class that existed."""
    clf = FewShotClassifier.open(tmp_path / "r", encoder=encoder, cache=False)
    for label in ("chelsea", "coffee"):
        clf.register(label, photos[label])
    extra = {f"{name}-view-{i}": v for name in ("rocket", "astronaut", "camera")
             for i, v in enumerate(encoder.embed(views_of(photos[name], 2, seed=7)))}
    ever, errors, answers, stop = {"chelsea", "coffee", *extra}, [], [], threading.Event()

    def reader(label):
        try:
            while not stop.is_set():
                (p,) = clf.predict([photos[label]], top_k=3)
                answers.append((label, p))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def writer():
        try:
            deadline = time.monotonic() + WRITER_SECONDS
            while time.monotonic() < deadline:
                for name, vector in extra.items():
                    clf.registry_.add(name, vector)
                    time.sleep(0.01)  # (a real writer embeds images between changes)
                for name in extra:
                    clf.remove(name)
                    time.sleep(0.01)
        finally:
            stop.set()

    run_threads([lambda: reader("chelsea"), lambda: reader("coffee")], writer)
    clf.close()
    assert not errors, errors[0]
    assert len(answers) >= 10
    for label, p in answers:
        assert p.error is None and p.label == label, p
        assert len({lb for lb, _ in p.top_k}) == len(p.top_k) and {lb for lb, _ in p.top_k} <= ever
    print(f"\n2 predict threads x {WRITER_SECONDS:.0f} s with the real encoder: {len(answers)} predictions")


def test_a_reader_gets_its_generation_however_many_saves_happen_while_it_reads(tmp_path, monkeypatch):
    """The worst case of a big registry saved often: between the moment a reader has read the manifest
    and the moment it reads the data files, the writer saves twice (as it would while a 100k-class
    registry is being read). Every attempt of the reader meets this, so retrying cannot help: the
    reader must still get the generation whose manifest it read, complete."""
    import fewshot.registry.manifest as registry_manifest

    path = tmp_path / "r"
    writer = Registry.open(path, DIM)
    writer.add_many([f"v{i}" for i in range(50)], unit_vectors(50, seed=5))
    parse, saves = registry_manifest._parse_manifest, []

    def parse_then_two_saves(mpath):
        m = parse(mpath)
        for _ in range(2):  # the writer finishes two saves before this reader goes on
            writer.rename(f"v{len(saves)}", f"renamed{len(saves)}")
            saves.append(writer.classes)
        return m

    monkeypatch.setattr(registry_manifest, "_parse_manifest", parse_then_two_saves)
    loaded = Registry.load(path)
    monkeypatch.undo()
    assert loaded.classes == [f"v{i}" for i in range(50)]  # the generation it started to read
    assert len(saves) == 2  # first attempt
    writer.rename("v2", "renamed2")  # no reader now: the generations no reader needs are removed
    writer.close()
    data_files = sorted(p.name for p in path.iterdir() if p.name.endswith((".npy", ".faiss")))
    assert len(data_files) == 2, data_files


SAVE_LOOP_SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from registry_child import import_registry_only
registry = import_registry_only()
import numpy as np
n, dim, seconds = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
reg = registry.Registry.open(sys.argv[2], dim)
reg.add_many([f"class {i}" for i in range(n)], np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32))
print("ready", flush=True)
saves, deadline = 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    reg.rename(f"class {saves % n}", f"renamed {saves}")  # one change = one full save
    saves += 1
print(saves, flush=True)
"""


def test_loads_never_fail_while_another_process_saves_a_large_registry_continuously(tmp_path):
    """2,000 classes x 512 dims (4 MB of prototypes) saved back to back by another process for 6 s
    while this one loads in a loop: every load gives a complete, verified generation."""
    path = tmp_path / "big"
    proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP_SCRIPT, str(HERE), str(path), "2000", "512", "6"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        loads, failures = 0, []
        while proc.poll() is None:
            try:
                reg = Registry.load(path)
                assert len(reg) == 2000
                loads += 1
            except Exception as e:  # noqa: BLE001 - reported below
                failures.append(f"{type(e).__name__}: {e}")
        saves = int(proc.stdout.read().strip())
    finally:
        proc.kill()
        proc.wait()
    assert not failures, f"{len(failures)} of {loads + len(failures)} loads failed, e.g. {failures[0]}"
    assert loads >= 10 and saves >= 10
    print(f"\n{loads} loads while another process made {saves} saves, none failed")


def test_listing_classes_reads_only_the_manifest(tmp_path):
    """Listing a registry's classes (fewshot classes) must not read every prototype: with the data
    files unreadable it still works, and the listing is verified by the manifest's checksum."""
    path = tmp_path / "r"
    reg = Registry(DIM)
    reg.add_many(["a", "b", "c"], unit_vectors(3, seed=1))
    reg.add("a", unit_vectors(1, seed=2))
    reg.save(path)
    for data in path.glob("prototypes-*.npy"):
        data.write_bytes(b"not read")
    assert Registry.saved_counts(path) == {"a": 2, "b": 1, "c": 1}
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"count": 2', '"count": 3'))
    with pytest.raises(RegistryFormatError, match="checksum"):
        Registry.saved_counts(path)
