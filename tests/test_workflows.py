"""Train a head and evaluate it, through the CLI, on real Omniglot drawings with the real encoder."""

from __future__ import annotations

import json
import pytest

from fewshot.cli import main

# Small, fast features for tests: stage 2 of Lite0 at 64 px, pooled to 2x2.
FEATURES = ["--stages", "2", "--pool", "2", "--input-size", "64"]


@pytest.fixture(scope="module")
def omniglot(omniglot_small):
    return omniglot_small


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    path = tmp_path_factory.mktemp("protocol") / "within-5way.toml"
    path.write_text('name = "small-within-5way-1shot"\nways = 5\nshots = 1\nqueries = 2\nepisodes = 60\n'
                    'seed = 3\nwithin_group = true\n[split]\nby = "group"\ntest = ["Balinese", "Greek"]\n')
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_head(omniglot, protocol, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "protonet"
    code = main(["train-head", "--data", str(omniglot), "--protocol", str(protocol), "--head", "protonet",
                 "--ways", "5", "--episodes", "150", "--within-group", "--augment", "rotations",
                 "--out", str(out), *FEATURES])
    assert code == 0
    return out


def test_evaluate_protocol_json_and_files(omniglot, protocol, tmp_path, capsys):
    code, out, _ = run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--json",
                       "--out", tmp_path, *FEATURES)
    result = json.loads(out)
    assert code == 0 and result["episodes"] == 60 and result["ways"] == 5 and result["shots"] == 1
    assert 0.2 < result["accuracy"] <= 1 and result["ci95"] > 0
    assert {p.name for p in tmp_path.iterdir()} >= {"result.json", "episodes.csv", "confusion.png"}


def test_manifest_replays_identically(omniglot, protocol, tmp_path, capsys):
    manifest = tmp_path / "episodes.json"
    _, first, _ = run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--json", "--out",
                      tmp_path / "a", "--save-episodes", manifest, *FEATURES)
    _, again, _ = run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--json", "--out",
                      tmp_path / "b", "--replay", manifest, "--seed", "99", *FEATURES)
    assert json.loads(first)["accuracy"] == json.loads(again)["accuracy"]


def test_head_records_its_encoder_and_training(trained_head):
    from fewshot import load_head

    metadata = load_head(trained_head).metadata
    assert metadata["encoder"]["preprocess"]["input_size"] == [3, 64, 64]
    assert metadata["training"]["augment"] == "rotations" and metadata["training"]["within_group"]
    validation_groups = {name.split("/")[0] for name in metadata["training"]["validation_classes"]}
    assert not validation_groups & {"Balinese", "Greek"}


def test_rotations_make_new_classes_of_exactly_rotated_images(omniglot):
    import numpy as np

    from fewshot.data.datasets import load_dataset
    from fewshot.embedding.images import load_image
    from fewshot.workflows import with_rotations

    data = load_dataset(omniglot).select_groups(["Latin"])
    rotated = with_rotations(data)
    assert len(rotated) == 4 * len(data) and len(rotated.classes) == 4 * len(data.classes)
    assert rotated.classes[len(data.classes)] == data.classes[0] + "@90"
    assert np.array_equal(np.asarray(load_image(rotated.items[len(data)])),
                          np.asarray(load_image(data.items[0]).rotate(90, expand=True)))


def test_trained_head_beats_raw_features(trained_head, omniglot, protocol, tmp_path, capsys):
    _, raw, _ = run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--json", "--out",
                    tmp_path / "raw", *FEATURES)
    code, headed, _ = run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--head", trained_head,
                          "--json", "--out", tmp_path / "head")
    assert code == 0
    assert json.loads(headed)["accuracy"] > json.loads(raw)["accuracy"] + 0.03


def test_register_and_predict_with_a_head(trained_head, tmp_path, capsys, photos):
    reg = tmp_path / "r"
    assert run(capsys, "register", reg, "--head", trained_head, "--class", "coins", photos["coins"])[0] == 0
    assert run(capsys, "register", reg, "--class", "moon", photos["camera"])[0] == 0  # head found from the registry
    code, out, _ = run(capsys, "predict", reg, photos["coins"], "--json")
    assert code == 0 and json.loads(out)[0]["label"] == "coins"
    manifest = json.loads((reg / "manifest.json").read_text())
    assert manifest["fingerprint"]["head"]["name"] == "protonet"


def test_fixed_runs(omniglot, tmp_path, capsys):
    from fewshot.data.datasets import load_dataset
    from fewshot.data.protocols import write_fixed_runs

    write_fixed_runs(load_dataset(omniglot), tmp_path / "runs", runs=3, ways=5, seed=0)
    code, out, _ = run(capsys, "evaluate", "--runs", tmp_path / "runs", "--json", "--out", tmp_path / "o",
                       *FEATURES)
    result = json.loads(out)
    assert code == 0 and result["episodes"] == 3 and result["ways"] == 5
    assert result["error"] == pytest.approx(1 - result["accuracy"])


def test_evaluate_usage_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate"])  # nothing to evaluate: no --data, --protocol, --replay or --runs
    assert exit_info.value.code == 2


def test_a_head_worse_than_raw_features_is_not_kept_unless_forced(omniglot, protocol, tmp_path, capsys):
    from fewshot import load_head

    # A 2-dimensional projection cannot match raw features on 5-way episodes.
    args = ["train-head", "--data", omniglot, "--protocol", protocol, "--head", "protonet", "--ways", "5",
            "--episodes", "20", "--val-every", "10", "--within-group", "--param", "out_dim=2", "--json", *FEATURES]
    code, out, err = run(capsys, *args, "--out", tmp_path / "guarded")
    assert "worse than raw features" in err and "keeping raw features" in err
    summary = json.loads(out)
    assert code == 0 and summary["kept"] == "raw features"
    assert summary["val_accuracy_head"] < summary["val_accuracy_raw_features"]
    guarded = load_head(tmp_path / "guarded")
    assert guarded.name == "identity" and not guarded.center
    assert guarded.metadata["training"]["trained_head"] == "protonet"
    assert guarded.metadata["training"]["val_accuracy_raw_features"] == summary["val_accuracy_raw_features"]
    # Evaluating with the kept head is evaluating raw features.
    _, raw, _ = run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--json", "--out",
                    tmp_path / "raw", *FEATURES)
    _, kept, _ = run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--head", tmp_path / "guarded",
                     "--json", "--out", tmp_path / "kept")
    assert json.loads(kept)["accuracy"] == pytest.approx(json.loads(raw)["accuracy"], abs=1e-9)

    code, out, err = run(capsys, *args, "--force", "--out", tmp_path / "forced")
    assert "keeping the protonet head (--force)" in err
    forced = load_head(tmp_path / "forced")
    assert code == 0 and json.loads(out)["kept"] == "head" and forced.name == "protonet" and forced.out_dim == 2
    assert forced.metadata["training"]["forced"] is True

def test_default_output_keeps_head_and_raw_results_apart_with_provenance(omniglot, protocol, trained_head,
                                                                          tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--episodes", "5", *FEATURES)[0] == 0
    assert run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--episodes", "5",
               "--head", trained_head)[0] == 0
    folder = tmp_path / "evaluation" / "small-within-5way-1shot"
    raw, head = (json.loads((folder / sub / "result.json").read_text()) for sub in ("raw", trained_head.name))
    assert raw["head"] is None and head["head"]["name"] == "protonet"
    assert head["head"]["fingerprint"] and head["head"]["path"] == str(trained_head.resolve())
    for result in (raw, head):
        assert result["encoder"]["preprocess"]["input_size"] == [3, 64, 64]
        assert result["dataset"] == str(omniglot) and result["protocol"]["name"] == "small-within-5way-1shot"


def test_replay_takes_everything_from_the_manifest_and_refuses_a_contradicting_protocol(
        omniglot, protocol, tmp_path, capsys):
    manifest = tmp_path / "episodes.json"
    _, first, _ = run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--episodes", "8", "--json",
                      "--out", tmp_path / "a", "--save-episodes", manifest, *FEATURES)
    code, again, err = run(capsys, "evaluate", "--replay", manifest, "--json", "--out", tmp_path / "b", *FEATURES)
    assert code == 0, err
    assert json.loads(again)["accuracy"] == json.loads(first)["accuracy"]
    five_shot = tmp_path / "five-shot.toml"
    five_shot.write_text(protocol.read_text().replace("shots = 1", "shots = 5"))
    code, _, err = run(capsys, "evaluate", "--data", omniglot, "--protocol", five_shot, "--replay", manifest,
                       "--out", tmp_path / "c", *FEATURES)
    assert code == 1 and "1-shot" in err and "5-shot" in err and not (tmp_path / "c").exists()


def test_train_head_refuses_a_validation_split_that_cannot_measure_anything(caltech_subset, tmp_path, capsys):
    """One validation class gives 1-way episodes, where every head and raw features score 100%."""
    code, _, err = run(capsys, "train-head", "--data", caltech_subset, "--head", "protonet", "--val-fraction", "0.1",
                       "--out", tmp_path / "head", *FEATURES)
    assert code == 1 and "--val-fraction" in err and "1 class" in err and not (tmp_path / "head").exists()


def test_evaluate_shows_progress_on_a_terminal(omniglot, protocol, tmp_path, run_on_a_terminal):
    code, out, terminal = run_on_a_terminal("evaluate", "--data", omniglot, "--protocol", protocol, "--episodes", "8",
                                            "--out", tmp_path, *FEATURES)
    assert code == 0 and "accuracy" in out
    assert "evaluating" in terminal and "8/8" in terminal  # the episode bar, even for a short run


def test_flip_support_views_evaluation_replays_exactly_and_is_recorded(omniglot, protocol, tmp_path, capsys):
    manifest = tmp_path / "episodes.json"
    _, first, _ = run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--json", "--out",
                      tmp_path / "a", "--save-episodes", manifest, "--support-views", "flip", *FEATURES)
    _, again, _ = run(capsys, "evaluate", "--data", omniglot, "--protocol", protocol, "--json", "--out",
                      tmp_path / "b", "--replay", manifest, "--support-views", "flip", *FEATURES)
    first, again = json.loads(first), json.loads(again)
    assert first["accuracy"] == again["accuracy"] and first["per_class_accuracy"] == again["per_class_accuracy"]
    assert first["support_views"] == "flip" and first["shots"] == 1  # a mirror is a view, not another shot
    assert (tmp_path / "a" / "episodes.csv").read_text() == (tmp_path / "b" / "episodes.csv").read_text()


def test_flipped_support_rows_are_the_mirrored_images_and_queries_stay_as_they_are(caltech_subset, encoder):
    import numpy as np

    from fewshot.data.datasets import load_dataset
    from fewshot.data.episodes import EpisodeSampler
    from fewshot.embedding.images import load_image
    from fewshot.workflows import embed_dataset, with_flipped_support

    dataset = load_dataset(caltech_subset)
    dataset = dataset.select_items(np.isin(dataset.labels, [0, 1, 2]))
    features, dataset = embed_dataset(encoder, dataset)
    episodes = EpisodeSampler(dataset.labels, ways=3, shots=1, queries=1, seed=0).sample_many(2)
    viewed_features, labels, viewed = with_flipped_support(encoder, dataset, features, episodes)
    for plain, views in zip(episodes, viewed):
        assert (views.query == plain.query).all() and (views.support[0::2] == plain.support).all()
        assert (labels[views.support[1::2]] == dataset.labels[plain.support]).all()
        mirrors = encoder.embed([np.asarray(load_image(dataset.items[i]))[:, ::-1] for i in plain.support])
        assert np.allclose(viewed_features[views.support[1::2]], mirrors, atol=1e-5)
