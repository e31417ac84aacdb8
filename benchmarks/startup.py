"""Start-up time of the commands that never run a model, against Python itself and `import torch`; and
`fewshot predict REG one.jpg` without torch (cached ONNX export) against the torch path, in the same run.

    .venv/bin/python benchmarks/startup.py [--reps 7] [--predict-reps 5]

Each row starts a fresh interpreter ``--reps`` times and reports the median wall time (and the
fastest): `python -c pass` (the floor), `import torch` (what every command paid before the imports
became lazy), `import fewshot`, and `python -m fewshot` with `--version`, `--help`, `classes`,
`rename` and `remove` on a 1,000-class registry. Target: <= 0.5 s for the fewshot rows.

The predict rows (``--predict-reps`` runs each) classify one JPEG against a 1,000-class registry of real Lite0
vectors: the default path (the encoder's ONNX export cached, no torch imported) and the torch path (`--encoder
efficientnet_lite0` re-creates the encoder with torch, as every predict did before); wall time and peak RSS (the
child's ru_maxrss), with their ratios. Targets: <= 1.0 s and <= 300 MB.
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
PREDICT_TARGET_S, PREDICT_TARGET_MB = 1.0, 300


def timed(argv: list[str], reps: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def timed_with_peak(argv: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run of ``argv``, in a fresh process."""
    code = ("import resource, subprocess, sys, time\n"
            "start = time.perf_counter()\n"
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, check=True, capture_output=True,
                          text=True)
    wall, peak = done.stdout.split()
    return float(wall), float(peak)


def make_photo_registry(path: Path, photo: Path, classes: int = 1000) -> None:
    """1,000 classes of real Lite0 vectors (the photo's embedding, perturbed), and the encoder's ONNX export cached."""
    from fewshot import create_encoder
    from fewshot.embedding.onnx_encoder import export_onnx_parts

    encoder = create_encoder()
    export_onnx_parts(encoder)
    base = encoder.embed([photo])[0]
    noise = np.random.default_rng(0).normal(scale=float(np.abs(base).mean()), size=(classes, encoder.dim))
    reg = Registry(encoder.dim, fingerprint=encoder.fingerprint)
    reg.add_many([f"class {i}" for i in range(classes)], (base + noise).astype(np.float32))
    reg.save(path)


def predict_rows(tmp: str, reps: int) -> None:
    import skimage

    photo = Path(skimage.__file__).parent / "data" / "rocket.jpg"
    reg = Path(tmp) / "photos"
    os.environ["FEWSHOT_CACHE_DIR"] = str(Path(tmp) / "cache")  # the export lands there; the children inherit it
    make_photo_registry(reg, photo)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "fewshot", "predict", str(reg), str(photo), "--no-cache"]
    runs = {"torch path (`--encoder efficientnet_lite0`)": command + ["--encoder", "efficientnet_lite0"],
            "without torch (cached ONNX export, the default)": command}
    results = {name: [timed_with_peak(argv, env) for _ in range(reps)] for name, argv in runs.items()}
    print(f"\n`fewshot predict REG one.jpg`, 1,000 classes, {reps} runs each; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| path | median wall s | median peak MB | wall ratio | memory ratio | target |")
    print("|---|---:|---:|---:|---:|---|")
    base_wall = statistics.median(w for w, _ in results[next(iter(runs))])
    base_peak = statistics.median(p for _, p in results[next(iter(runs))])
    for name, values in results.items():
        wall, peak = statistics.median(w for w, _ in values), statistics.median(p for _, p in values)
        verdict = "ok" if wall <= PREDICT_TARGET_S and peak <= PREDICT_TARGET_MB else "MISSED"
        print(f"| {name} | {wall:.2f} | {peak:.0f} | {base_wall / wall:.1f}x faster | {base_peak / peak:.1f}x "
              f"less | {verdict if 'ONNX' in name else ''} |")


def make_registry(path: Path, classes: int = 1000, dim: int = 1280) -> None:
    reg = Registry(dim, fingerprint={"name": "benchmark"})
    vectors = np.random.default_rng(0).normal(size=(classes, dim)).astype(np.float32)
    reg.add_many([f"class {i}" for i in range(classes)], vectors)
    reg.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--predict-reps", type=int, default=5, help="runs of each predict row (0: skip them)")
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
        if args.predict_reps:
            predict_rows(tmp, args.predict_reps)


if __name__ == "__main__":
    main()
