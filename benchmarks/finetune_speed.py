"""Fine-tuning speed: seconds per training epoch of today's ``finetune`` against the baseline (commit 8a4e88d's
``fewshot/learning/finetune.py``, loaded from git), same recipe, same capped data, same run, alternating.

    PYTHONPATH=. .venv/bin/python benchmarks/finetune_speed.py [--repeats 3] [--setups omniglot caltech]

An epoch is one pass over the training images: (classifier steps x batch + episodes x ways x (shots + queries))
images seen / training images. Its time is the whole run less the frozen prefix's caching (which both run once
per image and view), so validation, the guard and packaging count. Setups use the recipes in ``recipes/`` on
capped data: omniglot = the 5-alphabet ``images_background_small1.zip``, 8 drawings per character (+ rotations);
caltech = 40 classes of ``caltech101_base.zip``, 20 photos each.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fewshot import load_dataset
from fewshot.data.datasets import cap_per_class, split_validation
from fewshot.learning.finetune import Recipe, finetune

ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "8a4e88d"


def baseline_module():
    """The baseline fine-tuning module, imported as a sibling of today's (its relative imports resolve)."""
    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:fewshot/learning/finetune.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "finetune_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fewshot.learning.finetune_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    caching = {"seconds": 0.0}
    cache_split = module._cache_split

    def timed_cache_split(*args, **kwargs):
        start = time.perf_counter()
        try:
            return cache_split(*args, **kwargs)
        finally:
            caching["seconds"] += time.perf_counter() - start

    module._cache_split = timed_cache_split
    module.caching = caching
    return module


def setup(name: str, data: Path):
    if name == "omniglot":
        dataset = cap_per_class(load_dataset(data / "omniglot" / "images_background_small1.zip"), 8)
        recipe = Recipe.load(ROOT / "recipes" / "omniglot.toml").replace(episodes=30, val_every=10)
    else:
        dataset = load_dataset(data / "caltech101" / "caltech101_base.zip")
        dataset = cap_per_class(dataset.select_classes(dataset.classes[:40]), 20)
        recipe = Recipe.load(ROOT / "recipes" / "caltech.toml").replace(pretrain_steps=20, episodes=100)
    recipe = Recipe.from_dict({**recipe.to_dict(), "max_images_per_class": None, "patience": 1000})
    train, _ = split_validation(dataset, recipe.val_fraction, recipe.seed)
    n_train = len(train) * (4 if "rotations" in recipe.augment else 1)
    return dataset, recipe, n_train


def epochs(recipe: Recipe, result, n_train: int) -> float:
    seen = recipe.pretrain_steps * min(recipe.batch_size, n_train) + \
        result.steps_run * recipe.ways * (recipe.shots + recipe.queries)
    return seen / n_train


def run_today(dataset, recipe, n_train, precision: str) -> float:
    _, result = finetune(dataset, recipe.replace(precision=precision), progress=False)
    return (result.seconds - result.seconds_caching) / epochs(recipe, result, n_train)


def run_baseline(module, dataset, recipe, n_train) -> float:
    module.caching["seconds"] = 0.0
    _, result = module.finetune(dataset, recipe, progress=False)
    return (result.seconds - module.caching["seconds"]) / epochs(recipe, result, n_train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--setups", nargs="+", default=["omniglot", "caltech"], choices=["omniglot", "caltech"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    baseline = baseline_module()
    warm, warm_recipe, _ = setup("omniglot", args.data)  # first runs pay one-time costs: not measured
    warm = warm.select_classes(warm.classes[:40])
    for precision in ("float32", "auto"):
        finetune(warm, warm_recipe.replace(episodes=2, precision=precision, ways=5), progress=False)
    print(f"load average before: {os.getloadavg()}")
    print("| setup | training images | baseline s/epoch | today float32 s/epoch | today auto s/epoch | "
          "speed-up float32 | speed-up auto |")
    print("|---|---|---|---|---|---|---|")
    for name in args.setups:
        dataset, recipe, n_train = setup(name, args.data)
        times = {"baseline": [], "float32": [], "auto": []}
        for _ in range(args.repeats):  # alternating, so that load changes hit every variant alike
            times["baseline"].append(run_baseline(baseline, dataset, recipe, n_train))
            for precision in ("float32", "auto"):
                times[precision].append(run_today(dataset, recipe, n_train, precision))
        med = {k: float(np.median(v)) for k, v in times.items()}
        print(f"| {name} | {n_train} | {med['baseline']:.2f} | {med['float32']:.2f} | {med['auto']:.2f} | "
              f"{med['baseline'] / med['float32']:.2f}x | {med['baseline'] / med['auto']:.2f}x |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
