"""fewshot: few-shot and one-shot image classification on a frozen pretrained encoder.

Register new classes from one or a few images, predict with scores, top-k and "unknown",
and keep the classes in a persistent FAISS-backed registry.
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

# Public name -> the submodule that defines it. Submodules are imported on first use (PEP 562), so
# `import fewshot` and the commands that never run a model (`fewshot classes`, `remove`, `rename`,
# `--help`) start without importing torch, timm or faiss.
_EXPORTS = {
    # cache
    "EmbeddingCache": "cache",
    # classifier
    "FewShotClassifier": "classifier",
    "Prediction": "classifier",
    "RegisterReport": "classifier",
    # data
    "ImageDataset": "data",
    "load_dataset": "data",
    "split_by_class": "data",
    "split_by_group": "data",
    # encoders
    "DEFAULT_ENCODER": "encoders",
    "Embeddings": "encoders",
    "Encoder": "encoders",
    "create_encoder": "encoders",
    # episodes
    "Episode": "episodes",
    "EpisodeSampler": "episodes",
    "Protocol": "episodes",
    "load_episodes": "episodes",
    "load_fixed_runs": "episodes",
    "load_protocol": "episodes",
    "save_episodes": "episodes",
    "write_fixed_runs": "episodes",
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
    # evaluate
    "EvaluationResult": "evaluate",
    "evaluate_batch": "evaluate",
    "evaluate_episodes": "evaluate",
    # heads
    "Head": "heads",
    "available_heads": "heads",
    "create_head": "heads",
    "load_head": "heads",
    "save_head": "heads",
    # images
    "expand_inputs": "images",
    "load_image": "images",
    "load_images": "images",
    # registry
    "Registry": "registry",
    "SearchResult": "registry",
    # open set, hygiene and provenance
    "Neighbour": "classifier",
    "OpenSetEpisode": "episodes",
    "sample_open_set": "episodes",
    "Finding": "hygiene",
    "Calibration": "openset",
    "calibrate": "openset",
    "fit_calibration": "openset",
    "OpenSetResult": "openset_evaluate",
    "evaluate_open_set": "openset_evaluate",
    "ExampleSource": "registry",
    # shots sweep on a folder
    "SweepResult": "sweep",
    "shots_sweep": "sweep",
    # train
    "TrainResult": "train",
    "train_head": "train",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fewshot' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from .cache import EmbeddingCache
    from .classifier import FewShotClassifier, Prediction, RegisterReport
    from .data import ImageDataset, load_dataset, split_by_class, split_by_group
    from .encoders import DEFAULT_ENCODER, Embeddings, Encoder, create_encoder
    from .episodes import (
        Episode,
        EpisodeSampler,
        Protocol,
        load_episodes,
        load_fixed_runs,
        load_protocol,
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
    from .classifier import Neighbour
    from .episodes import OpenSetEpisode, sample_open_set
    from .hygiene import Finding
    from .openset import Calibration, calibrate, fit_calibration
    from .openset_evaluate import OpenSetResult, evaluate_open_set
    from .registry import ExampleSource, Registry, SearchResult
    from .sweep import SweepResult, shots_sweep
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
    "SweepResult",
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
    "shots_sweep",
    "split_by_group",
    "train_head",
    "write_fixed_runs",
]
