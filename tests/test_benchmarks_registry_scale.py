"""benchmarks/registry_scale.py: the registry sweep reads any factory string's inverted file and never
asks for more lists than there are; candidates re-score their R best exactly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from fewshot.registry import Registry

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "registry_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("registry_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["registry_scale"] = module
    spec.loader.exec_module(module)
    return module


def unit_rows(g, n: int, dim: int) -> np.ndarray:
    x = g.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def registry_and_queries(bench, index: str, n: int = 2000, dim: int = 64):
    g = np.random.default_rng(0)
    x = unit_rows(g, n, dim)
    reg = Registry(dim, index=index)
    reg.add_many([bench.label(i) for i in range(n)], x)
    queries = x[:40] + 0.05 * g.standard_normal((40, dim), dtype=np.float32)
    _, ref = faiss.knn(queries / np.linalg.norm(queries, axis=1, keepdims=True), x, 1, faiss.METRIC_INNER_PRODUCT)
    return reg, queries, ref[:, 0]


@pytest.mark.parametrize("in_use, nlist", [
    ("IVF2048,PQ160x4fs", 2048), ("PCAR512,IVF256,PQ256x4fs", 256), ("IVF4096_HNSW32,PQ256x4fs", 4096),
    ("IVF64,PQ32x4fs", 64), ("Flat", None), ("HNSW32", None), ("PCAR512,HNSW32", None)])
def test_ivf_lists_reads_the_inverted_file_of_any_factory_string(bench, in_use, nlist):
    assert bench.ivf_lists(in_use) == nlist


def test_sweep_of_an_index_that_scans_every_list_varies_rerank_only(bench):
    reg, queries, ref = registry_and_queries(bench, "IVF1,PQ32x4fs")  # one list: the default scans it all
    rows = bench.param_sweep(reg, queries, ref, "test")
    assert [(r[0], r[1]) for r in rows] == [(1, 128), (1, 256), (1, 512), (1, 1024)]
    recalls = [r[2] for r in rows]
    assert recalls == sorted(recalls)  # the same scan's top R nest: more re-scored never loses the top-1
    assert recalls[-1] >= 0.95


def test_sweep_of_a_partial_scan_varies_nprobe_up_to_nlist_and_rerank_to_1024(bench):
    reg, queries, ref = registry_and_queries(bench, "IVF64,PQ32x4fs")  # FAISS default nprobe 1 of 64
    rows = bench.param_sweep(reg, queries, ref, "test")
    assert sorted({r[0] for r in rows}) == [8, 16, 32, 64]  # never nprobe > nlist
    assert sorted({r[1] for r in rows}) == [128, 512, 1024]


def test_candidate_search_rescores_its_candidates_exactly(bench):
    g = np.random.default_rng(1)
    x = unit_rows(g, 3000, 32)
    index = faiss.index_factory(32, "IVF16,PQ16x4fs", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    index.nprobe = 16
    queries = unit_rows(g, 50, 32)
    _, exact = faiss.knn(queries, x, 1, faiss.METRIC_INNER_PRODUCT)
    coarse = [int(index.search(q[None], 1)[1][0, 0]) for q in queries]
    search = bench.rescored_top1(index, x, 3000)  # every prototype re-scored: exact whatever the codes
    assert [search(q[None]) for q in queries] == exact[:, 0].tolist()
    assert coarse != exact[:, 0].tolist()  # 4-bit codes alone do get some top-1 wrong


def test_previous_auto_is_the_registry_auto_index_before_the_pca_one(bench):
    assert bench.previous_auto(1_000_000, 1280).name == "previous auto IVF2048,PQ160x4fs"
    assert bench.previous_auto(100_000, 1280).name == "previous auto IVF512,PQ160x4fs"
