"""Encoders and heads without torch: their cached ONNX exports under onnxruntime, preprocessing in numpy/Pillow.

``fewshot predict`` spends seconds importing torch and timm for a network that onnxruntime runs faster. Once an
encoder's network is exported (``export_onnx_parts``, which needs torch, once per fingerprint, into the cache folder
where ``cached_encoder_onnx`` keeps it), ``cached_onnx_parts`` rebuilds the encoder from a registry's fingerprint
alone: the package's safe decoding, ``fewshot.embedding.preprocess`` (the same numbers as timm's transform),
the ONNX network, the embedding cache under the same fingerprint. Ensembles run every member's export (decoded once,
each member's vector unit-length, as ``EnsembleEncoder``); a registry's head runs as its own ONNX export, cached by
the head's checksum. Nothing here imports torch unless exporting.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .embeddings import Embeddings as Embeddings
from ..errors import ExportError
from .cache import EmbeddingCache
from .fingerprints import check_fingerprint, fingerprint_id
from .images import describe, digest_or_error, expand_inputs, load_images
from .preprocess import Preprocess
from .runtime import (INPUT_NAME, MIN_RUNTIME_COSINE, cached_encoder_onnx, encoder_onnx_path, export_module,
                      head_onnx_path, min_cosine, session)

DEFAULT_BATCH_SIZE = 8  # images per onnxruntime call: one call's overhead is small next to 8 images' network
_MAX_THREADS = 8  # onnxruntime intra-op threads per session
_DECODE_WORKERS_FROM = 4  # images: fewer decode in the calling thread (a pool costs more than it saves)


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Network:
    """One encoder's ONNX network and preprocessing."""

    def __init__(self, fingerprint: dict, path: Path, threads: int):
        self.fingerprint_id = fingerprint_id(fingerprint)
        self.dim = int(fingerprint["features"]["dim"])
        self.preprocess = Preprocess.from_fingerprint(fingerprint)
        self.session = session(path, threads)

    def __call__(self, arrays: list[np.ndarray]) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: self.preprocess.batch_step(arrays)})[0]


class OnnxEncoder:
    """The encoder a fingerprint describes (one network or an ensemble), run from its ONNX exports: ``embed_batch``
    gives the same rows as ``Encoder.embed_batch`` for that fingerprint, without torch."""

    def __init__(self, fingerprint: dict, paths: list[Path], *, threads: int | None = None):
        members = fingerprint["members"] if "members" in fingerprint else [fingerprint]
        if len(paths) != len(members):
            raise ValueError(f"{len(members)} network(s) need as many ONNX files, got {len(paths)}")
        threads = threads or min(usable_cores(), _MAX_THREADS)
        self.networks = [_Network(m, p, threads) for m, p in zip(members, paths)]
        self.fingerprint, self.fingerprint_id = fingerprint, fingerprint_id(fingerprint)
        self.name = fingerprint.get("name")
        self.dim = sum(n.dim for n in self.networks)
        self.resize_size = max(n.preprocess.resize_size for n in self.networks)  # decode once, for every member
        self.compile = "onnxruntime"  # how the network runs, as Encoder.compile says it

    def embed_batch(self, images, *, batch_size: int = DEFAULT_BATCH_SIZE, cache: EmbeddingCache | None = None,
                    progress: bool | None = None, workers: int | None = None) -> Embeddings:
        """Embed every input; a bad input fails alone (NaN row + message) and the rest go on. ``workers``: decoding
        threads (default: one per core for 4+ images, else none); ``progress`` is accepted for ``Encoder``'s
        signature (one-off predictions show no bar)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = expand_inputs(images)
        errors: list[str | None] = [None] * len(items)
        digests: list[str | None] = []
        for i, item in enumerate(items):
            digest, errors[i] = digest_or_error(item)
            digests.append(digest)
        blocks = [np.full((len(items), n.dim), np.nan, dtype=np.float32) for n in self.networks]
        todo = self._fill_from_cache(cache, digests, blocks)
        writers = [cache.writer(n.fingerprint_id) for n in self.networks] if cache is not None and todo else []
        try:
            for rows, arrays in self._decoded_batches(items, todo, errors, batch_size, workers):
                for i, (network, block) in enumerate(zip(self.networks, blocks)):
                    block[rows] = network([a[i] for a in arrays])
                    if writers:
                        writers[i].add({digests[r]: block[r].copy() for r in rows})
        finally:  # also on Ctrl-C: keep every batch that was finished
            for writer in writers:
                writer.flush()
        vectors = blocks[0] if len(blocks) == 1 else np.concatenate([_unit_rows(b) for b in blocks], axis=1)
        return Embeddings(vectors=vectors, sources=[describe(it) for it in items], errors=errors, digests=digests)

    def _fill_from_cache(self, cache: EmbeddingCache | None, digests: list, blocks: list[np.ndarray]) -> list[int]:
        """Copy cached vectors into place (a row is a hit when every network has it); the rows still to embed."""
        wanted = [i for i, d in enumerate(digests) if d is not None]
        if cache is None:
            return wanted
        found = [cache.get_many(n.fingerprint_id, [digests[i] for i in wanted], dim=n.dim) for n in self.networks]
        todo = []
        for i in wanted:
            if all(digests[i] in hits for hits in found):
                for hits, block in zip(found, blocks):
                    block[i] = hits[digests[i]]
            else:
                todo.append(i)
        return todo

    def _decoded_batches(self, items: list, todo: list[int], errors: list, batch_size: int, workers: int | None):
        """``(rows, per-image tuples of member arrays)`` batches of the decodable rows of ``todo``; decoding runs in
        worker threads ahead of the network, and a bad image fails alone (its message in ``errors``)."""
        if workers is None:
            workers = min(usable_cores(), 4) if len(todo) >= _DECODE_WORKERS_FROM else 0
        steps = [n.preprocess.image_step for n in self.networks]
        results = load_images((items[i] for i in todo), transform=lambda image: tuple(s(image) for s in steps),
                              min_size=self.resize_size, workers=workers)
        rows, arrays = [], []
        for row, result in zip(todo, results):
            if not result.ok:
                errors[row] = result.error
                continue
            rows.append(row)
            arrays.append(result.value)
            if len(rows) == batch_size:
                yield rows, arrays
                rows, arrays = [], []
        if rows:
            yield rows, arrays


class OnnxHead:
    """A registry's head as its cached ONNX export: ``transform`` maps embeddings to head space, as the head does."""

    def __init__(self, path: Path, *, fingerprint: dict, metric: str, encoder: dict):
        self.session = session(path, min(usable_cores(), _MAX_THREADS))
        self.in_dim = int(self.session.get_inputs()[0].shape[1])
        self.out_dim = int(self.session.get_outputs()[0].shape[1])
        self.fingerprint, self.metric, self.name = fingerprint, metric, fingerprint.get("name")
        self.metadata = {"encoder": encoder}  # what the classifier checks its encoder against

    def transform(self, features) -> np.ndarray:
        x = np.ascontiguousarray(np.atleast_2d(features), dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"{self.name} head expects features of shape (N, {self.in_dim}), got {x.shape}")
        return self.session.run(None, {INPUT_NAME: x})[0]


def cached_onnx_parts(fingerprint: dict, metric: str) -> tuple[OnnxEncoder, OnnxHead | None] | None:
    """The encoder and head (None if none) a registry's ``fingerprint`` names, run from their cached ONNX exports;
    None while an export is missing. ``metric``: the registry's (a head's). Raises ValueError where numpy cannot
    reproduce the encoder's preprocessing (then only torch can run it), or the fingerprint is malformed."""
    check_fingerprint(fingerprint)  # sizes bounded before anything is built from a file's numbers
    encoder_fingerprint = {k: v for k, v in fingerprint.items() if k != "head"}
    members = encoder_fingerprint.get("members") or [encoder_fingerprint]
    paths = [encoder_onnx_path(fingerprint_id(m)) for m in members]
    head = fingerprint.get("head")
    head_path = head_onnx_path(str(head.get("sha256"))) if isinstance(head, dict) else None
    if not all(p.is_file() for p in paths) or (head_path is not None and not head_path.is_file()):
        return None
    encoder = OnnxEncoder(encoder_fingerprint, paths)
    if head_path is None:
        return encoder, None
    return encoder, OnnxHead(head_path, fingerprint=head, metric=metric, encoder=encoder_fingerprint)


def export_onnx_parts(encoder, head=None) -> None:
    """Export a torch ``Encoder`` (every member of an ensemble) and its head, if any, to the ONNX cache where
    ``cached_onnx_parts`` finds them; each export is checked against torch on a probe batch. Needs torch; raises
    ExportError where a network cannot be exported or its export disagrees (the file is then removed)."""
    import torch

    for member in getattr(encoder, "members", [encoder]):
        Preprocess.from_fingerprint(member.fingerprint)  # a ValueError here: numpy cannot preprocess for it
        path = cached_encoder_onnx(member)
        probe = member.probe_batch(3)  # an odd size: the batch dimension must really be dynamic
        with torch.inference_mode():
            expected = member.features_module()(probe).numpy()
        _check_export(path, np.ascontiguousarray(probe.numpy()), expected)
    if head is not None:
        path = head_onnx_path(head.fingerprint["sha256"])
        probe = np.random.default_rng(0).normal(size=(3, head.in_dim)).astype(np.float32)
        if not path.is_file():
            export_module(head.eval(), path, torch.from_numpy(probe[:2]))
        _check_export(path, probe, head.transform(probe))


def _check_export(path: Path, probe: np.ndarray, expected: np.ndarray) -> None:
    got = session(path).run(None, {INPUT_NAME: probe})[0]
    agreement = min_cosine(got, expected) if got.shape == expected.shape else float("nan")
    if not agreement >= MIN_RUNTIME_COSINE:
        path.unlink(missing_ok=True)
        raise ExportError(f"the ONNX export {path.name} disagrees with torch (cosine {agreement:.6f} < "
                          f"{MIN_RUNTIME_COSINE}); it was removed, and torch runs this model")


def _unit_rows(block: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as torch's ``F.normalize`` does (NaN rows of failed images stay NaN)."""
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return (block / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
