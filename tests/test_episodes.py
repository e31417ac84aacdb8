"""Episodes: the sampler, manifests, protocol files and fixed-episode runs."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.data.datasets import ImageDataset, load_dataset, split_by_group
from fewshot.data.episodes import Episode, EpisodeBatch, EpisodeSampler, load_episodes, sample_open_set, save_episodes
from fewshot.data.protocols import Protocol, load_fixed_runs, load_protocol, write_fixed_runs

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
PROTOCOLS = sorted((REPO / "episodes").glob("*.toml"))


def needs(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path.name} not found at {path} (needs ../shared/datasets beside the repo)")
    return path


_LOADED: dict[str, ImageDataset] = {}


def shared_dataset(relative: str) -> ImageDataset:
    """A dataset under ../shared/datasets, loaded once per test session."""
    if relative not in _LOADED:
        _LOADED[relative] = load_dataset(needs(SHARED / relative))
    return _LOADED[relative]


@pytest.fixture(scope="module")
def omniglot() -> ImageDataset:
    return shared_dataset("omniglot/images_background.zip")


@pytest.fixture(scope="module")
def small_omniglot() -> ImageDataset:
    return shared_dataset("omniglot/images_background_small1.zip")


# Labels that are not 0..C-1: a user's own ids. Class 7 is too small for 2 shots + 3 queries.
COUNTS = {100: 9, -5: 6, 7: 3, 42: 12, 3: 5, 8: 20, 11: 7}


def user_labels(seed: int = 0) -> np.ndarray:
    labels = np.concatenate([[value] * n for value, n in COUNTS.items()])
    return np.random.default_rng(seed).permutation(labels)  # items of a class need not be contiguous


def new_sampler(labels, **kw) -> EpisodeSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EpisodeSampler(labels, **kw)


def check_episode(ep: Episode, labels: np.ndarray) -> None:
    """What every consumer relies on: labels say the truth and support/query never overlap."""
    assert len(set(ep.classes.tolist())) == ep.ways
    assert set(ep.support_labels.tolist()) == set(range(ep.ways)) == set(ep.query_labels.tolist())
    np.testing.assert_array_equal(labels[ep.support], ep.classes[ep.support_labels])
    np.testing.assert_array_equal(labels[ep.query], ep.classes[ep.query_labels])
    items = np.concatenate([ep.support, ep.query])
    assert len(np.unique(items)) == len(items)


# --- sampler ------------------------------------------------------------------------------------


def test_episodes_have_the_asked_shape_and_true_labels():
    labels = user_labels()
    with pytest.warns(UserWarning, match="1 of 7 classes have fewer than 5 items"):
        sampler = EpisodeSampler(labels, ways=4, shots=2, queries=3, seed=0)
    seen = set()
    for ep in sampler.sample_many(200):
        assert ep.support.shape == (8,) and ep.query.shape == (12,)
        np.testing.assert_array_equal(ep.support_labels, np.repeat(np.arange(4), 2))  # class-major
        np.testing.assert_array_equal(ep.query_labels, np.repeat(np.arange(4), 3))
        check_episode(ep, labels)
        seen |= set(ep.classes.tolist())
    assert seen == set(COUNTS) - {7}  # every eligible class turns up, the small one never
    assert sorted(sampler.eligible_.tolist()) == sorted(set(COUNTS) - {7})


def test_same_seed_same_episodes_and_another_seed_others():
    labels = user_labels()
    a, b, c = (new_sampler(labels, ways=3, shots=1, queries=2, seed=s) for s in (5, 5, 6))
    for x, y in zip(a.sample_many(10), b.sample_many(10)):
        for field in ("classes", "support", "support_labels", "query", "query_labels"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
    batches = [new_sampler(labels, ways=3, shots=1, queries=2, seed=s).sample_batch(10) for s in (5, 5, 6)]
    np.testing.assert_array_equal(batches[0].support, batches[1].support)
    assert not np.array_equal(batches[0].support, batches[2].support)
    assert any(not np.array_equal(x.support, y.support) for x, y in zip(a.sample_many(10), c.sample_many(10)))


def test_sample_batch_has_the_structure_of_sample():
    labels = user_labels()
    first = new_sampler(labels, ways=4, shots=2, queries=3, seed=9).sample()
    batch = new_sampler(labels, ways=4, shots=2, queries=3, seed=9).sample_batch(1)
    [same] = batch.to_episodes()
    for field in ("classes", "support", "support_labels", "query", "query_labels"):
        np.testing.assert_array_equal(getattr(first, field), getattr(same, field))

    batch = new_sampler(labels, ways=4, shots=2, queries=3, seed=1).sample_batch(300)
    assert isinstance(batch, EpisodeBatch) and len(batch) == 300
    assert batch.classes.shape == (300, 4) and batch.support.shape == (300, 8) and batch.query.shape == (300, 12)
    assert (batch.ways, batch.shots, batch.queries) == (4, 2, 3)
    np.testing.assert_array_equal(labels[batch.support], np.repeat(batch.classes, 2, axis=1))  # class-major
    np.testing.assert_array_equal(labels[batch.query], np.repeat(batch.classes, 3, axis=1))
    for ep in batch.to_episodes():
        check_episode(ep, labels)


@pytest.mark.parametrize("counts", [[6] * 6, [400, 300, 250, 120, 60, 30]])  # both ways of drawing subsets
def test_draws_are_uniform(counts):
    """Every class equally often in every episode position, every item equally often in support."""
    labels = np.repeat(np.arange(6), counts)
    batch = new_sampler(labels, ways=2, shots=1, queries=2, seed=0).sample_batch(24000)
    per_position = np.stack([np.bincount(batch.classes[:, j], minlength=6) for j in range(2)])
    np.testing.assert_allclose(per_position / 24000, 1 / 6, atol=0.012)
    small = np.flatnonzero(labels == 5)  # 30 or 6 items; drawn as support in about 1/3 of episodes
    hits = np.bincount(batch.support[np.isin(batch.support, small)], minlength=len(labels))[small]
    expected = per_position[:, 5].sum() / len(small)
    np.testing.assert_allclose(hits / expected, 1, atol=0.25 if len(small) > 10 else 0.1)


def test_all_way_takes_every_eligible_class():
    labels = user_labels()
    sampler = new_sampler(labels, ways=None, shots=2, queries=3, seed=0)
    for ep in [*sampler.sample_many(5), *sampler.sample_batch(5).to_episodes()]:
        assert sorted(ep.classes.tolist()) == sorted(set(COUNTS) - {7})
        check_episode(ep, labels)


def test_within_group_episodes_stay_in_one_group(omniglot):
    test = split_by_group(omniglot, 10, seed=0)[1]
    small_groups = {g for g, n in enumerate(np.bincount(test.class_groups)) if n < 20}
    sampler = EpisodeSampler(test.labels, ways=20, shots=1, queries=1, groups=test.groups, within_group=True, seed=0)
    batch = sampler.sample_batch(200)
    groups = test.class_groups[batch.classes]
    assert (groups == groups[:, :1]).all()
    assert len(np.unique(groups[:, 0])) > 5 and not set(groups[:, 0].tolist()) & small_groups
    for ep in sampler.sample_many(20):
        assert len(set(test.groups[np.concatenate([ep.support, ep.query])].tolist())) == 1
        check_episode(ep, test.labels)
    across = EpisodeSampler(test.labels, ways=20, shots=1, queries=1, seed=0).sample_batch(50)
    assert (test.class_groups[across.classes] != test.class_groups[across.classes][:, :1]).any()
    all_way = EpisodeSampler(test.labels, ways=None, shots=1, queries=1, groups=test.groups, within_group=True)
    for ep in all_way.sample_many(10):
        group = test.class_groups[ep.classes[0]]
        assert sorted(ep.classes.tolist()) == np.flatnonzero(test.class_groups == group).tolist()
    with pytest.raises(ValueError, match="differ in size from group to group"):
        all_way.sample_batch(3)


def test_impossible_requests_say_what_to_change():
    labels = user_labels()
    with pytest.raises(ValueError, match="ways=7 needs 7 classes .* the most in total is 6; lower ways"):
        new_sampler(labels, ways=7, shots=2, queries=3)
    with pytest.raises(ValueError, match="needs groups"):
        new_sampler(labels, within_group=True)
    groups = np.where(labels > 10, "big", "small")  # 3 and 4 classes
    with pytest.raises(ValueError, match="most in any one group is 4; lower ways.*within_group=False"):
        new_sampler(labels, ways=5, shots=1, queries=1, groups=groups, within_group=True)
    with pytest.raises(ValueError, match="more than one group"):
        new_sampler(labels, ways=2, shots=1, queries=1, groups=np.arange(len(labels)) % 2, within_group=True)
    for bad in (dict(shots=0), dict(queries=True), dict(ways=2.0), dict(ways=0)):
        with pytest.raises(ValueError, match="must be an integer"):
            new_sampler(labels, **bad)
    with pytest.raises(ValueError, match="1-D"):
        new_sampler(labels.reshape(-1, 2))
    variable = new_sampler(labels, variable=True, min_ways=2, max_ways=5)
    with pytest.raises(ValueError, match="use sample_many"):
        variable.sample_batch(2)
    with pytest.raises(ValueError, match="lower min_ways"):
        new_sampler(labels, variable=True, min_ways=8, max_ways=9)
    with pytest.raises(ValueError, match="raise max_support"):
        new_sampler(labels, variable=True, min_ways=2, max_ways=5, max_support=3)


def test_variable_episodes_respect_their_bounds():
    rng = np.random.default_rng(0)
    counts = rng.integers(2, 60, size=40)
    labels = np.repeat(np.arange(40) * 10, counts)  # labels 0, 10, 20, ...
    sampler = EpisodeSampler(labels, variable=True, min_ways=3, max_ways=12, queries=5, max_support=80, seed=1)
    ways, totals = set(), []
    for ep in sampler.sample_many(200):
        check_episode(ep, labels)
        assert 3 <= ep.ways <= 12
        n = counts[ep.classes // 10]
        per_query = np.bincount(ep.query_labels, minlength=ep.ways)
        per_support = np.bincount(ep.support_labels, minlength=ep.ways)
        np.testing.assert_array_equal(per_query, np.minimum(5, n // 2))
        assert (per_support >= 1).all() and (per_support <= n - per_query).all()
        assert len(ep.support) <= 80
        ways.add(ep.ways)
        totals.append(len(ep.support))
    assert len(ways) >= 8 and len(set(totals)) > 20  # shapes really vary
    again = EpisodeSampler(labels, variable=True, min_ways=3, max_ways=12, queries=5, max_support=80, seed=1)
    np.testing.assert_array_equal(again.sample().support, EpisodeSampler(
        labels, variable=True, min_ways=3, max_ways=12, queries=5, max_support=80, seed=1).sample().support)


def test_iterating_is_endless_and_matches_sample_many():
    labels = user_labels()
    it = iter(new_sampler(labels, ways=2, shots=1, queries=1, seed=4))
    firsts = [next(it) for _ in range(50)]
    for x, y in zip(firsts, new_sampler(labels, ways=2, shots=1, queries=1, seed=4).sample_many(50)):
        np.testing.assert_array_equal(x.query, y.query)


# --- manifests ----------------------------------------------------------------------------------


def tiny_dataset(root: Path) -> ImageDataset:
    for g in ("Alpha", "Beta"):
        for c in range(3):
            for i in range(4):
                path = root / g / f"c{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                Image.new("L", (3, 3), 10 * c + i).save(buf, format="PNG")
                path.write_bytes(buf.getvalue())
    return load_dataset(root)


def test_manifest_round_trip_by_name(tmp_path):
    ds = tiny_dataset(tmp_path / "data")
    episodes = EpisodeSampler(ds.labels, ways=3, shots=2, queries=2, seed=0).sample_many(4)
    protocol = {"name": "tiny", "ways": 3, "seed": 0}
    save_episodes(tmp_path / "eps.json", episodes, ds, protocol=protocol)
    doc = json.loads((tmp_path / "eps.json").read_text())
    assert (doc["format"], doc["version"], doc["dataset"], doc["protocol"]) == \
           ("fewshot-episodes", 1, ds.source, protocol)
    assert doc["episodes"][0]["classes"] == [ds.classes[c] for c in episodes[0].classes]
    assert doc["episodes"][0]["support"][0] == ds.names[episodes[0].support[0]]

    # The same data listed elsewhere (a zip this time) gives the same episodes by name.
    import zipfile
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as zf:
        for name, item in zip(ds.names, ds.items):
            zf.write(item, "wrapper/" + name)
    for other in (ds, load_dataset(tmp_path / "data.zip")):
        loaded = load_episodes(tmp_path / "eps.json", other)
        assert len(loaded) == 4
        for x, y in zip(episodes, loaded):
            for field in ("classes", "support", "support_labels", "query", "query_labels"):
                np.testing.assert_array_equal(getattr(x, field), getattr(y, field))

    batch = EpisodeSampler(ds.labels, ways=2, shots=1, queries=1, seed=0).sample_batch(3)
    save_episodes(tmp_path / "batch.json", batch, ds)
    np.testing.assert_array_equal(load_episodes(tmp_path / "batch.json", ds)[2].query, batch.query[2])


def test_manifest_errors(tmp_path):
    ds = tiny_dataset(tmp_path / "data")
    episodes = EpisodeSampler(ds.labels, ways=2, shots=1, queries=1, seed=0).sample_many(2)
    path = tmp_path / "eps.json"
    save_episodes(path, episodes, ds)
    doc = json.loads(path.read_text())
    doc["episodes"][1]["query"][0] = "Gamma/c9/0.png"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"episode 1: 'Gamma/c9/0.png' is not in dataset .*data"):
        load_episodes(path, ds)
    doc["episodes"][1]["query"] = [ds.names[i] for i in episodes[1].query]
    doc["episodes"][1]["query_labels"] = [1, 0]  # each query now claims the other class
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="the data differ"):
        load_episodes(path, ds)
    path.write_text(json.dumps({"format": "fewshot-episodes", "version": 2, "episodes": []}))
    with pytest.raises(ValueError, match="version 2"):
        load_episodes(path, ds)
    path.write_text("not json")
    with pytest.raises(ValueError, match="not an episode manifest"):
        load_episodes(path, ds)
    bad = Episode(np.array([0, 99]), np.array([0]), np.array([0]), np.array([1]), np.array([0]))
    with pytest.raises(ValueError, match="index 99"):
        save_episodes(tmp_path / "bad.json", [bad], ds)


# --- protocols ----------------------------------------------------------------------------------


def test_protocol_files_exist_for_each_standard_setting():
    names = {p.stem for p in PROTOCOLS}
    assert {"omniglot-within-20way-1shot", "omniglot-5way-1shot", "omniglot-5way-5shot", "omniglot-20way-1shot",
            "omniglot-20way-5shot", "caltech-5way-1shot", "caltech-5way-5shot", "caltech-allway-1shot",
            "caltech-allway-5shot", "omniglot-runs"} <= names
    for path in PROTOCOLS:
        assert path.read_text().startswith("#"), f"{path.name} needs a comment header saying what it measures"


@pytest.mark.parametrize("path", PROTOCOLS, ids=lambda p: p.stem)
def test_every_protocol_loads_and_samples_on_its_data(path, tmp_path, small_omniglot):
    protocol = load_protocol(path)
    assert protocol.name == path.stem and protocol.description
    if protocol.runs is not None:  # fixed runs: the user's folder; check one made in the same format
        root = tmp_path / protocol.runs
        write_fixed_runs(small_omniglot, root, runs=protocol.episodes, ways=protocol.ways, seed=protocol.seed)
        runs = load_fixed_runs(root)
        assert len(runs) == protocol.episodes and all(len(r.support) == protocol.ways for r in runs)
        return
    dataset = shared_dataset(protocol.dataset)
    test, train = protocol.test_split(dataset), protocol.train_split(dataset)
    assert not set(test.classes) & set(train.classes) and len(test) + len(train) == len(dataset)
    if "omniglot" in protocol.name:
        assert len(test.group_names) == 10
    else:
        assert len(test.classes) == 17
        assert ("Faces" in test.classes) == ("Faces_easy" in test.classes)
    sampler = protocol.sampler(test.labels, test.groups)
    episodes = sampler.sample_batch(protocol.episodes).to_episodes()
    assert len(episodes) == protocol.episodes
    ways = protocol.ways or len(test.classes)
    for ep in episodes[:50]:
        check_episode(ep, test.labels)
        assert ep.ways == ways and len(ep.support) == ways * protocol.shots and len(ep.query) == ways * protocol.queries
    if protocol.unknown_ways:
        for open_ep in protocol.open_set_episodes(test.labels, 50):
            assert len(open_ep.unknown_classes) == protocol.unknown_ways
            assert not set(open_ep.unknown_classes) & set(open_ep.episode.classes)
            assert set(test.labels[open_ep.unknown_query]) == set(open_ep.unknown_classes)
        if protocol.within_group:
            assert len(set(test.class_groups[ep.classes].tolist())) == 1


def test_protocol_settings_match_the_published_ones():
    by_name = {p.stem: load_protocol(p) for p in PROTOCOLS}
    within = by_name["omniglot-within-20way-1shot"]
    assert (within.ways, within.shots, within.queries, within.episodes, within.within_group) == (20, 1, 1, 400, True)
    assert by_name["caltech-allway-1shot"].ways is None and by_name["caltech-allway-1shot"].queries == 5
    assert by_name["omniglot-20way-5shot"].queries == 15 and by_name["omniglot-5way-5shot"].episodes == 600
    omniglot_tests = {tuple(p.split["test"]) for n, p in by_name.items() if n.startswith("omniglot") and p.split}
    assert len(omniglot_tests) == 1  # every Omniglot protocol tests on the same 10 alphabets
    assert by_name["omniglot-runs"].runs == "omniglot/runs"


def test_protocol_errors_name_the_file_and_key(tmp_path):
    def load(text):
        (tmp_path / "p.toml").write_text(text)
        return load_protocol(tmp_path / "p.toml")

    assert load('ways = "all"\nshots = 2').ways is None
    protocol = load("")
    assert isinstance(protocol, Protocol) and protocol.name == "p" and protocol.split == {}
    with pytest.raises(ValueError, match=r"p\.toml: unknown key 'way'"):
        load("way = 5")
    with pytest.raises(ValueError, match=r"p\.toml: shots must be int, got '1'"):
        load('shots = "1"')
    with pytest.raises(ValueError, match=r"p\.toml: within_group must be bool"):
        load("within_group = 1")
    with pytest.raises(ValueError, match=r"p\.toml: queries must be >= 1"):
        load("queries = 0")
    with pytest.raises(ValueError, match=r"split\.by must be"):
        load('[split]\nby = "alphabet"\ntest = 3')
    with pytest.raises(ValueError, match=r"unknown key split\.tset"):
        load('[split]\nby = "group"\ntset = 3')
    with pytest.raises(ValueError, match=r"not valid TOML"):
        load("ways = ")
    with pytest.raises(ValueError, match="no split"):
        load("").train_split(None)


# --- fixed runs ---------------------------------------------------------------------------------


def test_written_fixed_runs_round_trip(tmp_path, small_omniglot):
    ds = small_omniglot
    runs = write_fixed_runs(ds, tmp_path / "runs", runs=3, ways=20, seed=0)
    assert [r.name for r in runs] == ["run01", "run02", "run03"]
    assert load_fixed_runs(tmp_path / "runs")[1].query == runs[1].query
    by_bytes = {bytes(item): i for i, item in enumerate(ds.items)}
    assert len(by_bytes) == len(ds)  # every image distinct, so bytes identify the source item
    line = re.compile(r"^(run\d\d)/test/item\d\d\.png \1/training/class\d\d\.png$")
    for run in runs:
        text = (tmp_path / "runs" / run.name / "class_labels.txt").read_text().splitlines()
        assert len(text) == 20 and all(line.match(t) for t in text)
        assert len(run.support) == 20 and len(run.query) == 20 and sorted(run.query_labels.tolist()) == list(range(20))
        support = [by_bytes[p.read_bytes()] for p in run.support]
        query = [by_bytes[p.read_bytes()] for p in run.query]
        assert not set(support) & set(query)
        assert len({ds.labels[i] for i in support}) == 20
        assert [ds.labels[i] for i in query] == [ds.labels[support[j]] for j in run.query_labels]
        assert len({ds.groups[i] for i in support + query}) == 1  # within one alphabet
        assert run.query_labels.tolist() != list(range(20))  # item numbers do not give the class away
    again = write_fixed_runs(ds, tmp_path / "again", runs=3, ways=20, seed=0)
    assert [p.read_bytes() for p in again[2].query] == [p.read_bytes() for p in runs[2].query]
    with pytest.raises(ValueError, match="not an empty folder"):
        write_fixed_runs(ds, tmp_path / "runs", runs=1)


def test_malformed_fixed_runs_are_clear_errors(tmp_path, small_omniglot):
    root = tmp_path / "runs"
    write_fixed_runs(small_omniglot, root, runs=1, ways=5, seed=0)
    labels_file = root / "run01" / "class_labels.txt"
    good = labels_file.read_text()

    def broken(text):
        labels_file.write_text(text)
        return pytest.raises(ValueError, match=re.escape(str(labels_file)))

    with broken(good + "run01/test/item01.png\n"):
        load_fixed_runs(root)
    with broken("../outside.png run01/training/class01.png\n"):
        load_fixed_runs(root)
    with broken("run01/test/item99.png run01/training/class01.png\n"):
        load_fixed_runs(root)
    with broken("run01/test/item01.png run01/test/item02.png\n"):
        load_fixed_runs(root)
    with broken(""):
        load_fixed_runs(root)
    labels_file.unlink()
    with pytest.raises(ValueError, match="class_labels.txt: missing"):
        load_fixed_runs(root)
    with pytest.raises(ValueError, match="not a folder"):
        load_fixed_runs(tmp_path / "nowhere")


@pytest.mark.parametrize("edit, message", [
    (lambda row: row.update(query=row["support"][:1] + row["query"][1:]), "also in the support set"),
    (lambda row: row.update(support=[], support_labels=[]), "no support"),
    (lambda row: row.update(query=[], query_labels=[]), "no query"),
    (lambda row: row.update(support_labels=[10**30] + row["support_labels"][1:]), "lists of integers"),
    (lambda row: row.update(support_labels=[0.0] + row["support_labels"][1:]), "lists of integers"),
    (lambda row: row.update(support_labels=[True] + row["support_labels"][1:]), "lists of integers"),
    (lambda row: row.update(classes=row["classes"][:1] * 2), "more than once"),
    (lambda row: row.update(support=row["support"][:1], support_labels=[0]), "no support image"),
])
def test_replay_manifest_that_cannot_measure_anything_is_refused(tmp_path, edit, message):
    """A manifest whose episodes would score meaninglessly (query = support, nothing to score) or that
    holds impossible numbers gets a clear error naming the episode, never a score or a traceback."""
    ds = tiny_dataset(tmp_path / "data")
    path = tmp_path / "eps.json"
    save_episodes(path, EpisodeSampler(ds.labels, ways=2, shots=2, queries=2, seed=0).sample_many(2), ds)
    doc = json.loads(path.read_text())
    edit(doc["episodes"][1])
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"episode 1: .*{message}"):
        load_episodes(path, ds)


@pytest.mark.parametrize("line, key", [
    ("episodes = 1000000000000", "episodes"),
    ("ways = 1000000000", "ways"),
    ("shots = 1000000000", "shots"),
    ("queries = 1000000000", "queries"),
    ("max_support = 1000000000000", "max_support"),
    ("seed = -1", "seed"),
    ("seed = 1000000000000000000000", "seed"),
])
def test_protocol_sizes_beyond_sane_limits_are_refused_naming_file_and_key(tmp_path, line, key):
    """A protocol file chooses how much work and memory an evaluation takes: `episodes = 10**12`
    grew memory without end. Each number must lie within limits, checked when the file is read."""
    path = tmp_path / "hostile.toml"
    path.write_text(f'description = "x"\n{line}\n')
    with pytest.raises(ValueError, match=rf"{path}.*{key}"):
        load_protocol(path)


def test_sampler_refuses_episode_counts_beyond_the_limit():
    from fewshot.data.episodes import MAX_EPISODES

    sampler = EpisodeSampler(user_labels(), ways=2, shots=1, queries=1, seed=0)
    with pytest.raises(ValueError, match="at most"):
        sampler.sample_many(MAX_EPISODES + 1)
    with pytest.raises(ValueError, match="at most"):
        sampler.sample_batch(10**12)


def test_open_set_episodes_keep_unknown_classes_out_of_the_support_and_replay_from_the_seed():
    labels = np.repeat(np.arange(12), 8)
    first = sample_open_set(labels, ways=4, shots=2, queries=3, unknown_ways=3, unknown_queries=2, episodes=20, seed=5)
    again = sample_open_set(labels, ways=4, shots=2, queries=3, unknown_ways=3, unknown_queries=2, episodes=20, seed=5)
    for a, b in zip(first, again):
        assert np.array_equal(a.unknown_query, b.unknown_query) and np.array_equal(a.episode.support, b.episode.support)
    for open_ep in first:
        check_episode(open_ep.episode, labels)
        unknown = set(labels[open_ep.unknown_query])
        assert unknown == set(open_ep.unknown_classes) and len(unknown) == 3 and len(open_ep.unknown_query) == 6
        assert not unknown & set(open_ep.episode.classes)
    with pytest.raises(ValueError, match="unknown_ways"):
        sample_open_set(labels, ways=10, shots=2, queries=3, unknown_ways=3, episodes=1)


def test_protocol_open_set_fields_are_checked(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "p"\nways = 5\nunknown_ways = 5\nunknown_queries = 10\n')
    protocol = load_protocol(path)
    assert (protocol.unknown_ways, protocol.unknown_queries) == (5, 10)
    path.write_text('name = "p"\nunknown_ways = -1\n')
    with pytest.raises(ValueError, match="unknown_ways must be >= 0"):
        load_protocol(path)
    path.write_text('name = "p"\nways = "all"\nunknown_ways = 2\n')
    with pytest.raises(ValueError, match="fixed number of ways"):
        load_protocol(path).open_set_episodes(np.repeat(np.arange(10), 20))
