"""Start-up time of the commands that never run a model, against Python itself and `import torch`.

    .venv/bin/python benchmarks/startup.py [--reps 7]

Each row starts a fresh interpreter ``--reps`` times and reports the median wall time (and the
fastest): `python -c pass` (the floor), `import torch` (what every command paid before the imports
became lazy), `import fewshot`, and `python -m fewshot` with `--version`, `--help`, `classes`,
`rename` and `remove` on a 1,000-class registry. Target: <= 0.5 s for the fewshot rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fewshot.registry import Registry  # noqa: E402

TARGET_S = 0.5


def timed(argv: list[str], reps: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def make_registry(path: Path, classes: int = 1000, dim: int = 1280) -> None:
    reg = Registry(dim, fingerprint={"name": "benchmark"})
    vectors = np.random.default_rng(0).normal(size=(classes, dim)).astype(np.float32)
    reg.add_many([f"class {i}" for i in range(classes)], vectors)
    reg.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        reg = str(Path(tmp) / "reg")
        make_registry(Path(reg))
        rows = [
            ("python -c pass", [py, "-c", "pass"], False),
            ("import torch (the old floor)", [py, "-c", "import torch"], False),
            ("import fewshot", [py, "-c", "import fewshot"], True),
            ("fewshot --version", [py, "-m", "fewshot", "--version"], True),
            ("fewshot --help", [py, "-m", "fewshot", "--help"], True),
            ("fewshot classes REG (1,000 classes)", [py, "-m", "fewshot", "classes", reg], True),
            ("fewshot rename REG", [py, "-m", "fewshot", "rename", reg, "class 1", "class one"], True),
            ("fewshot remove REG", [py, "-m", "fewshot", "remove", reg, "--class", "class 1"], True),
        ]
        print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.reps} runs each\n")
        print("| command | median s | fastest s | target |")
        print("|---|---:|---:|---|")
        for name, argv, targeted in rows:
            if "rename" in name or "remove" in name:  # each changes the registry: undo between runs
                times = []
                for _ in range(args.reps):
                    make_registry(Path(reg))
                    times += timed(argv, 1)
            else:
                times = timed(argv, args.reps)
            med = statistics.median(times)
            verdict = ("ok" if med <= TARGET_S else "MISSED") if targeted else ""
            print(f"| `{name}` | {med:.3f} | {min(times):.3f} | {verdict} |")


if __name__ == "__main__":
    main()
