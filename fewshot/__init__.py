"""fewshot: few-shot and one-shot image classification on a frozen pretrained encoder.

Register new classes from one or a few images, predict with scores, top-k and "unknown",
and keep the classes in a persistent FAISS-backed registry.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .lazy import lazy_exports

# Public name -> the submodule that defines it (by stage: embedding, registry, data, evaluation, learning).
# Submodules are imported on first use (PEP 562), so `import fewshot` and the commands that never run a model
# (`fewshot classes`, `remove`, `rename`, `--help`) start without importing torch, timm or faiss.
_EXPORTS = {
    # embedding (cache)
    "EmbeddingCache": "embedding.cache",
    # classifier
    "FewShotClassifier": "classifier",
    "Prediction": "classifier",
    "RegisterReport": "classifier",
    # data (datasets)
    "ImageDataset": "data.datasets",
    "load_dataset": "data.datasets",
    "split_by_class": "data.datasets",
    "split_by_group": "data.datasets",
    # embedding (encoders)
    "DEFAULT_ENCODER": "embedding.encoders",
    "Embeddings": "embedding.encoders",
    "Encoder": "embedding.encoders",
    "create_encoder": "embedding.encoders",
    # data (episodes, protocols)
    "Episode": "data.episodes",
    "EpisodeSampler": "data.episodes",
    "Protocol": "data.protocols",
    "load_episodes": "data.episodes",
    "load_fixed_runs": "data.protocols",
    "load_protocol": "data.protocols",
    "save_episodes": "data.episodes",
    "write_fixed_runs": "data.protocols",
    # errors
    "DuplicateClassError": "errors",
    "EncoderMismatchError": "errors",
    "FewShotError": "errors",
    "HeadFormatError": "errors",
    "ImageError": "errors",
    "RegistryError": "errors",
    "RegistryFormatError": "errors",
    "RegistryLockedError": "errors",
    "RegistrySaveError": "errors",
    "UnknownClassError": "errors",
    "WeightsError": "errors",
    # evaluation
    "EvaluationResult": "evaluation.evaluate",
    "evaluate_batch": "evaluation.evaluate",
    "evaluate_episodes": "evaluation.evaluate",
    # learning (heads)
    "Head": "learning.heads",
    "available_heads": "learning.heads",
    "create_head": "learning.heads",
    "load_head": "learning.heads",
    "save_head": "learning.heads",
    # embedding (images)
    "expand_inputs": "embedding.images",
    "load_image": "embedding.images",
    "load_images": "embedding.images",
    # registry
    "Registry": "registry",
    "SearchResult": "registry",
    # open set, hygiene and provenance
    "Neighbour": "classifier",
    "OpenSetEpisode": "data.episodes",
    "sample_open_set": "data.episodes",
    "Finding": "registry.hygiene",
    "Calibration": "registry.calibration",
    "calibrate": "registry.calibration",
    "fit_calibration": "registry.calibration",
    "OpenSetResult": "evaluation.openset",
    "evaluate_open_set": "evaluation.openset",
    "ExampleSource": "registry",
    # shots sweep on a folder
    "SweepResult": "evaluation.sweep",
    "shots_sweep": "evaluation.sweep",
    # learning (train)
    "TrainResult": "learning.train",
    "train_head": "learning.train",
    # learning (adapting to a domain)
    "AdaptResult": "learning.adapt",
    "adapt": "learning.adapt",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from .embedding.cache import EmbeddingCache
    from .classifier import FewShotClassifier, Prediction, RegisterReport
    from .data.datasets import ImageDataset, load_dataset, split_by_class, split_by_group
    from .embedding.encoders import DEFAULT_ENCODER, Embeddings, Encoder, create_encoder
    from .data.episodes import Episode, EpisodeSampler, load_episodes, save_episodes
    from .data.protocols import Protocol, load_fixed_runs, load_protocol, write_fixed_runs
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
    from .evaluation.evaluate import EvaluationResult, evaluate_batch, evaluate_episodes
    from .learning.heads import Head, available_heads, create_head, load_head, save_head
    from .embedding.images import expand_inputs, load_image, load_images
    from .classifier import Neighbour
    from .data.episodes import OpenSetEpisode, sample_open_set
    from .registry.hygiene import Finding
    from .registry.calibration import Calibration, calibrate, fit_calibration
    from .evaluation.openset import OpenSetResult, evaluate_open_set
    from .registry import ExampleSource, Registry, SearchResult
    from .evaluation.sweep import SweepResult, shots_sweep
    from .learning.train import TrainResult, train_head
    from .learning.adapt import AdaptResult, adapt

__all__ = [
    "AdaptResult",
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
    "SweepResult",
    "TrainResult",
    "UnknownClassError",
    "WeightsError",
    "__version__",
    "adapt",
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
    "shots_sweep",
    "split_by_group",
    "train_head",
    "write_fixed_runs",
]
