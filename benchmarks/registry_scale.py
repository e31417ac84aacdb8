"""Registry at scale: build, memory, single-query search latency and recall, save and load.

    .venv/bin/python benchmarks/registry_scale.py [--sizes 100000 1000000] [--dim 1280] [--queries 1000]
                                                  [--flat-sweep] [--sweep] [--hnsw-at 100000]
                                                  [--candidates-at N] [--hnsw-full-at N] [--opq]

Synthetic 1-shot prototypes shaped like image embeddings (statistics of real Lite0 embeddings, see
``Synthetic``): ``--centres`` centres (superclasses), each with many classes. Half of the queries are
new images of registered classes, half images of new classes of the same centres (unknowns: the hard
case for an approximate index, whose nearest prototype is only slightly nearer than the next).

For each size, in one run: the exact baseline (FAISS flat search over the same vectors: its top-1 is
the reference for recall@1, its single-query p50 the baseline of the speedup), then a default
``Registry`` ("auto" index) built with ``add_many``: build time, bytes per prototype (RSS growth /
prototypes), single-query p50/p99 for k=1 and k=100 (what ``FewShotClassifier.predict`` asks for),
recall@1 against the exact top-1, save and load time of the registry directory (load is checked to
give identical answers). Optional: ``--sweep`` (recall/latency over nprobe x rerank, to justify the
defaults), ``--flat-sweep`` (exact single-query latency by size: where the auto threshold comes
from), ``--hnsw-at N`` (HNSW32 at size N, the alternative the auto index was chosen over).
With ``--sweep``, candidate indexes for the largest size (``--candidates-at``) are built with FAISS
directly on the same lite0 vectors while the exact baseline holds them, one at a time: build time,
bytes per prototype, recall@1 after exact re-scoring of their R best, p50/p99 per query, and a PNG.
Timings are medians of single queries; peak RSS is the process high-water mark per size.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fewshot.registry import AUTO_FLAT_FLOATS, Registry, openmp_threads  # noqa: E402

CHUNK = 65536
TARGET_RECALL, TARGET_P50_MS = 0.99, 5.0  # issue #11: recall@1 >= 0.99 at p50 <= 5 ms at 1M


# ---------------------------------------------------------------- memory

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    """Resident memory after handing freed heap memory back to the OS (else freed-but-cached
    allocations make the growth of RSS meaningless)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------- data

def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# Lite0 embeddings of 1,275 Caltech-101 images (25 per class, 51 classes), measured once: cosine of
# random image pairs 0.22, of same-class pairs 0.50, of class-mean directions 0.43, of an image with
# its class-mean direction 0.73. Class means differ along a steep spectrum (PCA ~ i^-0.93); views of
# one class differ along a much flatter one (participation ratio ~290 of 1280 dims; 24% of the
# within-class variance lies in the top 50 global components).
# model name -> (between slope, view slope, centre, class and view variance around a unit mean):
MODELS = {
    # calibrated on the figures above: prototypes of different centres ~0.22, a query and the prototype
    # of its class ~0.50. The hard case: the exact top-1 is only ~0.02 above the runner-up.
    "lite0": (0.93, 0.5, 0.60, 0.67, 2.27),
    # the easy case: tight isotropic clusters (siblings ~0.8, a query and its class ~0.9).
    "clustered": (0.0, 0.0, 1.0, 0.25, 0.25),
}


class Synthetic:
    """Deterministic 1-shot prototypes, generated chunk by chunk (never all held twice).

    class = mean + centre offset + class offset (between-class spectrum); an image of it (a prototype,
    or a query) = unit(class + view offset) (view spectrum); power-law spectra in one random rotation
    with the variances of MODELS. Novel queries are images of new classes of the same centres.
    """

    def __init__(self, n: int, dim: int, n_centres: int, model: str = "lite0", seed: int = 0):
        g = np.random.default_rng(seed)
        self.n, self.dim, self.seed, self.model = n, dim, seed, model
        between, view, centre_var, self.class_var, self.view_var = MODELS[model]
        self.rot = np.linalg.qr(g.standard_normal((dim, dim)))[0].astype(np.float32)
        self.mean = unit(g.standard_normal((1, dim), dtype=np.float32))
        self.between, self.view = self.spectrum(between), self.spectrum(view)
        self.centres = self.mean + np.sqrt(centre_var) * self.gauss(g, min(n_centres, n), self.between)

    def spectrum(self, slope: float) -> np.ndarray:
        var = np.arange(1, self.dim + 1, dtype=np.float64) ** -slope
        return np.sqrt(var / var.sum()).astype(np.float32)

    def gauss(self, g, m: int, std: np.ndarray) -> np.ndarray:
        return (g.standard_normal((m, self.dim), dtype=np.float32) * std) @ self.rot

    def classes(self, a: int, b: int) -> np.ndarray:
        g = np.random.default_rng((self.seed, a))
        owner = g.integers(0, len(self.centres), b - a)
        return self.centres[owner] + np.sqrt(self.class_var) * self.gauss(g, b - a, self.between)

    def image(self, classes: np.ndarray, seed) -> np.ndarray:
        return unit(classes + np.sqrt(self.view_var) * self.gauss(np.random.default_rng(seed), len(classes), self.view))

    def chunks(self, keep=None):
        """(a, b, prototypes a..b); rows listed in ``keep`` also get their class vectors kept."""
        kept = {}
        for a in range(0, self.n, CHUNK):
            b = min(self.n, a + CHUNK)
            classes = self.classes(a, b)
            if keep is not None:
                kept.update((int(r), classes[r - a].copy()) for r in keep[(keep >= a) & (keep < b)])  # not views
            yield a, b, self.image(classes, (self.seed, a, 1))
        self.kept = kept

    def novel(self, m: int, seed: int) -> np.ndarray:
        g = np.random.default_rng(seed)
        owner = g.integers(0, len(self.centres), m)
        return self.image(self.centres[owner] + np.sqrt(self.class_var) * self.gauss(g, m, self.between), (seed, 1))


def label(i: int) -> str:
    return f"c{i}"


# ---------------------------------------------------------------- timing

def time_queries(fn, queries: np.ndarray) -> tuple[np.ndarray, list]:
    fn(queries[:1])  # warm
    times, out = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q[None]))
        times.append(time.perf_counter() - t)
    return np.array(times) * 1e3, out


def pct(ms: np.ndarray, p: float) -> float:
    return float(np.percentile(ms, p))


def top1_rows(results) -> np.ndarray:
    return np.array([int(r.labels[0][0][1:]) for r in results])


# ---------------------------------------------------------------- phases

def build_registry(data: Synthetic, src: np.ndarray | None = None, **kw) -> tuple[Registry, float, float]:
    """A registry of the data's prototypes, added with add_many chunk by chunk, then its index built."""
    reg = Registry(data.dim, **kw)
    t = time.perf_counter()
    for a, b, c in data.chunks(keep=src):
        reg.add_many([label(i) for i in range(a, b)], c)
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    reg.search(data.centres[:1], 1)  # builds the index
    return reg, add_s, time.perf_counter() - t


def make_queries(data: Synthetic, src: np.ndarray, n_novel: int, seed: int) -> np.ndarray:
    near = data.image(np.stack([data.kept[int(r)] for r in src]), seed)  # new images of registered classes
    return np.ascontiguousarray(np.concatenate([near, data.novel(n_novel, seed + 1)]))


def exact_phase(data: Synthetic, queries: np.ndarray, src: np.ndarray, seed: int, with_vectors=None):
    """Exact top-1 of the queries and exact single-query latency over the same prototypes (freed after).
    with_vectors(x, ref), if given, runs while the vectors are in memory; its result is returned last."""
    x = np.empty((data.n, data.dim), np.float32)
    for a, b, c in data.chunks():
        x[a:b] = c
    g = np.random.default_rng(seed)
    pairs = g.integers(0, data.n, (2, 2000))
    stats = (float(np.median((x[pairs[0]] * x[pairs[1]]).sum(1))),
             float(np.median((queries[:len(src)] * x[src]).sum(1))))
    t = time.perf_counter()
    _, ref = faiss.knn(queries, x, 1, faiss.METRIC_INNER_PRODUCT)
    batch_s = time.perf_counter() - t
    n_timed = int(np.clip(20 / (data.n * data.dim * 4 / 4e9), 10, min(200, len(queries))))  # ~20 s
    ms, _ = time_queries(lambda q: faiss.knn(q, x, 1, faiss.METRIC_INNER_PRODUCT), queries[:n_timed])
    extra = with_vectors(x, ref[:, 0]) if with_vectors is not None else None
    del x
    gc.collect()
    return ref[:, 0], ms, batch_s, int((ref[:len(src), 0] == src).sum()), stats, extra


def flat_sweep(dim: int, sizes: list[int]) -> None:
    print(f"\n### Exact (Flat) single-query search by size, dim {dim} (where 'auto' stops being exact)\n")
    print("| prototypes | MiB scanned | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|")
    g = np.random.default_rng(0)
    for n in sizes:
        reg = Registry(dim, index="Flat")
        reg.add_many([label(i) for i in range(n)], g.standard_normal((n, dim), dtype=np.float32))
        ms, _ = time_queries(lambda q: reg.search(q, 100), g.standard_normal((200, dim), dtype=np.float32))
        print(f"| {n:,} | {n * dim * 4 / 2**20:.0f} | {pct(ms, 50):.2f} | {pct(ms, 99):.2f} |", flush=True)
        del reg
    print(f"\n'auto' threshold = AUTO_FLAT_FLOATS // dim = {AUTO_FLAT_FLOATS // dim:,} prototypes at dim {dim}")


def ivf_lists(in_use: str) -> int | None:
    """nlist of the IVF component of a factory string ("IVF2048,PQ160x4fs", "PCAR512,IVF256,PQ256x4fs",
    "IVF4096_HNSW32,..."), None without one."""
    for part in in_use.split(","):
        digits = part[3:].split("_")[0]
        if part.startswith("IVF") and digits.isdigit():
            return int(digits)
    return None


def scans_all_by_default(reg: Registry, dim: int, nlist: int) -> bool:
    """Whether the registry's default nprobe already visits every list, seen from outside: the
    default search finds the same best 100 as nprobe = nlist for queries in random directions
    (their nearest prototypes spread over many lists, so a partial scan misses some)."""
    probes = np.random.default_rng(0).standard_normal((5, dim), dtype=np.float32)
    # The best 100 of 1024 candidates: 4-bit scores tie, so the 1024th candidate may differ between
    # two identical searches whose lists were split over threads differently.
    k, rerank = min(100, len(reg)), min(1024, len(reg))
    default = reg.search(probes, k, params={"rerank": rerank})
    every = reg.search(probes, k, params={"nprobe": nlist, "rerank": rerank})
    return default.labels == every.labels


def param_sweep(reg: Registry, queries: np.ndarray, ref: np.ndarray, data_name: str) -> list[tuple]:
    """Recall@1 and p50 ms over nprobe x rerank; returns (nprobe, rerank, recall, p50) rows."""
    nlist = ivf_lists(reg.index_in_use)
    if nlist is None:
        print(f"\n(no parameter sweep at {len(reg):,} prototypes: the index in use, {reg.index_in_use}, "
              f"has no inverted lists)")
        return []
    full = scans_all_by_default(reg, queries.shape[1], nlist)
    print(f"\n#### Search parameters at {len(reg):,} prototypes, {data_name} data ({reg.index_in_use}), "
          f"{len(queries)} queries, k=1{' (its default nprobe scans all lists: rerank only)' if full else ''}\n")
    print("| nprobe | rerank | recall@1 | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    nprobes = [nlist] if full else sorted({16, 32, 64, 128, 256, 512, nlist // 8} & set(range(1, nlist + 1)))
    for nprobe in nprobes:
        for rerank in (128, 256, 512, 1024) if full else (128, 512, 1024):
            params = {"rerank": rerank} if full else {"nprobe": nprobe, "rerank": rerank}
            ms, res = time_queries(lambda q: reg.search(q, 1, params=params), queries)
            recall = float((top1_rows(res) == ref).mean())
            rows.append((nprobe, rerank, recall, pct(ms, 50)))
            print(f"| {nprobe} | {rerank} | {recall:.3f} | {pct(ms, 50):.2f} | {pct(ms, 99):.2f} |", flush=True)
    return rows


def plot_sweeps(sweeps: dict, path: Path) -> None:
    """Recall@1 against p50 latency, one line per (size, data, rerank): the trade-off nprobe buys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (n, model), rows in sweeps.items():
        if len({r[0] for r in rows}) == 1:  # full scan by default: rerank is the only knob
            ax.plot([r[3] for r in rows], [r[2] for r in rows], marker="s",
                    label=f"{n:,} {model}, all lists, rerank {', '.join(str(r[1]) for r in rows)}")
            continue
        for rerank in sorted({r[1] for r in rows}):
            line = [r for r in rows if r[1] == rerank]
            ax.plot([r[3] for r in line], [r[2] for r in line], marker="o",
                    label=f"{n:,} {model}, rerank {rerank}")
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.axvline(TARGET_P50_MS, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("p50 single-query search (ms); points: nprobe 16, 32, 64, ... (rerank where all lists are scanned)")
    ax.set_ylabel("recall@1 vs exact search")
    ax.set_title("Registry index='auto': recall against latency", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nplot: {path}")


def hnsw_compare(data: Synthetic, queries: np.ndarray, ref: np.ndarray) -> list[str]:
    gc.collect()
    before = rss()
    reg, add_s, build_s = build_registry(data, index="HNSW32")
    per = (rss() - before) / data.n
    rows = []
    for ef in (64, 128, 256, 512):
        ms, res = time_queries(lambda q: reg.search(q, 1, params={"efSearch": ef, "rerank": 1}), queries)
        rows.append(f"| HNSW32 efSearch={ef} | {data.model} | {data.n:,} | {add_s + build_s:.1f} | {per:,.0f} | "
                    f"{pct(ms, 50):.2f} | {pct(ms, 99):.2f} | {(top1_rows(res) == ref).mean():.3f} |")
    del reg
    gc.collect()
    return rows


# ---------------------------------------------------------------- candidate indexes at one size
# Built with FAISS directly on the exact vectors x (in memory during the exact phase), searched one
# query at a time on the same queries as the registry, each candidate's R best re-scored exactly
# against x the way the registry does it (gather the R rows, dot with the query, keep the best).

IP = faiss.METRIC_INNER_PRODUCT
PCA_SAMPLE = 2**16  # prototypes the projections and coarse quantisers train on (fixed seed)


@dataclass
class Candidate:
    name: str
    build: Callable[[np.ndarray], object]  # x -> trained and filled FAISS index
    # (label, configure(index), R, OpenMP threads while searching)
    settings: list[tuple[str, Callable[[object], None], int, int]]


def sample_rows(n: int, m: int, seed: int = 0) -> np.ndarray:
    return np.arange(n) if m >= n else np.sort(np.random.default_rng(seed).choice(n, m, replace=False))


def pow2_at_most(v: float) -> int:
    return 2 ** max(0, int(math.floor(math.log2(max(1.0, v)))))


def projection(x: np.ndarray, dim_out: int, plus_minus: bool = True) -> faiss.PCAMatrix:
    """PCA to dim_out then a random rotation (spreads variance evenly over PQ sub-quantisers).
    plus_minus trains on the sample stacked with its negation: a zero mean, so the directions are
    those of the uncentred second moment and nothing is subtracted (centring adds a per-prototype
    bias to inner products). Without it: ordinary centred PCA."""
    s = x[sample_rows(len(x), PCA_SAMPLE)]
    pca = faiss.PCAMatrix(x.shape[1], dim_out, 0, True)
    pca.train(np.vstack([s, -s]) if plus_minus else s)
    return pca


def projected(pre, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    if pre is None:
        return x[rows]
    return np.vstack([pre.apply(x[rows[a:a + CHUNK]]) for a in range(0, len(rows), CHUNK)])


def add_chunks(index, x: np.ndarray, name: str) -> None:
    for a in tqdm(range(0, len(x), CHUNK), desc=f"  add {name}", unit="chunk", leave=False):
        index.add(x[a:a + CHUNK])


def ivf_fast_scan(x: np.ndarray, factory: str, pre=None, nlist_sample: int = 0):
    """`factory` (an IVF fast-scan index, spherical k-means) behind an optional projection."""
    d = pre.d_out if pre is not None else x.shape[1]
    index = faiss.index_factory(d, factory, IP)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.spherical = True
    index.train(projected(pre, x, sample_rows(len(x), nlist_sample or max(PCA_SAMPLE, 40 * ivf.nlist))))
    index = faiss.IndexPreTransform(pre, index) if pre is not None else index
    add_chunks(index, x, factory)
    return index


def hnsw_on(x: np.ndarray, pre, m: int = 32, sq8: bool = False):
    """HNSW{m} (efConstruction 40) on the projected vectors, or with 8-bit scalar codes on x."""
    d = pre.d_out if pre is not None else x.shape[1]
    hnsw = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, m, IP) if sq8 else faiss.IndexHNSWFlat(d, m, IP)
    hnsw.hnsw.efConstruction = 40
    if sq8:
        hnsw.train(x[sample_rows(len(x), PCA_SAMPLE)])
    index = faiss.IndexPreTransform(pre, hnsw) if pre is not None else hnsw
    add_chunks(index, x, "HNSW")
    return index


def _ivf_of(index):
    return faiss.downcast_index(faiss.extract_index_ivf(index))


def set_nprobe(nprobe: int, parallel_lists: bool = False) -> Callable[[object], None]:
    def configure(index) -> None:
        ivf = _ivf_of(index)
        ivf.nprobe = nprobe
        quantiser = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantiser, faiss.IndexHNSW):  # it finds at most efSearch lists: nprobe needs as many
            quantiser.hnsw.efSearch = nprobe
        ivf.implem = 14 if parallel_lists else 0  # 14: fast scan parallel over the probed lists (one query, 2 cores)
    return configure


def set_ef(ef: int) -> Callable[[object], None]:
    def configure(index) -> None:
        faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index).hnsw.efSearch = ef
    return configure


def previous_auto(n: int, dim: int) -> Candidate:
    """IVF{nlist},PQ{dim/8}x4fs exactly as the registry's index="auto" built it before: nlist the power
    of two nearest 2*sqrt(n) (>= 40 prototypes per list), 40*nlist training prototypes."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, 2 * math.sqrt(n)))))
    while nlist > 1 and nlist * 40 > n:
        nlist //= 2
    m = next(m for m in range(max(1, math.ceil(max(dim / 8, min(dim / 2, 32)))), dim + 1) if dim % m == 0)
    factory = f"IVF{nlist},PQ{m}x4fs"
    settings = [(f"nprobe {p}, R {r}", set_nprobe(p), r, 1) for p in (16, 64, 256, 512) if p <= nlist
                for r in (128, 512)]
    return Candidate(f"previous auto {factory}", lambda x: ivf_fast_scan(x, factory, nlist_sample=40 * nlist), settings)


def pca_fast_scan(n: int, dim_out: int, reranks, plus_minus: bool = True, one_thread_reranks=()) -> Candidate:
    """The new auto: uncentred PCA to dim_out, IVF{nlist},PQ{dim_out/2}x4fs scanned in full, on 2
    threads; one_thread_reranks: also on 1 (the figure a machine whose other core is busy still gets)."""
    nlist = min(256, pow2_at_most(n / 40))
    factory = f"IVF{nlist},PQ{dim_out // 2}x4fs"
    name = f"PCA-reduced fast scan PCAR{dim_out},{factory}" + ("" if plus_minus else " (centred PCA)")
    settings = [(f"full scan, R {r}", set_nprobe(nlist, parallel_lists=True), r, 2) for r in reranks]
    settings += [(f"full scan, R {r}", set_nprobe(nlist), r, 1) for r in one_thread_reranks]
    return Candidate(name, lambda x: ivf_fast_scan(x, factory, projection(x, dim_out, plus_minus)), settings)


def hnsw_pca(dim_out: int = 384, rerank: int = 256) -> Candidate:
    # An HNSW search finds at most efSearch neighbours (FAISS 1.15): R is capped at efSearch.
    settings = [(f"efSearch {ef}, R {min(ef, rerank)}", set_ef(ef), min(ef, rerank), 1) for ef in (64, 128, 256, 512)]
    return Candidate(f"HNSW on PCA vectors PCAR{dim_out},HNSW32", lambda x: hnsw_on(x, projection(x, dim_out)),
                     settings)


def ivf_hnsw_coarse(n: int, dim_out: int = 512) -> Candidate:
    nlist = min(4096, pow2_at_most(n / 40))
    factory = f"IVF{nlist}_HNSW32,PQ{dim_out // 2}x4fs"
    settings = [(f"nprobe {p}, R 512", set_nprobe(p, parallel_lists=True), 512, 2) for p in (256, 1024) if p <= nlist]
    return Candidate(f"IVF with HNSW coarse quantiser PCAR{dim_out},{factory}",
                     lambda x: ivf_fast_scan(x, factory, projection(x, dim_out)), settings)


def hnsw_full(rerank: int = 256) -> Candidate:
    settings = [(f"efSearch {ef}, R {min(ef, rerank)}", set_ef(ef), min(ef, rerank), 1)
                for ef in (128, 256, 512, 1024)]
    return Candidate("HNSW on full vectors HNSW32_SQ8", lambda x: hnsw_on(x, None, sq8=True), settings)


def opq(n: int, dim_out: int = 512) -> Candidate:
    """OPQ's learnt rotation in place of the PCA projection, same codes and full scan."""
    nlist = min(256, pow2_at_most(n / 40))
    m = dim_out // 2
    factory = f"OPQ{m}_{dim_out},IVF{nlist},PQ{m}x4fs"

    def build(x):
        index = faiss.index_factory(x.shape[1], factory, IP)
        _ivf_of(index).cp.spherical = True
        index.train(x[sample_rows(len(x), PCA_SAMPLE)])
        add_chunks(index, x, factory)
        return index
    return Candidate(f"OPQ {factory}", build, [("full scan, R 512", set_nprobe(nlist, parallel_lists=True), 512, 2)])


def candidates_for(n: int, dim: int, args) -> list[Candidate]:
    out = []
    if n == args.candidates_at:
        out += [previous_auto(n, dim), pca_fast_scan(n, 512, (64, 128, 256, 512, 1024), one_thread_reranks=(256, 512)),
                pca_fast_scan(n, 384, (512,)), pca_fast_scan(n, 448, (512,)),
                pca_fast_scan(n, 512, (512,), plus_minus=False), hnsw_pca(), ivf_hnsw_coarse(n)]
        if args.opq:
            out.append(opq(n))
    if n == args.hnsw_full_at:
        out.append(hnsw_full())
    return [c for c in out if dim >= 512 or "PCAR" not in c.name]  # projections to <= 512 dims need dim >= 512


def rescored_top1(index, x: np.ndarray, rerank: int) -> Callable[[np.ndarray], int]:
    """Single-query search: the index's `rerank` candidates, re-scored exactly against x."""
    def search(q: np.ndarray) -> int:
        _, cand = index.search(q, rerank)
        ids = cand[0][cand[0] >= 0]
        # einsum, as the registry: BLAS would start threads for one query.
        return int(ids[np.argmax(np.einsum("cd,d->c", x[ids], q[0]))])
    return search


def sweep_candidate(c: Candidate, x: np.ndarray, queries: np.ndarray, ref: np.ndarray, n: int) -> list[dict]:
    reset_peak()
    t = time.perf_counter()
    index = c.build(x)
    build_s = time.perf_counter() - t
    per = faiss.serialize_index(index).nbytes / len(x)
    rows = []
    for label_, configure, rerank, n_threads in c.settings:
        configure(index)
        with openmp_threads(n_threads):
            ms, top = time_queries(rescored_top1(index, x, rerank), queries)
            rows.append(dict(n=n, candidate=c.name, setting=label_, rerank=rerank, threads=n_threads,
                             build_s=build_s, per=per, recall=float((np.array(top) == ref).mean()),
                             p50=pct(ms, 50), p99=pct(ms, 99)))
            print(f"  {c.name} | {label_}, {n_threads} thread(s): recall@1 {rows[-1]['recall']:.3f}, "
                  f"p50 {rows[-1]['p50']:.2f} ms", flush=True)
    print(f"[{n:,}] {c.name}: build {build_s:.1f}s, {per:,.0f} bytes/prototype, peak RSS {gib(peak_rss())}",
          flush=True)
    del index
    gc.collect()
    return rows


def candidate_sweep(x: np.ndarray, queries: np.ndarray, ref: np.ndarray, args) -> list[dict]:
    cands = candidates_for(len(x), x.shape[1], args)
    if not cands:
        return []
    print(f"[{len(x):,}] candidate indexes: {len(cands)} to build, one at a time, {len(queries)} queries each",
          flush=True)
    t = time.perf_counter()
    rows = [row for c in cands for row in sweep_candidate(c, x, queries, ref, len(x))]
    print(f"[{len(x):,}] candidate sweep {time.perf_counter() - t:.0f}s", flush=True)
    return rows


def print_candidates(rows: list[dict], args) -> None:
    print("\n### Candidate indexes (FAISS directly, same vectors and queries; the R candidates re-scored exactly)\n")
    print("| prototypes | candidate | setting | threads | build s | bytes/prototype | recall@1 | p50 ms | p99 ms |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        hit = " **" if r["recall"] >= TARGET_RECALL and r["p50"] <= TARGET_P50_MS else ""
        print(f"| {r['n']:,} | {r['candidate']} | {r['setting']}{hit} | {r['threads']} | {r['build_s']:.1f} | "
              f"{r['per']:,.0f} | {r['recall']:.3f} | {r['p50']:.2f} | {r['p99']:.2f} |")
    print(f"\n** = in the target region (recall@1 >= {TARGET_RECALL}, p50 <= {TARGET_P50_MS:g} ms).")
    off = [flag for flag, on in (("HNSW32_SQ8 on full vectors (--hnsw-full-at N)", args.hnsw_full_at),
                                 ("OPQ (--opq)", args.opq)) if not on]
    if off:
        print("Not built (off by default: too slow to build at 1M on 2 cores; HNSW32_SQ8 took 95 s at 200k, "
              f"OPQ160 training 564 s at 1M): {', '.join(off)}.")


def lines_of(points: list[dict]) -> list[list[dict]]:
    """A candidate's settings as plot lines: one per R where each other knob setting (nprobe) comes
    with several R (first R solid, second dotted), else one line."""
    knobs = {r["setting"].rsplit(", R ", 1)[0] for r in points}
    if len(knobs) > 1 and len(points) > len(knobs):
        return [[r for r in points if r["rerank"] == rr] for rr in dict.fromkeys(r["rerank"] for r in points)]
    return [points]


def plot_candidates(rows: list[dict], path: Path) -> None:
    """Recall@1 against p50 per candidate (log time axis), the target region shaded: all settings on
    the left, the neighbourhood of the target (recall >= 0.95) with each setting labelled on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(13, 7))
    keys = list(dict.fromkeys((r["n"], r["candidate"], r["threads"]) for r in rows))
    xlim = (min(r["p50"] for r in rows) / 1.5, max(max(r["p50"] for r in rows), TARGET_P50_MS) * 1.5)
    for ax, ymin, labelled in ((axes[0], min(r["recall"] for r in rows) - 0.02, False), (axes[1], 0.95, True)):
        ax.fill_between([xlim[0], TARGET_P50_MS], TARGET_RECALL, 1.005, color="tab:green", alpha=0.15,
                        label=f"target: recall@1 >= {TARGET_RECALL}, p50 <= {TARGET_P50_MS:g} ms")
        for i, key in enumerate(keys):
            points = [r for r in rows if (r["n"], r["candidate"], r["threads"]) == key]
            lines = lines_of(points)
            reranks = " solid / ".join(str(line[0]["rerank"]) for line in lines)
            styles = f", R {reranks} dotted" if len(lines) > 1 else ""
            for j, line in enumerate(lines):
                ax.plot([r["p50"] for r in line], [r["recall"] for r in line], marker="osD^vP*Xh"[i % 9],
                        color=f"C{i}", linestyle="-:"[j % 2], label=None if j else
                        f"{key[1]} ({key[2]} thread{'s' * (key[2] > 1)}{styles})")
            for j, r in enumerate(points if labelled else []):
                short = r["setting"].replace("full scan, ", "").replace("efSearch", "ef").replace("nprobe", "np")
                ax.annotate(short, (r["p50"], r["recall"]), fontsize=6, xytext=(3, 4 if j % 2 else -9),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlim(*xlim)
        ax.xaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(ymin, 1.004)
        ax.set_xlabel("p50 single-query ms (projection + search + exact re-scoring of R), log scale")
        ax.set_ylabel("recall@1 vs exact search")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title(f"Candidate indexes at {rows[0]['n']:,} prototypes, lite0 data: all settings", fontsize=10)
    axes[1].set_title("near the target (recall@1 >= 0.95); R = candidates re-scored exactly", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2)
    fig.tight_layout(rect=(0, 0.05 + 0.025 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nplot: {path}")


def run_size(n: int, model: str, args, tmp: Path) -> dict:
    """Registry first (memory measured alone), saved and freed; then the exact baseline over the
    same vectors (freed); then the registry loaded back and searched."""
    reset_peak()
    data = Synthetic(n, args.dim, args.centres, model)
    g = np.random.default_rng(7)
    half = args.queries // 2
    src = g.integers(0, n, half)
    gc.collect()
    before = rss()
    reg, add_s, build_s = build_registry(data, src)
    per = (rss() - before) / n
    in_use = reg.index_in_use
    print(f"[{n:,} {model}] add_many {add_s:.1f}s, index build {build_s:.1f}s -> {in_use}", flush=True)
    queries = make_queries(data, src, args.queries - half, seed=7)
    check = queries[:: max(1, len(queries) // 20)]
    expected = reg.search(check, 10)
    path = tmp / f"reg-{n}"
    t = time.perf_counter()
    reg.save(path)
    save_s = time.perf_counter() - t
    disk = sum(f.stat().st_size for f in path.iterdir())
    del reg
    gc.collect()

    t = time.perf_counter()
    def candidates(x, ref):
        return candidate_sweep(x, queries, ref, args) if model == "lite0" else []

    ref, exact_ms, exact_batch_s, src_top1, stats, cand_rows = exact_phase(data, queries, src, seed=7,
                                                                           with_vectors=candidates)
    print(f"[{n:,} {model}] exact phase {time.perf_counter() - t:.1f}s (batched exact search of {len(queries)} "
          f"queries {exact_batch_s:.1f}s); data: median cosine of random prototype pairs {stats[0]:.2f}, of "
          f"a near query and its class's prototype {stats[1]:.2f}; {src_top1}/{half} near queries have "
          f"their class as exact top-1", flush=True)

    t = time.perf_counter()
    reg = Registry.load(path)
    load_s = time.perf_counter() - t
    got = reg.search(check, 10)
    same = got.labels == expected.labels and np.array_equal(got.scores, expected.scores)
    assert reg.index_in_use == in_use
    ms1, res1 = time_queries(lambda q: reg.search(q, 1), queries)
    ms100, _ = time_queries(lambda q: reg.search(q, 100), queries[:: max(1, len(queries) // 200)])
    recall = top1_rows(res1) == ref
    if args.sweep:
        pick = np.linspace(0, len(queries) - 1, min(len(queries), args.sweep_queries)).astype(int)  # both halves
        sweep = param_sweep(reg, queries[pick], ref[pick], model)
    del reg
    gc.collect()
    shutil.rmtree(path)
    hnsw = hnsw_compare(data, queries, ref) if args.hnsw_at == n else []
    return dict(n=n, model=model, in_use=in_use, add_s=add_s, build_s=build_s, per=per, p50=pct(ms1, 50),
                p99=pct(ms1, 99), p50_100=pct(ms100, 50), p99_100=pct(ms100, 99), recall=recall.mean(),
                recall_near=recall[:half].mean(), recall_novel=recall[half:].mean(),
                exact_p50=pct(exact_ms, 50), exact_n=len(exact_ms), save_s=save_s, load_s=load_s,
                disk=disk, same=same, peak=peak_rss(), hnsw=hnsw, sweep=sweep if args.sweep else [],
                candidates=cand_rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--centres", type=int, default=10_000)
    ap.add_argument("--data", nargs="+", choices=sorted(MODELS), default=["lite0", "clustered"],
                    help="synthetic data: lite0 (calibrated on real embeddings, hard) and/or clustered (easy)")
    ap.add_argument("--sweep", action="store_true", help="recall/latency over nprobe x rerank (and a PNG plot)")
    ap.add_argument("--plot", type=Path, default=Path(__file__).parent / "results" / "registry_recall_latency.png",
                    help="where --sweep writes its recall/latency plot")
    ap.add_argument("--sweep-queries", type=int, default=400)
    ap.add_argument("--flat-sweep", action="store_true", help="exact latency by size (the auto threshold)")
    ap.add_argument("--hnsw-at", type=int, default=0, help="also build HNSW32 at this size (slow)")
    ap.add_argument("--candidates-at", type=int, default=None,
                    help="size at which --sweep builds the candidate indexes on lite0 data "
                         "(default: the largest of --sizes; 0: none)")
    ap.add_argument("--hnsw-full-at", type=int, default=0,
                    help="also the candidate HNSW32_SQ8 on full vectors at this size (lite0; slow: 95 s at 200k)")
    ap.add_argument("--opq", action="store_true",
                    help="also the candidate OPQ at --candidates-at (slow: its training took 400 s at 12k "
                         "prototypes here, far longer at 1M)")
    ap.add_argument("--candidates-plot", type=Path,
                    default=Path(__file__).parent / "results" / "registry_candidates.png",
                    help="where the candidate sweep writes its recall/latency plot")
    ap.add_argument("--tmp", default=None, help="where to save registries (default: system temp)")
    args = ap.parse_args()
    if args.candidates_at is None:
        args.candidates_at = max(args.sizes) if args.sweep else 0

    print(f"# Registry scale benchmark: dim {args.dim}, {args.queries} queries, {args.centres:,} centres")
    print(f"cores: {os.cpu_count()}, faiss threads: {faiss.omp_get_max_threads()}, load average at start: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}, memory: "
          f"{gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))}\n", flush=True)
    print("data: " + "; ".join(f"{m}: {MODELS[m]}" for m in args.data) + " (slopes, variances; see Synthetic)")
    if args.flat_sweep:
        flat_sweep(args.dim, [1000, 2000, 4000, AUTO_FLAT_FLOATS // args.dim, 10000, 20000, 50000])
    tmp = Path(tempfile.mkdtemp(prefix="fewshot-scale-", dir=args.tmp))
    results = []
    try:
        for n in args.sizes:
            for model in args.data:
                need = n * args.dim * 4 * 1.25
                avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
                if need > 0.8 * avail:
                    print(f"[{n:,}] skipped: needs ~{gib(need)} resident, {gib(avail)} free now")
                    continue
                results.append(run_size(n, model, args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n### Registry (index='auto'), dim {args.dim}; exact = FAISS flat over the same vectors\n")
    print("| prototypes | data | index in use | add_many s | index build s | bytes/prototype | p50 ms k=1 | "
          "p99 ms k=1 | p50 ms k=100 | exact p50 ms | speedup | recall@1 (near / novel) | save s | "
          "load s | on disk | peak RSS |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['n']:,} | {r['model']} | {r['in_use']} | {r['add_s']:.1f} | {r['build_s']:.1f} | {r['per']:,.0f} "
              f"({r['per'] / (4 * args.dim):.2f}x 4*dim) | {r['p50']:.2f} | {r['p99']:.2f} | {r['p50_100']:.2f} | "
              f"{r['exact_p50']:.1f} | {r['exact_p50'] / r['p50']:.0f}x | {r['recall']:.3f} "
              f"({r['recall_near']:.3f} / {r['recall_novel']:.3f}) | {r['save_s']:.1f} | {r['load_s']:.1f} | "
              f"{gib(r['disk'])} | {gib(r['peak'])} |")
    for r in results:
        if not r["same"]:
            print(f"WARNING: the loaded {r['n']:,} registry answered differently")
    hnsw = [row for r in results for row in r["hnsw"]]
    if hnsw:
        print("\n### Alternative: HNSW32 (efConstruction 40; plain top-1, no re-scoring), same queries\n")
        print("| index | data | prototypes | build s | bytes/prototype | p50 ms k=1 | p99 ms k=1 | recall@1 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        print("\n".join(hnsw))
    sweeps = {(r["n"], r["model"]): r["sweep"] for r in results if r["sweep"]}
    if sweeps:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_sweeps(sweeps, args.plot)
    cand_rows = [row for r in results for row in r["candidates"]]
    if cand_rows:
        print_candidates(cand_rows, args)
        args.candidates_plot.parent.mkdir(parents=True, exist_ok=True)
        plot_candidates(cand_rows, args.candidates_plot)
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
