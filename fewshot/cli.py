"""The ``fewshot`` command: parses arguments, calls the Python API, prints results.

Exit status: 0 on success, 1 when something failed at run time (a bad image, a corrupt registry;
the good items are still processed and saved), 2 for a usage error. Errors are one line on stderr;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from . import __version__
from .errors import FewShotError


class UsageError(Exception):
    """The command line itself is wrong (exit status 2)."""


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name that is not valid UTF-8 must not crash a print
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `register REG --class NAME PATH...`: argparse hands paths after an option back as extras.
    if args.command == "register" and extra and not any(e.startswith("-") for e in extra):
        args.paths += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        parser.error(str(exc))  # exits 2
    except (FewShotError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"fewshot: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# -- commands ---------------------------------------------------------------------------------
def cmd_register(args) -> int:
    if bool(args.class_name) == bool(args.folder):
        raise UsageError("give either --class NAME PATH... or --folder DIR")
    if args.class_name and not args.paths:
        raise UsageError("--class NAME needs at least one image or folder path")
    if args.folder and args.paths:
        raise UsageError("--folder DIR takes no extra paths")
    with _open_for_writing(args) as classifier:  # each change is saved before it returns
        if args.folder:
            reports = classifier.register_folder(args.folder)
        else:
            reports = [classifier.register(args.class_name, args.paths)]
    failures = 0
    for report in reports:
        print(f"{report.label}: +{report.added} image(s), {report.total} in total")
        for error in report.errors:
            print(f"fewshot: skipped {error}", file=sys.stderr)
        failures += len(report.errors)
    print(f"saved {args.registry} ({len(classifier.classes)} classes)")
    return 1 if failures else 0


def cmd_predict(args) -> int:
    classifier = _load(args)
    if args.threshold is not None:
        classifier.unknown_threshold = args.threshold
    predictions = classifier.predict(args.paths, top_k=args.top_k)
    if args.json:
        print(json.dumps([p.to_dict() for p in predictions], indent=2, ensure_ascii=False))
    else:
        for p in predictions:
            print(_format_prediction(p))
    return 1 if any(p.error for p in predictions) else 0


def _format_prediction(p) -> str:
    if p.error:
        return f"{p.input}\terror: {p.error}"
    label = p.label if p.label is not None else "unknown"
    others = ", ".join(f"{lab} {score:.3f}" for lab, score in p.top_k)
    return f"{p.input}\t{label}\t{p.score:.3f}\t[{others}]"


def cmd_classes(args) -> int:
    classifier = _load(args, need_encoder=False)
    counts = classifier.counts
    if args.json:
        print(json.dumps([{"label": k, "count": v} for k, v in counts.items()], indent=2, ensure_ascii=False))
    else:
        for label, count in counts.items():
            print(f"{label}\t{count}")
    return 0


def cmd_remove(args) -> int:
    with _open_registry(args) as registry:  # saved before remove returns
        registry.remove(args.class_name)
    print(f"removed {args.class_name!r}; {len(registry)} classes left")
    return 0


def cmd_rename(args) -> int:
    with _open_registry(args) as registry:
        registry.rename(args.old, args.new)
    print(f"renamed {args.old!r} to {args.new!r}")
    return 0


def cmd_info(args) -> int:
    import faiss
    import timm
    import torch

    from .encoders import DEFAULT_ENCODER, available_encoders

    print(f"fewshot {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
          f"faiss {faiss.__version__}")
    print(f"torch threads: {torch.get_num_threads()}, interop threads: {torch.get_num_interop_threads()}")
    print(f"default encoder: {DEFAULT_ENCODER}; offline encoders: {', '.join(available_encoders()) or 'none'}")
    if args.encoder:
        from .encoders import create_encoder

        encoder = create_encoder(args.encoder, weights=args.weights)
        print(json.dumps(encoder.fingerprint, indent=2))
    return 0


def cmd_train_head(args) -> int:
    from .episodes import load_protocol
    from .heads import save_head
    from .workflows import resolve_dataset, train_head_on_dataset

    protocol = load_protocol(args.protocol) if args.protocol else None
    dataset = resolve_dataset(args.data, protocol)
    if protocol is not None and protocol.split:
        dataset = protocol.train_split(dataset)  # never train on the protocol's test classes
    head, result = train_head_on_dataset(
        dataset, _encoder(args), args.head, ways=args.ways, shots=args.shots, queries=args.queries,
        episodes=args.episodes, within_group=args.within_group, val_fraction=args.val_fraction, seed=args.seed,
        lr=args.lr, head_params=dict(args.param), augment=args.augment, val_every=args.val_every,
        patience=args.patience, cache=_cache(args))
    save_head(head, args.out)
    training = head.metadata["training"]
    summary = {"head": args.head, "out": args.out, "best_val_accuracy": result.best_val_accuracy,
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
        print(f"saved {args.out}")
    return 0


def cmd_finetune(args) -> int:
    from .episodes import load_protocol
    from .finetune import Recipe, finetune
    from .heads import save_head
    from .workflows import resolve_dataset

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


def _add_finetune_parser(sub, common) -> None:
    p = sub.add_parser("finetune", parents=[common],
                       help="fine-tune the encoder's last stages with a head; the result works as --head MODEL")
    p.add_argument("--data", required=True, action="append", help="dataset (folder or zip); repeat for multi-task")
    p.add_argument("--weight", type=float, action="append", default=[],
                   help="sampling weight of each --data, in the same order (default: equal)")
    p.add_argument("--protocol", action="append", default=[],
                   help="protocol file per --data (in order): train on the classes its test split leaves out")
    p.add_argument("--out", required=True, help="directory to save the model to")
    p.add_argument("--recipe", help="recipe TOML (see recipes/); options below override it")
    p.add_argument("--trainable-stages", type=int, help="last encoder stages to train (0: the head only)")
    p.add_argument("--episodes", type=_positive_int, help="training episodes")
    p.add_argument("--seed", type=int)
    p.add_argument("--force", action="store_true",
                   help="keep the fine-tuned encoder even where the frozen one validates better")
    p.add_argument("--adapt-to", metavar="DIR",
                   help="unlabeled images of the target domain: adds a domain-adversarial (DANN) loss")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_finetune)


def cmd_evaluate(args) -> int:
    from .episodes import load_protocol
    from .heads import load_head
    from .workflows import evaluate_protocol, evaluate_runs, resolve_dataset

    if bool(args.runs) == bool(args.protocol):
        raise UsageError("give either --data ROOT --protocol FILE, or --runs DIR")
    if args.protocol and not args.data:
        raise UsageError("--protocol needs --data ROOT (the dataset, or the folder holding it)")
    head = load_head(args.head) if args.head else None
    encoder = _head_or_plain_encoder(args, head)
    if args.runs:
        result = evaluate_runs(args.runs, encoder, head=head, cache=_cache(args))
        name = Path(args.runs).name
    else:
        protocol = load_protocol(args.protocol)
        result = evaluate_protocol(resolve_dataset(args.data, protocol), protocol, encoder, head=head,
                                   episodes=args.episodes, seed=args.seed, cache=_cache(args),
                                   save_episodes=args.save_episodes, replay=args.replay)
        name = protocol.name
    paths = result.save(Path(args.out) if args.out else Path("evaluation") / name)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(result.summary())
        print(f"wrote {paths['json']}, {paths['episodes']} and {paths['confusion']}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(data=args.data, out=Path(args.out), shots=args.shots, seed=args.seed,
                    encoder=args.encoder, weights=args.weights)


# -- helpers ----------------------------------------------------------------------------------
def _registry_exists(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def _open_for_writing(args):
    """The classifier at args.registry (created if absent), holding its writer lock."""
    from .classifier import FewShotClassifier

    if _registry_exists(args.registry):
        return FewShotClassifier.open(args.registry, encoder=args.encoder, weights=args.weights, head=args.head,
                                      cache=not args.no_cache)
    encoder = None if args.head else _encoder(args)
    return FewShotClassifier.open(args.registry, encoder=encoder or "efficientnet_lite0", head=args.head,
                                  weights=args.weights, metric=args.metric, index=args.index,
                                  store_examples=args.store_examples, cache=not args.no_cache)


def _open_registry(args):
    """The registry at args.registry, for writing without an encoder (remove, rename)."""
    from .registry import Registry

    if not _registry_exists(args.registry):
        _load(args, need_encoder=False)  # raises the usual "no registry" error
    return Registry.open(args.registry)


def _encoder(args):
    from .encoders import create_encoder

    return create_encoder(args.encoder or "efficientnet_lite0", weights=args.weights, stages=args.stages,
                          pool=args.pool, input_size=args.input_size)


def _head_or_plain_encoder(args, head):
    from .classifier import head_encoder

    return head_encoder(head, weights=args.weights) if head is not None else _encoder(args)


def _cache(args):
    from .cache import EmbeddingCache

    return None if args.no_cache else EmbeddingCache()


def _load(args, need_encoder: bool = True):
    from .classifier import FewShotClassifier
    from .registry import Registry

    if not _registry_exists(args.registry):
        raise FewShotError(f"no registry at {args.registry}; create one with "
                           f"`fewshot register {args.registry} --class NAME IMAGES...`")
    if not need_encoder:  # listing, removing and renaming never run the network
        classifier = FewShotClassifier()
        classifier._registry = Registry.load(args.registry)
        return classifier
    return FewShotClassifier.load(args.registry, encoder=getattr(args, "encoder", None),
                                  weights=getattr(args, "weights", None), head=getattr(args, "head", None),
                                  cache=not args.no_cache)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _stages(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated stage indices like 2,3, got {text}") from None


def _pool(text: str) -> str | int:
    return text if text == "avg" else _positive_int(text)


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare word such as arch=conv


def build_parser() -> argparse.ArgumentParser:
    # --debug works before or after the command; SUPPRESS keeps a subcommand from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    encoder = argparse.ArgumentParser(add_help=False)
    encoder.add_argument("--encoder", help="encoder name (default efficientnet_lite0, or any timm model)")
    encoder.add_argument("--weights", help="local weights file for the encoder (.safetensors or torch)")
    encoder.add_argument("--stages", type=_stages, help="intermediate feature stages, e.g. 2,3 (default: final)")
    encoder.add_argument("--pool", type=_pool, default="avg", help="'avg' (global) or a grid size, e.g. 4")
    encoder.add_argument("--input-size", type=_positive_int, help="input resolution (default: the model's)")
    encoder.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    with_head = argparse.ArgumentParser(add_help=False)
    with_head.add_argument("--head", metavar="HEAD", help="trained head (from fewshot train-head)")

    parser = argparse.ArgumentParser(prog="fewshot", description="Few-shot image classification: register "
                                                                 "classes from a few images, then predict.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"fewshot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("register", parents=[common, encoder, with_head],
                       help="add classes to a registry (created if absent)")
    p.add_argument("registry", help="registry directory")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="class to add the images to")
    p.add_argument("--folder", metavar="DIR", help="register one class per subfolder of DIR")
    p.add_argument("paths", nargs="*", help="images or folders of images (with --class)")
    p.add_argument("--metric", choices=["cosine", "l2"], default="cosine", help="for a new registry")
    p.add_argument("--index", default="auto", help="FAISS factory string for a new registry (default auto: exact "
                   "search while small, an approximate index with exact re-scoring once large)")
    p.add_argument("--store-examples", action="store_true", help="keep every example embedding (new registry)")
    p.set_defaults(run=cmd_register)

    p = sub.add_parser("predict", parents=[common, encoder, with_head], help="predict the class of images")
    p.add_argument("registry")
    p.add_argument("paths", nargs="+", help="images or folders of images")
    p.add_argument("--top-k", type=_positive_int, default=5)
    p.add_argument("--threshold", type=float, help="top-1 probability below which the answer is 'unknown'")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("classes", parents=[common], help="list a registry's classes and example counts")
    p.add_argument("registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_classes)

    p = sub.add_parser("remove", parents=[common], help="remove a class")
    p.add_argument("registry")
    p.add_argument("--class", dest="class_name", metavar="NAME", required=True)
    p.set_defaults(run=cmd_remove)

    p = sub.add_parser("rename", parents=[common], help="rename a class")
    p.add_argument("registry")
    p.add_argument("old")
    p.add_argument("new")
    p.set_defaults(run=cmd_rename)

    p = sub.add_parser("train-head", parents=[common, encoder],
                       help="train a head episodically on frozen embeddings of a dataset")
    p.add_argument("--data", required=True, help="dataset: folder or zip, one (group/)class folder per class")
    p.add_argument("--head", required=True, help="head to train: identity, protonet, metric, anil, maml")
    p.add_argument("--out", required=True, help="directory to save the trained head to")
    p.add_argument("--protocol", help="protocol file: train on the classes its test split leaves out")
    p.add_argument("--ways", type=_positive_int, default=20)
    p.add_argument("--shots", type=_positive_int, default=1)
    p.add_argument("--queries", type=_positive_int, default=5)
    p.add_argument("--episodes", type=_positive_int, default=2000)
    p.add_argument("--within-group", action="store_true", help="episodes inside one group (e.g. alphabet)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="classes (or groups) held out for validation")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-every", type=_positive_int, default=200, help="episodes between validations")
    p.add_argument("--patience", type=_positive_int, default=5,
                   help="validations without improvement before stopping early")
    p.add_argument("--augment", choices=["rotations"],
                   help="rotations: add 90/180/270-degree copies of the training classes as new classes "
                        "(characters, symbols)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="head parameter, e.g. arch=conv, distance=cosine, loss=supcon, out_dim=128")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_train_head)

    _add_finetune_parser(sub, common)

    p = sub.add_parser("evaluate", parents=[common, encoder, with_head],
                       help="episodic evaluation: accuracy with a 95%% CI, per-class accuracy, confusion PNG")
    p.add_argument("--data", help="dataset, or the folder holding the protocol's dataset")
    p.add_argument("--protocol", help="protocol file (see episodes/)")
    p.add_argument("--runs", help="folder of fixed-episode runs (Omniglot one-shot format)")
    p.add_argument("--episodes", type=_positive_int, help="override the protocol's number of episodes")
    p.add_argument("--seed", type=int, help="override the protocol's seed")
    p.add_argument("--save-episodes", metavar="FILE", help="write the sampled episodes to a manifest")
    p.add_argument("--replay", metavar="FILE", help="evaluate the episodes of a manifest instead of sampling")
    p.add_argument("--out", help="folder for result.json, episodes.csv, confusion.png "
                                 "(default evaluation/<protocol>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("info", parents=[common, encoder], help="versions, threads and encoders")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("demo", parents=[common, encoder], help="offline demo on bundled images (or --data DIR)")
    p.add_argument("--data", metavar="DIR", help="your own folder, one subfolder per class")
    p.add_argument("--out", default="demo-output", help="folder for the contact sheet (default demo-output)")
    p.add_argument("--shots", type=_positive_int, default=5, help="support images per class (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_demo)
    return parser


if __name__ == "__main__":
    sys.exit(main())
