"""Commands that measure: evaluate (protocols, fixed runs, shot sweeps on a folder) and compare-encoders."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from ..errors import FewShotError
from .common import (SUPPORT_VIEWS_CHOICES, Parents, UsageError, embedding_cache, head_or_plain_encoder,
                     positive_int, progress_bars, target_tpr)


def cmd_evaluate(args) -> int:
    from ..learning.heads import load_head
    from ..workflows import evaluate_protocol, evaluate_runs, resolve_dataset

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
    encoder = head_or_plain_encoder(args, head)
    if args.runs:
        result = evaluate_runs(args.runs, encoder, head=head, cache=embedding_cache(args), progress=progress_bars())
        name = Path(args.runs).name
    elif protocol.unknown_ways:
        return _evaluate_open_set(args, protocol, data, encoder, head)
    elif protocol.runs:
        result = evaluate_runs(_runs_folder(data, protocol), encoder, head=head, cache=embedding_cache(args),
                               progress=progress_bars())
        name = protocol.name
    else:
        result = evaluate_protocol(resolve_dataset(data, protocol), protocol, encoder, head=head,
                                   episodes=args.episodes, seed=args.seed, cache=embedding_cache(args),
                                   save_episodes=args.save_episodes, replay=args.replay, progress=progress_bars(),
                                   support_views=args.support_views)
        name = protocol.name
    if head is not None:
        result.provenance["head"]["path"] = str(Path(args.head).resolve())
    # Results of raw features and of each head (and with support views) go to folders of their own.
    folder = _result_folder(args.head) + ("" if args.support_views == "none" else f"+{args.support_views}-views")
    return _save_and_report(args, result, Path("evaluation") / name / folder, result.summary())


def _protocol_and_data(args):
    """The protocol and dataset of an evaluation: as given, else as the --replay manifest records them."""
    from ..data.protocols import load_protocol, manifest_origin

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
    from ..workflows import evaluate_open_set_protocol, resolve_dataset

    result = evaluate_open_set_protocol(resolve_dataset(data, protocol), protocol, encoder, head=head,
                                        episodes=args.episodes, seed=args.seed, target_tpr=args.target_tpr,
                                        cache=embedding_cache(args), progress=progress_bars())
    return _save_and_report(args, result, Path("evaluation") / protocol.name / _result_folder(args.head),
                            result.summary())


def _evaluate_own_folder(args) -> int:
    """``fewshot evaluate --data DIR`` without a protocol: accuracy (and AUROC) against shot count."""
    from ..data.datasets import load_dataset
    from ..learning.heads import load_head
    from ..evaluation.sweep import shots_sweep

    if args.save_episodes:
        raise UsageError("--save-episodes needs --protocol; a folder sweep replays exactly from --seed")
    dataset = load_dataset(args.data)  # before the slow part
    head = load_head(args.head) if args.head else None
    given = {name: getattr(args, name) for name in ("ways", "shots", "queries", "unknown_ways", "episodes", "seed",
                                                    "target_tpr") if getattr(args, name) is not None}
    result = shots_sweep(dataset, head_or_plain_encoder(args, head), head=head, cache=embedding_cache(args),
                         progress=progress_bars(), **given)  # what is not given takes shots_sweep's defaults
    default_out = Path("evaluation") / Path(args.data).stem / "shots" / _result_folder(args.head)
    return _save_and_report(args, result, default_out, result.table())


def _save_and_report(args, result, default_out: Path, text: str) -> int:
    """Save an evaluation's files (to --out, else to ``default_out`` or, where that holds earlier results,
    a new ``default_out-N``), then print it as JSON or as ``text``, and the files written (on stderr
    with --json)."""
    from ..evaluation.evaluate import new_result_folder

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


def cmd_compare_encoders(args) -> int:
    from ..evaluation.compare import compare_encoders, format_table, plot_comparison, rows_as_dicts
    from ..data.datasets import load_dataset

    rows = compare_encoders(load_dataset(args.data), args.encoder or None, shots=args.shots,
                            ways=None if args.ways == "all" else args.ways, queries=args.queries,
                            episodes=args.episodes, seed=args.seed, speed_images=args.speed_images,
                            max_per_class=args.max_per_class, cache=embedding_cache(args))
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


def _add_evaluate(sub, parents: Parents) -> None:
    p = sub.add_parser("evaluate", parents=[parents.common, parents.encoder, parents.with_head],
                       help="episodic evaluation: accuracy with a 95%% CI, per-class accuracy, confusion PNG")
    p.add_argument("--data", help="dataset, or the folder holding the protocol's dataset")
    p.add_argument("--protocol", help="protocol file (see episodes/)")
    p.add_argument("--runs", help="folder of fixed-episode runs (Omniglot one-shot format)")
    p.add_argument("--episodes", type=positive_int, help="override the protocol's number of episodes "
                   "(folder sweep: default 600)")
    p.add_argument("--seed", type=int, help="override the protocol's seed (folder sweep: default 0)")
    p.add_argument("--save-episodes", metavar="FILE", help="write the sampled episodes to a manifest")
    p.add_argument("--replay", metavar="FILE", help="evaluate the episodes of a manifest instead of sampling "
                   "(its protocol and dataset are recorded: --data and --protocol are then optional)")
    p.add_argument("--target-tpr", type=target_tpr, help="open-set protocols (and --unknown-ways): share of known "
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


def _add_sweep_options(p) -> None:
    """Options of ``evaluate --data DIR`` without --protocol: how many images per class are needed."""
    g = p.add_argument_group("your own folder (--data DIR, no --protocol): accuracy against shots")
    g.add_argument("--ways", type=positive_int, help="classes per episode (default 5, capped by the classes "
                   "with enough images for the largest shot count)")
    g.add_argument("--shots", type=_shot_list, help="shot counts to compare, e.g. 1,2,5,10 (the default)")
    g.add_argument("--queries", type=positive_int, help="query images per class and episode (default 5)")
    g.add_argument("--unknown-ways", type=positive_int, help="also classes never registered, only queried: "
                   "adds AUROC, known kept and unknowns accepted at the fitted threshold")


def _shot_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, e.g. 1,2,5,10; got {text!r}")
    return values


def _add_compare_encoders(sub, parents: Parents) -> None:
    p = sub.add_parser("compare-encoders", parents=[parents.common],
                       help="rank encoders on your folder: few-shot accuracy (95%% CI), images/s, dimension, PNG")
    p.add_argument("--data", required=True, help="folder or zip, one subfolder per class")
    p.add_argument("--encoder", action="append", metavar="NAME",
                   help="encoder to compare, repeatable; NAME@SIZE sets its resolution, A+B an ensemble "
                        "(default: every offline encoder, and all of them together)")
    p.add_argument("--ways", type=_ways, default="all", help="classes per episode, or 'all' (default)")
    p.add_argument("--shots", type=positive_int, default=1)
    p.add_argument("--queries", type=positive_int, default=5)
    p.add_argument("--episodes", type=positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-images", type=int, default=32, help="images timed per encoder, uncached (0: skip)")
    p.add_argument("--max-per-class", type=positive_int, help="use only each class's first N images (faster)")
    p.add_argument("--out", default="compare-encoders", help="folder for encoders.json and encoders.png")
    p.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_compare_encoders)


def _ways(text: str) -> str | int:
    return text if text == "all" else positive_int(text)


def add_parsers(sub, parents: Parents, names: Iterable[str] | None = None) -> None:
    """Add this module's commands to ``sub``: those in ``names``, in that order, else all of them."""
    adders = {"evaluate": _add_evaluate, "compare-encoders": _add_compare_encoders}
    for name in adders if names is None else names:
        adders[name](sub, parents)
