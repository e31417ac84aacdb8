"""Single-image ``FewShotClassifier.predict`` latency with many registered classes, and where it goes.

    .venv/bin/python benchmarks/latency.py [--classes 1000 100000] [--calls 60] [--index auto Flat]

The classes are synthetic prototypes in the real encoder's space (``Registry.add_many``): embeddings
of augmented crops of scikit-image's bundled photos, each moved by noise to cosine ~0.7 of its source
(about what a new photo of the same object gets). Queries are the real photos, as files (decoded
every call), with the embedding cache off: every call runs the network, as for a new photo.

Warm figures: the model is loaded and a few calls are made before timing (the first is excluded).
For each class count and index it reports p50/p99 of ``predict`` and a breakdown, each part timed
alone over the same inputs (medians): ``embed`` (decode + preprocess + network, via the classifier's
own embedding path), ``forward`` (the network alone on a preprocessed 1-image batch, with the torch
threads ``predict`` uses and with one), ``search`` (``registry.search(vector, 100)``), ``softmax``
(scores to probabilities and ``Prediction`` objects), and what is left (per-call overhead). Exact
search ("Flat") over the same classes is the baseline for the default "auto" index.
Further rows: the embedding cache on (the default) with a new image each call, and per-call costs
found in the predict path (the embedding cache, thread-pool start-up).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fewshot import FewShotClassifier  # noqa: E402
from fewshot.classifier import softmax  # noqa: E402

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "camera.png", "brick.png", "grass.png", "gravel.png")


def photo_paths() -> list[Path]:
    import skimage

    root = Path(skimage.__file__).parent / "data"
    paths = [root / name for name in PHOTOS if (root / name).is_file()]
    if not paths:
        sys.exit(f"no scikit-image photos found under {root}")
    return paths


def crops(paths: list[Path], per_photo: int, seed: int = 0) -> list[np.ndarray]:
    """Random crops / flips of the photos as RGB arrays: more varied sources for prototypes."""
    from PIL import Image

    g = np.random.default_rng(seed)
    out = []
    for p in paths:
        img = np.asarray(Image.open(p).convert("RGB"))
        h, w = img.shape[:2]
        for _ in range(per_photo):
            s = g.uniform(0.5, 1.0)
            ch, cw = max(32, int(h * s)), max(32, int(w * s))
            y, x = g.integers(0, h - ch + 1), g.integers(0, w - cw + 1)
            c = img[y:y + ch, x:x + cw]
            out.append(np.ascontiguousarray(c[:, ::-1] if g.random() < 0.5 else c))
    return out


def prototypes(sources: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    """n unit vectors, each a source embedding plus noise (cosine ~0.7 with it)."""
    g = np.random.default_rng(seed)
    base = sources / np.linalg.norm(sources, axis=1, keepdims=True)
    out = np.empty((n, base.shape[1]), np.float32)
    for a in range(0, n, 20000):
        b = min(n, a + 20000)
        noise = g.standard_normal((b - a, base.shape[1]), dtype=np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        v = base[g.integers(0, len(base), b - a)] + noise  # equal norms: cosine ~0.71 with the source
        out[a:b] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def timed(fn, inputs, calls: int) -> np.ndarray:
    """ms per call over `calls` calls cycling through inputs (after two untimed warm calls)."""
    fn(inputs[0])
    fn(inputs[1 % len(inputs)])
    out = []
    for i in range(calls):
        x = inputs[i % len(inputs)]
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return np.array(out) * 1e3


def p(ms: np.ndarray, q: float) -> float:
    return float(np.percentile(ms, q))


def measure(n_classes: int, index: str, paths, protos, args) -> dict:
    clf = FewShotClassifier(index=index, cache=False, progress=False)
    reg = clf.registry_
    reg.add_many([f"class-{i}" for i in range(n_classes)], protos[:n_classes])
    files = [str(x) for x in paths]
    clf.predict(files[0])  # builds the index, warms the model
    r = {"classes": n_classes, "index": index, "in_use": reg.index_in_use}
    r["predict"] = timed(lambda f: clf.predict(f), files, args.calls)
    r["embed"] = timed(lambda f: clf._embed([f]), files, args.calls)
    enc = clf.encoder_
    vectors = clf._embed(files).vectors
    threads = max(1, torch.get_num_threads())  # one stream for one image: it gets all torch threads
    from PIL import Image

    batches = [enc._batch_step([enc._image_step(Image.fromarray(img))]) for img in crops(paths[:3], 2, seed=5)]
    network = enc._network(1, clf.batch_size, threads)
    for t in (threads, 1):
        before = torch.get_num_threads()
        torch.set_num_threads(t)
        try:
            r[f"forward_{t}"] = timed(network, batches, args.calls)
        finally:
            torch.set_num_threads(before)
    r["search"] = timed(lambda v: reg.search(v, 100), list(vectors), args.calls * 3)
    found = [reg.search(v, 100) for v in vectors]
    r["softmax"] = timed(lambda f: _package(clf, f), found, args.calls * 3)
    # the default configuration: embedding cache on, a new image every call (arrays with one pixel changed)
    arrays = crops(paths[:4], 1, seed=9)
    counter = iter(range(10**9))

    def fresh(a):
        a = a.copy()
        k = next(counter)
        a[0, 0, 0], a[0, 0, 1] = k % 256, (k // 256) % 256
        return a

    r["predict_array"] = timed(lambda a: clf.predict(fresh(a)), arrays, args.calls)
    with tempfile.TemporaryDirectory() as cache_dir:
        cached = FewShotClassifier(index=index, cache=Path(cache_dir) / "emb.sqlite", progress=False)
        cached._encoder, cached._registry = clf._encoder, clf._registry
        r["predict_array_cache"] = timed(lambda a: cached.predict(fresh(a)), arrays, args.calls)
    return r


def _package(clf, found) -> None:
    """The part of FewShotClassifier._predict_vectors after the search (softmax, Prediction objects)."""
    probabilities = softmax(found.scores / clf.temperature_)
    for labels, probs in zip(found.labels, probabilities):
        [(label, float(q)) for label, q in zip(labels[:5], probs[:5])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[1000, 100_000])
    ap.add_argument("--index", nargs="+", default=["auto", "Flat"],
                    help="registry indexes to compare ('auto' is the default, 'Flat' the exact baseline)")
    ap.add_argument("--calls", type=int, default=60, help="timed calls per figure")
    ap.add_argument("--crops", type=int, default=12, help="augmented crops per photo as prototype sources")
    args = ap.parse_args()

    print(f"# predict latency: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    paths = photo_paths()
    t = time.perf_counter()
    src = FewShotClassifier(cache=False, progress=False)
    sources = src.encoder_.embed(crops(paths, args.crops), progress=False)
    protos = prototypes(sources, max(args.classes))
    print(f"{len(paths)} photos; {len(sources)} crop embeddings (dim {sources.shape[1]}) as prototype sources; "
          f"setup {time.perf_counter() - t:.1f}s\n", flush=True)
    del src

    rows = []
    for n in args.classes:
        for index in args.index:
            r = measure(n, index, paths, protos, args)
            rows.append(r)
            print(f"[{n:,} classes, index={index} -> {r['in_use']}] predict p50 {p(r['predict'], 50):.1f} ms",
                  flush=True)

    print("\n### predict(one image file), warm, embedding cache off; medians of the parts timed alone (ms)\n")
    print("| classes | index (in use) | predict p50 | predict p99 | vs Flat | embed | forward (N thr / 1 thr) | "
          "search k=100 | softmax+objects | rest (overhead) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    flat = {r["classes"]: p(r["predict"], 50) for r in rows if r["index"] == "Flat"}
    threads = max(1, torch.get_num_threads())
    for r in rows:
        med = {k: p(v, 50) for k, v in r.items() if isinstance(v, np.ndarray)}
        rest = med["predict"] - med["embed"] - med["search"] - med["softmax"]
        ratio = f"{flat[r['classes']] / med['predict']:.2f}x faster" if r["classes"] in flat else "-"
        print(f"| {r['classes']:,} | {r['index']} ({r['in_use']}) | {med['predict']:.1f} | {p(r['predict'], 99):.1f} | "
              f"{ratio} | {med['embed']:.1f} | {med[f'forward_{threads}']:.1f} / {med['forward_1']:.1f} | "
              f"{med['search']:.2f} | {med['softmax']:.3f} | {rest:.1f} |")

    print("\n### Per-call costs in the predict path (ms, medians)\n")
    print("| classes | index | predict(new array) cache off | cache on (default) | cache cost |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        off, on = p(r["predict_array"], 50), p(r["predict_array_cache"], 50)
        print(f"| {r['classes']:,} | {r['index']} | {off:.1f} | {on:.1f} | {on - off:+.1f} |")
    def pool_round_trip(_):
        with ThreadPoolExecutor(1) as pool:
            pool.submit(int).result()

    pool = timed(pool_round_trip, [0], 200)
    print(f"\nstarting a 1-thread ThreadPoolExecutor and running one task (embed_batch does this per call): "
          f"{statistics.median(pool):.3f} ms")
    print(f"peak RSS of this process (model, 100,000 prototypes under each index, caches): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
