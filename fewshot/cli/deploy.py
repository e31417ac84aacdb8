"""Commands that put a model to work: embed (datasets to Parquet), export (ONNX bundle), serve (HTTP), demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from ..errors import FewShotError
from .common import (SUPPORT_VIEWS_CHOICES, Parents, UsageError, head_or_plain_encoder, load_classifier,
                     open_for_writing, positive_int, progress_bars)


def cmd_embed(args) -> int:
    """`embed DATA --out EMB.parquet`: embed a dataset to Parquet, locally or on Ray; resumes."""
    from ..jobs import embed_to_parquet

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
    from ..export import export_bundle
    from ..learning.heads import load_head

    if args.int8 and not args.calibration:
        raise UsageError("--int8 needs --calibration DIR: a few dozen photos like the ones to classify")
    if args.head and args.registry:
        raise UsageError("give --head or --registry, not both: a registry exports the head it was built with")
    if args.registry:
        classifier = load_classifier(args)
        files = export_bundle(args.out, encoder=classifier.encoder_, head=classifier.head_,
                              registry=classifier.registry_, temperature=classifier.temperature_,
                              unknown_threshold=classifier.unknown_threshold, unknown=classifier.unknown,
                              int8=args.int8, calibration=args.calibration, force=args.force)
    else:
        head = load_head(args.head) if args.head else None
        files = export_bundle(args.out, encoder=head_or_plain_encoder(args, head), head=head, int8=args.int8,
                              calibration=args.calibration, force=args.force)
    for role, path in files.items():
        print(f"{role}\t{path}")
    return 0


def cmd_serve(args) -> int:
    """Serve the registry over HTTP (and the web page) until interrupted; see the README's "Serve it"."""
    try:
        from ..serve import ServeSettings, is_loopback, listen, read_api_key, run
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
    with listen(args.host, args.port) as sock, open_for_writing(args) as classifier:  # then the lock error
        classifier.progress = False
        host, port = sock.getsockname()[:2]
        address = f"[{host}]" if ":" in host else host
        print(f"fewshot serve: {args.registry} on http://{address}:{port}/ (Ctrl-C stops)", flush=True)
        run(classifier, settings, host=args.host, port=args.port, sock=sock)
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    return run_demo(data=args.data, out=Path(args.out), shots=args.shots, seed=args.seed,
                    encoder=args.encoder, weights=args.weights, progress=progress_bars())


def _add_embed(sub, parents: Parents) -> None:
    p = sub.add_parser("embed", parents=[parents.common, parents.encoder],
                       help="embed a dataset to Parquet (locally or on Ray); resumes")
    p.add_argument("data", help="dataset folder or zip (classes from its layout), a folder of images, or a .txt "
                                "file listing image paths")
    p.add_argument("--out", required=True, metavar="EMB.parquet", help="Parquet dataset (a folder of parts) to "
                   "write; paths already in it are skipped")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--address", help="Ray cluster address ('auto': the running cluster; default: a local Ray)")
    p.add_argument("--actors", type=positive_int, help="Ray actors, each loading the encoder once "
                                                        "(default: one per CPU)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per actor call (Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own logs, progress and warnings "
                   "(default: they stay in Ray's log files, /tmp/ray/session_latest/logs)")
    p.set_defaults(run=cmd_embed)


def _add_export(sub, parents: Parents) -> None:
    p = sub.add_parser("export", parents=[parents.common, parents.encoder, parents.with_head],
                       help="export the encoder (and head, registry) to ONNX for deployment with "
                            "onnxruntime and numpy only")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder to write encoder.onnx, preprocess.json, "
                                                                "... (built aside, then renamed into place)")
    p.add_argument("--force", action="store_true", help="replace --out whole if it exists and is not empty")
    p.add_argument("--registry", metavar="REG", help="also export this registry's prototypes and labels (and the "
                                                     "encoder and head it was built with)")
    p.add_argument("--int8", action="store_true", help="also write encoder.int8.onnx (int8 weights and activations)")
    p.add_argument("--calibration", metavar="DIR", help="with --int8: a few dozen photos like the ones to classify, "
                                                        "to calibrate the int8 activation ranges")
    p.set_defaults(run=cmd_export)


def _add_serve(sub, parents: Parents) -> None:
    p = sub.add_parser("serve", parents=[parents.common, parents.encoder, parents.with_head],
                       help="HTTP service and web page over a registry (created if absent)")
    p.add_argument("registry", help="registry directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", metavar="FILE", help="file holding the API key clients must send "
                   "(required for a --host other than loopback)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default 20)")
    p.add_argument("--max-total-upload-mb", type=float, default=200.0,
                   help="upload bytes held for all requests in progress at once (default 200)")
    p.add_argument("--max-batch", type=positive_int, default=16,
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
    p.add_argument("--max-connections", type=positive_int, default=512,
                   help="connections open at once; more are closed on arrival (default 512)")
    p.add_argument("--metric", choices=["cosine", "l2"], help="for a new registry (default cosine)")
    p.add_argument("--index", help="FAISS factory string for a new registry (default auto)")
    p.add_argument("--store-examples", action=argparse.BooleanOptionalAction,
                   help="keep every example embedding (new registry; default on: the unknown threshold is "
                        "fitted from them)")
    p.add_argument("--support-views", choices=SUPPORT_VIEWS_CHOICES, help="flip: register each uploaded image "
                   "with its mirror averaged in, as register --support-views flip (default: the registry's, else none)")
    p.set_defaults(run=cmd_serve)


def _add_demo(sub, parents: Parents) -> None:
    p = sub.add_parser("demo", parents=[parents.common, parents.encoder],
                       help="offline demo on bundled images (or --data DIR)")
    p.add_argument("--data", metavar="DIR", help="your own folder, one subfolder per class")
    p.add_argument("--out", default="demo-output", help="folder for the contact sheet (default demo-output)")
    p.add_argument("--shots", type=positive_int, default=5, help="support images per class (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_demo)


def add_parsers(sub, parents: Parents, names: Iterable[str] | None = None) -> None:
    """Add this module's commands to ``sub``: those in ``names``, in that order, else all of them."""
    adders = {"embed": _add_embed, "export": _add_export, "serve": _add_serve, "demo": _add_demo}
    for name in adders if names is None else names:
        adders[name](sub, parents)
