"""Commands on a registry: register, predict, classes, doctor, remove, rename, calibrate (and info)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from collections.abc import Iterable

from .. import __version__
from ..errors import FewShotError
from .common import (SUPPORT_VIEWS_CHOICES, UNKNOWN_ANSWER, Parents, UsageError, display_label, escape_text,
                     finite_float, load_classifier, open_for_writing, positive_int, registry_exists,
                     require_registry, target_tpr)


def cmd_register(args) -> int:
    if args.from_embeddings:
        return cmd_register_from_embeddings(args)
    if (args.class_name is not None) == bool(args.folder):  # --class "" is a bad label, not a missing option
        raise UsageError("give either --class NAME PATH... or --folder DIR")
    if args.class_name is not None and not args.paths:
        raise UsageError("--class NAME needs at least one image or folder path")
    if args.folder and args.paths:
        raise UsageError("--folder DIR takes no extra paths")
    if registry_exists(args.registry):
        _refuse_feature_options(args)
    with open_for_writing(args) as classifier:  # each change is saved before it returns
        _refuse_new_registry_options(args, classifier.registry_)
        if args.folder:
            reports = classifier.register_folder(args.folder)
        else:
            reports = [classifier.register(args.class_name, args.paths)]
    failures = 0
    for report in reports:
        print(f"{display_label(report.label)}: +{report.added} image(s), {report.total} in total")
        for error in report.errors:
            print(f"fewshot: skipped {escape_text(error)}", file=sys.stderr)
        for warning in report.warnings:
            print(f"fewshot: warning: {escape_text(warning)}", file=sys.stderr)
        failures += len(report.errors)
    print(f"saved {escape_text(args.registry)} ({len(classifier.classes)} classes)")
    return 1 if failures else 0


def cmd_register_from_embeddings(args) -> int:
    """`register REG --from-embeddings EMB.parquet`: classes from `fewshot embed` output, no network run."""
    from ..jobs import check_encoder_reproduces, dataset_fingerprint, register_embeddings
    from ..registry.calibration import calibrate
    from ..registry import Registry

    if args.class_name or args.folder or args.paths or args.head:
        raise UsageError("--from-embeddings takes no --class, --folder, --head or image paths: the classes come "
                         "from the embeddings' class column")
    if args.support_views:
        raise UsageError("--from-embeddings adds the embeddings as they are (one view per image); to register "
                         "with --support-views, register the images themselves")
    fingerprint = dataset_fingerprint(args.from_embeddings)
    if fingerprint is None:
        raise FewShotError(f"no embeddings at {args.from_embeddings}; write them with "
                           f"`fewshot embed DATA --out {args.from_embeddings}`")
    if registry_exists(args.registry):
        registry = Registry.open(args.registry)  # register_embeddings refuses another encoder's vectors
    else:
        check_encoder_reproduces(fingerprint, weights=args.weights)  # predict will re-create it
        registry = Registry.open(args.registry, fingerprint["features"]["dim"], metric=args.metric or "cosine",
                                 index=args.index or "auto", fingerprint=fingerprint,
                                 store_examples=args.store_examples is not False)
    saved = registry.metadata.get("classifier")
    if isinstance(saved, dict) and saved.get("support_views", "none") != "none":
        print("fewshot: warning: this registry registers images with support views; these embeddings are added "
              "with one view per image", file=sys.stderr)
    with registry, registry.batch():  # the classes and the refitted unknown threshold: one save
        counts = register_embeddings(registry, args.from_embeddings)
        calibrate(registry)
    print(f"{counts['classes']} classes from {counts['images']} embeddings ({counts['unlabelled']} without a class, "
          f"{counts['failed']} failed rows skipped)")
    print(f"saved {escape_text(args.registry)} ({len(registry)} classes)")
    return 0


def cmd_predict(args) -> int:
    _refuse_feature_options(args)
    paths = _without_empty_folders(args.paths)
    classifier = load_classifier(args, onnx=True)  # no torch once the model's ONNX export is cached
    if not len(classifier.registry_):
        raise FewShotError(f"{args.registry} has no classes; add some with "
                           f"`fewshot register {args.registry} --class NAME IMAGES...`")
    if args.threshold is not None:
        classifier.unknown_threshold = args.threshold  # checked by finite_float
    if args.no_unknown:
        classifier.unknown = False
    explain = args.neighbours if args.explain else 0
    if explain and not classifier.registry_.store_examples:
        print(f"fewshot: note: {args.registry} does not store examples, so --explain has no neighbours to show; "
              "register into a new registry with --store-examples to keep them", file=sys.stderr)
    predictions = classifier.predict(paths, top_k=args.top_k, explain=explain) if paths else []
    if args.json:
        print(json.dumps([p.to_dict() for p in predictions], indent=2, ensure_ascii=False))
    else:
        for p in predictions:
            print(_format_prediction(p, classifier.threshold_for(p.top_k[0][0]) if p.unknown else None))
            for n in p.neighbours or ():
                print(_format_neighbour(n))
    return 1 if any(p.error for p in predictions) or len(paths) < len(args.paths) else 0


def _without_empty_folders(paths: list[str]) -> list[str]:
    """``paths`` less the folders holding no image, each reported on stderr (the others still run)."""
    from ..embedding.images import IMAGE_EXTENSIONS, expand_inputs

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
                                ("--store-examples", args.store_examples, registry.store_examples)]:
        if given is not None and given != actual:
            raise UsageError(f"{flag} applies to a new registry; {args.registry} exists with "
                             f"{flag.lstrip('-').replace('-', '_')}={actual!r}: leave {flag} out")


def _format_neighbour(n) -> str:
    source = repr(n.source) if n.source is not None else "(source unknown)"  # repr: no raw control characters
    return f"\tnear {n.label!r} {n.similarity:.3f}\t{source}\tsha256 {n.digest or 'unknown'}"


def cmd_doctor(args) -> int:
    classifier = load_classifier(args, need_encoder=False)
    findings = classifier.doctor()
    if args.json:
        print(json.dumps({"registry": args.registry, "classes": len(classifier.classes),
                          "stores_examples": classifier.registry_.store_examples,
                          "findings": [f.to_dict() for f in findings]}, indent=2, ensure_ascii=False))
    else:
        for finding in findings:
            print(f"{finding.kind}\t{finding.message}")
        checked = "" if classifier.registry_.store_examples else " (examples not stored: mislabelling not checked)"
        print(f"{len(findings)} finding(s) in {len(classifier.classes)} classes{checked}")
    return 1 if findings else 0


def _format_prediction(p, threshold: float | None = None) -> str:
    """One line: input, answer, its probability and similarity, then the top-k classes. An unknown answer
    shows the similarity that fell below ``threshold`` and names the nearest class as the nearest, not
    beside a probability that would read as the answer's own."""
    if p.error:
        return f"{escape_text(p.input)}\terror: {escape_text(p.error)}"
    others = ", ".join(f"{display_label(lab)} {score:.3f}" for lab, score in p.top_k)
    if p.unknown:
        return (f"{escape_text(p.input)}\t{UNKNOWN_ANSWER}\t(nearest: {display_label(p.top_k[0][0])}, similarity "
                f"{p.similarity:.3f} < {threshold:.3f})\t[{others}]")
    similarity = f"\tsimilarity {p.similarity:.3f}" if p.similarity is not None else ""
    return f"{escape_text(p.input)}\t{display_label(p.label)}\t{p.score:.3f}{similarity}\t[{others}]"


def cmd_classes(args) -> int:
    counts = _saved_counts(args)
    if args.json:
        print(json.dumps([{"label": k, "count": v} for k, v in counts.items()], indent=2, ensure_ascii=False))
    else:
        for label, count in counts.items():
            print(f"{display_label(label)}\t{count}")
    return 0


def cmd_remove(args) -> int:
    from ..registry.calibration import calibrate

    with _open_registry(args) as registry, registry.batch():  # saved, refitted, before remove returns
        _require_class(args, registry, args.class_name)
        registry.remove(args.class_name)
        calibrate(registry)
    print(f"removed {args.class_name!r}; {len(registry)} classes left")
    return 0


def cmd_rename(args) -> int:
    from ..registry.calibration import calibrate

    with _open_registry(args) as registry, registry.batch():
        _require_class(args, registry, args.old)
        registry.rename(args.old, args.new)
        calibrate(registry)
    print(f"renamed {args.old!r} to {args.new!r}")
    return 0


def _require_class(args, registry, label: str) -> None:
    if label not in registry:
        raise FewShotError(f"no class {label!r} in {args.registry}; `fewshot classes {args.registry}` lists its "
                           f"{len(registry)} classes")


def cmd_calibrate(args) -> int:
    """Refit the registry's unknown thresholds (optionally for another target), and measure them on a
    folder of background images (photos of things that are none of the classes) if given."""
    from ..registry.calibration import METADATA_KEY, accepted_share, calibrate

    with _open_registry(args) as registry:
        if not len(registry):
            raise FewShotError(f"registry {args.registry} has no classes to calibrate; register some first")
        calibration = calibrate(registry, args.target_tpr)
        if args.background:
            from ..classifier import FewShotClassifier

            classifier = FewShotClassifier.load(args.registry, cache=not args.no_cache)
            found = [p for p in classifier.predict(args.background, top_k=1) if p.error is None]
            if not found:
                raise FewShotError(f"no usable image in {args.background}")
            share = accepted_share(calibration, [p.similarity for p in found], [p.top_k[0][0] for p in found],
                                   [registry.count(p.top_k[0][0]) for p in found])
            calibration = dataclasses.replace(calibration, background_accepted=share)
            registry.metadata[METADATA_KEY] = calibration.to_dict()
        registry.save(args.registry)
    if args.json:
        print(json.dumps(calibration.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(_format_calibration(calibration))
        print(f"saved the thresholds and temperature in {args.registry} (predict uses them from now on)")
    return 0


def _format_calibration(c) -> str:
    def number(x):
        return "none" if x is None else f"{x:.4f}"

    lines = [f"unknown threshold fitted by {c.method} to keep {c.target_tpr:.0%} of known queries: "
             f"{number(c.threshold)} (classes with 2+ examples), {number(c.one_shot_threshold)} (1 example), "
             f"{len(c.per_class)} per-class threshold(s); temperature {number(c.temperature)}"]
    if c.method == "cross-class":
        lines.append("too few classes have 2+ examples: the threshold is a prior learnt from other photos; "
                     "add a second example to a few classes for a threshold fitted to yours")
    if c.background_accepted is not None:
        lines.append(f"background images accepted as known: {c.background_accepted:.1%}")
    return "\n".join(lines)


def cmd_info(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from ..embedding.fingerprints import DEFAULT_ENCODER, available_encoders
    from ..embedding.onnx_encoder import usable_cores

    def installed(package: str) -> str:  # read from the package's metadata: importing torch takes seconds
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    print(f"fewshot {__version__}")
    print(f"python {platform.python_version()}, " + ", ".join(
        f"{name} {installed(name)}" for name in ("torch", "timm", "faiss-cpu", "onnxruntime")))
    print(f"cpu cores usable: {usable_cores()} (torch threads and onnxruntime threads default to these)")
    print(f"default encoder: {DEFAULT_ENCODER}; offline encoders: {', '.join(available_encoders()) or 'none'}")
    if args.encoder:
        from ..embedding.encoders import create_encoder

        encoder = create_encoder(args.encoder, weights=args.weights)
        print(json.dumps(encoder.fingerprint, indent=2))
    return 0


def _open_registry(args):
    """The registry at args.registry, for writing without an encoder (remove, rename)."""
    from ..registry import Registry

    require_registry(args.registry, args.command)
    return Registry.open(args.registry)


def _saved_counts(args) -> dict[str, int]:
    """A registry's classes and counts from its manifest alone: listing reads no prototypes."""
    from ..registry import Registry

    require_registry(args.registry, args.command)
    return Registry.saved_counts(args.registry)


def _add_register(sub, parents: Parents) -> None:
    p = sub.add_parser("register", parents=[parents.common, parents.encoder, parents.with_head],
                       help="add classes to a registry (created if absent)")
    p.add_argument("registry", help="registry directory")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="class to add the images to")
    p.add_argument("--folder", metavar="DIR", help="register one class per subfolder of DIR")
    p.add_argument("paths", nargs="*", help="images or folders of images (with --class)")
    p.add_argument("--metric", choices=["cosine", "l2"], help="for a new registry (default cosine)")
    p.add_argument("--index", help="FAISS factory string for a new registry (default auto: exact "
                   "search while small, an approximate index with exact re-scoring once large)")
    p.add_argument("--store-examples", action=argparse.BooleanOptionalAction,
                   help="keep every example embedding (new registry; default on: the unknown threshold is "
                        "fitted from them)")
    p.add_argument("--from-embeddings", metavar="EMB", help="add the classes of a `fewshot embed` Parquet dataset "
                   "(bulk; refuses embeddings of another encoder)")
    p.add_argument("--support-views", choices=SUPPORT_VIEWS_CHOICES, help="flip: also embed each image mirrored "
                   "and keep the average as its example (counts unchanged); recorded in the registry (default: the "
                   "registry's, else none)")
    p.set_defaults(run=cmd_register)


def _add_predict(sub, parents: Parents) -> None:
    p = sub.add_parser("predict", parents=[parents.common, parents.encoder, parents.with_head],
                       help="predict the class of images")
    p.add_argument("registry")
    p.add_argument("paths", nargs="+", help="images or folders of images")
    p.add_argument("--top-k", type=positive_int, default=5)
    p.add_argument("--threshold", type=finite_float, help="top-1 similarity below which the answer is 'unknown' "
                   "(default: the thresholds the registry fitted; see fewshot calibrate)")
    p.add_argument("--no-unknown", action="store_true", help="always name the nearest class, never 'unknown'")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--explain", action="store_true", help="name the registered examples nearest to each input "
                   "(source and sha256; registries made with --store-examples)")
    p.add_argument("--neighbours", type=positive_int, default=3, metavar="N",
                   help="examples shown by --explain (default 3)")
    p.set_defaults(run=cmd_predict)


def _add_classes(sub, parents: Parents) -> None:
    p = sub.add_parser("classes", parents=[parents.common], help="list a registry's classes and example counts")
    p.add_argument("registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_classes)


def _add_doctor(sub, parents: Parents) -> None:
    p = sub.add_parser("doctor", parents=[parents.common], help="find near-duplicate classes, likely mislabelled "
                       "examples and images in several classes (exit 1 if any)")
    p.add_argument("registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_doctor)


def _add_remove(sub, parents: Parents) -> None:
    p = sub.add_parser("remove", parents=[parents.common], help="remove a class")
    p.add_argument("registry")
    p.add_argument("--class", dest="class_name", metavar="NAME", required=True)
    p.set_defaults(run=cmd_remove)


def _add_rename(sub, parents: Parents) -> None:
    p = sub.add_parser("rename", parents=[parents.common], help="rename a class")
    p.add_argument("registry")
    p.add_argument("old")
    p.add_argument("new")
    p.set_defaults(run=cmd_rename)


def _add_calibrate(sub, parents: Parents) -> None:
    p = sub.add_parser("calibrate", parents=[parents.common],
                       help="refit a registry's unknown thresholds; measure them on background images")
    p.add_argument("registry")
    p.add_argument("--target-tpr", type=target_tpr, help="share of known queries to keep (default: the last one "
                   "used, else 0.95)")
    p.add_argument("--background", metavar="DIR", help="folder of images of none of the classes: reports the "
                   "share the threshold accepts")
    p.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_calibrate)


def _add_info(sub, parents: Parents) -> None:
    p = sub.add_parser("info", parents=[parents.common, parents.encoder], help="versions, threads and encoders")
    p.set_defaults(run=cmd_info)


def add_parsers(sub, parents: Parents, names: Iterable[str] | None = None) -> None:
    """Add this module's commands to ``sub``: those in ``names``, in that order, else all of them."""
    adders = {"register": _add_register, "predict": _add_predict, "classes": _add_classes, "doctor": _add_doctor,
              "remove": _add_remove, "rename": _add_rename, "calibrate": _add_calibrate, "info": _add_info}
    for name in adders if names is None else names:
        adders[name](sub, parents)
