"""The ``fewshot`` command: parses arguments, calls the Python API, prints results.

Exit status: 0 on success, 1 when something failed at run time (a bad image, a corrupt registry;
the good items are still processed and saved), 2 for a usage error. Errors are one line on stderr;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
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
    with warnings.catch_warnings():  # restores the usual display when main returns (tests, embedding)
        warnings.showwarning = _one_line_warning
        return _run(parser, args)


def _run(parser: argparse.ArgumentParser, args) -> int:
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # `fewshot classes REG | head`: the reader has all it wanted
        _silence_stdout()
        return 0
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


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line for people, like errors: no Python source location or code line."""
    print(f"fewshot: warning: {escape_text(str(message))}", file=file or sys.stderr)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit raises no second broken-pipe error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# -- commands ---------------------------------------------------------------------------------
def cmd_register(args) -> int:
    if (args.class_name is not None) == bool(args.folder):  # --class "" is a bad label, not a missing option
        raise UsageError("give either --class NAME PATH... or --folder DIR")
    if args.class_name is not None and not args.paths:
        raise UsageError("--class NAME needs at least one image or folder path")
    if args.folder and args.paths:
        raise UsageError("--folder DIR takes no extra paths")
    if _registry_exists(args.registry):
        _refuse_feature_options(args)
    with _open_for_writing(args) as classifier:  # each change is saved before it returns
        _refuse_new_registry_options(args, classifier.registry_)
        if args.folder:
            reports = classifier.register_folder(args.folder)
        else:
            reports = [classifier.register(args.class_name, args.paths)]
    failures = 0
    for report in reports:
        print(f"{display_label(report.label)}: +{report.added} image(s), {report.total} in total")
        for error in report.errors:
            print(f"fewshot: skipped {error}", file=sys.stderr)
        failures += len(report.errors)
    print(f"saved {args.registry} ({len(classifier.classes)} classes)")
    return 1 if failures else 0


def cmd_predict(args) -> int:
    _refuse_feature_options(args)
    paths = _without_empty_folders(args.paths)
    classifier = _load(args)
    if not len(classifier.registry_):
        raise FewShotError(f"{args.registry} has no classes; add some with "
                           f"`fewshot register {args.registry} --class NAME IMAGES...`")
    if args.threshold is not None:
        classifier.unknown_threshold = args.threshold  # checked by _probability
    predictions = classifier.predict(paths, top_k=args.top_k) if paths else []
    if args.json:
        print(json.dumps([p.to_dict() for p in predictions], indent=2, ensure_ascii=False))
    else:
        for p in predictions:
            print(_format_prediction(p))
    return 1 if any(p.error for p in predictions) or len(paths) < len(args.paths) else 0


def _without_empty_folders(paths: list[str]) -> list[str]:
    """``paths`` less the folders holding no image, each reported on stderr (the others still run)."""
    from .images import IMAGE_EXTENSIONS, expand_inputs

    kept = []
    for path in paths:
        if os.path.isdir(path) and not expand_inputs(path):
            print(f"fewshot: error: {escape_text(path)}: no images in this folder "
                  f"({', '.join(sorted(IMAGE_EXTENSIONS))})", file=sys.stderr)
        else:
            kept.append(path)
    return kept


def _refuse_feature_options(args) -> None:
    """--stages, --pool and --input-size choose the features of a new registry or head; an existing
    registry re-creates its own, so they would be ignored."""
    given = [flag for flag, value in [("--stages", args.stages), ("--pool", args.pool),
                                      ("--input-size", args.input_size)] if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: {args.registry} re-creates the features it was built with; "
                         f"leave {'them' if len(given) > 1 else 'it'} out (they choose the features of a new "
                         f"registry)")


def _refuse_new_registry_options(args, registry) -> None:
    """--metric, --index and --store-examples shape a new registry; an existing one keeps its own."""
    for flag, given, actual in [("--metric", args.metric, registry.metric),
                                ("--index", args.index, registry.index_factory),
                                ("--store-examples", args.store_examples or None, registry.store_examples)]:
        if given is not None and given != actual:
            raise UsageError(f"{flag} applies to a new registry; {args.registry} exists with "
                             f"{flag.lstrip('-').replace('-', '_')}={actual!r}: leave {flag} out")


def _format_prediction(p) -> str:
    if p.error:
        return f"{escape_text(p.input)}\terror: {escape_text(p.error)}"
    label = display_label(p.label) if p.label is not None else UNKNOWN_ANSWER
    others = ", ".join(f"{display_label(lab)} {score:.3f}" for lab, score in p.top_k)
    return f"{escape_text(p.input)}\t{label}\t{p.score:.3f}\t[{others}]"


UNKNOWN_ANSWER = "unknown"  # text output's answer below the threshold; a class of that name is quoted
_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def escape_text(text: str) -> str:
    """``text`` with every non-printable character (newline, tab, ANSI/OSC escape, bidi control)
    written as a backslash escape, so printed text cannot fake rows or drive the terminal."""
    return text if text.isprintable() else "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def display_label(label: str) -> str:
    """A class label for text output: as is when plain, else quoted with backslash escapes. Quoted are
    labels with non-printable characters, labels starting with a quote, and a class named like the
    unknown answer, so that no label can pass for another one or for "unknown"."""
    if label.isprintable() and label != UNKNOWN_ANSWER and not label.startswith('"'):
        return label
    quoted = label.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escape_text(quoted)}"'


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def cmd_classes(args) -> int:
    counts = _saved_counts(args)
    if args.json:
        print(json.dumps([{"label": k, "count": v} for k, v in counts.items()], indent=2, ensure_ascii=False))
    else:
        for label, count in counts.items():
            print(f"{display_label(label)}\t{count}")
    return 0


def cmd_remove(args) -> int:
    with _open_registry(args) as registry:  # saved before remove returns
        _require_class(args, registry, args.class_name)
        registry.remove(args.class_name)
    print(f"removed {args.class_name!r}; {len(registry)} classes left")
    return 0


def cmd_rename(args) -> int:
    with _open_registry(args) as registry:
        _require_class(args, registry, args.old)
        registry.rename(args.old, args.new)
    print(f"renamed {args.old!r} to {args.new!r}")
    return 0


def _require_class(args, registry, label: str) -> None:
    if label not in registry:
        raise FewShotError(f"no class {label!r} in {args.registry}; `fewshot classes {args.registry}` lists its "
                           f"{len(registry)} classes")


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

    if not args.force and Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise UsageError(f"--out {args.out} exists already; registries keep their own copy of a head, but pass "
                         "--force to replace it, or choose another --out")
    protocol = load_protocol(args.protocol) if args.protocol else None
    dataset = resolve_dataset(args.data, protocol)
    if protocol is not None and protocol.split:
        dataset = protocol.train_split(dataset)  # never train on the protocol's test classes
    head, result = train_head_on_dataset(
        dataset, _encoder(args), args.head, ways=args.ways, shots=args.shots, queries=args.queries,
        episodes=args.episodes, within_group=args.within_group, val_fraction=args.val_fraction, seed=args.seed,
        lr=args.lr, head_params=dict(args.param), augment=args.augment, val_every=args.val_every,
        patience=args.patience, cache=_cache(args), progress=_progress(), force=args.force)
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


def cmd_evaluate(args) -> int:
    from .heads import load_head
    from .workflows import evaluate_protocol, evaluate_runs, resolve_dataset

    if bool(args.runs) == bool(args.protocol or args.replay):
        raise UsageError("give either --data ROOT --protocol FILE (or --replay MANIFEST), or --runs DIR")
    protocol, data = (None, None) if args.runs else _protocol_and_data(args)  # before the slow part
    head = load_head(args.head) if args.head else None
    encoder = _head_or_plain_encoder(args, head)
    if args.runs:
        result = evaluate_runs(args.runs, encoder, head=head, cache=_cache(args), progress=_progress())
        name = Path(args.runs).name
    elif protocol.runs:
        result = evaluate_runs(_runs_folder(data, protocol), encoder, head=head, cache=_cache(args),
                               progress=_progress())
        name = protocol.name
    else:
        result = evaluate_protocol(resolve_dataset(data, protocol), protocol, encoder, head=head,
                                   episodes=args.episodes, seed=args.seed, cache=_cache(args),
                                   save_episodes=args.save_episodes, replay=args.replay, progress=_progress())
        name = protocol.name
    if head is not None:
        result.provenance["head"]["path"] = str(Path(args.head).resolve())
    # Results of raw features and of each head go to folders of their own: none overwrites another.
    paths = result.save(Path(args.out) if args.out else Path("evaluation") / name / _result_folder(args.head))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(result.summary())
        print(f"wrote {paths['json']}, {paths['episodes']} and {paths['confusion']}")
    return 0


def cmd_compare_encoders(args) -> int:
    from .compare import compare_encoders, format_table, plot_comparison, rows_as_dicts
    from .data import load_dataset

    rows = compare_encoders(load_dataset(args.data), args.encoder or None, shots=args.shots,
                            ways=None if args.ways == "all" else args.ways, queries=args.queries,
                            episodes=args.episodes, seed=args.seed, speed_images=args.speed_images,
                            max_per_class=args.max_per_class, cache=_cache(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoders.json").write_text(json.dumps(rows_as_dicts(rows), indent=2) + "\n")
    plot = plot_comparison(rows, out / "encoders.png")
    if args.json:
        print(json.dumps(rows_as_dicts(rows), indent=2))
    else:
        print(format_table(rows))
        print(f"wrote {out / 'encoders.json'} and {plot}")
    return 0

def _protocol_and_data(args):
    """The protocol and dataset of an evaluation: as given, else as the --replay manifest records them."""
    from .episodes import load_protocol, manifest_origin

    recorded_protocol, recorded_data = manifest_origin(args.replay) if args.replay else (None, None)
    protocol = load_protocol(args.protocol) if args.protocol else recorded_protocol
    if protocol is None:
        raise UsageError(f"--replay {args.replay} records no protocol; add --protocol FILE")
    data = args.data or recorded_data
    if data is None:
        raise UsageError("--protocol needs --data ROOT (the dataset, or the folder holding it)")
    return protocol, data


def _runs_folder(data, protocol) -> Path:
    runs = Path(data) / protocol.runs
    if not runs.is_dir():
        raise FewShotError(f"{runs}: no such folder; protocol {protocol.name!r} reads its fixed runs from "
                           f"<--data ROOT>/{protocol.runs}: pass the ROOT that holds them")
    return runs


def _result_folder(head: str | None) -> str:
    return Path(head).resolve().name if head else "raw"


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(data=args.data, out=Path(args.out), shots=args.shots, seed=args.seed,
                    encoder=args.encoder, weights=args.weights, progress=_progress())


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
                                  weights=args.weights, metric=args.metric or "cosine", index=args.index or "auto",
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
                          pool=args.pool if args.pool is not None else "avg", input_size=args.input_size)


def _head_or_plain_encoder(args, head):
    from .classifier import head_encoder

    return head_encoder(head, weights=args.weights) if head is not None else _encoder(args)


def _progress() -> bool | None:
    """Progress bars (on stderr) for long commands whenever a person watches; None lets tqdm decide."""
    return True if sys.stderr.isatty() else None


def _cache(args):
    from .cache import EmbeddingCache

    return None if args.no_cache else EmbeddingCache()


def _load(args, need_encoder: bool = True):
    from .classifier import FewShotClassifier
    from .registry import Registry

    if not _registry_exists(args.registry) and Path(args.registry).exists():
        raise FewShotError(f"{args.registry} is not a registry (it holds no manifest.json); the registry comes "
                           f"first: fewshot {args.command} REGISTRY ...")
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


def _saved_counts(args) -> dict[str, int]:
    """A registry's classes and counts from its manifest alone: listing reads no prototypes."""
    from .registry import Registry

    if not _registry_exists(args.registry):
        return _load(args, need_encoder=False).counts  # raises the usual "no registry" error
    return Registry.saved_counts(args.registry)


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


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def _pool(text: str) -> str | int:
    return text if text == "avg" else _positive_int(text)


def _ways(text: str) -> str | int:
    return text if text == "all" else _positive_int(text)


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
    encoder.add_argument("--pool", type=_pool, help="'avg' (global, the default) or a grid size, e.g. 4")
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
    p.add_argument("--metric", choices=["cosine", "l2"], help="for a new registry (default cosine)")
    p.add_argument("--index", help="FAISS factory string for a new registry (default auto: exact "
                   "search while small, an approximate index with exact re-scoring once large)")
    p.add_argument("--store-examples", action="store_true", help="keep every example embedding (new registry)")
    p.set_defaults(run=cmd_register)

    p = sub.add_parser("predict", parents=[common, encoder, with_head], help="predict the class of images")
    p.add_argument("registry")
    p.add_argument("paths", nargs="+", help="images or folders of images")
    p.add_argument("--top-k", type=_positive_int, default=5)
    p.add_argument("--threshold", type=_probability, help="top-1 probability below which the answer is 'unknown'")
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
    p.add_argument("--force", action="store_true",
                   help="replace the head already saved at --out, and save the trained head even where raw "
                        "features score higher on the validation classes (otherwise raw features are saved)")
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

    p = sub.add_parser("evaluate", parents=[common, encoder, with_head],
                       help="episodic evaluation: accuracy with a 95%% CI, per-class accuracy, confusion PNG")
    p.add_argument("--data", help="dataset, or the folder holding the protocol's dataset")
    p.add_argument("--protocol", help="protocol file (see episodes/)")
    p.add_argument("--runs", help="folder of fixed-episode runs (Omniglot one-shot format)")
    p.add_argument("--episodes", type=_positive_int, help="override the protocol's number of episodes")
    p.add_argument("--seed", type=int, help="override the protocol's seed")
    p.add_argument("--save-episodes", metavar="FILE", help="write the sampled episodes to a manifest")
    p.add_argument("--replay", metavar="FILE", help="evaluate the episodes of a manifest instead of sampling "
                   "(its protocol and dataset are recorded: --data and --protocol are then optional)")
    p.add_argument("--out", help="folder for result.json, episodes.csv, confusion.png "
                                 "(default evaluation/<protocol>/<head folder name, or raw>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_evaluate)

    _add_compare_encoders(sub, common)

    p = sub.add_parser("info", parents=[common, encoder], help="versions, threads and encoders")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("demo", parents=[common, encoder], help="offline demo on bundled images (or --data DIR)")
    p.add_argument("--data", metavar="DIR", help="your own folder, one subfolder per class")
    p.add_argument("--out", default="demo-output", help="folder for the contact sheet (default demo-output)")
    p.add_argument("--shots", type=_positive_int, default=5, help="support images per class (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_demo)
    return parser


def _add_compare_encoders(sub, common) -> None:
    p = sub.add_parser("compare-encoders", parents=[common],
                       help="rank encoders on your folder: few-shot accuracy (95%% CI), images/s, dimension, PNG")
    p.add_argument("--data", required=True, help="folder or zip, one subfolder per class")
    p.add_argument("--encoder", action="append", metavar="NAME",
                   help="encoder to compare, repeatable; NAME@SIZE sets its resolution, A+B an ensemble "
                        "(default: every offline encoder, and all of them together)")
    p.add_argument("--ways", type=_ways, default="all", help="classes per episode, or 'all' (default)")
    p.add_argument("--shots", type=_positive_int, default=1)
    p.add_argument("--queries", type=_positive_int, default=5)
    p.add_argument("--episodes", type=_positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-images", type=int, default=32, help="images timed per encoder, uncached (0: skip)")
    p.add_argument("--max-per-class", type=_positive_int, help="use only each class's first N images (faster)")
    p.add_argument("--out", default="compare-encoders", help="folder for encoders.json and encoders.png")
    p.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_compare_encoders)


if __name__ == "__main__":
    sys.exit(main())
