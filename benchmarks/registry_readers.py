"""Readers of a large registry that another process saves over and over (issue 13, item 3).

A writer process saves a ``--classes`` x ``--dim`` registry back to back (one rename = one full save)
while this process loads it in a loop for ``--seconds``; prints how many loads succeeded and failed, and
their median time. Then compares listing the classes from the manifest alone (``Registry.saved_counts``,
what ``fewshot classes`` does) with a full ``Registry.load`` (the baseline), each in a fresh process,
with its time and peak memory growth (Linux: VmHWM reset after the imports).

    .venv/bin/python benchmarks/registry_readers.py [--classes 50000] [--dim 1280] [--seconds 20]

Peak memory is about 3 x classes x dim x 4 bytes (the writer's copy, the reader's, one being built).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WRITER = r"""
import sys, time
import numpy as np
from fewshot.registry import Registry
path, n, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
reg = Registry.open(path, dim)
reg.add_many([f"class {i}" for i in range(n)], np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32))
print("ready", flush=True)
saves, times = 0, []
while sys.stdin.readline().strip() == "go":  # one save per request, so the reader sets the rate
    start = time.monotonic()
    reg.rename(f"class {saves % n}", f"renamed {saves}")
    times.append(time.monotonic() - start)
    saves += 1
    print("saved", flush=True)
"""

LISTING = r"""
import json, sys, time
from fewshot.registry import Registry
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
before = status_kb("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: measure the listing, not the imports
start = time.monotonic()
counts = Registry.saved_counts(sys.argv[1]) if sys.argv[2] == "manifest" else Registry.load(sys.argv[1]).counts
seconds = time.monotonic() - start
print(json.dumps({"seconds": seconds, "classes": len(counts), "peak_mb": (status_kb("VmHWM:") - before) / 1024}))
"""


def load_loop(path: Path, writer: subprocess.Popen, seconds: float) -> dict:
    """Load in a loop while the writer saves continuously (asked for its next save as soon as the
    previous one is done), so every load overlaps saves."""
    from fewshot.registry import Registry

    loads, failures, times = 0, [], []
    writer.stdin.write("go\n")
    writer.stdin.flush()
    saves, deadline = 0, time.monotonic() + seconds
    stop = threading.Event()

    def keep_saving():
        nonlocal saves
        while not stop.is_set():
            if writer.stdout.readline().strip() != "saved":
                return
            saves += 1
            writer.stdin.write("go\n")
            writer.stdin.flush()

    thread = threading.Thread(target=keep_saving, daemon=True)
    thread.start()
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            Registry.load(path)
            loads += 1
            times.append(time.monotonic() - start)
        except Exception as e:  # noqa: BLE001 - counted and shown
            failures.append(f"{type(e).__name__}: {e}")
    stop.set()
    writer.stdin.write("stop\n")
    writer.stdin.flush()
    thread.join(timeout=120)
    return {"loads": loads, "failures": len(failures), "example": failures[0] if failures else "",
            "median_load_s": statistics.median(times) if times else float("nan"), "saves": saves}


def listing(path: Path, how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LISTING, str(path), how], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:  # e.g. a fewshot without saved_counts
        return {"seconds": float("nan"), "peak_mb": float("nan")}
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=50000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fewshot-readers-") as tmp:
        path = Path(tmp) / "reg"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(args.classes), str(args.dim)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert writer.stdout.readline().strip() == "ready"
        result = load_loop(path, writer, args.seconds)
        writer.wait(timeout=120)
        print(f"## {args.classes} classes x {args.dim} dims, saved back to back for {args.seconds:.0f} s\n")
        print("| loads | failed | median load (s) | saves meanwhile |\n|---|---|---|---|")
        print(f"| {result['loads']} | {result['failures']} | {result['median_load_s']:.2f} | {result['saves']} |")
        if result["example"]:
            print(f"\nfirst failure: {result['example']}")
        rows = {how: listing(path, how) for how in ("load", "manifest")}
        print("\n| listing classes | seconds | peak memory growth (MB) |\n|---|---|---|")
        for how, label in (("load", "Registry.load(...).counts (baseline)"),
                           ("manifest", "Registry.saved_counts (fewshot classes)")):
            print(f"| {label} | {rows[how]['seconds']:.2f} | {rows[how]['peak_mb']:.0f} |")
        print(f"\nlisting from the manifest: {rows['load']['seconds'] / rows['manifest']['seconds']:.1f}x faster, "
              f"{rows['load']['peak_mb'] / max(rows['manifest']['peak_mb'], 1):.0f}x less memory growth")


if __name__ == "__main__":
    main()
