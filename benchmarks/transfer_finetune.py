"""Fine-tuning, multi-task training and domain adaptation on splits of the shared data, with 95% CIs.

    PYTHONPATH=. .venv/bin/python benchmarks/transfer_finetune.py --data ../shared/datasets \
        --tables finetune multitask domain [--episodes N] [--test-cap 20] [--out benchmarks/results]

Tables (each row trains on a protocol's train classes and evaluates on its held-out test classes):
- finetune: the recipes in recipes/ against the frozen encoder's raw features (nearest prototype).
  Equivalent commands: fewshot finetune --data DATA --protocol episodes/P.toml --recipe recipes/R.toml
  --out MODEL, then fewshot evaluate --data DATA --protocol episodes/P.toml --head MODEL.
- multitask: Omniglot (within-alphabet) and Caltech trained together (--data A --data B) against each alone,
  with the same features and budget.
- domain: Caltech photos (train classes) to edge sketches of the held-out classes; fine-tuning with and
  without --adapt-to (DANN) on the unlabeled sketches, evaluated 5-way 1-shot on the sketches.
``--test-cap`` keeps that many test images per class (the same ones for every row), ``--train-cap`` that many
training images per class, to bound time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps

from fewshot import create_encoder, load_dataset, load_protocol
from fewshot.data.datasets import cap_per_class
from fewshot.learning.finetune import Recipe, finetune
from fewshot.embedding.images import load_image
from fewshot.workflows import evaluate_protocol, resolve_dataset

ROOT = Path(__file__).resolve().parents[1]
EPISODES, RECIPES = ROOT / "episodes", ROOT / "recipes"
SETUPS = {"omniglot": ("omniglot-within-20way-1shot", "omniglot"), "caltech": ("caltech-5way-1shot", "caltech")}


def evaluate(model, protocol, test, progress=False) -> dict:
    encoder = model.carried_encoder()
    result = evaluate_protocol(test, dataclasses.replace(protocol, split={}), encoder, head=model, progress=progress)
    return {"accuracy": result.accuracy, "ci95": result.ci95}


def evaluate_raw(recipe: Recipe, protocol, test) -> dict:
    encoder = create_encoder(recipe.encoder, stages=recipe.stages, pool=recipe.pool, input_size=recipe.input_size)
    result = evaluate_protocol(test, dataclasses.replace(protocol, split={}), encoder)
    return {"accuracy": result.accuracy, "ci95": result.ci95}


def _recipe(name: str, args) -> Recipe:
    recipe = Recipe.load(RECIPES / f"{name}.toml")
    return recipe.replace(episodes=args.episodes, seed=args.seed, max_images_per_class=args.train_cap)


def _fmt(row: dict) -> str:
    return f"{row['accuracy']:.1%} ± {row['ci95']:.1%}"


def finetune_table(args) -> list[dict]:
    rows = []
    for setup in args.setups:
        protocol_name, recipe_name = SETUPS[setup]
        protocol = load_protocol(EPISODES / f"{protocol_name}.toml")
        dataset = resolve_dataset(args.data, protocol)
        recipe = _recipe(recipe_name, args)
        test = cap_per_class(protocol.test_split(dataset), args.test_cap)
        raw = evaluate_raw(recipe, protocol, test)
        start = time.perf_counter()
        model, result = finetune(protocol.train_split(dataset), recipe, progress=True)
        minutes = (time.perf_counter() - start) / 60
        tuned = evaluate(model, protocol, test)
        rows.append({"table": "finetune", "protocol": protocol_name, "recipe": recipe_name,
                     "episodes": result.steps_run, "kept": result.kept, "minutes": round(minutes, 1),
                     "raw": raw, "finetuned": tuned, "val": dataclasses.asdict(result) | {"history": None}})
        print(f"| {protocol_name} | {recipe_name} | {_fmt(raw)} | {_fmt(tuned)} | {result.kept} "
              f"(val {result.val_accuracy_finetuned:.1%} vs frozen {result.val_accuracy_frozen:.1%}) | "
              f"{minutes:.1f} min |", flush=True)
    return rows


def multitask_table(args) -> list[dict]:
    """Omniglot + Caltech in one run vs each alone, same features (final, 112 px) and episodes."""
    protocols = {s: load_protocol(EPISODES / f"{SETUPS[s][0]}.toml") for s in ("omniglot", "caltech")}
    data = {s: resolve_dataset(args.data, p) for s, p in protocols.items()}
    recipe = Recipe(input_size=112, trainable_stages=1, head="identity", ways=5, shots=1, queries=5,
                    episodes=args.episodes or 200, val_every=25, val_episodes=100, encoder_lr=1e-4,
                    augment=("flip",), max_images_per_class=args.train_cap or 20, seed=args.seed)
    tests = {s: cap_per_class(protocols[s].test_split(data[s]), args.test_cap) for s in protocols}
    five_way = {s: dataclasses.replace(p, ways=5, queries=5, within_group=False, episodes=300)
                for s, p in protocols.items()}
    rows = []
    runs = {"omniglot alone": ["omniglot"], "caltech alone": ["caltech"], "omniglot+caltech": ["omniglot", "caltech"]}
    for run, names in runs.items():
        model, result = finetune([protocols[s].train_split(data[s]) for s in names], recipe, progress=True)
        for s in names:
            acc = evaluate(model, five_way[s], tests[s])
            rows.append({"table": "multitask", "run": run, "evaluated_on": s, "kept": result.kept, **acc})
            print(f"| {run} | {s} 5-way 1-shot | {_fmt(acc)} | kept {result.kept} |", flush=True)
    return rows


def sketch(item) -> Image.Image:
    """An edge sketch of a photo: dark lines on white, no colour or texture."""
    gray = ImageOps.grayscale(load_image(item))
    return ImageOps.autocontrast(ImageOps.invert(gray.filter(ImageFilter.FIND_EDGES)))


def domain_table(args) -> list[dict]:
    protocol = load_protocol(EPISODES / "caltech-5way-1shot.toml")
    dataset = resolve_dataset(args.data, protocol)
    test = cap_per_class(protocol.test_split(dataset), args.test_cap)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for item, name in zip(test.items, test.names):
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            sketch(item).save(target.with_suffix(".png"))
        sketches = load_dataset(tmp)
        sketch_protocol = dataclasses.replace(protocol, split={}, dataset=None)
        recipe = _recipe("caltech", args)
        train = protocol.train_split(dataset)
        raw = evaluate_raw(recipe, sketch_protocol, sketches)
        rows.append({"table": "domain", "run": "frozen raw features", **raw})
        for run, adapt in (("fine-tuned", None), ("fine-tuned + DANN", sketches)):
            model, result = finetune(train, recipe, adapt_to=adapt, progress=True)
            rows.append({"table": "domain", "run": run, "kept": result.kept,
                         **evaluate(model, sketch_protocol, sketches)})
        for row in rows:
            print(f"| {row['run']} | {_fmt(row)} | {row.get('kept', '')} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--tables", nargs="+", default=["finetune"], choices=["finetune", "multitask", "domain"])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--episodes", type=int, help="override the recipes' episode budget")
    parser.add_argument("--test-cap", type=int, default=20, help="test images kept per class")
    parser.add_argument("--train-cap", type=int, help="training images kept per class (multitask default: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    tables = {"finetune": finetune_table, "multitask": multitask_table, "domain": domain_table}
    rows = []
    for name in args.tables:
        rows += tables[name](args)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"transfer_finetune_{'_'.join(args.tables)}.json"
    out.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
