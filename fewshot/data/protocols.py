"""Benchmark protocols (TOML files naming a dataset, its splits and N-way K-shot settings) and fixed-episode
runs (the published Omniglot one-shot format: a folder per run with ``class_labels.txt``).

Both turn into episodes of ``fewshot.data.episodes``; ``manifest_origin`` reads back the protocol a saved
episode manifest recorded, so that a replay needs nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checks import check_int
from ..embedding.images import IMAGE_EXTENSIONS
from .datasets import ImageDataset, split_by_class, split_by_group
from .episodes import (MAX_EPISODES, MAX_ITEMS_PER_CLASS, MAX_SEED, MAX_SUPPORT, MAX_WAYS, EpisodeSampler,
                       OpenSetEpisode, read_manifest, sample_open_set)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def manifest_origin(path: str | os.PathLike) -> tuple[Protocol | None, str | None]:
    """(protocol, dataset) an episode manifest was saved with, so a replay needs nothing else; either is
    None where the manifest does not record it."""
    doc = read_manifest(path)
    protocol, dataset = doc.get("protocol"), doc.get("dataset")
    return (protocol_from_dict(protocol, f"{path} (its protocol)") if protocol is not None else None,
            dataset if isinstance(dataset, str) and dataset else None)


# --- protocols ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """A benchmark setting from a TOML file in ``episodes/``: the data, its split and the episodes."""

    name: str
    description: str = ""
    dataset: str | None = None  # relative to a data root, e.g. "omniglot/images_background.zip"
    ways: int | None = 5  # None (TOML: "all") = every eligible class
    shots: int = 1
    queries: int = 15
    episodes: int = 600
    seed: int = 0
    within_group: bool = False
    variable: bool = False
    min_ways: int = 5  # variable episodes only
    max_ways: int = 50
    max_support: int = 500
    split: dict = field(default_factory=dict)  # {"by": "group"|"class", "test": [names] | count, "seed": int}
    runs: str | None = None  # fixed-run protocols: folder of runs relative to the data root
    unknown_ways: int = 0  # open set: classes per episode that are never registered, only queried
    unknown_queries: int | None = None  # queries per unknown class (default: queries)

    def to_dict(self) -> dict:
        """Plain dict, e.g. for ``save_episodes(..., protocol=protocol.to_dict())``."""
        return dataclasses.asdict(self)

    def sampler(self, labels, groups=None) -> EpisodeSampler:
        return EpisodeSampler(labels, ways=self.ways, shots=self.shots, queries=self.queries, groups=groups,
                              within_group=self.within_group, seed=self.seed, variable=self.variable,
                              min_ways=self.min_ways, max_ways=self.max_ways, max_support=self.max_support)

    def open_set_episodes(self, labels, episodes: int | None = None) -> list[OpenSetEpisode]:
        """The protocol's seeded open-set episodes (``unknown_ways`` > 0)."""
        if not self.unknown_ways:
            raise ValueError(f"protocol {self.name!r} has no unknown_ways: it is not an open-set protocol")
        if self.ways is None or self.variable:
            raise ValueError(f"protocol {self.name!r}: open-set episodes need a fixed number of ways")
        return sample_open_set(labels, ways=self.ways, shots=self.shots, queries=self.queries,
                               unknown_ways=self.unknown_ways, unknown_queries=self.unknown_queries,
                               episodes=episodes or self.episodes, seed=self.seed)

    def test_split(self, dataset: ImageDataset) -> ImageDataset:
        """The part of ``dataset`` this protocol evaluates on (all of it when there is no split)."""
        return self._split(dataset)[1] if self.split else dataset

    def train_split(self, dataset: ImageDataset) -> ImageDataset:
        """The rest of ``dataset``: what a head may train on without seeing the test classes."""
        if not self.split:
            raise ValueError(f"protocol {self.name!r} has no split: it tests on the whole dataset, so there is no "
                             "train side; add a [split] table or use another protocol to train")
        return self._split(dataset)[0]

    def _split(self, dataset: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
        by, test, seed = self.split["by"], self.split["test"], self.split.get("seed", 0)
        try:
            return (split_by_group if by == "group" else split_by_class)(dataset, test, seed=seed)
        except ValueError as e:
            raise ValueError(f"protocol {self.name!r}, split.test: {e}") from None


_TYPES = {"name": str, "description": str, "dataset": str, "ways": int, "shots": int, "queries": int,
          "episodes": int, "seed": int, "within_group": bool, "variable": bool, "min_ways": int,
          "max_ways": int, "max_support": int, "split": dict, "runs": str, "unknown_ways": int,
          "unknown_queries": int}


_LIMITS = [("ways", 1, MAX_WAYS), ("shots", 1, MAX_ITEMS_PER_CLASS), ("queries", 1, MAX_ITEMS_PER_CLASS),
           ("episodes", 1, MAX_EPISODES), ("min_ways", 1, MAX_WAYS), ("max_ways", 1, MAX_WAYS),
           ("max_support", 1, MAX_SUPPORT), ("seed", 0, MAX_SEED), ("unknown_ways", 0, MAX_WAYS),
           ("unknown_queries", 1, MAX_ITEMS_PER_CLASS)]


def load_protocol(path: str | os.PathLike) -> Protocol:
    """Read a protocol TOML file; unknown keys and bad values are errors naming the file and key."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such protocol file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    return protocol_from_dict(raw, path)


def protocol_from_dict(raw: dict, path: str | os.PathLike) -> Protocol:
    """A ``Protocol`` from the keys of a protocol file (or ``Protocol.to_dict()``, e.g. as an episode
    manifest records it), checked as ``load_protocol`` checks them; errors name ``path`` and the key."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the protocol must be a table of keys, got {type(raw).__name__}")
    raw = {k: v for k, v in raw.items() if v is not None or k == "ways"}  # to_dict's None: the default
    values = {}
    for key, value in raw.items():
        if key not in _TYPES:
            raise ValueError(f"{path}: unknown key {key!r}; known keys: {', '.join(_TYPES)}")
        if key == "ways" and value in ("all", None):
            values[key] = None
            continue
        kind = _TYPES[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            hint = ' (or "all")' if key == "ways" else ""
            raise ValueError(f"{path}: {key} must be {kind.__name__}{hint}, got {value!r}")
        values[key] = value
    for key, low, high in _LIMITS:
        value = values.get(key)
        if value is not None and not low <= value <= high:
            bound = f">= {low}" if value < low else f"at most {high}"
            raise ValueError(f"{path}: {key} must be {bound}, got {value}")
    values.setdefault("name", path.stem)
    values["split"] = _check_split(values.get("split", {}), path)
    return Protocol(**values)


def _check_split(split: dict, path: Path) -> dict:
    if not split:
        return {}
    unknown = set(split) - {"by", "test", "seed"}
    if unknown:
        raise ValueError(f"{path}: unknown key split.{sorted(unknown)[0]}; split takes by, test and seed")
    if split.get("by") not in ("group", "class"):
        raise ValueError(f"{path}: split.by must be \"group\" or \"class\", got {split.get('by')!r}")
    test = split.get("test")
    names = isinstance(test, list) and test and all(isinstance(t, str) for t in test)
    count = isinstance(test, int) and not isinstance(test, bool) and test >= 1
    fraction = isinstance(test, float) and 0 < test < 1 and split["by"] == "class"
    if not (names or count or fraction):
        raise ValueError(f"{path}: split.test must be a list of names or a count"
                         f"{' or a fraction in (0, 1)' if split['by'] == 'class' else ''}, got {test!r}")
    seed = split.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{path}: split.seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    return dict(split)


# --- fixed-episode runs (Lake et al.'s Omniglot one-shot format) --------------------------------


@dataclass(frozen=True)
class FixedRun:
    """One published-style run: one support image per class, and queries labelled by support index."""

    name: str
    support: list[Path]  # the run's training/ images, sorted
    query: list[Path]  # in class_labels.txt order
    query_labels: np.ndarray  # (n_query,) index into support


LABELS_FILE = "class_labels.txt"


def load_fixed_runs(root: str | os.PathLike) -> list[FixedRun]:
    """Runs under ``root``: each subfolder holds ``class_labels.txt`` (lines ``<query> <support>``,
    paths relative to ``root``) and a ``training/`` folder of support images."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; expected one folder per run (run01/, run02/, ...)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no run folders; expected run01/{LABELS_FILE}, run01/training/, ...")
    return [_load_run(root, folder) for folder in folders]


def _load_run(root: Path, folder: Path) -> FixedRun:
    labels_file = folder / LABELS_FILE
    if not labels_file.is_file():
        raise ValueError(f"{labels_file}: missing; every run folder needs a {LABELS_FILE} with lines "
                         f"'{folder.name}/test/item01.png {folder.name}/training/class01.png'")
    training = folder / "training"
    support = sorted(p for p in training.iterdir() if p.is_file() and not p.name.startswith(".")
                     and p.suffix.lower() in IMAGE_EXTENSIONS) if training.is_dir() else []
    if not support:
        raise ValueError(f"{training}: no support images; each run needs training/ with one image per class")
    index = {p.resolve(): i for i, p in enumerate(support)}
    query, labels = [], []
    for number, line in enumerate(labels_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{labels_file}, line {number}"
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{where}: expected '<query path> <support path>', got {line.strip()!r}")
        q, s = (_inside(root, f, where) for f in fields)
        if not q.is_file():
            raise ValueError(f"{where}: query image {fields[0]} does not exist under {root}")
        if s.resolve() not in index:
            raise ValueError(f"{where}: {fields[1]} is not an image in {training}")
        query.append(q)
        labels.append(index[s.resolve()])
    if not query:
        raise ValueError(f"{labels_file}: no lines; expected one '<query> <support>' line per query image")
    return FixedRun(folder.name, support, query, np.array(labels, dtype=np.int64))


def _inside(root: Path, rel: str, where: str) -> Path:
    path = root / rel
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise ValueError(f"{where}: {rel} points outside {root}; paths must be relative to the runs' folder") from None
    return path


def write_fixed_runs(dataset: ImageDataset, root: str | os.PathLike, *, runs: int = 20, ways: int = 20,
                     within_group: bool = True, seed: int = 0) -> list[FixedRun]:
    """Write ``runs`` one-shot runs from ``dataset`` in the published format (image bytes copied) into the
    empty or new folder ``root``; returns them as ``load_fixed_runs(root)`` reads them.

    Each run is a ways-way episode with one support and one query image per class; queries are numbered
    in random order, so item numbers say nothing about classes.
    """
    check_int(runs, "runs", 1)
    if within_group and dataset.groups is None:
        raise ValueError(f"{dataset.source} is a flat dataset without groups; pass within_group=False")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root} exists and is not an empty folder; choose a new folder for the runs")
    episode_seed, order_seed = np.random.SeedSequence(seed).spawn(2)
    sampler = EpisodeSampler(dataset.labels, ways=ways, shots=1, queries=1, groups=dataset.groups,
                             within_group=within_group, seed=episode_seed)
    order_rng = np.random.default_rng(order_seed)
    width = max(2, len(str(runs)))
    digits = max(2, len(str(ways)))
    for r, ep in enumerate(sampler.sample_many(runs), 1):
        name = f"run{r:0{width}d}"
        (root / name / "training").mkdir(parents=True)
        (root / name / "test").mkdir()
        support = []
        for j, i in enumerate(ep.support, 1):
            support.append(f"{name}/training/class{j:0{digits}d}{_suffix(dataset.names[i])}")
            (root / support[-1]).write_bytes(_read(dataset.items[i]))
        lines = []
        for k, q in enumerate(order_rng.permutation(len(ep.query)), 1):
            i = ep.query[q]
            item = f"{name}/test/item{k:0{digits}d}{_suffix(dataset.names[i])}"
            (root / item).write_bytes(_read(dataset.items[i]))
            lines.append(f"{item} {support[ep.query_labels[q]]}\n")
        (root / name / LABELS_FILE).write_text("".join(lines), encoding="utf-8")
    return load_fixed_runs(root)


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _read(item) -> bytes:
    return bytes(item) if isinstance(item, (bytes, bytearray, memoryview)) else Path(item).read_bytes()
