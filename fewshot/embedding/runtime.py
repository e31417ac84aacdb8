"""The onnxruntime runtime: an encoder's network exported to ONNX and run by onnxruntime inside fewshot.

``create_encoder(..., runtime="onnxruntime")`` runs the network through ``OnnxFeatures``: the model is exported
once per fingerprint to the cache folder (``cached_encoder_onnx``) and reused. It lives in the embedding stage,
not in ``fewshot.export`` (the deployment bundle), so that the encoder never imports a deployment tool; the
bundle uses ``export_module`` and ``session`` from here.
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path

import numpy as np

from ..errors import ExportError
from ..streams import descriptor_silenced
from .cache import default_cache_path

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
OPSET = 17
MIN_RUNTIME_COSINE = 0.9999  # an onnxruntime network must match eager this closely on a probe batch


def onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def export_module(module, path: str | os.PathLike, example, *, names: tuple[str, str] = (INPUT_NAME, OUTPUT_NAME)
                  ) -> Path:
    """Export a torch module taking one ``(N, ...)`` float32 tensor to ONNX with a dynamic batch, atomically;
    ``names``: its input and output names."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # concurrent exporters never share one
    try:
        with warnings.catch_warnings(), torch.no_grad(), descriptor_silenced(1):
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's
            # The TorchScript-based exporter: ~1 s for Lite0, where the dynamo exporter takes ~15 s.
            torch.onnx.export(module.eval(), (example,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=[names[0]], output_names=[names[1]],
                              dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}})
        os.replace(tmp, path)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ExportError(f"could not export {type(module).__name__} to ONNX ({type(exc).__name__}: {detail}); "
                          f"this model runs with torch only") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path



def session(path: str | os.PathLike, threads: int = 1):
    """An onnxruntime CPU session for ``path`` running on ``threads`` threads of the caller."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cached_encoder_onnx(encoder) -> Path:
    """The encoder's ONNX file in the cache folder, exported the first time (keyed by fingerprint)."""
    path = encoder_onnx_path(encoder.fingerprint_id)
    if not path.is_file():
        export_module(encoder.features_module(), path, encoder.probe_batch(2))
    return path


class OnnxFeatures:
    """An encoder's network under onnxruntime: torch batch in, torch embeddings out (what the streams call)."""

    def __init__(self, encoder, threads: int = 1):
        self.session = session(cached_encoder_onnx(encoder), threads)

    def __call__(self, batch):
        import torch

        array = np.ascontiguousarray(batch.numpy(), dtype=np.float32)  # channels-last memory -> NCHW
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: array})[0])


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine similarity between two (N, D) arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((num / np.maximum(den, 1e-30)).min())


def encoder_onnx_path(fingerprint_id: str) -> Path:
    """Where ``cached_encoder_onnx`` keeps the ONNX file of the encoder with this fingerprint id, whether or not
    it exists yet (torch-free)."""
    return default_cache_path().parent / "onnx" / f"{fingerprint_id}.onnx"


def head_onnx_path(head_sha256: str) -> Path:
    """Where a head's ONNX export is cached, keyed by the head's checksum (its fingerprint's ``sha256``)."""
    if not (len(head_sha256) == 64 and all(c in "0123456789abcdef" for c in head_sha256)):
        raise ValueError(f"a head checksum is 64 hex digits, got {str(head_sha256)[:80]!r}")
    return default_cache_path().parent / "onnx" / f"head-{head_sha256}.onnx"
