"""Embedding: images in, vectors out. Safe image decoding, the frozen encoders (torch or onnxruntime), ensembles,
support views and the embedding cache. Knows nothing of registries, heads or evaluation.

Modules: ``images`` (safe decoding), ``fingerprints`` (what identifies an encoder's vectors; names), ``model``
(``Encoder``: preprocessing, streams, compilation), ``ensemble``, ``encoders`` (``create_encoder``), ``runtime``
(onnxruntime), ``views`` (flipped support views), ``cache`` (embedding cache keyed by content and fingerprint).
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# Public name -> the module defining it, imported on first use (PEP 562): importing one module of this
# stage does not import the others (nor torch, where they need it).
_EXPORTS = {
    "EmbeddingCache": "cache",
    "default_cache_path": "cache",
    "available_encoders": "fingerprints",
    "create_encoder": "encoders",
    "encoder_from_fingerprint": "encoders",
    "EnsembleEncoder": "ensemble",
    "DEFAULT_ENCODER": "fingerprints",
    "PACKAGED_WEIGHTS": "fingerprints",
    "check_fingerprint": "fingerprints",
    "describe_fingerprint": "fingerprints",
    "fingerprint_id": "fingerprints",
    "split_encoder_name": "fingerprints",
    "IMAGE_EXTENSIONS": "images",
    "NamedBytes": "images",
    "content_digest": "images",
    "describe": "images",
    "expand_inputs": "images",
    "load_image": "images",
    "load_images": "images",
    "COMPILE_MODES": "model",
    "DEFAULT_BATCH_SIZE": "model",
    "RUNTIMES": "model",
    "Embeddings": "model",
    "Encoder": "model",
    "OnnxFeatures": "runtime",
    "cached_encoder_onnx": "runtime",
    "export_module": "runtime",
    "onnxruntime_available": "runtime",
    "session": "runtime",
    "SUPPORT_VIEWS": "views",
    "average_views": "views",
    "embed_flipped": "views",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from .cache import EmbeddingCache, default_cache_path
    from .encoders import create_encoder, encoder_from_fingerprint
    from .ensemble import EnsembleEncoder
    from .fingerprints import (
        DEFAULT_ENCODER,
        PACKAGED_WEIGHTS,
        available_encoders,
        check_fingerprint,
        describe_fingerprint,
        fingerprint_id,
        split_encoder_name,
    )
    from .images import (
        IMAGE_EXTENSIONS,
        NamedBytes,
        content_digest,
        describe,
        expand_inputs,
        load_image,
        load_images,
    )
    from .model import COMPILE_MODES, DEFAULT_BATCH_SIZE, RUNTIMES, Embeddings, Encoder
    from .runtime import (
        OnnxFeatures,
        cached_encoder_onnx,
        export_module,
        onnxruntime_available,
        session,
    )
    from .views import SUPPORT_VIEWS, average_views, embed_flipped

__all__ = [
    "COMPILE_MODES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_ENCODER",
    "EmbeddingCache",
    "Embeddings",
    "Encoder",
    "EnsembleEncoder",
    "IMAGE_EXTENSIONS",
    "NamedBytes",
    "OnnxFeatures",
    "PACKAGED_WEIGHTS",
    "RUNTIMES",
    "SUPPORT_VIEWS",
    "available_encoders",
    "average_views",
    "cached_encoder_onnx",
    "check_fingerprint",
    "content_digest",
    "create_encoder",
    "default_cache_path",
    "describe",
    "describe_fingerprint",
    "embed_flipped",
    "encoder_from_fingerprint",
    "expand_inputs",
    "export_module",
    "fingerprint_id",
    "load_image",
    "load_images",
    "onnxruntime_available",
    "session",
    "split_encoder_name",
]
