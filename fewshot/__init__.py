"""fewshot: few-shot and one-shot image classification on a frozen pretrained encoder.

Register new classes from one or a few images, predict with scores, top-k and "unknown",
and keep the classes in a persistent FAISS-backed registry.
"""

__version__ = "0.1.0"

from .cache import EmbeddingCache
from .classifier import FewShotClassifier, Neighbour, Prediction, RegisterReport
from .data import ImageDataset, load_dataset, split_by_class, split_by_group
from .encoders import DEFAULT_ENCODER, Embeddings, Encoder, create_encoder
from .episodes import (
    Episode,
    EpisodeSampler,
    OpenSetEpisode,
    Protocol,
    load_episodes,
    load_fixed_runs,
    load_protocol,
    sample_open_set,
    save_episodes,
    write_fixed_runs,
)
from .errors import (
    DuplicateClassError,
    EncoderMismatchError,
    FewShotError,
    HeadFormatError,
    ImageError,
    RegistryError,
    RegistryFormatError,
    RegistryLockedError,
    RegistrySaveError,
    UnknownClassError,
    WeightsError,
)
from .evaluate import EvaluationResult, evaluate_batch, evaluate_episodes
from .heads import Head, available_heads, create_head, load_head, save_head
from .images import expand_inputs, load_image, load_images
from .hygiene import Finding
from .openset import Calibration, calibrate, fit_calibration
from .openset_evaluate import OpenSetResult, evaluate_open_set
from .registry import ExampleSource, Registry, SearchResult
from .train import TrainResult, train_head

__all__ = [
    "DEFAULT_ENCODER",
    "DuplicateClassError",
    "EmbeddingCache",
    "Embeddings",
    "Encoder",
    "EncoderMismatchError",
    "Calibration",
    "Episode",
    "ExampleSource",
    "EpisodeSampler",
    "EvaluationResult",
    "FewShotClassifier",
    "FewShotError",
    "Finding",
    "Head",
    "HeadFormatError",
    "ImageDataset",
    "ImageError",
    "Neighbour",
    "OpenSetEpisode",
    "OpenSetResult",
    "Prediction",
    "Protocol",
    "RegisterReport",
    "Registry",
    "RegistryError",
    "RegistryFormatError",
    "RegistryLockedError",
    "RegistrySaveError",
    "SearchResult",
    "TrainResult",
    "UnknownClassError",
    "WeightsError",
    "__version__",
    "available_heads",
    "calibrate",
    "create_encoder",
    "create_head",
    "evaluate_batch",
    "evaluate_episodes",
    "evaluate_open_set",
    "expand_inputs",
    "fit_calibration",
    "load_dataset",
    "load_episodes",
    "load_fixed_runs",
    "load_head",
    "load_image",
    "load_images",
    "load_protocol",
    "sample_open_set",
    "save_episodes",
    "save_head",
    "split_by_class",
    "split_by_group",
    "train_head",
    "write_fixed_runs",
]
