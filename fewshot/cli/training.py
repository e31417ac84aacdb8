"""Commands that train: train-head (a head on frozen embeddings), finetune (the encoder's last stages) and adapt
(the best transfer to a domain, chosen by validation on its own held-out classes)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from .common import Parents, UsageError, embedding_cache, finite_float, make_encoder, positive_int, progress_bars


def cmd_train_head(args) -> int:
    from ..data.protocols import load_protocol
    from ..learning.heads import save_head
    from ..workflows import resolve_dataset, train_head_on_dataset

    if not args.force and Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise UsageError(f"--out {args.out} exists already; registries keep their own copy of a head, but pass "
                         "--force to replace it, or choose another --out")
    protocol = load_protocol(args.protocol) if args.protocol else None
    dataset = resolve_dataset(args.data, protocol)
    if protocol is not None and protocol.split:
        dataset = protocol.train_split(dataset)  # never train on the protocol's test classes
    head, result = train_head_on_dataset(
        dataset, make_encoder(args), args.head, ways=args.ways, shots=args.shots, queries=args.queries,
        episodes=args.episodes, within_group=args.within_group, val_fraction=args.val_fraction, seed=args.seed,
        lr=args.lr, head_params=dict(args.param), augment=args.augment, val_every=args.val_every,
        patience=args.patience, cache=embedding_cache(args), progress=progress_bars(), force=args.force)
    save_head(head, args.out)
    training = head.metadata["training"]
    summary = {"head": args.head, "out": args.out, "kept": training["kept"],
               "best_val_accuracy": result.best_val_accuracy,
               "best_episode": result.best_episode, "episodes_run": result.episodes_run,
               "stopped_early": result.stopped_early, "train_classes": len(dataset.classes),
               "val_accuracy_raw_features": training["val_accuracy_raw_features"],
               "val_accuracy_head": training["val_accuracy_head"]}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"trained {args.head} head on {len(dataset.classes)} classes, {result.episodes_run} episodes; "
              f"validation classes: head {summary['val_accuracy_head']:.2%}, "
              f"raw features {summary['val_accuracy_raw_features']:.2%}")
        kept = "the trained head" if training["kept"] == "head" else "raw features: the head did not beat them"
        print(f"saved {args.out} ({kept})")
    return 0


def cmd_finetune(args) -> int:
    from ..data.protocols import load_protocol
    from ..learning.finetune import Recipe, finetune
    from ..learning.heads import save_head
    from ..workflows import resolve_dataset

    if len(args.weight) not in (0, len(args.data)):
        raise UsageError(f"give one --weight per --data ({len(args.data)}), or none")
    if len(args.protocol) > len(args.data):
        raise UsageError("give at most one --protocol per --data (in the same order)")
    datasets = []
    for i, data in enumerate(args.data):
        protocol = load_protocol(args.protocol[i]) if i < len(args.protocol) else None
        dataset = resolve_dataset(data, protocol)
        datasets.append(protocol.train_split(dataset) if protocol is not None and protocol.split else dataset)
    recipe = Recipe.load(args.recipe) if args.recipe else Recipe()
    recipe = recipe.replace(trainable_stages=args.trainable_stages, episodes=args.episodes, seed=args.seed,
                            guard=False if args.force else None)
    adapt_to = resolve_dataset(args.adapt_to) if args.adapt_to else None
    model, result = finetune(datasets, recipe, weights=args.weight or None, adapt_to=adapt_to)
    save_head(model, args.out)
    summary = {"out": args.out, "kept": result.kept, "val_accuracy_finetuned": result.val_accuracy_finetuned,
               "val_accuracy_frozen": result.val_accuracy_frozen, "per_dataset": result.val_accuracy_per_dataset,
               "episodes_run": result.steps_run, "stopped_early": result.stopped_early,
               "minutes": round(result.seconds / 60, 1)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"kept the {result.kept} encoder: validation accuracy fine-tuned {result.val_accuracy_finetuned:.2%}, "
              f"frozen {result.val_accuracy_frozen:.2%} ({result.steps_run} episodes, {summary['minutes']} min)")
        print(f"saved {args.out} (use it as --head {args.out})")
    return 0


def cmd_adapt(args) -> int:
    from ..learning.adapt import adapt, format_report, plot_report
    from ..learning.heads import save_head

    out = Path(args.out)
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {args.out} exists already; pass --force to replace it, or choose another --out")
    result = adapt(args.data, unlabeled=args.unlabeled, budget=args.budget, seed=args.seed, ways=args.ways,
                   within_group=args.within_group, encoder=args.encoder, cache=embedding_cache(args) or False,
                   progress=progress_bars())
    save_head(result.model, out)
    report = plot_report(result, out / "adapt-report.png")
    if args.json:
        print(json.dumps({"out": args.out, "report_png": str(report), **result.to_dict()}, indent=2))
    else:
        print(format_report(result))
        saved = "the best complete candidate, interrupted" if result.interrupted else result.chosen
        print(f"saved {args.out} ({saved}; use it as --head {args.out}); report: {report}")
    return 0


def _positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare word such as arch=conv


def _add_train_head(sub, parents: Parents) -> None:
    p = sub.add_parser("train-head", parents=[parents.common, parents.encoder],
                       help="train a head episodically on frozen embeddings of a dataset")
    p.add_argument("--data", required=True, help="dataset: folder or zip, one (group/)class folder per class")
    p.add_argument("--head", required=True, help="head to train: identity, protonet, metric, anil, maml")
    p.add_argument("--out", required=True, help="directory to save the trained head to")
    p.add_argument("--force", action="store_true",
                   help="replace the head already saved at --out, and save the trained head even where raw "
                        "features score higher on the validation classes (otherwise raw features are saved)")
    p.add_argument("--protocol", help="protocol file: train on the classes its test split leaves out")
    p.add_argument("--ways", type=positive_int, default=20)
    p.add_argument("--shots", type=positive_int, default=1)
    p.add_argument("--queries", type=positive_int, default=5)
    p.add_argument("--episodes", type=positive_int, default=2000)
    p.add_argument("--within-group", action="store_true", help="episodes inside one group (e.g. alphabet)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="classes (or groups) held out for validation")
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--val-every", type=positive_int, default=200, help="episodes between validations")
    p.add_argument("--patience", type=positive_int, default=5,
                   help="validations without improvement before stopping early")
    p.add_argument("--augment", choices=["rotations"],
                   help="rotations: add 90/180/270-degree copies of the training classes as new classes "
                        "(characters, symbols)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="head parameter, e.g. arch=conv, distance=cosine, loss=supcon, out_dim=128")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_train_head)


def _add_finetune(sub, parents: Parents) -> None:
    p = sub.add_parser("finetune", parents=[parents.common],
                       help="fine-tune the encoder's last stages with a head; the result works as --head MODEL")
    p.add_argument("--data", required=True, action="append", help="dataset (folder or zip); repeat for multi-task")
    p.add_argument("--weight", type=_positive_float, action="append", default=[],
                   help="sampling weight of each --data, in the same order (default: equal)")
    p.add_argument("--protocol", action="append", default=[],
                   help="protocol file per --data (in order): train on the classes its test split leaves out")
    p.add_argument("--out", required=True, help="directory to save the model to")
    p.add_argument("--recipe", help="recipe TOML (see recipes/); options below override it")
    p.add_argument("--trainable-stages", type=int, help="last encoder stages to train (0: the head only)")
    p.add_argument("--episodes", type=positive_int, help="training episodes")
    p.add_argument("--seed", type=int)
    p.add_argument("--force", action="store_true",
                   help="keep the fine-tuned encoder even where the frozen one validates better")
    p.add_argument("--adapt-to", metavar="DIR",
                   help="unlabeled images of the target domain: adds a domain-adversarial (DANN) loss")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_finetune)


def _add_adapt(sub, parents: Parents) -> None:
    p = sub.add_parser("adapt", parents=[parents.common],
                       help="learn your domain from labelled classes: tries transfers within a time budget, keeps "
                            "the best on held-out classes (never worse than frozen); the result works as --head MODEL")
    p.add_argument("--data", required=True,
                   help="labelled classes of your domain (folder or zip, one (group/)class folder per class); not "
                        "the classes you will register later")
    p.add_argument("--unlabeled", metavar="DIR", help="a folder of unlabelled images of the domain (optional)")
    p.add_argument("--out", required=True, help="directory to save the chosen model to")
    p.add_argument("--budget", default="10m", help="wall-clock time to spend, e.g. 90s, 10m, 1h (default 10m)")
    p.add_argument("--ways", type=positive_int, default=5, help="N of the N-way validation episodes (default 5)")
    p.add_argument("--within-group", action="store_true",
                   help="validation episodes inside one group (e.g. one alphabet) of a group/class/image dataset")
    p.add_argument("--encoder", default="efficientnet_lite0", help="the frozen default to start from")
    p.add_argument("--seed", type=int, default=0, help="class split, samples and episodes (default 0)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--force", action="store_true", help="replace what is at --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_adapt)


def add_parsers(sub, parents: Parents, names: Iterable[str] | None = None) -> None:
    """Add this module's commands to ``sub``: those in ``names``, in that order, else all of them."""
    adders = {"train-head": _add_train_head, "finetune": _add_finetune, "adapt": _add_adapt}
    for name in adders if names is None else names:
        adders[name](sub, parents)
