"""ONNX export and the onnxruntime runtime: deploy a classifier with onnxruntime, numpy and Pillow only.

``export_bundle(out, encoder=..., head=..., registry=...)`` writes a folder a deployment needs:

* ``encoder.onnx``: the encoder's feature function, preprocessed images ``(N, 3, H, W)`` float32 ->
  embeddings ``(N, dim)``, with a dynamic batch dimension (``encoder.int8.onnx`` too with ``int8=True``:
  int8 weights and activations, calibrated on images you give);
* ``preprocess.json``: how to turn a photo into that input (resize, centre crop, mean/std), and the
  encoder fingerprint;
* ``head.onnx`` + ``head.json`` for a trained head (embeddings -> head space, and the head's metric);
* for a registry: ``prototypes.npy`` (float32, one row per class, unit rows for cosine), ``labels.json``
  (class labels in row order), ``counts.npy`` (examples per class), ``thresholds.npy`` (float64: the top-1
  similarity below which a query nearest to that class is "unknown", as ``predict`` decides it; NaN where
  it never is) and ``registry.json`` (metric, fitted temperature, the whole fitted calibration);
* ``bundle.json``: every file above with its size and sha256; a reader uses only the files it lists.
The folder is built beside ``out`` and renamed into place, so it never mixes files of two exports.
``examples/onnx_predict.py`` predicts from such a folder.

``OnnxFeatures``, which runs an encoder's network under onnxruntime inside fewshot (``create_encoder(...,
runtime="onnxruntime")``), lives in ``fewshot.embedding.runtime`` with ``export_module`` and ``session``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from .embedding.runtime import INPUT_NAME, OUTPUT_NAME, export_module
from .errors import ExportError as ExportError
from .files import honour_umask


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: np.ndarray,
                  batch_size: int = 8) -> Path:
    """Static int8 quantisation of an encoder's ONNX model: per-channel int8 weights, uint8 activations whose
    ranges are calibrated on ``calibration`` (preprocessed images, ``(N, 3, H, W)`` float32).

    Static rather than dynamic: on Lite0, dynamic quantisation was slower than fp32 and kept the nearest
    prototype for only 60% of queries; static QDQ ran ~2x fp32 and kept 80% (benchmarks/export.py)."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or not len(calibration):
        raise ValueError("int8 quantisation needs calibration images: a few dozen photos like those to classify")

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT_NAME: calibration[i:i + batch_size]}
                                 for i in range(0, len(calibration), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    logging.disable(logging.WARNING)  # the quantiser logs shape-inference notes on the root logger
    try:
        quantize_static(str(src), str(dst), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return Path(dst)


def preprocess_images(encoder, images) -> np.ndarray:
    """Images (paths, folders, bytes, PIL images) -> the encoder's input batch ``(N, 3, H, W)`` float32;
    inputs that cannot be decoded are left out."""
    import torch

    from .embedding.images import expand_inputs, load_images

    results = load_images(expand_inputs(images), transform=encoder.transform, min_size=encoder.resize_size)
    tensors = [r.value for r in results if r.ok]
    if not tensors:
        raise ValueError("none of the calibration images could be decoded; pass a folder of photos")
    return torch.stack(tensors).numpy()



# -- the deployment bundle ----------------------------------------------------------------------
def preprocess_config(encoder) -> dict:
    """What a deployment does to a photo before ``encoder.onnx``, in plain numbers."""
    cfg = encoder.data_config
    return {
        "input": INPUT_NAME, "output": OUTPUT_NAME, "layout": "NCHW", "dtype": "float32",
        "resize_shorter_to": encoder.resize_size, "interpolation": cfg["interpolation"],
        "center_crop": list(cfg["input_size"][1:]), "scale": 1 / 255,
        "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
        "dim": encoder.dim, "fingerprint": encoder.fingerprint,
    }


def export_bundle(out: str | os.PathLike, *, encoder, head=None, registry=None, temperature: float | None = None,
                  unknown_threshold: float | None = None, unknown: bool = True, int8: bool = False,
                  calibration=None, force: bool = False) -> dict[str, Path]:
    """Write the deployment folder ``out`` (see the module docstring); returns the files by role.

    ``int8=True`` also writes ``encoder.int8.onnx``, calibrated on ``calibration`` (images: paths, a folder,
    ...; a few dozen photos like the ones the deployment will see).
    ``registry``'s vectors must come from ``encoder`` (and ``head``): another fingerprint raises
    ``EncoderMismatchError``. Its unknown decisions are exported as ``predict`` makes them: the registry's
    fitted thresholds, or ``unknown_threshold`` for every class, or none with ``unknown=False``;
    ``temperature`` overrides the fitted one.
    An existing ``out`` that is not empty is refused (``ExportError``) unless ``force``: then it is replaced
    whole, so no file of an earlier export survives.
    """
    from .errors import EncoderMismatchError

    out = Path(out)
    expected = {**encoder.fingerprint, "head": head.fingerprint} if head is not None else encoder.fingerprint
    if int8 and calibration is None:
        raise ValueError("int8 export needs calibration images (CLI: --calibration DIR): a few dozen photos like "
                         "the ones the deployment will classify")
    if registry is not None and registry.fingerprint and registry.fingerprint != expected:
        raise EncoderMismatchError("the registry was built with another encoder (or head) than the one exported; "
                                   "export it with the encoder and head it was built with")
    _check_out_folder(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        files = {"encoder": export_module(encoder.features_module(), build / "encoder.onnx", encoder.probe_batch(2))}
        _write_json(build / "preprocess.json", preprocess_config(encoder))
        files["preprocess"] = build / "preprocess.json"
        if int8:
            files["encoder_int8"] = quantize_int8(files["encoder"], build / "encoder.int8.onnx",
                                                  preprocess_images(encoder, calibration))
        if head is not None:
            files.update(_export_head(build, head))
        if registry is not None:
            files.update(_export_registry(build, registry, temperature, unknown_threshold, unknown))
        _write_json(build / "bundle.json", {"files": {role: _file_entry(p) for role, p in files.items()}})
        honour_umask(build, directory=True)  # mkdtemp made it 0700
        _move_into_place(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return {role: out / path.name for role, path in files.items()}


def _check_out_folder(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder; give --out a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty; export to a new folder, or pass --force (Python: force=True) to "
                          f"replace it whole")


def _move_into_place(build: Path, out: Path) -> None:
    """Rename the finished folder ``build`` to ``out``, replacing what is there (a rename replaces an empty
    folder in one step; a full one is first renamed aside, then deleted)."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex}.old")
        os.rename(out, old)
    os.replace(build, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_head(out: Path, head) -> dict[str, Path]:
    import torch

    path = export_module(head, out / "head.onnx", torch.zeros(2, head.in_dim), names=(OUTPUT_NAME, "head_vectors"))
    _write_json(out / "head.json", {"name": head.name, "metric": head.metric, "in_dim": head.in_dim,
                                    "out_dim": head.out_dim, "fingerprint": head.fingerprint})
    return {"head": path, "head_info": out / "head.json"}


def _export_registry(out: Path, registry, temperature: float | None, unknown_threshold: float | None,
                     unknown: bool) -> dict[str, Path]:
    from .classifier import DEFAULT_TEMPERATURE, SOFTMAX_CANDIDATES
    from .registry.calibration import current_calibration

    labels, prototypes = registry.prototypes()
    prototypes = np.ascontiguousarray(prototypes, dtype=np.float32)
    if registry.metric == "cosine":
        prototypes /= np.maximum(np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-12)
    all_counts = registry.counts
    counts = np.array([all_counts[label] for label in labels], dtype=np.int64)
    fitted = current_calibration(registry)
    np.save(out / "prototypes.npy", prototypes, allow_pickle=False)
    np.save(out / "counts.npy", counts, allow_pickle=False)
    np.save(out / "thresholds.npy", _unknown_thresholds(fitted, labels, counts, unknown_threshold, unknown),
            allow_pickle=False)
    _write_json(out / "labels.json", list(labels))
    _write_json(out / "registry.json", {
        "metric": registry.metric, "classes": len(labels), "dim": registry.dim,
        "temperature": temperature or fitted.temperature or DEFAULT_TEMPERATURE[registry.metric],
        "softmax_candidates": SOFTMAX_CANDIDATES,  # probabilities are over this many nearest classes
        "unknown": unknown, "unknown_threshold": unknown_threshold, "calibration": fitted.to_dict(),
        "fingerprint": registry.fingerprint})
    return {role: out / f"{role}.{ext}" for role, ext in (("prototypes", "npy"), ("labels", "json"),
                                                          ("counts", "npy"), ("thresholds", "npy"),
                                                          ("registry", "json"))}


def _unknown_thresholds(calibration, labels: list[str], counts, override: float | None = None,
                        unknown: bool = True) -> np.ndarray:
    """Per class (row order), the top-1 similarity below which ``predict`` answers "unknown": ``override``
    for every class if given, else the fitted ``calibration.threshold_for``; NaN (no similarity is below it)
    where there is none, or for every class with ``unknown=False``."""
    if not unknown:
        return np.full(len(labels), np.nan)
    values = [override if override is not None else calibration.threshold_for(label, int(count))
              for label, count in zip(labels, counts)]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _file_entry(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_json(path: Path, obj) -> None:
    """Plain write: the whole folder is renamed into place once complete, so files need no atomicity of
    their own, and they get the permissions the umask gives, as any file the user writes."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
