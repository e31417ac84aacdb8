"""fewshot: few-shot and one-shot image classification on a frozen pretrained encoder.

Register new classes from one or a few images, predict with scores, top-k and "unknown",
and keep the classes in a persistent FAISS-backed registry.
"""

__version__ = "0.1.0"

from .cache import EmbeddingCache
from .classifier import FewShotClassifier, Prediction, RegisterReport
from .encoders import DEFAULT_ENCODER, Embeddings, Encoder, create_encoder
from .errors import (
    DuplicateClassError,
    EncoderMismatchError,
    FewShotError,
    ImageError,
    RegistryError,
    RegistryFormatError,
    RegistrySaveError,
    UnknownClassError,
    WeightsError,
)
from .images import expand_inputs, load_image, load_images
from .registry import Registry, SearchResult

__all__ = [
    "DEFAULT_ENCODER",
    "DuplicateClassError",
    "EmbeddingCache",
    "Embeddings",
    "Encoder",
    "EncoderMismatchError",
    "FewShotClassifier",
    "FewShotError",
    "ImageError",
    "Prediction",
    "RegisterReport",
    "Registry",
    "RegistryError",
    "RegistryFormatError",
    "RegistrySaveError",
    "SearchResult",
    "UnknownClassError",
    "WeightsError",
    "__version__",
    "create_encoder",
    "expand_inputs",
    "load_image",
    "load_images",
]
