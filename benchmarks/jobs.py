"""Embedding jobs: the local engine against Ray Data on this machine, images/s and peak memory.

    .venv/bin/python benchmarks/jobs.py [--images 200] [--data ../shared/datasets/caltech101/caltech101_base.zip]
                                        [--reps 3] [--cpus 2]

Extracts N real Caltech-101 JPEGs (seeded sample, one folder per class) and runs `embed_to_parquet` into a
fresh Parquet dataset ``--reps`` times per engine: "local" (this process) and "ray" (a local Ray started
once with ``--cpus`` CPUs, one actor per CPU, each loading the encoder once; the start-up of Ray itself is
reported apart). Reported: median wall time and images/s, the ratio to the local engine, and the peak
resident memory of the whole process tree (this process, and for Ray its raylet, GCS and workers), sampled
every 0.1 s from /proc. A resumed run (everything already written) is timed too: it must cost only the listing.
Linux only (/proc). On a shared machine compare the ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_ZIP = ROOT.parent / "shared" / "datasets" / "caltech101" / "caltech101_base.zip"
from fewshot import create_encoder  # noqa: E402
from fewshot.jobs import embed_to_parquet  # noqa: E402


def tree_rss_mb(root_pid: int) -> float:
    """Resident memory of ``root_pid`` and all its descendants, in MB (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    total_kb = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                total_kb += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            continue
    return total_kb / 1024


class PeakMemory:
    """Samples the process tree's RSS in a thread; ``peak`` is the highest seen."""

    def __init__(self, every: float = 0.1):
        self.every, self.peak, self._stop = every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(os.getpid()))
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def extract_dataset(zip_path: Path, n: int, root: Path, seed: int = 0) -> Path:
    """N JPEGs drawn (seeded) from the whole zip, kept in their class folders (``<class>/<image>``)."""
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(name for name in zf.namelist() if name.lower().endswith((".jpg", ".jpeg")))
        random.Random(seed).shuffle(names)
        for name in names[:n]:
            target = root / Path(name).parent.name / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--data", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs given to the local Ray")
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"zip of JPEGs not found at {args.data}; pass --data PATH")
    import ray

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fewshot-jobs-bench-") as tmp:
        tmp = Path(tmp)
        data = extract_dataset(args.data, args.images, tmp / "data")
        encoder = create_encoder()
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - start
        rows = {}
        for engine in ("local", "ray"):
            times, peaks = [], []
            for rep in range(args.reps + 1):  # the first run warms up (Ray: actors, export to ONNX once)
                out = tmp / f"{engine}-{rep}.parquet"
                with PeakMemory() as memory:
                    start = time.perf_counter()
                    report = embed_to_parquet(data, out, encoder=encoder, engine=engine, progress=False)
                    elapsed = time.perf_counter() - start
                assert report.written == args.images, report
                if rep:
                    times.append(elapsed)
                    peaks.append(memory.peak)
            start = time.perf_counter()
            resumed = embed_to_parquet(data, out, encoder=encoder, engine=engine, progress=False)
            resume_s = time.perf_counter() - start
            assert resumed.written == 0 and resumed.skipped == args.images
            rows[engine] = (statistics.median(times), max(peaks), resume_s)
            print(f"  {engine}: {[round(t, 2) for t in times]} s", file=sys.stderr)
        ray.shutdown()
    print(f"\n### Embedding jobs: {args.images} Caltech-101 JPEGs -> Parquet, local engine vs Ray Data on this "
          f"machine\n")
    print(f"{os.cpu_count()} CPUs, Ray given {args.cpus}; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; median of {args.reps} warm runs; Ray start-up {ray_start:.1f} s "
          f"(once per session, not in the rows)\n")
    print("| engine | wall s (median) | images/s | vs local | peak RSS, process tree MB | resume s |")
    print("|---|---:|---:|---:|---:|---:|")
    for engine, (wall, peak, resume_s) in rows.items():
        print(f"| {engine} | {wall:.2f} | {args.images / wall:.1f} | {rows['local'][0] / wall:.2f}x | {peak:.0f} | "
              f"{resume_s:.2f} |")


if __name__ == "__main__":
    main()
