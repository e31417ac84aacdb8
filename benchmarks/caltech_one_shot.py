"""Caltech-101 (the 51 classes in ../shared/datasets): `fewshot register` throughput and 1-shot accuracy.

    .venv/bin/python benchmarks/caltech_one_shot.py [--zip PATH] [--seeds 5] [--naive 200]

1. Times `fewshot register REG --folder DIR` over every image with a cold embedding cache (images/s,
   end to end: process start, model load, decoding, network, save), and a naive baseline in the same
   run: timm eager model, one image at a time, PIL decode + transform, on the first N images.
2. 1-shot accuracy: every class registered from one random image, all the others predicted
   (repeated over seeds; the warm cache from step 1 makes this fast).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ZIP = ROOT.parent / "shared" / "datasets" / "caltech101" / "caltech101_base.zip"


def extract(zip_path: Path, target: Path) -> Path:
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(target)
    return target / "caltech101"


def time_cli_register(folder: Path, registry: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fewshot", "register", str(registry), "--folder", str(folder)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def naive_images_per_second(paths: list[Path]) -> float:
    """What a user would write first: eager timm model, one image at a time."""
    import timm
    import torch
    from PIL import Image

    from fewshot.embedding.encoders import create_encoder

    model = create_encoder().model
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    start = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            model(transform(Image.open(path).convert("RGB")).unsqueeze(0))
    return len(paths) / (time.perf_counter() - start)


def one_shot_accuracy(folder: Path, seed: int) -> float:
    from fewshot import FewShotClassifier
    from fewshot.data.datasets import class_folders, support_query_split

    support, query = support_query_split(class_folders(folder), shots=1, seed=seed)
    clf = FewShotClassifier(progress=False)
    for label, paths in support.items():
        clf.register(label, paths)
    paths = [p for ps in query.values() for p in ps]
    truth = [label for label, ps in query.items() for _ in ps]
    return float(np.mean([p.label == t for p, t in zip(clf.predict(paths), truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--naive", type=int, default=200, help="images for the naive baseline")
    args = parser.parse_args()
    if not args.zip.is_file():
        sys.exit(f"Caltech-101 zip not found at {args.zip}; pass --zip PATH")
    with tempfile.TemporaryDirectory() as tmp:
        folder = extract(args.zip, Path(tmp))
        paths = sorted(folder.rglob("*.jpg"))
        env = {**os.environ, "FEWSHOT_CACHE_DIR": str(Path(tmp) / "cache")}
        os.environ.update(env)
        seconds = time_cli_register(folder, Path(tmp) / "all.reg", env)
        naive = naive_images_per_second(paths[: args.naive])
        print(f"images: {len(paths)}, classes: {len(list(folder.iterdir()))}")
        print(f"fewshot register --folder (cold cache, end to end): {seconds:.1f} s, {len(paths) / seconds:.1f} img/s")
        print(f"naive loop (eager, batch 1, first {args.naive} images):     {naive:.1f} img/s")
        print(f"ratio: {len(paths) / seconds / naive:.2f}x")
        accuracies = [one_shot_accuracy(folder, seed) for seed in range(args.seeds)]
        mean = statistics.mean(accuracies)
        ci = 1.96 * statistics.stdev(accuracies) / len(accuracies) ** 0.5 if len(accuracies) > 1 else float("nan")
        print(f"1-shot, all {len(list(folder.iterdir()))} classes, rest predicted: accuracy {mean:.2%} ± {ci:.2%} "
              f"(95% CI over {args.seeds} seeds: {', '.join(f'{a:.2%}' for a in accuracies)})")


if __name__ == "__main__":
    main()
