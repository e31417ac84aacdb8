"""Accuracy of each head on the standard protocols: train on the protocol's train classes, evaluate
on its held-out test classes (never seen in training), with 95% confidence intervals.

    .venv/bin/python benchmarks/heads_report.py --data ../shared/datasets [--setups omniglot caltech]
        [--heads identity protonet metric maml] [--episodes 2000] [--out benchmarks/results]

Each row is equivalent to these commands (shown for Omniglot + protonet):
    fewshot train-head --data ../shared/datasets --protocol episodes/omniglot-within-20way-1shot.toml \
        --head protonet --param arch=conv --ways 20 --within-group --augment rotations --episodes 2000 \
        --stages 2,3 --pool 7 --input-size 112 --out heads/omniglot-protonet
    fewshot evaluate --data ../shared/datasets --protocol episodes/omniglot-5way-1shot.toml \
        --head heads/omniglot-protonet
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fewshot import EmbeddingCache, create_encoder, load_protocol, save_head
from fewshot.workflows import evaluate_protocol, resolve_dataset, train_head_on_dataset

ROOT = Path(__file__).resolve().parents[1]
EPISODES = ROOT / "episodes"

# Features per domain: characters need intermediate stages with some spatial layout (at 112 px,
# close to Omniglot's 105 px); natural photos are served best by the final pooled features.
SETUPS = {
    "omniglot": {
        "features": {"stages": (2, 3), "pool": 7, "input_size": 112},
        "train_protocol": "omniglot-within-20way-1shot",
        "train": {"ways": 20, "shots": 1, "queries": 5, "within_group": True, "augment": "rotations"},
        "heads": {"identity": {}, "protonet": {"arch": "conv"}, "metric": {"arch": "conv"}, "maml": {}},
        "protocols": ["omniglot-within-20way-1shot", "omniglot-5way-1shot", "omniglot-20way-1shot"],
    },
    "caltech": {
        "features": {},
        "train_protocol": "caltech-5way-1shot",
        "train": {"ways": 5, "shots": 1, "queries": 5, "within_group": False},
        "heads": {"identity": {}, "protonet": {}, "metric": {}, "maml": {}},
        "protocols": ["caltech-5way-1shot", "caltech-allway-1shot"],
    },
}


def run_setup(name: str, setup: dict, args) -> list[dict]:
    encoder = create_encoder(**setup["features"])
    cache = EmbeddingCache()
    train_protocol = load_protocol(EPISODES / f"{setup['train_protocol']}.toml")
    dataset = resolve_dataset(args.data, train_protocol)
    train = train_protocol.train_split(dataset)
    rows = []
    for head_name in args.heads:
        start = time.perf_counter()
        head, training = train_head_on_dataset(train, encoder, head_name, episodes=args.episodes, seed=args.seed,
                                               head_params=setup["heads"][head_name], cache=cache,
                                               **setup["train"])
        save_head(head, args.out / "heads" / f"{name}-{head_name}")
        trained_s = time.perf_counter() - start
        for protocol_name in setup["protocols"]:
            protocol = load_protocol(EPISODES / f"{protocol_name}.toml")
            result = evaluate_protocol(dataset, protocol, encoder, head=head, cache=cache)
            result.save(args.out / "evaluations" / f"{protocol_name}-{head_name}")
            rows.append({"protocol": protocol_name, "head": head_name, "accuracy": result.accuracy,
                         "ci95": result.ci95, "error": result.error, "episodes": result.episodes,
                         "best_val_accuracy": training.best_val_accuracy, "train_seconds": round(trained_s, 1)})
            print(f"| {protocol_name} | {head_name} | {result.accuracy:.2%} ± {result.ci95:.2%} | "
                  f"{result.error:.2%} | {result.episodes} | {trained_s:.0f} s |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--heads", nargs="+", default=["identity", "protonet", "metric", "maml"])
    parser.add_argument("--episodes", type=int, default=2000, help="training episodes per head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    print("| protocol | head | accuracy ± 95% CI | error | episodes | training |")
    print("|---|---|---|---|---|---|")
    rows = [row for name in args.setups for row in run_setup(name, SETUPS[name], args)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"heads_report_{'_'.join(args.setups)}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
