"""AdaBN on textures: 5-way 1-shot nearest prototype (cosine) on held-out DTD classes, with the frozen encoder and
with batch-norm statistics re-estimated on the other classes' images (``fewshot.learning.adabn``).

    PYTHONPATH=. .venv/bin/python benchmarks/adabn.py [--data ../shared/datasets] [--splits 2] [--max-images 300]

Each seeded split puts 5 of the 10 classes of ``dtd/dtd_textures.zip`` aside for AdaBN and tests on the other
5 (600 episodes of 15 queries per class, the same episodes for both encoders); mean accuracy with 95% CI.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from fewshot import create_encoder, load_dataset
from fewshot.learning.adabn import adapt_batchnorm

ROOT = Path(__file__).resolve().parents[1]


def one_shot_accuracy(features: np.ndarray, labels: np.ndarray, seed: int, episodes: int = 600,
                      ways: int = 5, queries: int = 15) -> tuple[float, float]:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    rng, scores = np.random.default_rng(seed), []
    for _ in range(episodes):
        classes = rng.choice(np.unique(labels), ways, replace=False)
        rows = [rng.permutation(np.flatnonzero(labels == c))[:1 + queries] for c in classes]
        prototypes = np.stack([unit[r[0]] for r in rows])
        query = np.concatenate([unit[r[1:]] for r in rows])
        truth = np.repeat(np.arange(ways), queries)
        scores.append(np.mean(np.argmax(query @ prototypes.T, axis=1) == truth))
    scores = np.asarray(scores)
    return float(scores.mean()), float(1.96 * scores.std() / np.sqrt(len(scores)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--splits", type=int, default=2)
    parser.add_argument("--max-images", type=int, default=300)
    args = parser.parse_args()
    dataset = load_dataset(args.data / "dtd" / "dtd_textures.zip")
    encoder = create_encoder()
    print(f"load average before: {os.getloadavg()}")
    print("| split | frozen | AdaBN | AdaBN seconds |\n|---|---|---|---|")
    for split in range(args.splits):
        aside = list(np.random.default_rng(split).permutation(dataset.classes)[:5])
        test = dataset.select_classes([c for c in dataset.classes if c not in aside])
        start = time.perf_counter()
        adapted = adapt_batchnorm(encoder, dataset.select_classes(aside), max_images=args.max_images,
                                  progress=False)
        seconds = time.perf_counter() - start
        frozen = one_shot_accuracy(encoder.embed(test.items), test.labels, seed=9)
        adabn = one_shot_accuracy(adapted.embed(test.items), test.labels, seed=9)
        print(f"| {split} | {frozen[0]:.1%} ± {frozen[1]:.1%} | {adabn[0]:.1%} ± {adabn[1]:.1%} | {seconds:.0f} |",
              flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
