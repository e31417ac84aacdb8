"""The ``fewshot`` command: parses arguments, calls the Python API, prints results.

Exit status: 0 on success, 1 when something failed at run time (a bad image, a corrupt registry;
the good items are still processed and saved) or when ``doctor`` found something, 2 for a usage
error. Errors are one line on stderr; ``--debug`` shows the traceback.

This module parses and runs; the commands live by group in ``registry`` (register, predict, classes,
doctor, remove, rename, calibrate, info), ``evaluation`` (evaluate, compare-encoders), ``training``
(train-head, finetune) and ``deploy`` (embed, export, serve, demo), each adding its own parsers;
``common`` holds what they share.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .. import __version__
from ..errors import FewShotError
from . import deploy, evaluation, registry, training
from .common import (SUPPORT_VIEWS_CHOICES, Parser, UsageError, display_label, escape_text, parent_parsers,
                     registry_exists)

__all__ = ["SUPPORT_VIEWS_CHOICES", "UsageError", "build_parser", "display_label", "escape_text", "main"]

# Each module adds its own commands; `fewshot --help` lists them in this order.
_HELP_ORDER = ((registry, ["register"]), (deploy, ["embed", "export"]),
               (registry, ["predict", "classes", "doctor", "remove", "rename", "calibrate"]),
               (training, ["train-head", "finetune", "adapt"]), (evaluation, ["evaluate"]), (deploy, ["serve"]),
               (evaluation, ["compare-encoders"]), (registry, ["info"]), (deploy, ["demo"]))


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


def _suggestion(parser: Parser, command: str, extra: list[str]) -> str:
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
    if args.command == "register" and registry_exists(args.registry):
        from ..registry import Registry

        counts = Registry.saved_counts(args.registry)
        return (f"{args.registry} is as this command found it ({len(counts)} class(es), {sum(counts.values())} "
                f"image(s)): a register is saved at its end{cached}: run the same command again")
    return f"nothing was saved{cached}: run the same command again"


def build_parser() -> Parser:
    parents = parent_parsers()
    parser = Parser(prog="fewshot", description="Few-shot image classification: register classes from a few "
                                                "images, then predict.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"fewshot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices
    for module, names in _HELP_ORDER:
        module.add_parsers(sub, parents, names)
    return parser
