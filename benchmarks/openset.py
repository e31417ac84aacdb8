"""Open-set recognition on splits of the Caltech classes: which score tells registered objects from
never-registered ones, and does the threshold the registry fits itself keep what it promises?

    .venv/bin/python benchmarks/openset.py [--zip PATH] [--seeds 10] [--per-class 40] [--queries 15]

Each seed registers 25 classes (1 or 5 photos each) and queries photos of those 25 (known) and of 25
other classes (unknown; Faces and Faces_easy, the same people, always fall on the same side). For every
score variant it prints, as mean ± 95% CI over seeds: AUROC, FPR@95TPR (share of unknowns accepted
at the threshold that keeps 95% of known queries), closed-set accuracy on the known queries, and for
the score fewshot uses, the share of known queries kept by the threshold fitted from the 25 classes'
own photos (target 95%) and the share of unknowns it accepts. Baselines in the same run: today's
softmax probability and plain top-1 cosine similarity. Then the known queries the fitted threshold
keeps for 5/10/25 registered classes at 1/2/5/10 shots, the same operating point on classes never
used to fit the 1-shot fallback (``fewshot.registry.calibration.CROSS_CLASS_QUANTILE``; ``--tune`` re-derives that
table on the other classes), the calibration error of the probabilities at the default and the fitted
temperature, and an ROC plot (benchmarks/results/openset_roc.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewshot.evaluation.metrics import auroc, expected_calibration_error, fpr_at_tpr, roc_curve  # noqa: E402
from fewshot.registry.calibration import fit_calibration  # noqa: E402

DEFAULT_ZIP = ROOT.parent / "shared" / "datasets" / "caltech101" / "caltech101_base.zip"
TOGETHER = ("Faces", "Faces_easy")
TARGET = 0.95
TUNING_SEED = 123  # draws the classes that fit the 1-shot fallback (the others test it)


def embed_caltech(zip_path: Path, per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Unit embeddings of the first ``per_class`` photos of each class (cached across runs)."""
    from fewshot.embedding.cache import EmbeddingCache
    from fewshot.data.datasets import load_dataset
    from fewshot.embedding.encoders import create_encoder

    dataset = load_dataset(zip_path)
    keep = np.zeros(len(dataset), bool)
    for c in range(len(dataset.classes)):
        keep[np.flatnonzero(dataset.labels == c)[:per_class]] = True
    subset = dataset.select_items(keep)
    x = create_encoder().embed(subset.items, cache=EmbeddingCache()).astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True), subset.labels, subset.classes


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def split(classes: list[str], pool: list[int], n_known: int, rng) -> tuple[list[int], list[int]]:
    """n_known known classes and the rest of ``pool`` unknown, keeping TOGETHER on one side."""
    together = [classes.index(name) for name in TOGETHER if classes.index(name) in pool]
    units = [together] if together else []
    units += [[c] for c in pool if c not in together]
    known, unknown = [], []
    for u in (units[i] for i in rng.permutation(len(units))):
        (known if len(known) + len(u) <= n_known else unknown).extend(u)
    return known, unknown


def episode(y, known, unknown, shots, queries, rng):
    support, known_q, truth, unknown_q = [], [], [], []
    for j, c in enumerate(known):
        idx = rng.permutation(np.flatnonzero(y == c))
        support.append(idx[:shots])
        known_q.extend(idx[shots:shots + queries])
        truth.extend([j] * len(idx[shots:shots + queries]))
    for c in unknown:
        unknown_q.extend(rng.permutation(np.flatnonzero(y == c))[:queries])
    return np.array(support), np.array(known_q), np.array(truth), np.array(unknown_q)


def score_variants(x: np.ndarray, support: np.ndarray, queries: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (score per query, predicted class per query); higher score = more likely known."""
    s = x[support]  # (W, K, d)
    ways, shots, dim = s.shape
    flat = s.reshape(-1, dim)
    q = x[queries]
    cos = q @ unit(s.mean(axis=1)).T
    top = -np.sort(-cos, axis=1)
    pred = cos.argmax(axis=1)
    logits = (cos - cos.max(axis=1, keepdims=True)) / 0.05  # today's default temperature
    out = {"softmax probability (today)": (1 / np.exp(logits).sum(axis=1), pred),
           "top-1 cosine (fewshot)": (top[:, 0], pred),
           "margin to runner-up": (top[:, 0] - top[:, 1], pred),
           "top-1 minus mean of all": (top[:, 0] - cos.mean(axis=1), pred),
           "nearest stored example": ((q @ flat.T).max(axis=1), pred)}
    centre = flat.mean(axis=0)
    centred = unit(q - centre) @ unit(unit(s - centre).mean(axis=1)).T
    out["centred cosine"] = (centred.max(axis=1), centred.argmax(axis=1))
    power = unit(np.sqrt(np.maximum(x, 0)))
    pcos = power[queries] @ unit(power[support].mean(axis=1)).T
    out["power-normalised cosine"] = (pcos.max(axis=1), pcos.argmax(axis=1))
    # Class-conditional scaling by impostors: each class's similarities to other classes' examples.
    owner = np.repeat(np.arange(ways), shots)
    impostor = flat @ unit(s.mean(axis=1)).T
    mask = owner[:, None] != np.arange(ways)[None]
    mu = np.array([impostor[mask[:, c], c].mean() for c in range(ways)])
    sd = np.array([impostor[mask[:, c], c].std() for c in range(ways)])
    out["impostor z-score"] = (((cos - mu) / sd)[np.arange(len(q)), pred], pred)
    out["minus impostor mean"] = ((cos - mu).max(axis=1), (cos - mu).argmax(axis=1))
    if shots > 1:  # class-conditional scaling by the class's own spread (leave-one-out)
        loo = np.einsum("wkd,wkd->wk", s, unit((s.sum(axis=1, keepdims=True) - s) / (shots - 1)))
        own = (cos - loo.mean(axis=1)) / (loo.std(axis=1) + 1e-3)
        out["own-spread z-score"] = (own[np.arange(len(q)), pred], pred)
    return out


def ci95(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(1.96 * values.std() / np.sqrt(len(values)))


def fitted_operating_point(x, support, known_q, unknown_q) -> tuple[float, float, float | None]:
    """(known kept, unknowns accepted) by the threshold fitted from the support photos alone, and the
    fitted temperature."""
    ways = len(support)
    calibration = fit_calibration([str(c) for c in range(ways)], [x[s] for s in support], "cosine", TARGET)
    prototypes = unit(x[support].mean(axis=1))
    counts = [support.shape[1]] * ways

    def accepted(queries):
        cos = x[queries] @ prototypes.T
        best = cos.argmax(axis=1)
        limits = np.array([calibration.threshold_for(str(c), counts[c]) for c in best])
        return float(np.mean(cos.max(axis=1) >= limits))

    return accepted(known_q), accepted(unknown_q), calibration.temperature


def run_table(x, y, classes, pool, n_known, seeds, queries, shots_list, label, plot_to=None):
    print(f"\n## {label}")
    print("| score | shots | AUROC | FPR@95TPR | closed-set accuracy | known kept by fitted threshold "
          "| unknowns accepted by it |")
    print("|---|---|---|---|---|---|---|")
    curves = {}
    for shots in shots_list:
        rows, kept, leaked, ece = {}, [], [], {"default": [], "fitted": []}
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            known, unknown = split(classes, pool, n_known, rng)
            support, known_q, truth, unknown_q = episode(y, known, unknown, shots, queries, rng)
            n = len(known_q)
            for name, (score, pred) in score_variants(x, support, np.r_[known_q, unknown_q]).items():
                rows.setdefault(name, []).append((auroc(score[:n], score[n:]), fpr_at_tpr(score[:n], score[n:], TARGET),
                                                  float(np.mean(pred[:n] == truth))))
                if plot_to is not None and seed == 0 and name in ("softmax probability (today)",
                                                                  "top-1 cosine (fewshot)"):
                    curves[f"{name}, {shots}-shot"] = roc_curve(score[:n], score[n:])
            k, u, temperature = fitted_operating_point(x, support, known_q, unknown_q)
            kept.append(k)
            leaked.append(u)
            cos = x[known_q] @ unit(x[support].mean(axis=1)).T
            correct = cos.argmax(axis=1) == truth
            for which, t in (("default", 0.05), ("fitted", temperature or 0.05)):
                z = (cos - cos.max(axis=1, keepdims=True)) / t
                ece[which].append(expected_calibration_error(1 / np.exp(z).sum(axis=1), correct))
        for name, values in rows.items():
            a = np.array(values)
            fitted = (f"{np.mean(kept):.1%} ± {ci95(kept):.1%} | {np.mean(leaked):.1%} ± {ci95(leaked):.1%}"
                      if name.startswith("top-1 cosine") else "— | —")
            print(f"| {name} | {shots} | {a[:, 0].mean():.3f} ± {ci95(a[:, 0]):.3f} | {a[:, 1].mean():.1%} ± "
                  f"{ci95(a[:, 1]):.1%} | {a[:, 2].mean():.1%} ± {ci95(a[:, 2]):.1%} | {fitted} |")
        print(f"ECE of the top-1 probability, {shots}-shot known queries: default temperature 0.05: "
              f"{np.mean(ece['default']):.3f}; fitted temperature: {np.mean(ece['fitted']):.3f}"
              + (" (1-shot: nothing to fit, default kept)" if shots == 1 else ""))
    if plot_to is not None:
        plot_roc(curves, plot_to)


def operating_point_grid(x, y, classes, seeds: int, queries: int) -> None:
    """Known queries kept by the fitted threshold (target 95%) across registry sizes and shots."""
    print("\n## Known queries kept by the fitted threshold (target 95%), by registered classes and shots")
    print("| shots | 5 classes | 10 classes | 25 classes |")
    print("|---|---|---|---|")
    everything = list(range(len(classes)))
    for shots in (1, 2, 5, 10):
        cells = []
        for ways in (5, 10, 25):
            kept = []
            for seed in range(seeds * (25 // ways)):  # as many known queries per cell
                rng = np.random.default_rng(1000 + seed)
                known, _ = split(classes, everything, ways, rng)
                support, known_q, _, _ = episode(y, known, [], shots, queries, rng)
                kept.append(fitted_operating_point(x, support, known_q, known_q[:1])[0])
            cells.append(f"{np.mean(kept):.1%} ± {ci95(kept):.1%}")
        print(f"| {shots} | " + " | ".join(cells) + " |")


def plot_roc(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=name, linestyle="--" if "softmax" in name else "-")
    ax.axhline(TARGET, color="grey", linewidth=0.5)
    ax.set_xlabel("unknowns accepted (FPR)")
    ax.set_ylabel("known queries kept (TPR)")
    ax.set_title("25 registered vs 25 unregistered Caltech classes, seed 0", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nwrote {path}")


def tuning_split(classes: list[str]) -> tuple[list[int], list[int]]:
    """(classes that fit the 1-shot fallback, classes that test it); TOGETHER stays in the test half."""
    together = [classes.index(name) for name in TOGETHER]
    rest = np.random.default_rng(TUNING_SEED).permutation([c for c in range(len(classes)) if c not in together])
    return sorted(rest[:24].tolist()), sorted(rest[24:].tolist() + together)


def tune_fallback(x, y, tuning: list[int], queries: int) -> None:
    """Re-derive CROSS_CLASS_QUANTILE: for each target, the quantile of the similarities between
    different 1-shot prototypes that equals the target's quantile of known-query scores."""
    print("\n## 1-shot fallback, fitted on the tuning classes (fewshot.registry.calibration.CROSS_CLASS_QUANTILE)")
    for target in (0.5, 0.8, 0.9, 0.95, 0.99):
        levels = []
        for ways in (10, 24):
            for seed in range(20):
                rng = np.random.default_rng(seed)
                known = rng.choice(tuning, ways, replace=False).tolist()
                support, known_q, _, _ = episode(y, known, [], 1, queries, rng)
                prototypes = x[support[:, 0]]
                top1 = (x[known_q] @ prototypes.T).max(axis=1)
                cross = (prototypes @ prototypes.T)[np.triu_indices(ways, 1)]
                levels.append(np.mean(cross <= np.quantile(top1, 1 - target)))
        print(f"target {target:.2f}: quantile {np.mean(levels):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=40, help="photos embedded per class (the first N)")
    parser.add_argument("--queries", type=int, default=15, help="query photos per class")
    parser.add_argument("--tune", action="store_true", help="re-derive the 1-shot fallback table")
    args = parser.parse_args()
    if not args.zip.is_file():
        sys.exit(f"Caltech-101 zip not found at {args.zip}; pass --zip PATH")
    x, y, classes = embed_caltech(args.zip, args.per_class)
    print(f"{len(x)} photos of {len(classes)} classes; {args.seeds} seeds; {args.queries} queries per class; "
          f"fitted threshold target: keep {TARGET:.0%} of known queries")
    everything = list(range(len(classes)))
    run_table(x, y, classes, everything, 25, args.seeds, args.queries, (1, 5),
              "25 registered + 25 unregistered classes", plot_to=ROOT / "benchmarks" / "results" / "openset_roc.png")
    operating_point_grid(x, y, classes, args.seeds, args.queries)
    tuning, testing = tuning_split(classes)
    run_table(x, y, classes, testing, 13, args.seeds, args.queries, (1,),
              f"1-shot on the {len(testing)} classes never used to fit the fallback (13 registered + "
              f"{len(testing) - 13} unregistered)")
    if args.tune:
        tune_fallback(x, y, tuning, args.queries)


if __name__ == "__main__":
    main()
