"""Thresholds of the registry hygiene checks (near-duplicate classes, likely mislabelled examples),
measured on the Caltech-101 classes in ../shared/datasets with the default encoder (Lite0).

    .venv/bin/python benchmarks/hygiene_thresholds.py [--zip PATH] [--per-class 20] [--seeds 10] [--plot PNG]

1. Near-duplicate classes. Every class is registered from K images. Distinct classes: the cosine
   similarity of each prototype to its nearest other prototype (what a new, genuinely different
   class looks like). Duplicates: the similarity of two prototypes of the SAME class built from two
   disjoint sets of K images (what registering one thing under two names looks like). For each
   candidate threshold: the share of distinct classes flagged (false alarms) and of duplicates found.
2. Likely mislabelled examples, K = 5 per class. An example's margin = its similarity to the nearest
   other prototype minus its similarity to its own class's prototype without it (leave-one-out).
   Clean examples vs one image of another registered class slipped into a class's support set.
Every figure pools all classes of all seeds. ``--plot`` draws both distributions with the chosen
thresholds (default benchmarks/results/hygiene_thresholds.png).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ZIP = ROOT.parent / "shared" / "datasets" / "caltech101" / "caltech101_base.zip"


def embed_pool(zip_path: Path, per_class: int) -> dict[str, np.ndarray]:
    """Unit-length embeddings of the first `per_class` images of every class."""
    from fewshot import EmbeddingCache, create_encoder, load_dataset

    data = load_dataset(zip_path)
    rows = [np.flatnonzero(data.labels == c)[:per_class] for c in range(len(data.classes))]
    picked = np.concatenate(rows)
    result = create_encoder().embed_batch([data.items[i] for i in picked], cache=EmbeddingCache(), progress=True)
    vectors = result.vectors / np.linalg.norm(result.vectors, axis=1, keepdims=True)
    out, start = {}, 0
    for c, r in enumerate(rows):
        block = vectors[start:start + len(r)]
        out[data.classes[c]] = block[np.isfinite(block).all(axis=1)]
        start += len(r)
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def class_pairs(pool: dict, shots: int, seeds: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(nearest-other-class similarity of each distinct class, similarity of duplicate prototypes,
    {pair of classes: how many seeds it was the closest pair of some class at >= 0.9})."""
    nearest, duplicate, close = [], [], {}
    names = list(pool)
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        first, second = [], []
        for vectors in pool.values():
            order = rng.permutation(len(vectors))
            first.append(unit(vectors[order[:shots]].mean(0)))
            second.append(unit(vectors[order[shots:2 * shots]].mean(0)))
        first, second = np.array(first), np.array(second)
        sims = first @ first.T
        np.fill_diagonal(sims, -np.inf)
        nearest.extend(sims.max(axis=1))
        duplicate.extend((first * second).sum(1))
        for a, b in zip(*np.nonzero(np.triu(sims >= 0.9))):
            pair = (names[a], names[b])
            close[pair] = close.get(pair, 0) + 1
    return np.array(nearest), np.array(duplicate), close


def margins(pool: dict, shots: int, seeds: int) -> tuple[np.ndarray, np.ndarray]:
    """(margins of clean examples, margins of an image of another class slipped into a class)."""
    names = list(pool)
    clean, wrong = [], []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        support, spare = {}, {}
        for name in names:
            order = rng.permutation(len(pool[name]))
            support[name], spare[name] = pool[name][order[:shots]], pool[name][order[shots:]]
        protos = np.array([unit(support[n].mean(0)) for n in names])
        for c, name in enumerate(names):
            x = support[name]
            loo = unit((x.sum(0) - x) / (shots - 1))  # own prototype without each example
            others = x @ np.delete(protos, c, axis=0).T
            clean.extend(others.max(axis=1) - (x * loo).sum(1))
            intruder_class = int(rng.choice([i for i in range(len(names)) if i != c]))
            intruder = spare[names[intruder_class]][0]
            own = unit(x.mean(0))  # the class without the intruder
            wrong.append(float((np.delete(protos, c, axis=0) @ intruder).max() - intruder @ own))
    return np.array(clean), np.array(wrong)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "results" / "hygiene_thresholds.png")
    args = parser.parse_args()
    pool = embed_pool(args.zip, args.per_class)
    print(f"{len(pool)} classes, {sum(map(len, pool.values()))} images, {args.seeds} seeds")

    print("\n1. near-duplicate classes (cosine similarity of prototypes)")
    pairs = {}
    for shots in (1, 3, 5):
        nearest, duplicate, close = class_pairs(pool, shots, args.seeds)
        pairs[shots] = nearest, duplicate
        q = np.percentile(nearest, [50, 90, 95, 99, 100])
        d = np.percentile(duplicate, [1, 5, 10, 50])
        print(f"  {shots}-shot: nearest other class p50/p90/p95/p99/max = "
              + "/".join(f"{v:.3f}" for v in q) + "; same class twice p1/p5/p10/p50 = "
              + "/".join(f"{v:.3f}" for v in d))
        for t in (0.80, 0.85, 0.90, 0.95):
            print(f"    threshold {t:.2f}: distinct classes flagged {np.mean(nearest >= t):6.1%}, "
                  f"duplicates found {np.mean(duplicate >= t):6.1%}")
        if close:
            print("    pairs at >= 0.90 (seeds): " + ", ".join(f"{a}~{b} ({n})" for (a, b), n in sorted(close.items())))

    print("\n2. likely mislabelled examples, 5-shot (margin = nearest other class - own class without it)")
    clean, wrong = margins(pool, 5, args.seeds)
    print("  clean p50/p90/p99/max = " + "/".join(f"{v:+.3f}" for v in np.percentile(clean, [50, 90, 99, 100]))
          + "; intruders p10/p50 = " + "/".join(f"{v:+.3f}" for v in np.percentile(wrong, [10, 50])))
    for m in (0.0, 0.05, 0.10, 0.15, 0.20):
        print(f"    margin > {m:.2f}: clean examples flagged {np.mean(clean > m):6.2%}, "
              f"intruders found {np.mean(wrong > m):6.1%}")
    plot(pairs, clean, wrong, args.plot)
    print(f"\nwrote {args.plot}")


def plot(pairs: dict, clean: np.ndarray, wrong: np.ndarray, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fewshot.registry.hygiene import MISLABEL_MARGIN, NEAR_DUPLICATE_SIMILARITY

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    bins = np.linspace(0, 1, 51)
    for ax, shots in zip(axes[:2], (1, 5)):
        nearest, duplicate = pairs[shots]
        ax.hist(nearest, bins, alpha=0.6, density=True, label="distinct class: nearest other class")
        ax.hist(duplicate, bins, alpha=0.6, density=True, label="same class registered twice")
        ax.axvline(NEAR_DUPLICATE_SIMILARITY, color="k", ls="--", label=f"threshold {NEAR_DUPLICATE_SIMILARITY}")
        ax.set(title=f"Near-duplicate classes, {shots}-shot", xlabel="cosine similarity of prototypes",
               ylabel="density")
        ax.legend(fontsize=8)
    bins = np.linspace(-0.6, 0.8, 57)
    axes[2].hist(clean, bins, alpha=0.6, density=True, label="correctly labelled example")
    axes[2].hist(wrong, bins, alpha=0.6, density=True, label="image of another class")
    axes[2].axvline(MISLABEL_MARGIN, color="k", ls="--", label=f"margin {MISLABEL_MARGIN}")
    axes[2].set(title="Likely mislabelled, 5-shot", xlabel="similarity to nearest other class - to own class "
                "without it", ylabel="density")
    axes[2].legend(fontsize=8)
    fig.suptitle("fewshot hygiene thresholds: Caltech-101 (51 classes), Lite0")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
