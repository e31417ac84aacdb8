"""Transfer learning beyond the frozen default: accuracy tables on splits of the shared data (issue #12).

    .venv/bin/python benchmarks/transfer.py --data ../shared/datasets [--tables caltech-heads caltech-encoders
        caltech-compare] [--episodes 2000] [--seed 0] [--per-class N] [--test-per-class N]
        [--out benchmarks/results/transfer]

One function per table (add a table: write a function taking ``args`` and returning its Markdown, then
name it in ``TABLES``). Every figure is a mean over the protocol's seeded episodes with its 95% CI, on
classes the heads never trained on; embeddings come from the embedding cache after the first run.

- ``caltech-heads``: does a trained head beat raw features on the Caltech protocols? Heads are trained
  on the 34 base classes the protocols leave out (``Protocol.train_split``), validated on held-out base
  classes, and evaluated on the 17 test classes. "kept by train-head" is what ``fewshot train-head``
  saves: the head if it validated at least as well as raw features, else raw features.
- ``caltech-encoders``: Caltech all-way 1-shot (17 test classes) per offline encoder and ensemble, on raw
  features and centred on the base-class mean (SimpleShot, the ``identity`` head fitted on base classes), each
  also with flip views of the support images (``support_views="flip"``).
- ``caltech-compare``: ``fewshot compare-encoders`` on all 51 shared Caltech classes (the README encoder
  table takes its images/s; its accuracies are all-way over 51 classes, not the 17-class protocol).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fewshot import EmbeddingCache, create_encoder, create_head, load_protocol
from fewshot.evaluation.compare import compare_encoders, first_per_class, format_table, plot_comparison
from fewshot.data.datasets import load_dataset
from fewshot.workflows import embed_dataset, evaluate_protocol, resolve_dataset, train_head_on_dataset

ROOT = Path(__file__).resolve().parents[1]
EPISODES = ROOT / "episodes"
CALTECH_PROTOCOLS = ["caltech-5way-1shot", "caltech-allway-1shot"]
OFFLINE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
ENSEMBLES = ["efficientnet_lite0+efficientnet_lite2", "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2"]

# Heads trained on Caltech base classes: the default protonet (a 128-d MLP projection, which starts far
# from raw features) and the residual protonet (starts exactly at raw features under cosine).
CALTECH_HEADS = {
    "protonet (mlp, 128-d)": {},
    "protonet (residual, cosine)": {"residual": True, "distance": "cosine"},
}


def _pct(result) -> str:
    return f"{result.accuracy:.1%} ± {result.ci95:.1%}"


def caltech_heads_table(args) -> str:
    """Raw features vs trained heads on the Caltech protocols (Lite0, final pooled features)."""
    encoder, cache = create_encoder(), EmbeddingCache()
    train_protocol = load_protocol(EPISODES / f"{CALTECH_PROTOCOLS[0]}.toml")
    dataset = resolve_dataset(args.data, train_protocol)
    base = train_protocol.train_split(dataset)
    protocols = [load_protocol(EPISODES / f"{name}.toml") for name in CALTECH_PROTOCOLS]
    raw = {p.name: evaluate_protocol(dataset, p, encoder, cache=cache, progress=False) for p in protocols}
    lines = ["| head | validation: raw / head | kept by train-head | " +
             " | ".join(f"{p.name}: head | {p.name}: kept" for p in protocols) + " |",
             "|---|---|---|" + "---|---|" * len(protocols),
             "| raw features | | | " + " | ".join(f"{_pct(raw[p.name])} | {_pct(raw[p.name])}"
                                                  for p in protocols) + " |"]
    for label, params in CALTECH_HEADS.items():
        head, _ = train_head_on_dataset(base, encoder, "protonet", ways=5, shots=1, queries=5, episodes=args.episodes,
                                        seed=args.seed, head_params=params, cache=cache, force=True,
                                        progress=False)
        training = head.metadata["training"]
        kept_head = training["val_accuracy_head"] >= training["val_accuracy_raw_features"]
        cells = []
        for p in protocols:
            trained = evaluate_protocol(dataset, p, encoder, head=head, cache=cache, progress=False)
            cells.append(f"{_pct(trained)} | {_pct(trained if kept_head else raw[p.name])}")
        lines.append(f"| {label} | {training['val_accuracy_raw_features']:.1%} / {training['val_accuracy_head']:.1%}"
                     f" | {'head' if kept_head else 'raw features'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def caltech_encoders_table(args) -> str:
    """Caltech all-way 1-shot per encoder: raw features, and centred on the base-class mean."""
    protocol = load_protocol(EPISODES / "caltech-allway-1shot.toml")
    dataset = resolve_dataset(args.data, protocol)
    base = protocol.train_split(dataset)
    if args.per_class:  # the centring mean needs only a sample of the base classes
        base = first_per_class(base, args.per_class)
    if args.test_per_class:
        dataset = first_per_class(dataset, args.test_per_class)
    cache = EmbeddingCache()
    lines = ["| encoder | dimension | raw features | centred (SimpleShot) | raw + flip views | centred + flip views |",
             "|---|---|---|---|---|---|"]
    for name in OFFLINE + ENSEMBLES:
        encoder = create_encoder(name)
        centred = create_head("identity", encoder.dim)
        centred.fit(embed_dataset(encoder, base, cache=cache, progress=False)[0])
        # Same seeded episodes in every cell; flip views: each support image also embedded mirrored.
        cells = [evaluate_protocol(dataset, protocol, encoder, head=head, cache=cache, progress=False,
                                   support_views=views) for views in ("none", "flip") for head in (None, centred)]
        lines.append(f"| {name} | {encoder.dim} | " + " | ".join(_pct(cell) for cell in cells) + " |")
    return "\n".join(lines)


def caltech_compare_table(args) -> str:
    """``fewshot compare-encoders`` on every shared Caltech class (all-way 1-shot), with its PNG."""
    zip_path = Path(args.data) / "caltech101" / "caltech101_base.zip"
    rows = compare_encoders(load_dataset(zip_path), OFFLINE + ENSEMBLES, episodes=100, seed=args.seed,
                            speed_images=32, max_per_class=args.per_class, cache=EmbeddingCache())
    images = f"first {args.per_class} images per class" if args.per_class else "every image"
    png = plot_comparison(rows, Path(args.out) / "caltech-compare-encoders.png",
                          title=f"51 Caltech-101 classes ({images}), all-way 1-shot, 100 episodes")
    return format_table(rows) + f"\n\n(plot: {png})"


TABLES = {
    "caltech-heads": caltech_heads_table,
    "caltech-encoders": caltech_encoders_table,
    "caltech-compare": caltech_compare_table,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets"),
                        help="folder holding caltech101/ and omniglot/")
    parser.add_argument("--tables", nargs="+", choices=list(TABLES), default=list(TABLES))
    parser.add_argument("--episodes", type=int, default=2000, help="training episodes per head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, help="encoder tables: only each class's first N images (faster); "
                        "caltech-encoders: of the base classes (the centring mean)")
    parser.add_argument("--test-per-class", type=int, help="caltech-encoders: only each test class's first N images "
                        "(default: the whole protocol)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transfer"))
    args = parser.parse_args()
    if not (Path(args.data) / "caltech101" / "caltech101_base.zip").is_file():
        sys.exit(f"shared datasets not found under {args.data}; pass --data ROOT")
    print(f"load average {os.getloadavg()[0]:.1f}; command: {' '.join(sys.argv)}\n")
    for name in args.tables:
        print(f"## {name}\n\n{TABLES[name](args)}\n", flush=True)


if __name__ == "__main__":
    main()
