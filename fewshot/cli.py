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
    classifier = _open_or_create(args)
    if args.folder:
        reports = classifier.register_folder(args.folder)
    else:
        reports = [classifier.register(args.class_name, args.paths)]
    classifier.save(args.registry)
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
    classifier = _load(args, need_encoder=False)
    classifier.registry_.remove(args.class_name)
    classifier.registry_.save(args.registry)
    print(f"removed {args.class_name!r}; {len(classifier.registry_)} classes left")
    return 0


def cmd_rename(args) -> int:
    classifier = _load(args, need_encoder=False)
    classifier.registry_.rename(args.old, args.new)
    classifier.registry_.save(args.registry)
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


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(data=args.data, out=Path(args.out), shots=args.shots, seed=args.seed,
                    encoder=args.encoder, weights=args.weights)


# -- helpers ----------------------------------------------------------------------------------
def _registry_exists(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def _open_or_create(args):
    from .classifier import FewShotClassifier

    if _registry_exists(args.registry):
        return _load(args)
    return FewShotClassifier(args.encoder or "efficientnet_lite0", weights=args.weights, metric=args.metric,
                             index=args.index, store_examples=args.store_examples, cache=not args.no_cache)


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
                                  weights=getattr(args, "weights", None), cache=not args.no_cache)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # --debug works before or after the command; SUPPRESS keeps a subcommand from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    encoder = argparse.ArgumentParser(add_help=False)
    encoder.add_argument("--encoder", help="encoder name (default efficientnet_lite0, or any timm model)")
    encoder.add_argument("--weights", help="local weights file for the encoder (.safetensors or torch)")
    encoder.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")

    parser = argparse.ArgumentParser(prog="fewshot", description="Few-shot image classification: register "
                                                                 "classes from a few images, then predict.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"fewshot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("register", parents=[common, encoder], help="add classes to a registry (created if absent)")
    p.add_argument("registry", help="registry directory")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="class to add the images to")
    p.add_argument("--folder", metavar="DIR", help="register one class per subfolder of DIR")
    p.add_argument("paths", nargs="*", help="images or folders of images (with --class)")
    p.add_argument("--metric", choices=["cosine", "l2"], default="cosine", help="for a new registry")
    p.add_argument("--index", default="Flat", help="FAISS factory string for a new registry (default Flat)")
    p.add_argument("--store-examples", action="store_true", help="keep every example embedding (new registry)")
    p.set_defaults(run=cmd_register)

    p = sub.add_parser("predict", parents=[common, encoder], help="predict the class of images")
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
