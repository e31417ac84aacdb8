"""The registry's FAISS index: the choice and sizing of index="auto", search parameters, OpenMP
threads, and the checks of a loaded index against the prototypes."""

from __future__ import annotations

import contextlib
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..errors import RegistryFormatError
from ..checks import check_int
from .storage import MANIFEST, read_verified_into
from .vectors import CHUNK_FLOATS, as_matrix, chunk_rows, normalise_rows


# -- index="auto"
AUTO = "auto"
# Exact search scans every prototype: a single query costs ~0.16 ms per million float32 values on
# 2 CPU cores (quiet machine; up to ~2x that on a busy one), so "auto" stays exact up to ~2 ms:
# 12 Mi values, i.e. 9,830 prototypes at dim 1280 (measured 2.0 ms at 10,000) and 24,576 at dim
# 512 (benchmarks/registry_scale.py --flat-sweep).
AUTO_FLAT_FLOATS = 12 * 2**20
MIN_AUTO_THRESHOLD = 256  # below this an inverted file has too little to train on
# Above the threshold "auto" scans compact codes of every prototype, then re-scores the best
# candidates exactly. Inverted-list pruning and graphs both lose the exact top-1 on diffuse embeddings
# (1-shot prototypes of very varied classes: k-means lists need ~60% of the data scanned for 99% of
# the top-1s; HNSW needs efSearch > 1000), while a full scan of 4-bit codes with 2 dimensions per
# sub-quantiser keeps the exact top-1 among its best 256 candidates for 99.4% of queries at 1M
# (benchmarks/registry_scale.py --sweep). Above AUTO_PCA_DIM dimensions the codes are of a projection
# onto the top AUTO_PCA_DIM principal directions: the same bytes, a better ranking.
AUTO_PCA_DIM = 512
AUTO_TRAIN_PER_LIST = 40  # k-means training sample: 40 prototypes per list (FAISS asks >= 39)
AUTO_TRAIN_MIN = 65536  # but at least this many, for the principal directions and the PQ codebooks
# Approximate candidates re-scored exactly by default (at least 2 * k): at 1M diffuse prototypes
# 256 keep the exact top-1 for 99.4% of queries, 512 for 99.9% at ~0.6 ms more.
AUTO_RERANK = 256
# Codes scanned per query by default (sets nprobe from the list sizes): every code up to ~1M
# prototypes (~4.4 ms on 2 cores at 128 bytes a code), the nearest lists' beyond.
AUTO_SCAN_CODES = 2**20
# Searches of fewer queries than this run on one OpenMP thread: a parallel region waits for every
# thread, and when another process holds the other cores that wait is whole scheduler ticks (single
# exact queries measured 4-24 ms instead of 1.5 ms on 2 busy cores). Bigger batches use them all.
# The exception is a fast-scan inverted file: its probed lists are split into parts searched on
# threads of their own (_search_list_parts), as a full scan at 1M takes ~5.5 ms on one core.
SERIAL_SEARCH_BELOW = 64
MAX_LIST_PARTS = 8


@dataclass(frozen=True)
class SearchResult:
    labels: list[list[str]]  # per query, best first
    scores: np.ndarray  # (n_queries, k') float32, higher is closer: cosine or -squared L2


def _auto_nlist(n: int) -> int:
    """Inverted lists for n prototypes: the power of two nearest sqrt(n)/4, with >= 40 per list. Few
    lists: below AUTO_SCAN_CODES all are scanned, and each list costs time; beyond, they let a
    search skip the farthest prototypes."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n) / 4))))
    while nlist > 1 and nlist * AUTO_TRAIN_PER_LIST > n:
        nlist //= 2
    return nlist


def _auto_nprobe(nlist: int, ntotal: int) -> int:
    """Lists visited per query by default: enough to scan ~AUTO_SCAN_CODES codes, at least 16."""
    return min(nlist, max(16, math.ceil(AUTO_SCAN_CODES * nlist / max(1, ntotal))))


def _searched_dim(dim: int) -> int:
    return min(dim, AUTO_PCA_DIM)


def _auto_codec(dim: int) -> str:
    """4-bit fast-scan PQ with 2 dimensions per sub-quantiser (dim/2 bytes a code): with coarser
    codes (8 dimensions each) the exact top-1 of diffuse embeddings ranked below the 3,000th
    candidate for 1% of queries at 1M."""
    m = next(m for m in range(max(1, math.ceil(dim / 2)), dim + 1) if dim % m == 0)
    return f"PQ{m}x4fs"


def _auto_factory(n: int, dim: int, threshold: int) -> str:
    if n < threshold:
        return "Flat"
    searched = _searched_dim(dim)
    projection = f"PCAR{searched}," if searched < dim else ""
    return f"{projection}IVF{_auto_nlist(n)},{_auto_codec(searched)}"


def _auto_scheme(factory: str) -> str:
    """The factory without its list count: what an "auto" index of any size is built as."""
    return re.sub(r"IVF\d+", "IVF", factory)


def _train_projections(index, x: np.ndarray, metric: int) -> None:
    """Train the PCA of a pre-transformed index on x and -x for inner products: the principal
    directions of the uncentred data. Centring would subtract the mean from prototypes and queries,
    which adds a per-prototype bias to every inner product (the exact top-1 fell out of the best 256
    candidates for 2% of queries instead of 0.2%, at 200k diffuse prototypes)."""
    if not isinstance(index, faiss.IndexPreTransform) or metric != faiss.METRIC_INNER_PRODUCT:
        return
    first = faiss.downcast_VectorTransform(index.chain.at(0))
    if isinstance(first, faiss.PCAMatrix) and not first.is_trained:
        first.train(np.concatenate([x, -x]))


@contextlib.contextmanager
def openmp_threads(n: int | None):
    """Run the block with n OpenMP threads for FAISS; the setting is the calling thread's own
    (an OpenMP ICV) and is restored after, so other threads and later calls are unaffected."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


_list_workers: ThreadPoolExecutor | None = None


def _list_parts_pool() -> ThreadPoolExecutor:
    global _list_workers
    if _list_workers is None:
        _list_workers = ThreadPoolExecutor(MAX_LIST_PARTS, thread_name_prefix="fewshot-lists")
    return _list_workers


def _search_list_parts(index, q: np.ndarray, k: int, nprobe: int, threads: int) -> np.ndarray:
    """Candidate ids of a small batch over an IVF fast-scan index: the probed lists of each query,
    dealt into one part per thread (at most MAX_LIST_PARTS), each part searched on a thread of its
    own (FAISS releases the GIL), the parts' best merged by score then id. A full scan at 1M takes
    ~4.4 ms on 2 cores against ~5.4 ms on one (memory-bound); unlike FAISS's own list-parallel
    search (implem 14) it gives the same answer every time: 4-bit scores tie, and that search's
    merge follows thread timing. The caller holds the registry lock (nprobe is set here)."""
    xt = q
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            xt = faiss.downcast_VectorTransform(index.chain.at(i)).apply(xt)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    nprobe = min(nprobe, ivf.nlist)
    n_parts = max(1, min(threads, MAX_LIST_PARTS, nprobe))
    coarse_dis, lists = ivf.quantizer.search(np.ascontiguousarray(xt, np.float32), nprobe)
    width = -(-nprobe // n_parts)
    pad = width * n_parts - nprobe  # lists -1 are skipped
    lists = np.pad(lists, ((0, 0), (0, pad)), constant_values=-1)
    coarse_dis = np.pad(coarse_dis, ((0, 0), (0, pad)))

    def part(p: int):
        with openmp_threads(1):
            return ivf.search_preassigned(xt, k, np.ascontiguousarray(lists[:, p::n_parts]),
                                          np.ascontiguousarray(coarse_dis[:, p::n_parts]))

    before, ivf.nprobe = ivf.nprobe, width
    try:
        others = [_list_parts_pool().submit(part, p) for p in range(1, n_parts)]
        found = [part(0)] + [f.result() for f in others]  # the calling thread searches one part
    finally:
        ivf.nprobe = before
    dist = np.concatenate([d for d, _ in found], axis=1)
    ids = np.concatenate([i for _, i in found], axis=1)
    closer = dist if ivf.metric_type == faiss.METRIC_INNER_PRODUCT else -dist
    order = np.lexsort((ids, np.where(ids == -1, np.inf, -closer)), axis=1)[:, :k]  # best first, -1 last
    return np.take_along_axis(ids, order, axis=1)


def _inner(index):
    """The index under an IndexIDMap2, downcast (an IVF index holds its own ids: no wrapper)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def index_kind(index) -> str:
    """'flat' (exact), 'ivf', 'hnsw' or 'other' (approximate without search parameters)."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    if faiss.try_extract_index_ivf(inner) is not None:
        return "ivf"
    if hasattr(inner, "hnsw"):
        return "hnsw"
    return "other"
_PARAMS = {"flat": {}, "ivf": {"nprobe": 1, "max_codes": 0, "rerank": 1},
           "hnsw": {"efSearch": 1, "rerank": 1}, "other": {"rerank": 1}}  # name -> minimum value


def _index_ids(index) -> np.ndarray:
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map)
    ivf = faiss.extract_index_ivf(index)
    inv, parts = ivf.invlists, []
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n:
            ptr = inv.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, n).copy())
            inv.release_ids(lst, ptr)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def load_index(path: Path, m: dict, reg: IndexedSearch, opened: dict):
    """The saved FAISS index a manifest lists, verified, deserialised and checked against ``reg``."""
    fpath = path / m["files"]["index"]["name"]
    (data,) = read_verified_into(path, m["files"]["index"], lambda size: [np.empty(size, np.uint8)], opened)
    try:
        index = faiss.deserialize_index(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is a format error
        raise RegistryFormatError(f"{fpath}: not a valid FAISS index ({e})") from None
    del data
    wrapped = isinstance(index, faiss.IndexIDMap2) or faiss.try_extract_index_ivf(index) is not None
    if not wrapped or index.d != reg.dim or index.metric_type != reg._faiss_metric:
        raise RegistryFormatError(f"{fpath}: index type, dim or metric does not match the manifest")
    ids = _index_ids(index)
    if index.ntotal != len(reg) or len(ids) != len(reg) or not np.array_equal(np.sort(ids), np.sort(reg._ids)):
        raise RegistryFormatError(f"{fpath}: index holds {index.ntotal} vectors / ids that do not "
                                  f"match the {len(reg)} classes of the manifest")
    return index


def auto_outdated(reg: IndexedSearch) -> bool:
    """Whether a loaded "auto" index is of an older scheme than "auto" builds today (e.g. inverted
    lists of 8-dimension codes, saved before the full-scan codes): the next search rebuilds it
    rather than keep its lower recall."""
    if not reg._auto or reg._exact:
        return False
    return _auto_scheme(reg._in_use) != _auto_scheme(_auto_factory(len(reg), reg._dim, reg._threshold))


def check_flat_vectors(fpath: Path, reg: IndexedSearch) -> None:
    """A flat index scores queries with its own copies of the prototypes: they must be exactly the
    prototypes, or a query would get the wrong class at a perfect score (an index out of step with
    its metadata, mem0#7117). Approximate indexes need no check: their candidates are re-scored
    against the prototypes."""
    if reg._stale or not isinstance(reg._index, faiss.IndexIDMap2):
        return
    inner = faiss.downcast_index(reg._index.index)
    if not isinstance(inner, faiss.IndexFlat):
        return
    n = inner.ntotal
    stored = faiss.rev_swig_ptr(inner.get_xb(), n * reg.dim).reshape(n, reg.dim) if n else None
    rows = reg._row_of_id[faiss.vector_to_array(reg._index.id_map)]
    step = chunk_rows(reg.dim)
    for a in range(0, n, step):
        if not np.array_equal(stored[a:a + step], reg._searched(rows[a:a + step])):
            raise RegistryFormatError(f"{fpath}: the index's vectors are not the prototypes of "
                                      f"{MANIFEST} and the prototypes file")


def _same_type(a, b) -> bool:
    return type(a) is type(b) or (isinstance(a, faiss.IndexFlat) and isinstance(b, faiss.IndexFlat))


def read_index_in_use(mpath: Path, m: dict, reg: IndexedSearch) -> tuple[str, bool]:
    """(factory string of the loaded index, whether it is a flat stand-in for an untrainable one),
    after checking that the index file is of the kind the manifest says."""
    loaded = _inner(reg._index)

    def built(factory):
        try:
            return faiss.index_factory(reg.dim, factory, reg._faiss_metric)
        except (RuntimeError, TypeError, MemoryError) as e:
            raise RegistryFormatError(f"{mpath}: invalid index_in_use {factory!r}: {e or 'out of memory'}") from None

    in_use = m.get("index_in_use")
    if in_use is None:  # format 1: the factory asked for, or its flat stand-in
        in_use = reg._factory if _same_type(loaded, built(reg._factory)) else "Flat"
    if (not reg._auto and in_use not in (reg._factory, "Flat")) or not _same_type(loaded, built(in_use)):
        raise RegistryFormatError(f"{mpath}: the index file is not the {in_use!r} index the manifest "
                                  f"names (index_factory {reg._factory!r})")
    return in_use, not reg._auto and in_use != reg._factory


class IndexedSearch:
    """Search and FAISS index upkeep of the Registry (its state lives in ``Registry``): the lazy
    (re)build of the index ``auto`` chose, search parameters, and exact re-scoring of candidates."""

    def search(self, queries, k: int, *, params: dict | None = None) -> SearchResult:
        """The k nearest classes of each query, best first, with exact scores.

        params: per-call search parameters of the index in use, e.g. ``{"nprobe": 32}`` (IVF,
        including "auto"), ``{"efSearch": 128}`` (HNSW), and for any approximate index
        ``{"rerank": 1024}``: how many candidates to re-score exactly (default
        ``max(256, 2 * k)``). They are ignored while the index is exact (a small "auto" registry).
        "auto" scans every prototype's code up to ~1M prototypes (the nearest lists' ~1M codes
        beyond) and re-scores the best 256 exactly: recall@1 against exact search 0.994 at 1M
        diffuse prototypes (0.999 with ``rerank=512``); on clustered embeddings ``nprobe=16`` keeps
        ~0.995 at a third of the time. See ``benchmarks/registry_scale.py --sweep``.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        params = self._check_params(params)
        q = as_matrix(queries, self._dim, "queries")
        if self._metric == "cosine":
            q = normalise_rows(q, "queries")
        with self._lock:
            if not self._row_of:
                raise ValueError("registry has no classes; register some first")
            self._ensure_index()
            k = min(int(k), len(self._row_of))
            threads = faiss.omp_get_max_threads()
            with openmp_threads(1 if len(q) < SERIAL_SEARCH_BELOW else None):
                if self._exact:
                    dist, ids = self._index.search(q, k)
                    scores = dist if self._metric == "cosine" else -dist  # higher is always closer
                else:
                    n_cand = min(len(self._row_of), max(k, params.pop("rerank", max(AUTO_RERANK, 2 * k))))
                    cand = self._candidates(q, n_cand, params, threads)
                    scores, ids = self._rescore(q, cand, k)
            labels = [[self._labels[r] for r in self._row_of_id[row[row != -1]].tolist()] for row in ids]
        # Approximate indexes may return fewer hits (id -1): those slots score -inf.
        return SearchResult(labels, np.where(ids == -1, -np.inf, scores).astype(np.float32))

    def _check_params(self, params) -> dict:
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise ValueError(f"params must be a dict of search parameters, got {type(params).__name__}")
        valid = _PARAMS[self._param_kind]
        unknown = sorted(str(p) for p in params if p not in valid)
        if unknown:
            names = ", ".join(sorted(valid)) if valid else "none (this index is exact)"
            raise ValueError(f"unknown search parameter(s) {', '.join(unknown)} for index "
                             f"{self._factory!r}; valid ones: {names}")
        return {name: check_int(v, f"search parameter {name}", valid[name]) for name, v in params.items()}

    def _candidates(self, q: np.ndarray, n_cand: int, params: dict, threads: int) -> np.ndarray:
        """Ids of the approximate index's n_cand best per query (-1 where it found fewer)."""
        ivf = faiss.try_extract_index_ivf(self._index)  # approximate: never a flat stand-in here
        fast_scan = ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan)
        if fast_scan and len(q) < SERIAL_SEARCH_BELOW and "max_codes" not in params:
            nprobe = params.get("nprobe", self._default_nprobe(ivf))
            return _search_list_parts(self._index, q, n_cand, nprobe, threads)
        return self._index.search(q, n_cand, params=self._faiss_params(params))[1]

    def _default_nprobe(self, ivf) -> int:
        return _auto_nprobe(ivf.nlist, ivf.ntotal) if self._auto else ivf.nprobe

    def _faiss_params(self, params: dict):
        if self._fallback or not (params or self._auto):
            return None
        inner = _inner(self._index)
        if "efSearch" in params:
            return faiss.SearchParametersHNSW(efSearch=params["efSearch"])
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is None:
            return None
        return faiss.SearchParametersIVF(nprobe=params.get("nprobe", self._default_nprobe(ivf)),
                                         max_codes=params.get("max_codes", ivf.max_codes))

    def _rescore(self, q: np.ndarray, cand: np.ndarray, k: int):
        """Exact scores of the candidate ids against the stored means; the k best per query."""
        nq, n_cand = cand.shape
        out_ids = np.full((nq, k), -1, np.int64)
        out_scores = np.full((nq, k), -np.inf, np.float32)
        step = max(1, CHUNK_FLOATS // max(1, n_cand * self._dim))
        for a in range(0, nq, step):
            ids, qs = cand[a:a + step], q[a:a + step]
            ok = ids != -1
            rows = self._row_of_id[np.where(ok, ids, 0)]
            ok &= rows != -1
            rows = np.where(ok, rows, 0)
            # einsum, not matmul: BLAS would start threads for one query, which stalls for whole
            # scheduler ticks (4-8 ms) when another process holds the other cores.
            dots = np.einsum("bcd,bd->bc", self._means[rows], qs).astype(np.float64)
            norms = self._norm[rows]
            if self._metric == "cosine":
                s = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
            else:
                s = 2 * dots - norms ** 2 - (qs.astype(np.float64) ** 2).sum(1)[:, None]
            s = np.where(ok, s, -np.inf)
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            best = np.take_along_axis(s, top, axis=1)
            out_scores[a:a + step] = best
            out_ids[a:a + step] = np.where(np.isfinite(best), np.take_along_axis(ids, top, axis=1), -1)
        return out_scores, out_ids

    # -- FAISS index maintenance
    def _planned(self) -> str:
        return _auto_factory(len(self._row_of), self._dim, self._threshold) if self._auto else self._factory

    def _sparse_ids(self) -> bool:
        return self._next_id > 2 * len(self._row_of) + 1024

    def _compact_ids(self) -> None:
        """Renumber the FAISS ids 0..C-1 in class order (only while no index holds the old ones)."""
        rows = self._ordered_rows()
        old = self._ids[rows]
        new = np.arange(len(rows), dtype=np.int64)
        self._ids[rows] = new
        self._row_of_id = np.full(max(1024, len(rows)), -1, np.int64)
        self._row_of_id[new] = rows
        if self._store_examples:
            self._examples = {n: self._examples[o] for o, n in zip(old.tolist(), new.tolist())}
        self._sources = {n: self._sources[o] for o, n in zip(old.tolist(), new.tolist()) if o in self._sources}
        self._owners = None  # rebuilt with the new ids on next use
        self._next_id = len(rows)

    def _build_index(self):
        self._index, self._stale = None, True  # the old index goes first (memory; ids renumbered below)
        if self._sparse_ids():
            self._compact_ids()
        rows = self._ordered_rows()
        factory = self._planned()
        inner, fallback = faiss.index_factory(self._dim, factory, self._faiss_metric), False
        if not inner.is_trained:
            try:
                if len(rows) == 0:
                    raise RuntimeError("nothing to train on")
                self._train(inner, rows)
            except RuntimeError:
                # Too few prototypes to train (IVF needs >= nlist, PQ >= 256): search exactly with a
                # flat index for now; the next mutation marks it stale so training is retried.
                inner, fallback, factory = faiss.IndexFlat(self._dim, self._faiss_metric), True, "Flat"
        # IVF indexes store ids themselves and remove by id; wrapped in an IndexIDMap2 their removal
        # would shift the wrapper's id table out of step with the lists.
        index = inner if faiss.try_extract_index_ivf(inner) is not None else faiss.IndexIDMap2(inner)
        self._add_to(index, rows)
        self._index, self._in_use, self._fallback, self._built_n = index, factory, fallback, len(rows)
        self._exact = index_kind(index) == "flat"
        self._stale = False

    def _train(self, inner, rows: np.ndarray) -> None:
        ivf = faiss.try_extract_index_ivf(inner)
        cap = max(AUTO_TRAIN_PER_LIST * ivf.nlist, AUTO_TRAIN_MIN) if self._auto and ivf is not None else 2**18
        if len(rows) > cap:  # a fixed-seed sample: the same prototypes give the same index
            rows = np.sort(np.random.default_rng(0).choice(rows, cap, replace=False))
        if self._auto and ivf is not None:
            ivf.nprobe = _auto_nprobe(ivf.nlist, len(rows))  # saved with the index; searches recompute it
            # Unit vectors, inner product: spherical k-means (unit centroids). Plain k-means with
            # inner-product assignment lets a few long centroids take most vectors (lists 100x the
            # median measured on clustered data, and a search then scans them all).
            ivf.cp.spherical = self._metric == "cosine"
        x = self._searched(rows)
        _train_projections(inner, x, self._faiss_metric)
        inner.train(x)

    def _add_to(self, index, rows: np.ndarray) -> None:
        step = chunk_rows(self._dim) * 4
        for a in range(0, len(rows), step):
            index.add_with_ids(self._searched(rows[a:a + step]), self._ids[rows[a:a + step]])

    def _ensure_index(self):
        if self._stale:
            self._build_index()

    def _auto_outgrown(self) -> bool:
        """Whether "auto" should rebuild: exact index past the threshold, or an inverted file whose
        number of lists no longer fits the registry's size (it grew or shrank 4x since it was built)."""
        n = len(self._row_of)
        if self._exact:
            return n >= self._threshold
        if n < self._threshold // 2:
            return True  # back to exact search (hysteresis: no flapping around the threshold)
        return n >= 4 * self._built_n or 4 * n <= self._built_n

    def _index_add(self, rows: np.ndarray):
        if self._fallback or self._next_id > 4 * len(self._row_of) + 2**20:
            self._stale = True  # more prototypes: training may now succeed; or ids to compact
        if not self._stale and self._auto and self._auto_outgrown():
            self._stale = True  # one rebuild at the next search, not one per add
        if not self._stale:
            self._add_to(self._index, rows)

    def _index_remove(self, class_id: int) -> bool:
        """Remove one id; False (index marked stale) where the index cannot remove it in place."""
        if self._stale:
            return False
        inner = _inner(self._index)
        # IndexIDMap2 compacts its id table on removal, which matches only indexes that shift
        # their codes the same way (flat codes); HNSW cannot remove at all.
        if isinstance(self._index, faiss.IndexIDMap2) and not isinstance(inner, faiss.IndexFlatCodes):
            self._stale = True
            return False
        try:
            self._index.remove_ids(np.array([class_id], dtype=np.int64))
        except RuntimeError:
            self._stale = True
            return False
        if self._auto and self._auto_outgrown():
            self._stale = True
            return False
        return True
