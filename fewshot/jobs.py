"""Embedding jobs: a folder, zip or list of images -> a Parquet dataset of embeddings, on one machine or on Ray.

``embed_to_parquet(data, out)`` embeds every image once and writes, per image, its path, the sha256 of its
bytes, its class (and group) where the dataset layout gives one, the embedding (a fixed-size float32 list)
and, if it failed, the error (its embedding is then null). The encoder's fingerprint sits in every file's
metadata, so embeddings of different encoders are never mixed.

``out`` is a Parquet dataset: a folder of part files, each written to a temporary name and renamed when
complete. A job that stops (crash, Ctrl-C, lost node) leaves only whole parts behind, and the next run
skips every path already written. A bad image fails its row alone; the job never fails for it.

Engines: ``"local"`` embeds in this process (needs pyarrow only). ``"ray"`` streams the images through Ray
Data's ``map_batches`` over a pool of actors that each load the encoder once; this process writes the parts
as batches come back. ``address`` is passed to ``ray.init`` (``"auto"``: a running cluster; None: a local
Ray on this machine). Ray's own logs, progress and warnings stay in its log files (``/tmp/ray/session_latest``)
unless ``verbose``: the user's stderr shows fewshot's progress bar alone.

``register_embeddings(registry, out)`` builds (or extends) a registry from such a dataset at bulk speed,
refusing embeddings of another encoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import EncoderMismatchError
from .streams import descriptor_silenced

ENGINES = ("local", "ray")
FINGERPRINT_KEY = b"fewshot.encoder"  # Parquet file metadata: the encoder fingerprint, as JSON
MAX_FINGERPRINT_BYTES = 64 * 2**10  # a fingerprint is a few hundred bytes; a bigger one is not ours
PART_PREFIX = "part-"
DEFAULT_PART_ROWS = 1024  # images per part file: the unit of progress that survives a crash
DEFAULT_BATCH_SIZE = 64  # images per actor call with Ray
LIST_SUFFIXES = (".txt", ".lst")  # a text file of image paths, one per line


@dataclass(frozen=True)
class Source:
    """One image to embed: where to read it, and its class and group when the layout gives them."""

    path: str  # file path, or "<zip>:<member>" for zip members
    zip: str | None = None
    member: str | None = None
    label: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class JobReport:
    """What ``embed_to_parquet`` did."""

    out: str
    written: int  # rows written by this run (including failed images)
    failed: int  # of which the image could not be embedded (see the errors column)
    skipped: int  # already in ``out`` from an earlier run


@dataclass(frozen=True)
class EmbeddingTable:
    """The rows of an embeddings dataset that embedded fine (``read_embeddings``)."""

    fingerprint: dict
    paths: list[str]
    sha256: list[str]
    labels: list[str | None]
    groups: list[str | None]
    vectors: np.ndarray  # (N, dim) float32
    failed: int  # rows with an error (not included above)


# -- listing the input ------------------------------------------------------------------------
def list_sources(data: str | os.PathLike | Iterable[str]) -> list[Source]:
    """The images of a dataset folder or zip (with classes), a text file listing image paths, or a list
    of paths. A folder whose images do not follow a class layout is taken as images without classes."""
    from .data.datasets import load_dataset
    from .embedding.images import expand_inputs

    if not isinstance(data, (str, os.PathLike)):
        return [Source(path=os.fspath(p)) for p in expand_inputs(list(data))]
    path = Path(data)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [Source(path=line.strip()) for line in lines if line.strip() and not line.startswith("#")]
    try:
        dataset = load_dataset(path)
    except ValueError:
        if not path.is_dir():
            raise
        return [Source(path=p) for p in expand_inputs(path)]  # loose images, no class layout
    sources = []
    for item, name, label in zip(dataset.items, dataset.names, dataset.labels):
        group = name.split("/")[0] if dataset.groups is not None else None
        if isinstance(item, bytes):  # a zip member ("<zip>:<member>"): read again when embedded, not kept
            member = item.name[len(os.fspath(path)) + 1:]
            sources.append(Source(path=item.name, zip=os.fspath(path), member=member, label=dataset.classes[label],
                                  group=group))
        else:
            sources.append(Source(path=item, label=dataset.classes[label], group=group))
    return sources


def read_sources(sources: list[Source]) -> tuple[list, list[str | None], list[str | None]]:
    """Read each source's bytes: (items for the encoder, sha256 per item, read error per item)."""
    from .files import open_regular
    from .embedding.images import NamedBytes

    items, digests, errors = [], [], []
    archives: dict[str, zipfile.ZipFile] = {}
    try:
        for src in sources:
            try:
                if src.zip is not None:
                    if src.zip not in archives:
                        archives[src.zip] = zipfile.ZipFile(src.zip)
                    data = archives[src.zip].read(src.member)
                else:
                    f = open_regular(src.path)
                    if f is None:
                        raise ValueError("not a regular file")
                    with f:
                        data = f.read()
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                items.append(None)
                digests.append(None)
                errors.append(f"{src.path}: cannot read it ({exc})")
                continue
            items.append(NamedBytes(data, src.path))
            digests.append(hashlib.sha256(data).hexdigest())
            errors.append(None)
    finally:
        for archive in archives.values():
            archive.close()
    return items, digests, errors


def embed_sources(encoder, sources: list[Source], *, batch_size: int | None = None) -> dict:
    """Read and embed ``sources``; the columns of their Parquet rows (see ``rows_table``)."""
    from .embedding.encoders import DEFAULT_BATCH_SIZE as ENCODER_BATCH

    items, digests, errors = read_sources(sources)
    vectors = np.full((len(sources), encoder.dim), np.nan, dtype=np.float32)
    readable = [i for i, item in enumerate(items) if item is not None]
    if readable:
        result = encoder.embed_batch([items[i] for i in readable], batch_size=batch_size or ENCODER_BATCH,
                                     progress=False)
        vectors[readable] = result.vectors
        for i, err in zip(readable, result.errors):
            errors[i] = err
    for i in range(len(sources)):
        if errors[i] is None and not np.isfinite(vectors[i]).all():
            errors[i] = f"{sources[i].path}: its embedding is not finite (NaN or infinity); check the encoder weights"
    return {"path": [s.path for s in sources], "sha256": digests, "class": [s.label for s in sources],
            "group": [s.group for s in sources], "embedding": vectors, "error": errors}


# -- the Parquet dataset --------------------------------------------------------------------------
def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("embedding jobs need pyarrow: pip install 'fewshot[jobs]'") from exc
    return pa, pq


def rows_table(columns: dict, fingerprint: dict):
    """An Arrow table of embedding rows, the encoder fingerprint in its schema metadata."""
    pa, _ = _pyarrow()
    vectors = np.asarray(columns["embedding"], dtype=np.float32)
    dim = vectors.shape[1]
    failed = np.array([e is not None for e in columns["error"]], dtype=bool)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim,
                                                  mask=pa.array(failed) if failed.any() else None)
    schema = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("class", pa.string()),
                        ("group", pa.string()), ("embedding", pa.list_(pa.float32(), dim)), ("error", pa.string())],
                       metadata={FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True).encode()})
    arrays = [pa.array(list(columns[name]), pa.string()) for name in ("path", "sha256", "class", "group")]
    return pa.Table.from_arrays([*arrays, embedding, pa.array(list(columns["error"]), pa.string())], schema=schema)


def write_part(out: Path, table) -> Path:
    """Write one part file atomically: a reader (or a resumed job) never sees half of it."""
    _, pq = _pyarrow()
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"
    tmp = out / f".{final.name}.tmp"
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def part_files(out: str | os.PathLike) -> list[Path]:
    """The complete part files of an embeddings dataset (a single .parquet file counts as one part)."""
    out = Path(out)
    if out.is_file():
        return [out]
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name.startswith(PART_PREFIX) and p.suffix == ".parquet")


def dataset_fingerprint(out: str | os.PathLike) -> dict | None:
    """The encoder fingerprint of an embeddings dataset (None if it has no parts yet); parts that
    disagree are refused."""
    _, pq = _pyarrow()
    found = None
    for part in part_files(out):
        fingerprint = _part_fingerprint(pq.read_schema(part), part)
        if found is not None and fingerprint != found:
            raise EncoderMismatchError(f"{part} holds embeddings of another encoder than the other parts of {out}")
        found = fingerprint
    return found


def _part_fingerprint(schema, part: Path) -> dict:
    """The part's encoder fingerprint, once it and the part's columns are checked to be what
    ``fewshot embed`` writes (a tampered file is refused before any row is read)."""
    from .embedding.encoders import check_fingerprint
    from .registry import MAX_DIM

    raw = (schema.metadata or {}).get(FINGERPRINT_KEY)
    if raw is None:
        raise ValueError(f"{part} is not a fewshot embeddings file (no encoder fingerprint in its metadata); "
                         f"write it with `fewshot embed`")
    redo = "embed the images again with `fewshot embed`"
    try:
        if len(raw) > MAX_FINGERPRINT_BYTES:
            raise ValueError(f"{len(raw)} bytes")
        fingerprint = json.loads(raw)
        check_fingerprint(fingerprint)
        dim = (fingerprint.get("features") or {}).get("dim")
        if type(dim) is not int or not 1 <= dim <= MAX_DIM:
            raise ValueError(f"features.dim must be an integer in 1..{MAX_DIM}")
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{part}: malformed encoder fingerprint ({str(e)[:200]}); {redo}") from None
    _check_columns(schema, part, dim, redo)
    return fingerprint


def _check_columns(schema, part: Path, dim: int, redo: str) -> None:
    """Every column ``rows_table`` writes, of its type; embeddings ``dim`` float32 each."""
    pa, _ = _pyarrow()
    for name in ("path", "sha256", "class", "group", "embedding", "error"):
        if schema.get_field_index(name) < 0:
            raise ValueError(f"{part} has no '{name}' column (or several); {redo}")
        kind = schema.field(name).type
        if name != "embedding" and kind != pa.string():
            raise ValueError(f"{part}: column '{name}' holds {str(kind)[:100]}, not text; {redo}")
    kind = schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(kind) and kind.list_size == dim and kind.value_type == pa.float32()):
        raise ValueError(f"{part}: column 'embedding' holds {str(kind)[:100]}, not the {dim} float32 numbers "
                         f"per image its encoder fingerprint says; {redo}")


def written_paths(out: str | os.PathLike) -> set[str]:
    """Paths that an earlier run already wrote (embedded or failed)."""
    _, pq = _pyarrow()
    done: set[str] = set()
    for part in part_files(out):
        done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
    return done


def read_embeddings(path: str | os.PathLike) -> EmbeddingTable:
    """The rows of an embeddings dataset (folder of parts, or one .parquet file) that embedded fine."""
    import pyarrow.compute as pc

    pa, pq = _pyarrow()
    parts = part_files(path)
    if not parts:
        raise ValueError(f"no embeddings at {path}; write them with `fewshot embed DATA --out {path}`")
    fingerprint = dataset_fingerprint(path)
    table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="none")
    ok = pc.and_(pc.is_null(table.column("error")), pc.is_valid(table.column("embedding")))  # else failed
    good = table.filter(ok)
    dim = good.schema.field("embedding").type.list_size
    vectors = good.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return EmbeddingTable(
        fingerprint=fingerprint, paths=good.column("path").to_pylist(), sha256=good.column("sha256").to_pylist(),
        labels=good.column("class").to_pylist(), groups=good.column("group").to_pylist(),
        vectors=np.ascontiguousarray(vectors.reshape(-1, dim), dtype=np.float32),
        failed=len(table) - len(good))


# -- running a job --------------------------------------------------------------------------------
def embed_to_parquet(data, out: str | os.PathLike, *, encoder=None, engine: str = "local",
                     address: str | None = None, actors: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                     part_rows: int = DEFAULT_PART_ROWS, progress: bool | None = None,
                     verbose: bool = False) -> JobReport:
    """Embed the images of ``data`` into the Parquet dataset ``out``, skipping those already there.

    ``encoder``: an ``Encoder``, or ``create_encoder`` keyword arguments as a dict (the form Ray actors
    rebuild it from; default: the default encoder). ``engine``: "local" or "ray" (``address``, ``actors``:
    the actors' pool size, default one per CPU Ray offers; ``batch_size``: images per actor call).
    ``part_rows``: images per part file. ``verbose``: let Ray's own logs, progress bars and warnings through
    (default: only fewshot's progress). Resuming with another encoder raises ``EncoderMismatchError``.
    """
    from tqdm.auto import tqdm

    from .embedding.encoders import Encoder, create_encoder

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    for name, value in (("batch_size", batch_size), ("part_rows", part_rows), ("actors", actors)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    _pyarrow()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; embedding jobs write a folder of Parquet parts, give a new path")
    model = encoder if isinstance(encoder, Encoder) else create_encoder(**(encoder or {}))
    spec = dict(encoder) if isinstance(encoder, dict) else encoder_spec(model)
    previous = dataset_fingerprint(out)
    if previous is not None and previous != model.fingerprint:
        raise EncoderMismatchError(f"{out} holds embeddings of another encoder; resume with the encoder that "
                                   f"started it, or write to a new --out")
    sources = list_sources(data)
    done = written_paths(out)
    todo = [s for s in sources if s.path not in done]
    written = failed = 0
    quiet = _ray_kept_off_stderr() if engine == "ray" and todo and not verbose else contextlib.nullcontext()
    with quiet, tqdm(total=len(todo), desc=f"embedding ({engine})", unit="img",
                     disable=progress is False or None) as bar:
        batches = (_local_batches(model, todo, part_rows) if engine == "local" else
                   _ray_batches(spec, model, todo, address, actors, batch_size, part_rows, verbose))
        for columns in batches:
            write_part(out, rows_table(columns, model.fingerprint))
            n = len(columns["path"])
            written += n
            failed += sum(e is not None for e in columns["error"])
            bar.update(n)
    return JobReport(out=str(out), written=written, failed=failed, skipped=len(sources) - len(todo))


def _local_batches(encoder, todo: list[Source], part_rows: int) -> Iterator[dict]:
    for start in range(0, len(todo), part_rows):
        yield embed_sources(encoder, todo[start:start + part_rows])


class EmbedActor:
    """A Ray Data actor: loads the encoder once, then embeds batches of sources (``map_batches``)."""

    def __init__(self, spec: dict, fingerprint: dict):
        from .embedding.encoders import create_encoder

        self.encoder = create_encoder(**spec)
        if self.encoder.fingerprint != fingerprint:  # e.g. another weights file on this node
            raise EncoderMismatchError("this worker's encoder differs from the driver's (other weights or "
                                       "package versions); install the same on every node")

    def __call__(self, batch: dict) -> dict:
        sources = [Source(path=str(p), zip=_none(z), member=_none(m), label=_none(c), group=_none(g))
                   for p, z, m, c, g in zip(batch["path"], batch["zip"], batch["member"], batch["class"],
                                            batch["group"])]
        columns = embed_sources(self.encoder, sources)
        # Ray's numpy batches hold no None: empty strings stand for "none" here and are restored by the driver.
        return {key: (np.array(["" if v is None else v for v in values], dtype=object) if key != "embedding"
                      else values) for key, values in columns.items()}


def _none(value) -> str | None:
    return None if value is None or value == "" else str(value)


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError("engine='ray' needs Ray Data: pip install 'fewshot[jobs]'") from exc
    return ray


@contextlib.contextmanager
def _ray_kept_off_stderr() -> Iterator[None]:
    """Ray's own logs, progress bars and warnings off the user's stderr while a job runs; they stay in Ray's log
    files, and every setting is restored afterwards.

    Python: the console handlers of Ray Data's "ray.data" logger at ERROR (its file handler keeps everything),
    its progress bars and start banner off, Ray's warnings ignored (``ray.init``'s ``logging_level`` and
    ``log_to_driver`` quiet the "ray" logger and the actors). C++: Ray's core in this process copies the errors it
    logs to its file onto file descriptor 2, among them a spurious one per Ray Data actor (ray#57733), and no Ray
    setting turns that copy off, so fd 2 points at /dev/null meanwhile."""
    ray = _import_ray()
    context = ray.data.DataContext.get_current()
    consoles = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    saved = context.enable_progress_bars, context.print_on_execution_start, [h.level for h in consoles]
    context.enable_progress_bars = context.print_on_execution_start = False
    for handler in consoles:
        handler.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), descriptor_silenced(2, keep_python_stream=True):
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")
            yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved[:2]
        for handler, level in zip(consoles, saved[2]):
            handler.setLevel(level)


def _start_ray(address: str | None, verbose: bool) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR)


def _ray_batches(spec: dict, encoder, todo: list[Source], address: str | None, actors: int | None,
                 batch_size: int, part_rows: int, verbose: bool = False) -> Iterator[dict]:
    if not todo:
        return
    ray = _import_ray()
    _start_ray(address, verbose)
    rows = [{"path": s.path, "zip": s.zip or "", "member": s.member or "", "class": s.label or "",
             "group": s.group or ""} for s in todo]
    # An actor embeds many small batches: pick the fast network once (same features), unless told otherwise.
    # (The local engine's calls of DEFAULT_PART_ROWS images get the same from runtime="auto".)
    spec = {"runtime": "onnxruntime", "compile": "torchscript", **spec}
    blocks = -(-len(rows) // batch_size)  # one block per actor call, not Ray's default of one per row here
    # no more actors than blocks: each loads the encoder, and one without a block would idle
    pool = min(blocks, actors or max(1, int(ray.available_resources().get("CPU", 1))))
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        EmbedActor, fn_constructor_kwargs={"spec": spec, "fingerprint": encoder.fingerprint},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=pool), num_cpus=1, batch_format="numpy")
    for batch in ds.iter_batches(batch_size=part_rows, batch_format="numpy"):
        yield {"path": [str(p) for p in batch["path"]], "sha256": [_none(v) for v in batch["sha256"]],
               "class": [_none(v) for v in batch["class"]], "group": [_none(v) for v in batch["group"]],
               "embedding": np.asarray(batch["embedding"], dtype=np.float32),
               "error": [_none(v) for v in batch["error"]]}


def encoder_spec(encoder) -> dict:
    """``create_encoder`` keyword arguments that rebuild ``encoder`` on another machine (packaged or
    timm weights; a local weights file must exist at the same path on every node)."""
    features = encoder.fingerprint.get("features") or {}
    size = (encoder.fingerprint.get("preprocess") or {}).get("input_size")
    return {"name": encoder.name, "stages": features.get("stages"), "pool": features.get("pool", "avg"),
            "input_size": size[-1] if size else None}


# -- registering from embeddings ----------------------------------------------------------------
def check_encoder_reproduces(fingerprint: dict, *, weights=None) -> None:
    """Raise ``EncoderMismatchError`` unless the encoder ``fingerprint`` names, re-created (with
    ``weights``), has that very fingerprint: a registry built from the embeddings is used with that
    encoder, so one whose fingerprint was forged or edited is refused before it is saved."""
    from .embedding.encoders import describe_fingerprint, encoder_from_fingerprint

    encoder = encoder_from_fingerprint(fingerprint, weights=weights)
    if encoder.fingerprint != fingerprint:
        raise EncoderMismatchError(f"the embeddings claim to come from {describe_fingerprint(fingerprint)}, but "
                                   f"re-creating that encoder gave {describe_fingerprint(encoder.fingerprint)}; "
                                   "embed the images again (with --weights FILE if they were embedded with one)")


def register_embeddings(registry, path: str | os.PathLike) -> dict[str, int]:
    """Add the classes of an embeddings dataset to ``registry`` at bulk speed; returns counts.

    Rows without a class or with an error are skipped. New one-image classes go in with one
    ``Registry.add_many``; new classes with several images with ``add_class`` (their prototype is the
    mean, as ``register`` makes it); existing classes gain examples. A registry opened with
    ``Registry.open`` saves once, at the end. Embeddings of another encoder than the registry's raise
    ``EncoderMismatchError`` and change nothing.
    """
    from .embedding.encoders import describe_fingerprint

    table = read_embeddings(path)
    if registry.fingerprint and registry.fingerprint != table.fingerprint:
        raise EncoderMismatchError(f"{path} holds embeddings of {describe_fingerprint(table.fingerprint)}, but the "
                                   f"registry was built with {describe_fingerprint(registry.fingerprint)}; embed "
                                   f"the images again with the registry's encoder")
    if table.vectors.shape[1] != registry.dim:
        raise ValueError(f"{path} holds {table.vectors.shape[1]}-dimensional embeddings, the registry "
                         f"{registry.dim}-dimensional ones")
    rows_of: dict[str, list[int]] = {}
    for i, label in enumerate(table.labels):
        if label is not None:
            rows_of.setdefault(label, []).append(i)
    singles = [label for label, rows in rows_of.items() if len(rows) == 1 and label not in registry]
    with registry.batch():
        if singles:
            registry.add_many(singles, table.vectors[[rows_of[label][0] for label in singles]])
        for label, rows in rows_of.items():
            if label in registry and not (len(rows) == 1 and label in singles):
                registry.add_examples(label, table.vectors[rows])
            elif label not in registry:
                registry.add_class(label, table.vectors[rows])
    unlabelled = len(table.labels) - sum(len(r) for r in rows_of.values())
    return {"classes": len(rows_of), "images": len(table.labels) - unlabelled, "unlabelled": unlabelled,
            "failed": table.failed}

