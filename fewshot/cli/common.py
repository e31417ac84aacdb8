"""What the command modules share: the parser and its shared option sets, argument types, printing
untrusted text, and opening the registry, classifier and encoder that a command names."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

from ..errors import ExportError, FewShotError

# fewshot.views.SUPPORT_VIEWS, spelled out: importing that module would load numpy at every start-up.
SUPPORT_VIEWS_CHOICES = ("none", "flip")


class UsageError(Exception):
    """The command line itself is wrong (exit status 2)."""


# -- parsing -----------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """No abbreviations (``--thr`` is an error with a suggestion, not silently ``--threshold``), and
    usage errors in one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.commands: dict[str, Parser] = {}  # the top-level parser's subcommand parsers

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def option_strings(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings]


class Parents(NamedTuple):
    """The option sets that several commands share (argparse parent parsers)."""

    common: Parser  # --debug
    encoder: Parser  # the encoder to create and the embedding cache
    with_head: Parser  # --head


def parent_parsers() -> Parents:
    # --debug works before or after the command; SUPPRESS keeps a subcommand from resetting it.
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    encoder = Parser(add_help=False)
    encoder.add_argument("--encoder", help="encoder name (default efficientnet_lite0, or any timm model)")
    encoder.add_argument("--weights", help="local weights file for the encoder (.safetensors or torch)")
    encoder.add_argument("--stages", type=_stages, help="intermediate feature stages, e.g. 2,3 (default: final)")
    encoder.add_argument("--pool", type=_pool, help="'avg' (global, the default) or a grid size, e.g. 4")
    encoder.add_argument("--input-size", type=positive_int, help="input resolution (default: the model's)")
    encoder.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    with_head = Parser(add_help=False)
    with_head.add_argument("--head", metavar="HEAD", help="trained head (from fewshot train-head)")
    return Parents(common, encoder, with_head)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _stages(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated stage indices like 2,3, got {text}") from None


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def target_tpr(text: str) -> float:
    """A share of known queries to keep, in fewshot.openset.check_target's range [0.5, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.5 <= value < 1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a share of known queries to keep, in [0.5, 1) (e.g. 0.95); "
                                         f"got {text}")
    return value


def _pool(text: str) -> str | int:
    return text if text == "avg" else positive_int(text)


# -- printing ----------------------------------------------------------------------------------
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


# -- what a command names: registry, classifier, encoder --------------------------------------
def registry_exists(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def open_for_writing(args):
    """The classifier at args.registry (created if absent), holding its writer lock."""
    from ..classifier import FewShotClassifier

    if registry_exists(args.registry):
        views = {"support_views": args.support_views} if args.support_views else {}  # else the saved one
        return FewShotClassifier.open(args.registry, encoder=args.encoder, weights=args.weights, head=args.head,
                                      cache=not args.no_cache, **views)
    encoder = None if args.head else make_encoder(args)
    return FewShotClassifier.open(args.registry, encoder=encoder or "efficientnet_lite0", head=args.head,
                                  weights=args.weights, metric=args.metric or "cosine", index=args.index or "auto",
                                  store_examples=args.store_examples is not False, cache=not args.no_cache,
                                  support_views=args.support_views or "none")


def require_registry(path: str, command: str) -> None:
    if not registry_exists(path) and Path(path).exists():
        raise FewShotError(f"{path} is not a registry (it holds no manifest.json); the registry comes "
                           f"first: fewshot {command} REGISTRY ...")
    if not registry_exists(path):
        raise FewShotError(f"no registry at {path}; create one with "
                           f"`fewshot register {path} --class NAME IMAGES...`")


def make_encoder(args):
    from ..embedding.encoders import create_encoder

    return create_encoder(args.encoder or "efficientnet_lite0", weights=args.weights, stages=args.stages,
                          pool=args.pool if args.pool is not None else "avg", input_size=args.input_size)


def head_or_plain_encoder(args, head):
    from ..classifier import head_encoder

    return head_encoder(head, weights=args.weights) if head is not None else make_encoder(args)


def progress_bars() -> bool | None:
    """Progress bars (on stderr) for long commands whenever a person watches; None lets tqdm decide."""
    return True if sys.stderr.isatty() else None


def embedding_cache(args):
    from ..embedding.cache import EmbeddingCache

    return None if args.no_cache else EmbeddingCache()


def load_classifier(args, need_encoder: bool = True, onnx: bool = False):
    """The classifier of the registry args.registry. ``onnx``: its encoder (and head) run from their cached ONNX
    exports where they can (``onnx_classifier``), unless the command names another encoder, weights or head."""
    from ..classifier import FewShotClassifier
    from ..registry import Registry

    require_registry(args.registry, args.command)
    if not need_encoder:  # listing, removing and renaming never run the network
        return FewShotClassifier.over_registry(Registry.load(args.registry))
    named = {key: getattr(args, key, None) for key in ("encoder", "weights", "head")}
    if onnx and not any(named.values()):
        return onnx_classifier(args.registry, cache=not args.no_cache)
    return FewShotClassifier.load(args.registry, **named, cache=not args.no_cache)


def onnx_classifier(registry: str, *, cache: bool):
    """The classifier of ``registry`` with its encoder and head run by onnxruntime from their cached ONNX exports
    (numpy/Pillow preprocessing, no torch imported). The first time, the torch classifier exports them for this call
    and the next ones; where that cannot be done, torch runs, after one warning."""
    from ..classifier import FewShotClassifier
    from ..embedding.onnx_encoder import cached_onnx_parts, export_onnx_parts
    from ..registry import Registry

    fingerprint, metric = Registry.saved_fingerprint(registry)
    unusable = (ImportError, ExportError, OSError, KeyError, TypeError, ValueError)  # e.g. a read-only cache
    try:
        parts = cached_onnx_parts(fingerprint, metric)
    except unusable as exc:
        _warn_torch_runs(exc)
        return FewShotClassifier.load(registry, cache=cache)
    if parts is None:
        classifier = FewShotClassifier.load(registry, cache=cache)
        try:
            export_onnx_parts(classifier.encoder_, classifier.head_)
            parts = cached_onnx_parts(fingerprint, metric)
        except unusable as exc:
            _warn_torch_runs(exc)
            return classifier
        if parts is None:  # the cache folder lost the files already: next time
            return classifier
    encoder, head = parts
    return FewShotClassifier.load(registry, encoder=encoder, head=head, cache=cache)


def _warn_torch_runs(reason: Exception) -> None:
    warnings.warn(f"the model runs with torch: it has no usable ONNX export ({type(reason).__name__}: "
                  f"{' '.join(str(reason).split())[:300]})", RuntimeWarning, stacklevel=3)
