"""Every name `fewshot` exported in 0.1 (its ``__all__`` on commit 6b115aa) still imports from `fewshot`.

The package was reorganised by stage; user code written against 0.1 must keep working unchanged.
"""

from __future__ import annotations

import importlib

import pytest

PUBLIC_0_1 = [
    "Calibration", "DEFAULT_ENCODER", "DuplicateClassError", "EmbeddingCache", "Embeddings", "Encoder",
    "EncoderMismatchError", "Episode", "EpisodeSampler", "EvaluationResult", "ExampleSource", "FewShotClassifier",
    "FewShotError", "Finding", "Head", "HeadFormatError", "ImageDataset", "ImageError", "Neighbour", "OpenSetEpisode",
    "OpenSetResult", "Prediction", "Protocol", "RegisterReport", "Registry", "RegistryError", "RegistryFormatError",
    "RegistryLockedError", "RegistrySaveError", "SearchResult", "SweepResult", "TrainResult", "UnknownClassError",
    "WeightsError", "__version__", "available_heads", "calibrate", "create_encoder", "create_head", "evaluate_batch",
    "evaluate_episodes", "evaluate_open_set", "expand_inputs", "fit_calibration", "load_dataset", "load_episodes",
    "load_fixed_runs", "load_head", "load_image", "load_images", "load_protocol", "sample_open_set", "save_episodes",
    "save_head", "shots_sweep", "split_by_class", "split_by_group", "train_head", "write_fixed_runs",
]


@pytest.mark.parametrize("name", PUBLIC_0_1)
def test_name_still_imports_from_fewshot(name):
    fewshot = importlib.import_module("fewshot")
    assert getattr(fewshot, name) is not None
    assert name in fewshot.__all__ and name in dir(fewshot)
    namespace: dict = {}
    exec(f"from fewshot import {name}", namespace)  # the form user code uses
    assert namespace[name] is getattr(fewshot, name)


# Added since 0.1, each with what it is for.
ADDED = ["adapt", "AdaptResult"]  # fewshot adapt: learn a domain, never worse than the frozen default


@pytest.mark.parametrize("name", ADDED)
def test_added_name_imports_from_fewshot(name):
    fewshot = importlib.import_module("fewshot")
    assert getattr(fewshot, name) is not None and name in fewshot.__all__


def test_all_lists_exactly_the_0_1_names_and_those_added():
    import fewshot

    assert sorted(fewshot.__all__) == sorted(PUBLIC_0_1 + ADDED)


def test_errors_are_one_class_each_whatever_the_import_path():
    import fewshot
    from fewshot.errors import HeadFormatError

    assert fewshot.HeadFormatError is HeadFormatError
    assert issubclass(fewshot.RegistryFormatError, fewshot.FewShotError)
