"""Fine-tuning with tiny budgets (a few episodes on tens of real Caltech photos at 64 px): the saved model
works as a head everywhere, records its lineage, is guarded against losing to the frozen encoder, and is
refused when tampered with or mixed with the frozen encoder's registries."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot import FewShotClassifier, create_encoder, load_dataset, load_head
from fewshot.cli import main
from fewshot.errors import EncoderMismatchError, HeadFormatError
from fewshot.learning.finetune import Recipe, SplitNetwork, finetune
from fewshot.embedding.images import load_image

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(input_size=64, trainable_stages=1, ways=3, shots=1, queries=2, episodes=4, val_every=2,
            val_episodes=6, val_fraction=0.3, augment=("flip",), batch_size=8)


@pytest.fixture(scope="module")
def photos_dataset(caltech_subset):
    return load_dataset(caltech_subset)


@pytest.fixture(scope="module")
def forced_model(caltech_subset, tmp_path_factory):
    """``fewshot finetune --recipe FILE --force``: a model the guard may not replace (path, printed summary)."""
    tmp = tmp_path_factory.mktemp("models")
    recipe = tmp / "tiny.toml"
    recipe.write_text("".join(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}\n"
                              for k, v in {**TINY, "pretrain_steps": 2}.items()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["finetune", "--data", str(caltech_subset), "--recipe", str(recipe), "--force",
                     "--out", str(tmp / "forced"), "--json"]) == 0
    return tmp / "forced", json.loads(out.getvalue())


def _protocol(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text('name = "tiny"\nways = 3\nshots = 1\nqueries = 2\nepisodes = 5\nseed = 0\n')
    return path


def test_saved_model_works_as_head_for_register_predict_evaluate(forced_model, caltech_subset, tmp_path, capsys):
    path, _ = forced_model
    classes = sorted(p.name for p in caltech_subset.iterdir())[:3]
    images = {c: sorted((caltech_subset / c).glob("*.jpg")) for c in classes}
    reg = tmp_path / "shop.reg"
    for c in classes:
        assert main(["register", str(reg), "--head", str(path), "--class", c, *map(str, images[c][:2])]) == 0
    capsys.readouterr()
    assert main(["predict", str(reg), "--head", str(path), "--json", *map(str, [images[c][3] for c in classes])]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert [p["error"] for p in predictions] == [None] * 3
    assert sum(p["label"] == c for p, c in zip(predictions, classes)) >= 2  # real photos, nearest prototype
    # the registry reopens with the model it was built with, from the Python API too
    reopened = FewShotClassifier.load(reg, head=path)
    assert sorted(reopened.classes) == classes
    assert main(["evaluate", "--data", str(caltech_subset), "--protocol", str(_protocol(tmp_path)),
                 "--head", str(path), "--out", str(tmp_path / "eval"), "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1


def test_lineage_and_both_validation_figures_are_recorded(forced_model, photos_dataset):
    path, summary = forced_model
    meta = load_head(path).metadata
    lineage = meta["lineage"]
    assert lineage["base_encoder"] == create_encoder(input_size=64).fingerprint
    assert len(lineage["data_digest"]) == 64 and lineage["seed"] == 0
    assert Recipe.from_dict(lineage["recipe"]) == Recipe(**TINY, pretrain_steps=2, guard=False)
    assert lineage["datasets"] == [photos_dataset.source]
    assert meta["training"]["kept"] == "finetuned"
    assert summary["kept"] == "finetuned" and summary["out"] == str(path)
    assert meta["training"]["val_accuracy_frozen"] == summary["val_accuracy_frozen"]
    assert meta["training"]["val_accuracy_finetuned"] == summary["val_accuracy_finetuned"]


def test_fingerprint_differs_and_frozen_registries_refuse_the_model(forced_model, caltech_subset, tmp_path):
    path, _ = forced_model
    model = load_head(path)
    frozen = create_encoder(input_size=64)
    tuned = model.carried_encoder()
    assert tuned.fingerprint != frozen.fingerprint
    assert tuned.fingerprint["weights_sha256"] != frozen.fingerprint["weights_sha256"]
    assert model.metadata["encoder"] == tuned.fingerprint
    some = sorted(next(p for p in caltech_subset.iterdir() if p.is_dir()).glob("*.jpg"))[:2]
    plain = FewShotClassifier(frozen, cache=False)
    plain.register("thing", some)
    plain.save(tmp_path / "frozen.reg")
    with pytest.raises(EncoderMismatchError):
        FewShotClassifier.load(tmp_path / "frozen.reg", head=path)
    with pytest.raises(EncoderMismatchError):  # the model with the frozen encoder passed in explicitly
        FewShotClassifier(frozen, head=path, cache=False).register("thing", some)


def test_checksum_refuses_tampered_weights(forced_model, tmp_path):
    path, _ = forced_model
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    weights = bytearray((copy / "weights.safetensors").read_bytes())
    weights[-100] ^= 0x01  # one bit of one encoder weight
    (copy / "weights.safetensors").write_bytes(bytes(weights))
    with pytest.raises(HeadFormatError, match="sha256"):
        load_head(copy)


def test_guard_keeps_the_frozen_encoder_when_finetuning_is_worse(photos_dataset):
    # A learning rate that wrecks the encoder in a few steps: validation must prefer the frozen one.
    recipe = Recipe(**{**TINY, "trainable_stages": 2, "encoder_lr": 0.5, "lr": 0.5, "episodes": 4})
    model, result = finetune(photos_dataset, recipe, progress=False)
    assert result.kept == "frozen"
    assert result.val_accuracy_frozen >= result.val_accuracy_finetuned
    assert model.carried_encoder().fingerprint == create_encoder(input_size=64).fingerprint
    assert model.metadata["training"]["kept"] == "frozen"


@pytest.mark.parametrize("stages,pool,trainable", [(None, "avg", 0), (None, "avg", 2), ((2, 3), 2, 1)])
def test_split_network_computes_the_encoder_features(stages, pool, trainable, photos):
    encoder = create_encoder(stages=stages, pool=pool, input_size=64, compile="none")
    net = SplitNetwork(encoder.model, stages, pool, trainable)
    x = encoder.transform(load_image(photos["chelsea"]))[None]
    with torch.no_grad():
        features = net.suffix(*net.prefix(x)).numpy()
    np.testing.assert_allclose(features, encoder.embed([photos["chelsea"]]), atol=1e-4)


def test_multitask_with_weights_and_domain_adaptation_run_and_replay(photos_dataset):
    half = len(photos_dataset.classes) // 2
    first = photos_dataset.select_classes(photos_dataset.classes[:half])
    second = photos_dataset.select_classes(photos_dataset.classes[half:])
    recipe = Recipe(**{**TINY, "val_fraction": 0.5, "ways": 2})
    model, result = finetune([first, second], recipe, weights=[3, 1], adapt_to=photos_dataset, progress=False)
    assert len(result.val_accuracy_per_dataset) == 2
    assert model.metadata["lineage"]["weights"] == [3.0, 1.0]
    assert model.metadata["lineage"]["adapt_to"] == photos_dataset.source
    again, _ = finetune([first, second], recipe, weights=[3, 1], adapt_to=photos_dataset, progress=False)
    assert again.fingerprint == model.fingerprint  # seeded: the same call gives the same model


def test_finetune_usage_errors_exit_2(caltech_subset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--data", str(caltech_subset), "--weight", "1", "--weight", "2",
              "--out", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    assert "--weight" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_recipes_load_and_bad_recipes_say_what_is_wrong(tmp_path):
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        assert isinstance(Recipe.load(path), Recipe)
    bad = tmp_path / "bad.toml"
    bad.write_text("episodes = 10\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        Recipe.load(bad)
    with pytest.raises(ValueError, match="augment"):
        Recipe(augment=("mixup",))
    with pytest.raises(ValueError, match="precision must be one of"):
        Recipe(precision="float16")
    with pytest.raises(ValueError, match="trainable_stages"):
        SplitNetwork(create_encoder(input_size=64, compile="none").model, None, "avg", 99)
    with pytest.raises(ValueError, match="at least one dataset"):
        finetune([], Recipe())


def test_recipe_numbers_must_be_finite_and_the_error_names_the_key(caltech_subset, tmp_path, capsys):
    bad = tmp_path / "inf.toml"
    bad.write_text("lr = inf\n")
    code = main(["finetune", "--data", str(caltech_subset), "--recipe", str(bad), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"fewshot: error: {bad}: lr must be a finite number > 0, got inf")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
    for key, value in [("encoder_lr", float("nan")), ("weight_decay", -1.0), ("adapt_weight", float("inf")),
                       ("val_fraction", 1.0), ("lr", "fast"), ("max_images_per_class", 0)]:
        with pytest.raises(ValueError, match=f"^{key} must be"):
            Recipe(**{key: value})
    with pytest.raises(SystemExit) as exit_info:
        main(["train-head", "--data", str(caltech_subset), "--head", "protonet", "--lr", "inf", "--out",
              str(tmp_path / "h")])
    assert exit_info.value.code == 2 and "--lr" in capsys.readouterr().err


def test_finetune_logs_a_line_per_validation_when_no_bar_is_shown(photos_dataset, capsys):
    finetune(photos_dataset, Recipe(**TINY), progress=None)  # stderr is not a terminal here: no bar
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["fine-tuning: episode 2/4", "fine-tuning: episode 4/4"]
    assert all("validation accuracy" in line and "\r" not in line for line in lines)
    finetune(photos_dataset, Recipe(**TINY), progress=False)
    assert capsys.readouterr().err == ""


def test_a_past_deadline_trains_nothing_and_returns_the_frozen_model(photos_dataset):
    model, result = finetune(photos_dataset, Recipe(**TINY), progress=False, deadline=time.monotonic())
    assert result.stopped_for_time and result.steps_run == 0 and result.kept == "frozen"
    assert model.carried_encoder().fingerprint == create_encoder(input_size=64).fingerprint
    assert 0 < result.seconds_caching < result.seconds


def test_deadline_stops_training_and_keeps_the_best_validated_weights(photos_dataset):
    recipe = Recipe(**{**TINY, "episodes": 100_000, "val_every": 3, "patience": 100_000, "guard": False})
    start = time.monotonic()
    model, result = finetune(photos_dataset, recipe, progress=False, deadline=start + 15)
    assert result.stopped_for_time and not result.stopped_early and 0 < result.steps_run < recipe.episodes
    assert time.monotonic() - start < 15 + 10  # one step, one validation and packaging past the deadline
    validated = [h["val_accuracy"] for h in result.history]
    assert result.history[-1]["episode"] == result.steps_run  # the last steps were validated before stopping
    assert result.val_accuracy_finetuned >= max(validated)
    assert model.metadata["training"]["stopped_for_time"] is True


def test_distillation_on_unlabeled_images_adds_its_loss_and_replays(photos_dataset):
    recipe = Recipe(**{**TINY, "unlabeled": "distill", "adapt_weight": 1.0, "val_every": 1})
    model, result = finetune(photos_dataset, recipe, adapt_to=photos_dataset, progress=False)
    _, plain = finetune(photos_dataset, recipe, progress=False)
    again, _ = finetune(photos_dataset, recipe, adapt_to=photos_dataset, progress=False)
    with_distill = np.array([h["train_loss"] for h in result.history])
    without = np.array([h["train_loss"] for h in plain.history])
    # the same episodes plus a cosine loss in [0, 2] between augmented views and the frozen network's features
    assert np.isfinite(with_distill).all() and (with_distill > without).all() and (with_distill < without + 2).all()
    assert again.fingerprint == model.fingerprint
    assert model.metadata["lineage"]["recipe"]["unlabeled"] == "distill"
    with pytest.raises(ValueError, match="unlabeled must be one of"):
        Recipe(unlabeled="pseudo-labels")
