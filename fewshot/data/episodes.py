"""Few-shot episodes: seeded sampling, manifests by name, open-set episodes (protocols: ``protocols``).

An episode is N classes ("ways"), K labelled support items per class ("shots") and Q query items per
class to classify. Everything here works on integer item indices and labels (numpy only): the encoder
embeds the items, heads and evaluation consume the indices.

Replaying an evaluation exactly takes either the sampler's seed (same data, same code -> same episodes)
or a manifest written by ``save_episodes``, which names classes and items so that it replays on any
machine holding the same data, whatever the order in which its files were listed.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checks import check_int
from .datasets import ImageDataset

MANIFEST_FORMAT, MANIFEST_VERSION = "fewshot-episodes", 1
# Limits on sizes a protocol file (or a caller) may ask for, far above any benchmark (they use 100 to
# 10,000 episodes of at most a few hundred items) but low enough that a hostile or mistyped file cannot
# make fewshot allocate without end: the episodes drawn are held in memory (~1 KB each).
MAX_EPISODES = 100_000
MAX_WAYS = 10_000
MAX_ITEMS_PER_CLASS = 10_000  # shots, queries
MAX_SUPPORT = 1_000_000
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Episode:
    """One episode; support and query are class-major (all of class 0, then class 1, ...)."""

    classes: np.ndarray  # (ways,) label values; episode label j means classes[j]
    support: np.ndarray  # (n_support,) item indices
    support_labels: np.ndarray  # (n_support,) episode labels 0..ways-1
    query: np.ndarray
    query_labels: np.ndarray

    @property
    def ways(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class EpisodeBatch:
    """E same-shape episodes as arrays, for evaluating many at once with tensor ops."""

    classes: np.ndarray  # (E, ways)
    support: np.ndarray  # (E, ways*shots), class-major: labels are np.repeat(arange(ways), shots)
    query: np.ndarray  # (E, ways*queries), class-major likewise

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def ways(self) -> int:
        return self.classes.shape[1]

    @property
    def shots(self) -> int:
        return self.support.shape[1] // self.ways

    @property
    def queries(self) -> int:
        return self.query.shape[1] // self.ways

    @property
    def support_labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.ways), self.shots)

    @property
    def query_labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.ways), self.queries)

    def to_episodes(self) -> list[Episode]:
        s, q = self.support_labels, self.query_labels
        return [Episode(c, sup, s, qry, q) for c, sup, qry in zip(self.classes, self.support, self.query)]


# --- sampling -----------------------------------------------------------------------------------


class EpisodeSampler:
    """Seeded N-way K-shot Q-query episodes over items with any labels.

    ``ways=None`` takes every eligible class (all-way). A class is eligible when it has at least
    ``shots + queries`` items; the others are dropped with one warning. ``within_group=True`` (with
    ``groups``, one value per item) draws a group first and then the classes inside it, as in Omniglot's
    within-alphabet episodes. Support and query never share an item.

    ``variable=True`` draws Meta-Dataset style episodes (Triantafillou et al. 2020), simplified: ``ways``
    and ``shots`` are ignored; an episode has ways ~ U[min_ways, min(max_ways, eligible)]; class c
    (n_c items) gets q_c = min(queries, n_c // 2) queries; the support budget is
    min(max_support, sum_c ceil(beta * min(100, n_c - q_c))) with beta ~ U(0, 1), shared out in proportion
    to (n_c - q_c) * exp(U(log 1/2, log 2)), at least 1 and at most n_c - q_c per class. Eligible: n_c >= 2.

    The same seed gives the same sequence of episodes. ``sample()``/``sample_many()`` and ``sample_batch()``
    draw from one generator, so each is deterministic for a given call sequence (``sample()`` on a fresh
    sampler equals ``sample_batch(1)`` on another), but ``sample_many(n)`` and ``sample_batch(n)`` are not the
    same episodes.
    """

    def __init__(self, labels, *, ways: int | None = 5, shots: int = 1, queries: int = 15, groups=None,
                 within_group: bool = False, seed=0, variable: bool = False, min_ways: int = 5,
                 max_ways: int = 50, max_support: int = 500):
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-D array (one label per item), got shape {labels.shape}")
        for name, value, high in [("shots", shots, MAX_ITEMS_PER_CLASS), ("queries", queries, MAX_ITEMS_PER_CLASS),
                                  ("min_ways", min_ways, MAX_WAYS), ("max_ways", max_ways, MAX_WAYS),
                                  ("max_support", max_support, MAX_SUPPORT)]:
            check_int(value, name, 1, high)
        if ways is not None:
            check_int(ways, "ways", 1, MAX_WAYS)
        if variable and max_ways < min_ways:
            raise ValueError(f"max_ways={max_ways} is below min_ways={min_ways}; raise max_ways or lower min_ways")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.within_group, self.variable = bool(within_group), bool(variable)
        self.min_ways, self.max_ways, self.max_support = min_ways, max_ways, max_support
        self.seed = seed
        self._rng = np.random.default_rng(seed)

        self.classes_, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")  # items grouped by class, ascending within each
        self._counts = np.bincount(inverse, minlength=len(self.classes_))
        self._offsets = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
        self._items = order  # class c owns _items[_offsets[c] : _offsets[c] + _counts[c]]

        need = 2 if variable else shots + queries
        eligible = np.flatnonzero(self._counts >= need)
        dropped = len(self.classes_) - len(eligible)
        if dropped:
            warnings.warn(f"{dropped} of {len(self.classes_)} classes have fewer than {need} items and are never "
                          "sampled" + ("" if variable else " (lower shots or queries to use them)"), stacklevel=2)
        self.eligible_ = self.classes_[eligible]
        self._pools = self._make_pools(eligible, groups, inverse)
        self._check_possible(need)

    def _make_pools(self, eligible: np.ndarray, groups, inverse: np.ndarray) -> list[np.ndarray]:
        """The class pools an episode draws from: all eligible classes, or each group's eligible classes."""
        if not self.within_group:
            return [eligible]
        if groups is None:
            raise ValueError("within_group=True needs groups (one group per item, e.g. dataset.groups); "
                             "pass groups or set within_group=False")
        groups = np.asarray(groups)
        if groups.shape != inverse.shape:
            raise ValueError(f"groups must hold one value per item: expected shape {inverse.shape}, got {groups.shape}")
        group_values, group_of_item = np.unique(groups, return_inverse=True)
        class_group = group_of_item[self._items[self._offsets]]  # the group of each class's first item
        mixed = np.flatnonzero(group_of_item != class_group[inverse])
        if len(mixed):
            raise ValueError(f"class {self.classes_[inverse[mixed[0]]]!r} has items in more than one group; "
                             "each class must lie in a single group for within_group=True")
        return [eligible[class_group[eligible] == g] for g in range(len(group_values))]

    def _check_possible(self, need: int) -> None:
        if self.variable:
            low, what = self.min_ways, "min_ways"
        else:
            low, what = (1 if self.ways is None else self.ways), "ways"
        sizes = [len(p) for p in self._pools]
        self._usable = [p for p in self._pools if len(p) >= low]
        where = "in any one group" if self.within_group else "in total"
        if not self._usable:
            raise ValueError(f"{what}={low} needs {low} classes with at least {need} items each, but the most "
                             f"{where} is {max(sizes)}; lower {what}"
                             + ("" if self.variable else ", shots or queries")
                             + (" or set within_group=False" if self.within_group else ""))
        if self.variable:
            top = min(self.max_ways, max(len(p) for p in self._usable))
            if self.max_support < top:
                raise ValueError(f"max_support={self.max_support} cannot give each of up to {top} classes a support "
                                 f"item; raise max_support to at least {top} or lower max_ways")

    # -- public API --

    def sample(self) -> Episode:
        """The next episode."""
        if self.variable:
            return self._variable()
        pool = None
        if self.within_group and self.ways is None:  # all-way: the group decides the number of classes
            pool = self._usable[self._rng.integers(len(self._usable))]
        return self._fixed(1, pool).to_episodes()[0]

    def sample_many(self, n: int) -> list[Episode]:
        """The next ``n`` episodes (the same as calling ``sample()`` n times)."""
        check_int(n, "the number of episodes", 0, MAX_EPISODES)
        return [self.sample() for _ in range(n)]

    def sample_batch(self, n: int) -> EpisodeBatch:
        """``n`` episodes drawn at once as arrays; fixed ways and shots only."""
        check_int(n, "the number of episodes", 1, MAX_EPISODES)
        if self.variable:
            raise ValueError("variable episodes differ in shape and cannot form a batch; use sample_many()")
        if self.within_group and self.ways is None and len({len(p) for p in self._usable}) > 1:
            raise ValueError("all-way within_group episodes differ in size from group to group and cannot form "
                             "a batch; use sample_many(), or give ways a number")
        return self._fixed(n, None)

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def __repr__(self) -> str:
        kind = "variable" if self.variable else f"{self.ways or 'all'}-way {self.shots}-shot {self.queries}-query"
        return (f"EpisodeSampler({kind}, {len(self.eligible_)} eligible classes"
                f"{', within group' if self.within_group else ''}, seed={self.seed!r})")

    # -- drawing --

    def _fixed(self, n: int, pool: np.ndarray | None) -> EpisodeBatch:
        rng, k = self._rng, self.shots + self.queries
        if pool is not None:
            pools, sizes = pool[None], np.array([len(pool)])
        elif self.within_group:
            padded = _pad(self._usable)
            g = rng.integers(len(self._usable), size=n)
            pools, sizes = padded[g], np.array([len(p) for p in self._usable])[g]
        else:
            pools, sizes = self._pools[0][None], np.array([len(self._pools[0])])
        ways = self.ways or int(sizes[0])
        chosen = np.take_along_axis(pools, _choose(rng, np.broadcast_to(sizes, (n,)), ways), axis=1)  # (n, ways)
        picks = _choose(rng, self._counts[chosen].ravel(), k).reshape(n, ways, k)
        items = self._items[self._offsets[chosen][..., None] + picks]
        return EpisodeBatch(classes=self.classes_[chosen],
                            support=items[:, :, :self.shots].reshape(n, -1),
                            query=items[:, :, self.shots:].reshape(n, -1))

    def _variable(self) -> Episode:
        rng = self._rng
        pool = self._usable[rng.integers(len(self._usable))] if self.within_group else self._usable[0]
        ways = int(rng.integers(self.min_ways, min(self.max_ways, len(pool)) + 1))
        chosen = rng.choice(pool, ways, replace=False)
        counts = self._counts[chosen]
        n_query = np.minimum(self.queries, counts // 2)
        left = counts - n_query  # items a class can still give to the support set
        beta = rng.random()
        budget = min(self.max_support, int(np.ceil(beta * np.minimum(100, left)).sum()))
        weights = left * np.exp(rng.uniform(np.log(0.5), np.log(2.0), ways))
        n_support = np.minimum(left, np.floor(weights / weights.sum() * max(budget - ways, 0)).astype(int) + 1)
        support, query = [], []
        for c, s, q in zip(chosen, n_support, n_query):
            items = self._items[self._offsets[c] + rng.permutation(self._counts[c])]
            query.append(items[:q])
            support.append(items[q:q + s])
        labels = np.arange(ways)
        return Episode(classes=self.classes_[chosen], support=np.concatenate(support),
                       support_labels=np.repeat(labels, n_support), query=np.concatenate(query),
                       query_labels=np.repeat(labels, n_query))


def _choose(rng: np.random.Generator, sizes: np.ndarray, k: int) -> np.ndarray:
    """(len(sizes), k): per row, k distinct positions in [0, size) in uniformly random order."""
    sizes = np.asarray(sizes)
    m, top = len(sizes), int(sizes.max())
    if top <= k * k:  # few candidates: sort random keys, padding last
        keys = rng.random((m, top))
        keys[np.arange(top)[None, :] >= sizes[:, None]] = np.inf
        return np.argsort(keys, axis=1)[:, :k]
    # Many candidates, few picks: Floyd's algorithm, vectorised over rows (memory m*k, not m*size).
    picks = np.empty((m, k), dtype=np.int64)
    for i in range(k):
        j = sizes - k + i  # the candidate range grows by one each step
        t = rng.integers(0, j + 1)
        picks[:, i] = np.where((picks[:, :i] == t[:, None]).any(axis=1), j, t)
    return np.take_along_axis(picks, np.argsort(rng.random((m, k)), axis=1), axis=1)  # Floyd's order is biased


def _pad(pools: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(pools), max(len(p) for p in pools)), dtype=np.int64)  # padding is never chosen
    for row, pool in zip(out, pools):
        row[:len(pool)] = pool
    return out


# --- manifests ----------------------------------------------------------------------------------


def save_episodes(path: str | os.PathLike, episodes: Sequence[Episode] | EpisodeBatch, dataset: ImageDataset,
                  *, protocol: dict | None = None) -> None:
    """Write episodes as JSON by class and item NAME (not index), so they replay on any copy of the data.

    ``episodes`` hold indices into ``dataset`` (labels = ``dataset.labels``). The file is replaced
    atomically; ``protocol`` (any JSON-able dict, e.g. ``dataclasses.asdict(protocol)``) is stored as is.
    """
    if isinstance(episodes, EpisodeBatch):
        episodes = episodes.to_episodes()
    rows = []
    for e, ep in enumerate(episodes):
        where = f"episode {e}"
        rows.append({
            "classes": _lookup(ep.classes, dataset.classes, where, dataset.source),
            "support": _lookup(ep.support, dataset.names, where, dataset.source),
            "support_labels": _ints(ep.support_labels),
            "query": _lookup(ep.query, dataset.names, where, dataset.source),
            "query_labels": _ints(ep.query_labels),
        })
    head = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "dataset": dataset.source,
            "protocol": protocol}
    try:
        text = json.dumps(head, ensure_ascii=False)
    except TypeError as exc:
        raise ValueError(f"protocol must be JSON-serialisable ({exc}); "
                         "pass plain str/int/float/bool/list/dict") from None
    # One episode per line: diffable, greppable, still plain JSON.
    body = ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in rows)
    text = text[:-1] + ', "episodes": [\n' + body + "\n]}\n"
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_episodes(path: str | os.PathLike, dataset: ImageDataset) -> list[Episode]:
    """Episodes of a manifest as indices into ``dataset``; every name must exist there."""
    doc = read_manifest(path)
    class_index = {name: i for i, name in enumerate(dataset.classes)}
    item_index = {name: i for i, name in enumerate(dataset.names)}
    rows = doc.get("episodes")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: \"episodes\" must be a list of episodes")
    out = []
    for e, row in enumerate(rows):
        where = f"{path}, episode {e}"
        missing = [k for k in ("classes", "support", "support_labels", "query", "query_labels")
                   if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{where}: missing {missing[0]!r}")
        classes = _indices(row["classes"], class_index, where, dataset.source)
        if len(np.unique(classes)) != len(classes):
            raise ValueError(f"{where}: a class is listed more than once; re-save the episodes")
        support = _indices(row["support"], item_index, where, dataset.source)
        query = _indices(row["query"], item_index, where, dataset.source)
        support_labels = _label_array(row["support_labels"], where)
        query_labels = _label_array(row["query_labels"], where)
        if support_labels.shape != support.shape or query_labels.shape != query.shape:
            raise ValueError(f"{where}: support/query and their labels differ in length")
        for items, lab in [(support, support_labels), (query, query_labels)]:
            if len(lab) and (lab.min() < 0 or lab.max() >= len(classes)):
                raise ValueError(f"{where}: labels must lie in 0..{len(classes) - 1}")
            wrong = np.flatnonzero(dataset.labels[items] != classes[lab])
            if len(wrong):
                i = items[wrong[0]]
                raise ValueError(f"{where}: {dataset.names[i]!r} is class {dataset.classes[dataset.labels[i]]!r} in "
                                 f"{dataset.source}, not {dataset.classes[classes[lab[wrong[0]]]]!r}; the data differ")
        _check_measurable(where, row, support, support_labels, query)
        out.append(Episode(classes, support, support_labels, query, query_labels))
    return out


def _label_array(values, where: str) -> np.ndarray:
    """Episode labels as int64; anything but a list of plain integers that fit is refused (no silent
    truncation of 1.5, no overflow traceback for 10**30)."""
    if (not isinstance(values, list) or not all(type(v) is int for v in values)
            or not all(-2**63 <= v < 2**63 for v in values)):
        raise ValueError(f"{where}: support_labels and query_labels must be lists of integers")
    return np.array(values, dtype=np.int64)


def _check_measurable(where: str, row: dict, support: np.ndarray, support_labels: np.ndarray,
                      query: np.ndarray) -> None:
    """Refuse an episode whose score would mean nothing: no support or no query, a class without a
    support image, or a query image that is also in the support set (it would match itself)."""
    if not len(support):
        raise ValueError(f"{where}: no support images; every episode needs a support set to learn from")
    if not len(query):
        raise ValueError(f"{where}: no query images; every episode needs queries to score")
    bare = sorted(set(range(len(row["classes"]))) - set(support_labels.tolist()))
    if bare:
        raise ValueError(f"{where}: class {row['classes'][bare[0]]!r} has no support image; every class of an "
                         "episode needs at least one")
    shared = np.intersect1d(support, query)
    if len(shared):
        name = row["support"][int(np.flatnonzero(support == shared[0])[0])]
        raise ValueError(f"{where}: query image {name!r} is also in the support set, so it would be scored "
                         "against itself; support and query must not share images")


def read_manifest(path: str | os.PathLike) -> dict:
    """The JSON document of an episode manifest, its format and version checked."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such episode manifest; write one with save_episodes()") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not an episode manifest (not JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an episode manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    if doc.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path} has manifest version {doc.get('version')!r}; this fewshot reads version "
                         f"{MANIFEST_VERSION}: upgrade fewshot or re-save the episodes")
    return doc

def _ints(values) -> list[int]:
    return [int(v) for v in np.asarray(values).ravel()]


def _lookup(indices, names: list[str], where: str, source: str) -> list[str]:
    indices = _ints(indices)
    bad = [i for i in indices if not 0 <= i < len(names)]
    if bad:
        raise ValueError(f"{where} refers to index {bad[0]}, outside {source} ({len(names)} entries); save "
                         "episodes with the dataset whose labels they were sampled from")
    return [names[i] for i in indices]


def _indices(names, table: dict[str, int], where: str, source: str) -> np.ndarray:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: expected a list of names, got {type(names).__name__}")
    missing = next((n for n in names if n not in table), None)
    if missing is not None:
        raise ValueError(f"{where}: {missing!r} is not in dataset {source}; load the same data the episodes "
                         "were saved from (same files, same layout)")
    return np.array([table[n] for n in names], dtype=np.int64)


# --- open-set episodes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenSetEpisode:
    """An episode plus queries of classes that are not in it: what the registry must call unknown."""

    episode: Episode
    unknown_classes: np.ndarray  # (unknown_ways,) label values never in the support set
    unknown_query: np.ndarray  # item indices of those classes


def sample_open_set(labels, *, ways: int, shots: int, queries: int, unknown_ways: int,
                    unknown_queries: int | None = None, episodes: int, seed=0) -> list[OpenSetEpisode]:
    """Seeded open-set episodes: ``ways`` known classes (``shots`` support + ``queries`` query items each)
    and ``unknown_ways`` other classes with up to ``unknown_queries`` (default ``queries``) query items
    each. A class is known-eligible with ``shots + queries`` items, unknown-eligible with one."""
    labels = np.asarray(labels)
    for name, value in [("ways", ways), ("shots", shots), ("queries", queries), ("unknown_ways", unknown_ways),
                        ("episodes", episodes)]:
        check_int(value, name, 1)
    unknown_queries = queries if unknown_queries is None else unknown_queries
    check_int(unknown_queries, "unknown_queries", 1)
    classes, inverse = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    eligible = np.array([c for c in range(len(classes)) if len(members[c]) >= shots + queries])
    if len(eligible) < ways or len(classes) < ways + unknown_ways:
        raise ValueError(f"an open-set episode needs {ways} classes with {shots + queries}+ items (found "
                         f"{len(eligible)}) and {unknown_ways} more classes (found {len(classes)} in all); "
                         "lower ways, unknown_ways, shots or queries")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(episodes):
        known = rng.choice(eligible, ways, replace=False)
        unknown = rng.choice(np.setdiff1d(np.arange(len(classes)), known), unknown_ways, replace=False)
        drawn = [rng.permutation(members[c]) for c in known]
        support = np.concatenate([d[:shots] for d in drawn])
        query = np.concatenate([d[shots:shots + queries] for d in drawn])
        unknown_query = np.concatenate([rng.permutation(members[c])[:unknown_queries] for c in unknown])
        episode = Episode(classes[known], support, np.repeat(np.arange(ways), shots), query,
                          np.repeat(np.arange(ways), queries))
        out.append(OpenSetEpisode(episode, classes[unknown], unknown_query))
    return out
