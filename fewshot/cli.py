"""The ``fewshot`` command: parses arguments, calls the Python API, prints results.

Exit status: 0 on success, 1 when something failed at run time (a bad image, a corrupt registry;
the good items are still processed and saved) or when ``doctor`` found something, 2 for a usage
error. Errors are one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import FewShotError

# fewshot.embedding.views.SUPPORT_VIEWS, spelled out: importing that module would load numpy at every start-up.
SUPPORT_VIEWS_CHOICES = ("none", "flip")


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
        parser.error(f"unrecognized arguments: {' '.join(extra)}{_suggestion(parser, args.command, extra)}")
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
    except (FewShotError, ValueError, OSError, FloatingPointError) as exc:  # FloatingPointError: training diverged
        if args.debug:
            raise
        # Paths and labels in the message are untrusted; its own line breaks (a list of failures) stay.
        message = "\n".join(escape_text(line) for line in str(exc).split("\n"))
        print(f"fewshot: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fewshot: interrupted: {_interrupted(args)}", file=sys.stderr)
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


def _suggestion(parser: _Parser, command: str, extra: list[str]) -> str:
    """' (did you mean --threshold?)' where an unknown option is close to one of ``command``'s."""
    import difflib

    options = parser.commands[command].option_strings()
    for word in extra:
        close = difflib.get_close_matches(word.partition("=")[0], options, n=1) if word.startswith("-") else []
        if close:
            return f" (did you mean {close[0]}?)"
    return ""


def _interrupted(args) -> str:
    """What Ctrl-C left behind, and how to go on: the rest of the one line on stderr."""
    cached = "" if getattr(args, "no_cache", True) else "; the images embedded so far are cached"
    if args.command == "embed":
        return f"the embeddings written so far stay in {args.out}: run the same command again to resume"
    if args.command in ("remove", "rename", "calibrate", "serve"):
        return f"{args.registry} holds every change that completed (each is saved whole or not at all)"
    if args.command == "register" and _registry_exists(args.registry):
        from .registry import Registry

        counts = Registry.saved_counts(args.registry)
        return (f"{args.registry} is as this command found it ({len(counts)} class(es), {sum(counts.values())} "
                f"image(s)): a register is saved at its end{cached}: run the same command again")
    return f"nothing was saved{cached}: run the same command again"


# -- commands ---------------------------------------------------------------------------------
def cmd_register(args) -> int:
    if args.from_embeddings:
        return cmd_register_from_embeddings(args)
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
            print(f"fewshot: skipped {escape_text(error)}", file=sys.stderr)
        for warning in report.warnings:
            print(f"fewshot: warning: {escape_text(warning)}", file=sys.stderr)
        failures += len(report.errors)
    print(f"saved {escape_text(args.registry)} ({len(classifier.classes)} classes)")
    return 1 if failures else 0


def cmd_register_from_embeddings(args) -> int:
    """`register REG --from-embeddings EMB.parquet`: classes from `fewshot embed` output, no network run."""
    from .jobs import check_encoder_reproduces, dataset_fingerprint, register_embeddings
    from .registry.calibration import calibrate
    from .registry import Registry

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
    if _registry_exists(args.registry):
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


def cmd_embed(args) -> int:
    """`embed DATA --out EMB.parquet`: embed a dataset to Parquet, locally or on Ray; resumes."""
    from .jobs import embed_to_parquet

    spec = {"name": args.encoder or "efficientnet_lite0", "weights": args.weights, "stages": args.stages,
            "pool": args.pool if args.pool is not None else "avg", "input_size": args.input_size}
    report = embed_to_parquet(args.data, args.out, encoder=spec, engine=args.engine, address=args.address,
                              actors=args.actors, batch_size=args.batch_size,
                              progress=False if args.no_progress else None, verbose=args.verbose)
    print(f"{report.out}: {report.written} written ({report.failed} failed), {report.skipped} already there")
    if report.failed:
        print(f"fewshot: {report.failed} image(s) could not be embedded; see the 'error' column", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    """`export --out DIR [--head H | --registry REG] [--int8]`: an onnxruntime + numpy deployment folder."""
    from .export import export_bundle
    from .learning.heads import load_head

    if args.int8 and not args.calibration:
        raise UsageError("--int8 needs --calibration DIR: a few dozen photos like the ones to classify")
    if args.head and args.registry:
        raise UsageError("give --head or --registry, not both: a registry exports the head it was built with")
    if args.registry:
        classifier = _load(args)
        files = export_bundle(args.out, encoder=classifier.encoder_, head=classifier.head_,
                              registry=classifier.registry_, temperature=classifier.temperature_,
                              unknown_threshold=classifier.unknown_threshold, unknown=classifier.unknown,
                              int8=args.int8, calibration=args.calibration, force=args.force)
    else:
        head = load_head(args.head) if args.head else None
        files = export_bundle(args.out, encoder=_head_or_plain_encoder(args, head), head=head, int8=args.int8,
                              calibration=args.calibration, force=args.force)
    for role, path in files.items():
        print(f"{role}\t{path}")
    return 0


def cmd_predict(args) -> int:
    _refuse_feature_options(args)
    paths = _without_empty_folders(args.paths)
    classifier = _load(args)
    if not len(classifier.registry_):
        raise FewShotError(f"{args.registry} has no classes; add some with "
                           f"`fewshot register {args.registry} --class NAME IMAGES...`")
    if args.threshold is not None:
        classifier.unknown_threshold = args.threshold  # checked by _finite_float
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
    from .embedding.images import IMAGE_EXTENSIONS, expand_inputs

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
    classifier = _load(args, need_encoder=False)
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


UNKNOWN_ANSWER = "unknown"  # text output's answer below the threshold; a class of that name is quoted
_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def escape_text(text: str) -> str:
    """``text`` with every non-printable character (newline, tab, ANSI/OSC escape, bidi control)
    written as a backslash escape, so printed text cannot fake rows or drive the terminal: the one
    way untrusted text (paths, labels, messages holding them) reaches the terminal."""
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
    from .registry.calibration import calibrate

    with _open_registry(args) as registry, registry.batch():  # saved, refitted, before remove returns
        _require_class(args, registry, args.class_name)
        registry.remove(args.class_name)
        calibrate(registry)
    print(f"removed {args.class_name!r}; {len(registry)} classes left")
    return 0


def cmd_rename(args) -> int:
    from .registry.calibration import calibrate

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
    from .registry.calibration import METADATA_KEY, accepted_share, calibrate

    with _open_registry(args) as registry:
        if not len(registry):
            raise FewShotError(f"registry {args.registry} has no classes to calibrate; register some first")
        calibration = calibrate(registry, args.target_tpr)
        if args.background:
            from .classifier import FewShotClassifier

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
    import faiss
    import timm
    import torch

    from .embedding.encoders import DEFAULT_ENCODER, available_encoders

    print(f"fewshot {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
          f"faiss {faiss.__version__}")
    print(f"torch threads: {torch.get_num_threads()}, interop threads: {torch.get_num_interop_threads()}")
    print(f"default encoder: {DEFAULT_ENCODER}; offline encoders: {', '.join(available_encoders()) or 'none'}")
    if args.encoder:
        from .embedding.encoders import create_encoder

        encoder = create_encoder(args.encoder, weights=args.weights)
        print(json.dumps(encoder.fingerprint, indent=2))
    return 0


def cmd_train_head(args) -> int:
    from .data.protocols import load_protocol
    from .learning.heads import save_head
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


def cmd_finetune(args) -> int:
    from .data.protocols import load_protocol
    from .learning.finetune import Recipe, finetune
    from .learning.heads import save_head
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
    p.add_argument("--weight", type=_positive_float, action="append", default=[],
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
    from .learning.heads import load_head
    from .workflows import evaluate_protocol, evaluate_runs, resolve_dataset

    if args.out and not args.force and Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        raise UsageError(f"--out {args.out} holds earlier results; pass --force to replace them, or choose another "
                         "--out (without --out, each evaluation gets a folder of its own)")
    if args.data and not (args.runs or args.protocol or args.replay):
        return _evaluate_own_folder(args)
    _check_no_sweep_options(args)
    if bool(args.runs) == bool(args.protocol or args.replay):
        raise UsageError("give either --data DIR alone (shot counts swept on your folder), --data ROOT "
                         "--protocol FILE (or --replay MANIFEST), or --runs DIR")
    protocol, data = (None, None) if args.runs else _protocol_and_data(args)  # before the slow part
    if args.support_views != "none" and (args.runs or protocol.unknown_ways or protocol.runs):
        raise UsageError("--support-views works with sampled closed-set protocols only; drop it for fixed runs "
                         "and open-set protocols")
    head = load_head(args.head) if args.head else None
    encoder = _head_or_plain_encoder(args, head)
    if args.runs:
        result = evaluate_runs(args.runs, encoder, head=head, cache=_cache(args), progress=_progress())
        name = Path(args.runs).name
    elif protocol.unknown_ways:
        return _evaluate_open_set(args, protocol, data, encoder, head)
    elif protocol.runs:
        result = evaluate_runs(_runs_folder(data, protocol), encoder, head=head, cache=_cache(args),
                               progress=_progress())
        name = protocol.name
    else:
        result = evaluate_protocol(resolve_dataset(data, protocol), protocol, encoder, head=head,
                                   episodes=args.episodes, seed=args.seed, cache=_cache(args),
                                   save_episodes=args.save_episodes, replay=args.replay, progress=_progress(),
                                   support_views=args.support_views)
        name = protocol.name
    if head is not None:
        result.provenance["head"]["path"] = str(Path(args.head).resolve())
    # Results of raw features and of each head (and with support views) go to folders of their own.
    folder = _result_folder(args.head) + ("" if args.support_views == "none" else f"+{args.support_views}-views")
    return _save_and_report(args, result, Path("evaluation") / name / folder, result.summary())


def cmd_compare_encoders(args) -> int:
    from .evaluation.compare import compare_encoders, format_table, plot_comparison, rows_as_dicts
    from .data.datasets import load_dataset

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
    from .data.protocols import load_protocol, manifest_origin

    given = load_protocol(args.protocol) if args.protocol else None
    if given is not None and given.unknown_ways and (args.save_episodes or args.replay):
        raise UsageError("--save-episodes and --replay are for closed-set protocols; an open-set protocol "
                         "replays exactly from its seed")
    recorded_protocol, recorded_data = manifest_origin(args.replay) if args.replay else (None, None)
    protocol = given or recorded_protocol
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


def _evaluate_open_set(args, protocol, data, encoder, head) -> int:
    from .workflows import evaluate_open_set_protocol, resolve_dataset

    result = evaluate_open_set_protocol(resolve_dataset(data, protocol), protocol, encoder, head=head,
                                        episodes=args.episodes, seed=args.seed, target_tpr=args.target_tpr,
                                        cache=_cache(args), progress=_progress())
    return _save_and_report(args, result, Path("evaluation") / protocol.name / _result_folder(args.head),
                            result.summary())


def _evaluate_own_folder(args) -> int:
    """``fewshot evaluate --data DIR`` without a protocol: accuracy (and AUROC) against shot count."""
    from .data.datasets import load_dataset
    from .learning.heads import load_head
    from .evaluation.sweep import shots_sweep

    if args.save_episodes:
        raise UsageError("--save-episodes needs --protocol; a folder sweep replays exactly from --seed")
    dataset = load_dataset(args.data)  # before the slow part
    head = load_head(args.head) if args.head else None
    given = {name: getattr(args, name) for name in ("ways", "shots", "queries", "unknown_ways", "episodes", "seed",
                                                    "target_tpr") if getattr(args, name) is not None}
    result = shots_sweep(dataset, _head_or_plain_encoder(args, head), head=head, cache=_cache(args),
                         progress=_progress(), **given)  # what is not given takes shots_sweep's defaults
    default_out = Path("evaluation") / Path(args.data).stem / "shots" / _result_folder(args.head)
    return _save_and_report(args, result, default_out, result.table())


def _save_and_report(args, result, default_out: Path, text: str) -> int:
    """Save an evaluation's files (to --out, else to ``default_out`` or, where that holds earlier results,
    a new ``default_out-N``), then print it as JSON or as ``text``, and the files written (on stderr
    with --json)."""
    from .evaluation.evaluate import new_result_folder

    paths = list(result.save(Path(args.out) if args.out else new_result_folder(default_out)).values())
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(text)
    print(f"wrote {', '.join(map(str, paths[:-1]))} and {paths[-1]}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _check_no_sweep_options(args) -> None:
    given = [f"--{n.replace('_', '-')}" for n in ("ways", "shots", "queries", "unknown_ways") if getattr(args, n)]
    if given:
        raise UsageError(f"{', '.join(given)} set the episodes of a folder sweep (--data DIR alone); with "
                         "--protocol, --replay or --runs the episodes come from there: leave them out")


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(data=args.data, out=Path(args.out), shots=args.shots, seed=args.seed,
                    encoder=args.encoder, weights=args.weights, progress=_progress())


def cmd_serve(args) -> int:
    """Serve the registry over HTTP (and the web page) until interrupted; see the README's "Serve it"."""
    try:
        from .serve import ServeSettings, is_loopback, listen, read_api_key, run
    except ImportError as e:
        raise FewShotError(f"fewshot serve needs the serve extra ({e}); pip install 'fewshot[serve]'") from None
    if not is_loopback(args.host) and not args.api_key_file:
        raise UsageError(f"--host {args.host} is not a loopback address: anyone who can reach it could change "
                         "the registry, so give --api-key-file FILE (clients send the key as 'Authorization: "
                         "Bearer KEY' or 'X-API-Key: KEY')")
    for name in ("max_upload_mb", "max_total_upload_mb", "header_timeout", "body_timeout", "max_image_mp",
                 "max_request_mp"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0")
    settings = ServeSettings(api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
                             max_upload_mb=args.max_upload_mb, max_total_upload_mb=args.max_total_upload_mb,
                             max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                             compile=args.compile, cors_origins=args.cors_origin,
                             header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                             max_connections=args.max_connections, max_image_mp=args.max_image_mp,
                             max_request_mp=args.max_request_mp)
    args.no_cache = True  # uploads are not kept, so neither are their embeddings
    # Bound first: a busy port fails here, before the registry is created or its lock taken.
    with listen(args.host, args.port) as sock, _open_for_writing(args) as classifier:  # then the lock error
        classifier.progress = False
        host, port = sock.getsockname()[:2]
        address = f"[{host}]" if ":" in host else host
        print(f"fewshot serve: {args.registry} on http://{address}:{port}/ (Ctrl-C stops)", flush=True)
        run(classifier, settings, host=args.host, port=args.port, sock=sock)
    return 0


# -- helpers ----------------------------------------------------------------------------------
def _registry_exists(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def _open_for_writing(args):
    """The classifier at args.registry (created if absent), holding its writer lock."""
    from .classifier import FewShotClassifier

    if _registry_exists(args.registry):
        views = {"support_views": args.support_views} if args.support_views else {}  # else the saved one
        return FewShotClassifier.open(args.registry, encoder=args.encoder, weights=args.weights, head=args.head,
                                      cache=not args.no_cache, **views)
    encoder = None if args.head else _encoder(args)
    return FewShotClassifier.open(args.registry, encoder=encoder or "efficientnet_lite0", head=args.head,
                                  weights=args.weights, metric=args.metric or "cosine", index=args.index or "auto",
                                  store_examples=args.store_examples is not False, cache=not args.no_cache,
                                  support_views=args.support_views or "none")


def _open_registry(args):
    """The registry at args.registry, for writing without an encoder (remove, rename)."""
    from .registry import Registry

    _require_registry(args.registry, args.command)
    return Registry.open(args.registry)


def _require_registry(path: str, command: str) -> None:
    if not _registry_exists(path) and Path(path).exists():
        raise FewShotError(f"{path} is not a registry (it holds no manifest.json); the registry comes "
                           f"first: fewshot {command} REGISTRY ...")
    if not _registry_exists(path):
        raise FewShotError(f"no registry at {path}; create one with "
                           f"`fewshot register {path} --class NAME IMAGES...`")


def _encoder(args):
    from .embedding.encoders import create_encoder

    return create_encoder(args.encoder or "efficientnet_lite0", weights=args.weights, stages=args.stages,
                          pool=args.pool if args.pool is not None else "avg", input_size=args.input_size)


def _head_or_plain_encoder(args, head):
    from .classifier import head_encoder

    return head_encoder(head, weights=args.weights) if head is not None else _encoder(args)


def _progress() -> bool | None:
    """Progress bars (on stderr) for long commands whenever a person watches; None lets tqdm decide."""
    return True if sys.stderr.isatty() else None


def _cache(args):
    from .embedding.cache import EmbeddingCache

    return None if args.no_cache else EmbeddingCache()


def _load(args, need_encoder: bool = True):
    from .classifier import FewShotClassifier
    from .registry import Registry

    _require_registry(args.registry, args.command)
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

    _require_registry(args.registry, args.command)
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


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _target_tpr(text: str) -> float:
    """A share of known queries to keep, in fewshot.registry.calibration.check_target's range [0.5, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.5 <= value < 1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a share of known queries to keep, in [0.5, 1) (e.g. 0.95); "
                                         f"got {text}")
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


class _Parser(argparse.ArgumentParser):
    """No abbreviations (``--thr`` is an error with a suggestion, not silently ``--threshold``), and
    usage errors in one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.commands: dict[str, _Parser] = {}  # the top-level parser's subcommand parsers

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def option_strings(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings]


def build_parser() -> _Parser:
    # --debug works before or after the command; SUPPRESS keeps a subcommand from resetting it.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    encoder = _Parser(add_help=False)
    encoder.add_argument("--encoder", help="encoder name (default efficientnet_lite0, or any timm model)")
    encoder.add_argument("--weights", help="local weights file for the encoder (.safetensors or torch)")
    encoder.add_argument("--stages", type=_stages, help="intermediate feature stages, e.g. 2,3 (default: final)")
    encoder.add_argument("--pool", type=_pool, help="'avg' (global, the default) or a grid size, e.g. 4")
    encoder.add_argument("--input-size", type=_positive_int, help="input resolution (default: the model's)")
    encoder.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    with_head = _Parser(add_help=False)
    with_head.add_argument("--head", metavar="HEAD", help="trained head (from fewshot train-head)")

    parser = _Parser(prog="fewshot", description="Few-shot image classification: register classes from a few "
                                                 "images, then predict.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"fewshot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices

    p = sub.add_parser("register", parents=[common, encoder, with_head],
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
    _add_embed_parser(sub, parents=[common, encoder])
    _add_export_parser(sub, parents=[common, encoder, with_head])

    p = sub.add_parser("predict", parents=[common, encoder, with_head], help="predict the class of images")
    p.add_argument("registry")
    p.add_argument("paths", nargs="+", help="images or folders of images")
    p.add_argument("--top-k", type=_positive_int, default=5)
    p.add_argument("--threshold", type=_finite_float, help="top-1 similarity below which the answer is 'unknown' "
                   "(default: the thresholds the registry fitted; see fewshot calibrate)")
    p.add_argument("--no-unknown", action="store_true", help="always name the nearest class, never 'unknown'")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--explain", action="store_true", help="name the registered examples nearest to each input "
                   "(source and sha256; registries made with --store-examples)")
    p.add_argument("--neighbours", type=_positive_int, default=3, metavar="N",
                   help="examples shown by --explain (default 3)")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("classes", parents=[common], help="list a registry's classes and example counts")
    p.add_argument("registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_classes)

    p = sub.add_parser("doctor", parents=[common], help="find near-duplicate classes, likely mislabelled examples "
                       "and images in several classes (exit 1 if any)")
    p.add_argument("registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_doctor)

    p = sub.add_parser("remove", parents=[common], help="remove a class")
    p.add_argument("registry")
    p.add_argument("--class", dest="class_name", metavar="NAME", required=True)
    p.set_defaults(run=cmd_remove)

    p = sub.add_parser("rename", parents=[common], help="rename a class")
    p.add_argument("registry")
    p.add_argument("old")
    p.add_argument("new")
    p.set_defaults(run=cmd_rename)

    p = sub.add_parser("calibrate", parents=[common],
                       help="refit a registry's unknown thresholds; measure them on background images")
    p.add_argument("registry")
    p.add_argument("--target-tpr", type=_target_tpr, help="share of known queries to keep (default: the last one "
                   "used, else 0.95)")
    p.add_argument("--background", metavar="DIR", help="folder of images of none of the classes: reports the "
                   "share the threshold accepts")
    p.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_calibrate)

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
    p.add_argument("--lr", type=_positive_float, default=1e-3)
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
    p.add_argument("--episodes", type=_positive_int, help="override the protocol's number of episodes "
                   "(folder sweep: default 600)")
    p.add_argument("--seed", type=int, help="override the protocol's seed (folder sweep: default 0)")
    p.add_argument("--save-episodes", metavar="FILE", help="write the sampled episodes to a manifest")
    p.add_argument("--replay", metavar="FILE", help="evaluate the episodes of a manifest instead of sampling "
                   "(its protocol and dataset are recorded: --data and --protocol are then optional)")
    p.add_argument("--target-tpr", type=_target_tpr, help="open-set protocols (and --unknown-ways): share of known "
                   "queries the fitted threshold should keep (default 0.95)")
    p.add_argument("--out", help="folder for result.json, episodes.csv, confusion.png "
                                 "(default evaluation/<protocol>/<head folder name, or raw>); without "
                                 "--protocol: shots.json and shots.png (default evaluation/<DIR>/shots/...); "
                                 "a default folder holding results already gets a new one beside it (NAME-2, ...)")
    p.add_argument("--force", action="store_true", help="replace the results already in --out")
    _add_sweep_options(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--support-views", choices=SUPPORT_VIEWS_CHOICES, default="none", help="flip: each support image "
                   "also counts mirrored, averaged into one example, as register --support-views flip does")
    p.set_defaults(run=cmd_evaluate)

    _add_serve_parser(sub, [common, encoder, with_head])
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


def _add_sweep_options(p) -> None:
    """Options of ``evaluate --data DIR`` without --protocol: how many images per class are needed."""
    g = p.add_argument_group("your own folder (--data DIR, no --protocol): accuracy against shots")
    g.add_argument("--ways", type=_positive_int, help="classes per episode (default 5, capped by the classes "
                   "with enough images for the largest shot count)")
    g.add_argument("--shots", type=_shot_list, help="shot counts to compare, e.g. 1,2,5,10 (the default)")
    g.add_argument("--queries", type=_positive_int, help="query images per class and episode (default 5)")
    g.add_argument("--unknown-ways", type=_positive_int, help="also classes never registered, only queried: "
                   "adds AUROC, known kept and unknowns accepted at the fitted threshold")


def _shot_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, e.g. 1,2,5,10; got {text!r}")
    return values


def _add_serve_parser(sub, parents) -> None:
    p = sub.add_parser("serve", parents=parents, help="HTTP service and web page over a registry (created if absent)")
    p.add_argument("registry", help="registry directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", metavar="FILE", help="file holding the API key clients must send "
                   "(required for a --host other than loopback)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default 20)")
    p.add_argument("--max-total-upload-mb", type=float, default=200.0,
                   help="upload bytes held for all requests in progress at once (default 200)")
    p.add_argument("--max-batch", type=_positive_int, default=16,
                   help="images per model batch of predictions (1 turns batching off; default 16)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long a prediction waits for others to batch with (default 5)")
    p.add_argument("--compile", choices=["none", "torchscript", "inductor", "auto"], default="torchscript",
                   help="how the encoder's network runs: same features, other speed (default torchscript: "
                        "built once at start-up)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (repeatable; default none)")
    p.add_argument("--max-image-mp", type=float, default=40.0, help="largest image in megapixels as decoded "
                   "(JPEGs decode at reduced size; default 40)")
    p.add_argument("--max-request-mp", type=float, default=160.0,
                   help="megapixels decoded for all images of one request (default 160)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="longest pause in seconds while a client sends a request body (default 30)")
    p.add_argument("--max-connections", type=_positive_int, default=512,
                   help="connections open at once; more are closed on arrival (default 512)")
    p.add_argument("--metric", choices=["cosine", "l2"], help="for a new registry (default cosine)")
    p.add_argument("--index", help="FAISS factory string for a new registry (default auto)")
    p.add_argument("--store-examples", action=argparse.BooleanOptionalAction,
                   help="keep every example embedding (new registry; default on: the unknown threshold is "
                        "fitted from them)")
    p.add_argument("--support-views", choices=SUPPORT_VIEWS_CHOICES, help="flip: register each uploaded image "
                   "with its mirror averaged in, as register --support-views flip (default: the registry's, else none)")
    p.set_defaults(run=cmd_serve)


def _add_embed_parser(sub, parents: list) -> None:
    p = sub.add_parser("embed", parents=parents, help="embed a dataset to Parquet (locally or on Ray); resumes")
    p.add_argument("data", help="dataset folder or zip (classes from its layout), a folder of images, or a .txt "
                                "file listing image paths")
    p.add_argument("--out", required=True, metavar="EMB.parquet", help="Parquet dataset (a folder of parts) to "
                   "write; paths already in it are skipped")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--address", help="Ray cluster address ('auto': the running cluster; default: a local Ray)")
    p.add_argument("--actors", type=_positive_int, help="Ray actors, each loading the encoder once "
                                                         "(default: one per CPU)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per actor call (Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own logs, progress and warnings "
                   "(default: they stay in Ray's log files, /tmp/ray/session_latest/logs)")
    p.set_defaults(run=cmd_embed)


def _add_export_parser(sub, parents: list) -> None:
    p = sub.add_parser("export", parents=parents, help="export the encoder (and head, registry) to ONNX for "
                                                        "deployment with onnxruntime and numpy only")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder to write encoder.onnx, preprocess.json, "
                                                                "... (built aside, then renamed into place)")
    p.add_argument("--force", action="store_true", help="replace --out whole if it exists and is not empty")
    p.add_argument("--registry", metavar="REG", help="also export this registry's prototypes and labels (and the "
                                                     "encoder and head it was built with)")
    p.add_argument("--int8", action="store_true", help="also write encoder.int8.onnx (int8 weights and activations)")
    p.add_argument("--calibration", metavar="DIR", help="with --int8: a few dozen photos like the ones to classify, "
                                                        "to calibrate the int8 activation ranges")
    p.set_defaults(run=cmd_export)


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
