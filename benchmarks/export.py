"""The network under each runtime: eager, TorchScript, inductor, onnxruntime fp32 and int8 (network only).

    .venv/bin/python benchmarks/export.py [--classes 20] [--queries 3] [--batch 8] [--threads 2] [--reps 5]

Real Caltech-101 photos, preprocessed once by the encoder's own transform: ``--classes`` classes, one
support photo each, ``--queries`` query photos each. Every runtime embeds the same batches of ``--batch``
images with ``--threads`` threads. Reported per runtime: the first call (export / compile included), the
median images/s over ``--reps`` passes, the ratio to eager, achieved GFLOP/s as a % of a float32 matmul
peak timed in the same run, the lowest cosine similarity to eager's embeddings, and nearest-prototype
agreement: the share of queries whose nearest class prototype (built by that runtime) is the one eager
finds. int8 is static (QDQ, per-channel weights), calibrated on the photos of ``--calibration-classes``
other classes. End-to-end figures (decode included) against the naive loop: benchmarks/embedding.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from embedding import DEFAULT_ZIP, gflop_per_image, matmul_peak_gflops  # noqa: E402


def photos(zip_path: Path, classes: int, per_class: int, target: Path) -> dict[str, list[Path]]:
    """The first ``per_class`` JPEGs of the first ``classes`` classes (sorted): the same every run."""
    by_class: dict[str, list[str]] = {}
    with zipfile.ZipFile(zip_path) as zf:
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) == 3 and name.lower().endswith(".jpg"):
                by_class.setdefault(parts[1], []).append(name)
        chosen = {label: names[:per_class] for label, names in sorted(by_class.items())
                  if len(names) >= per_class}
        chosen = dict(list(chosen.items())[:classes])
        out = {}
        for label, names in chosen.items():
            out[label] = []
            for name in names:
                path = target / label / Path(name).name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(zf.read(name))
                out[label].append(path)
    return out


def runtimes(encoder, batch: int, threads: int, folder: Path, calibration: list[Path]):
    """name -> (build function returning a batch -> numpy callable)."""
    import torch

    from fewshot.embedding.model import _compile_features
    from fewshot.embedding.runtime import export_module, session
    from fewshot.export import preprocess_images, quantize_int8

    probe = encoder.probe_batch(batch)

    def torch_mode(mode):
        def build():
            module = _compile_features(encoder.features_module(), mode, probe) if mode else encoder.features_module()

            def run(x):
                with torch.inference_mode():
                    return module(x).numpy()
            return run
        return build

    def onnx(int8: bool):
        def build():
            path = export_module(encoder.features_module(), folder / "encoder.onnx", probe)
            if int8:
                path = quantize_int8(path, folder / "encoder.int8.onnx", preprocess_images(encoder, calibration))
            ort = session(path, threads)
            return lambda x: ort.run(None, {"images": np.ascontiguousarray(x.numpy())})[0]
        return build

    return {"eager": torch_mode(None), "TorchScript": torch_mode("torchscript"), "inductor": torch_mode("inductor"),
            "onnxruntime fp32": onnx(False), "onnxruntime int8": onnx(True)}


def nearest(queries: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    p = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
    return (q @ p.T).argmax(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--queries", type=int, default=3, help="query photos per class")
    parser.add_argument("--calibration-classes", type=int, default=8,
                        help="further classes whose photos calibrate int8 (never evaluated)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip", default="", help="runtimes to leave out, comma-separated (e.g. inductor)")
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"Caltech-101 zip not found at {args.data}; pass --data PATH")
    import torch

    from fewshot import create_encoder
    from fewshot.embedding.runtime import min_cosine
    from fewshot.embedding.images import load_image

    torch.set_num_threads(args.threads)
    encoder = create_encoder(runtime="torch", compile="none")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fewshot-export-bench-") as tmp:
        tmp = Path(tmp)
        found = photos(args.data, args.classes + args.calibration_classes, 1 + args.queries, tmp / "photos")
        calibration = [p for label in list(found)[args.classes:] for p in found.pop(label)]
        paths = [p for ps in found.values() for p in ps]
        images = torch.stack([encoder.transform(load_image(p)) for p in paths]).contiguous(
            memory_format=torch.channels_last)
        is_support = np.array([i == 0 for ps in found.values() for i in range(len(ps))])
        batches = [images[i:i + args.batch] for i in range(0, len(images), args.batch)]
        gflop, peak = gflop_per_image(), matmul_peak_gflops()
        results = {}
        for name, build in runtimes(encoder, args.batch, args.threads, tmp, calibration).items():
            if name in args.skip.split(","):
                continue
            print(f"  timing {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                run = build()
                vectors = np.concatenate([run(b) for b in batches])
            except Exception as exc:  # e.g. inductor without a C++ compiler: report, go on
                results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
                continue
            cold = time.perf_counter() - start
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                for b in batches:
                    run(b)
                times.append(time.perf_counter() - start)
            results[name] = {"cold": cold, "rate": len(images) / statistics.median(times), "vectors": vectors}
        peak = max(peak, matmul_peak_gflops())
    eager = results["eager"]["vectors"]
    truth = nearest(eager[~is_support], eager[is_support])
    print(f"\n### Runtimes, network only: Lite0 at 224 px, batch {args.batch}, {args.threads} threads, "
          f"{len(paths)} Caltech-101 photos ({args.classes} classes)\n")
    print(f"torch {torch.__version__}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"{gflop:.3f} GFLOP/image; float32 matmul peak {peak:.0f} GFLOP/s (best of the two timings in this run)\n")
    print("| runtime | first call s | img/s (median) | vs eager | % of matmul peak | min cosine to eager "
          "| nearest-prototype agreement with eager |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | | |")
            continue
        v = r["vectors"]
        agreement = float((nearest(v[~is_support], v[is_support]) == truth).mean())
        print(f"| {name} | {r['cold']:.1f} | {r['rate']:.1f} | {r['rate'] / results['eager']['rate']:.2f}x | "
              f"{r['rate'] * gflop / peak:.0%} | {min_cosine(v, eager):.6f} | {agreement:.1%} "
              f"({int(round(agreement * (~is_support).sum()))}/{(~is_support).sum()}) |")


if __name__ == "__main__":
    main()
