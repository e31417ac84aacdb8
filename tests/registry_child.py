"""Helpers for the crash, fuzz and lock tests: deterministic registry workloads, state snapshots,
and a cheap way to run registry code in another process.

Importing ``fewshot`` imports torch (seconds); the registry itself needs only numpy and FAISS.
``import_registry_only()`` loads ``fewshot.registry`` without the package ``__init__``, so a
subprocess is ready in ~0.2 s. Run as a script, this module is a *zygote*: it imports the registry
once, then for each JSON request on stdin forks a child that runs a workload (and is SIGKILLed at a
chosen moment), and answers one JSON line with what the child acknowledged before it died.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIM = 8
QUERIES_SEED = 99


def import_registry_only():
    """``fewshot.registry`` without ``fewshot/__init__`` (and so without torch)."""
    if "fewshot" not in sys.modules:
        package = types.ModuleType("fewshot")
        package.__path__ = [str(ROOT / "fewshot")]
        sys.modules["fewshot"] = package
    import fewshot.registry

    return fewshot.registry


# ---------------------------------------------------------------- workloads

VARIANTS = {  # name -> Registry options
    "flat-cosine-examples": {"metric": "cosine", "index": "Flat", "store_examples": True},
    "auto-l2": {"metric": "l2", "index": "auto"},
}


def initial_registry(variant: str):
    """The registry every trial starts from (5 classes)."""
    import numpy as np

    registry = import_registry_only()
    g = np.random.default_rng(1)
    reg = registry.Registry(DIM, fingerprint={"name": "test-encoder"}, **VARIANTS[variant])
    for i in range(5):
        vectors = g.normal(size=(int(g.integers(1, 3)), DIM))
        reg.add(f"base-{i}", vectors, sources=sources_for(f"base-{i}", len(vectors)) if i % 2 else None)
    return reg


def sources_for(name: str, n: int) -> list[tuple[str, str]]:
    """n (source, digest) pairs, as the classifier records for images it registers."""
    return [(f"photos/{name}/{j}.jpg", hashlib.sha256(f"{name}/{j}".encode()).hexdigest()) for j in range(n)]


def make_steps(seed: int, n_steps: int) -> list[list[tuple]]:
    """A deterministic list of steps, each a list of changes (a step of several is one batch/save):
    add_class, add_examples, add_many, remove and rename, with labels that exercise odd characters."""
    import numpy as np

    g = np.random.default_rng(seed)
    live = [f"base-{i}" for i in range(5)]
    steps, n = [], 0

    def change():
        nonlocal n
        kind = g.choice(["add_class", "add_examples", "add_many", "remove", "rename"],
                        p=[0.3, 0.25, 0.1, 0.2, 0.15])
        if kind in ("remove", "rename", "add_examples") and len(live) < 3:
            kind = "add_class"
        n += 1
        if kind == "add_class":
            label = f"c{n}/../ünï {n}"
            live.append(label)
            vectors = g.normal(size=(int(g.integers(1, 4)), DIM)).tolist()
            return ("add_class", label, vectors, {"sources": sources_for(label, len(vectors))})
        if kind == "add_many":
            labels = [f"m{n}-{j}" for j in range(3)]
            live.extend(labels)
            return ("add_many", labels, g.normal(size=(3, DIM)).tolist())
        victim = live[int(g.integers(len(live)))]
        if kind == "add_examples":
            vectors = g.normal(size=(int(g.integers(1, 3)), DIM)).tolist()
            return ("add_examples", victim, vectors, {"sources": sources_for(f"{victim}+{n}", len(vectors))})
        live.remove(victim)
        if kind == "remove":
            return ("remove", victim)
        live.append(f"r{n}")
        return ("rename", victim, f"r{n}")

    for _ in range(n_steps):
        steps.append([change() for _ in range(1 if g.random() < 0.75 else 3)])
    return steps


def apply_change(reg, change: tuple) -> None:
    kind, *args = change
    options = args.pop() if args and isinstance(args[-1], dict) else {}
    getattr(reg, kind)(*args, **options)


def apply_step(reg, step: list[tuple]) -> None:
    with reg.batch():  # one save for the step when the registry is bound (Registry.open)
        for change in step:
            apply_change(reg, change)


def snapshot(reg) -> dict:
    """Everything a user could observe, exactly: classes in order, counts, prototypes and stored
    examples bit for bit, and the answers (labels and scores) to fixed queries."""
    import numpy as np

    labels, protos = reg.prototypes()
    queries = np.random.default_rng(QUERIES_SEED).normal(size=(5, reg.dim)).astype(np.float32)
    found = reg.search(queries, 4) if len(reg) else None
    return {
        "classes": labels,
        "counts": [reg.count(label) for label in labels],
        "prototypes": protos.tobytes().hex(),
        "examples": [reg.examples(label).tobytes().hex() for label in labels] if reg.store_examples else None,
        "sources": [reg.sources(label) for label in labels],
        "answers": found.labels if found else None,
        "scores": found.scores.tobytes().hex() if found else None,
    }


def expected_states(variant: str, steps: list) -> list[dict]:
    """Snapshots after 0, 1, ..., len(steps) steps, computed in memory (nothing saved)."""
    reg = initial_registry(variant)
    states = [snapshot(reg)]
    for step in steps:
        apply_step(reg, step)
        states.append(snapshot(reg))
    return states


# ---------------------------------------------------------------- the zygote and its children

DURABLE_CALLS = ("write", "fsync", "replace", "unlink")


def _install_kill_switch(kill_at: int, when: str) -> None:
    """SIGKILL this process at the kill_at-th durable-storage call (a file write, fsync, rename or
    unlink), just before or just after it: every window of a save can be hit on purpose."""
    import signal

    storage = import_registry_only().storage  # the module that writes the registry's files
    count = 0

    def wrap(fn):
        def wrapper(*args, **kwargs):
            nonlocal count
            count += 1
            if count == kill_at and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = fn(*args, **kwargs)
            if count == kill_at and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper

    os.fsync, os.replace, os.unlink = wrap(os.fsync), wrap(os.replace), wrap(os.unlink)
    writer = storage._HashingWriter
    writer.write = wrap(writer.write)


def count_durable_calls(fn) -> int:
    """How many durable-storage calls fn() makes (in this process)."""
    storage = import_registry_only().storage  # the module that writes the registry's files
    count = 0
    saved = os.fsync, os.replace, os.unlink, storage._HashingWriter.write

    def wrap(f):
        def wrapper(*args, **kwargs):
            nonlocal count
            count += 1
            return f(*args, **kwargs)
        return wrapper

    os.fsync, os.replace, os.unlink = wrap(os.fsync), wrap(os.replace), wrap(os.unlink)
    storage._HashingWriter.write = wrap(storage._HashingWriter.write)
    try:
        fn()
    finally:
        os.fsync, os.replace, os.unlink, storage._HashingWriter.write = saved
    return count


def run_workload(directory: str, variant: str, seed: int, n_steps: int, mode: str, ack) -> None:
    """Apply the steps to the registry saved at directory, calling ack(k) once step k is durable:
    mode "open" (Registry.open: every step saved before it returns) or "save" (load, change, save)."""
    registry = import_registry_only()
    steps = make_steps(seed, n_steps)
    if mode == "open":
        reg = registry.Registry.open(directory)
        for k, step in enumerate(steps, 1):
            apply_step(reg, step)
            ack(k)
    else:
        reg = registry.Registry.load(directory)
        for k, step in enumerate(steps, 1):
            for change in step:
                apply_change(reg, change)
            reg.save(directory)
            ack(k)


def _trial(request: dict) -> dict:
    import signal
    import time

    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    r, w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: run the workload, report each acknowledged step on the pipe
        os.close(r)
        try:
            if request.get("kill_at"):
                _install_kill_switch(request["kill_at"], request["when"])
            run_workload(request["dir"], request["variant"], request["seed"], request["steps"], request["mode"],
                         lambda k: os.write(w, b"ack %d %f\n" % (k, time.monotonic() - start)))
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the test
            os.write(w, f"error {type(e).__name__}: {e}\n".encode()[:4000])
            code = 1
        os._exit(code)
    os.close(w)
    if request.get("delay") is not None:
        time.sleep(request["delay"])
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    elapsed = time.monotonic() - start
    with os.fdopen(r, "rb") as f:
        lines = f.read().decode().splitlines()
    acks = [line.split() for line in lines if line.startswith("ack ")]
    errors = [line for line in lines if line.startswith("error ")]
    return {"acked": max((int(a[1]) for a in acks), default=0), "ack_times": [float(a[2]) for a in acks],
            "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "errors": errors,
            "seconds": elapsed, "zygote_threads": threads}


def _warm_up() -> None:
    """Load what the registry imports lazily (numpy.ma alone costs ~50 ms in every child otherwise)
    by saving and loading a registry once. No search: no OpenMP thread pool exists before a fork."""
    import tempfile

    registry = import_registry_only()
    with tempfile.TemporaryDirectory() as tmp:
        reg = registry.Registry(DIM, store_examples=True)
        reg.add_many(["a", "b"], [[1.0] * DIM, [2.0] + [1.0] * (DIM - 1)])
        reg.save(tmp)
        registry.Registry.load(tmp)


def zygote() -> None:
    _warm_up()
    for line in sys.stdin:
        print(json.dumps(_trial(json.loads(line))), flush=True)


if __name__ == "__main__":
    zygote()
