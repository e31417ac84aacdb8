"""Embedding throughput end to end (JPEG files -> vectors), against a naive loop and today's code in the same run.

    .venv/bin/python benchmarks/embedding.py [--images 240] [--data ../shared/datasets/caltech101/caltech101_base.zip]
                                             [--reps 5] [--today REF] [--modes none,torchscript,inductor,onnxruntime]

Extracts N real Caltech-101 JPEGs to a temporary folder and times, each in its own process (so peak RSS
and torch's thread state belong to that row alone):

* naive: what a user writes first: timm's eager model, one image at a time,
  ``PIL.Image.open(p).convert("RGB")`` + timm's transform, ``torch.no_grad()``, torch's default threads.
  Also with one torch thread, since on a busy machine torch's default two OpenMP threads can be far slower.
* ``encoder.embed(paths)`` with every default, the encoder's ONNX export cached (as after a first
  registration): all N images in one call, and in calls of 16 images.
* the same with "today's code": the package as of ``--today REF`` (a git commit, exported with
  ``git archive`` to a temporary folder and imported from there; ``--today none`` leaves these rows out).
* the Lite0+Lite1+Lite2 ensemble with every default (exports cached), against today's single Lite0 default.
* ``encoder.embed(paths)`` with each torch ``compile=`` mode (``runtime="torch"``), and ``runtime="onnxruntime"``
  (``--modes``; none by default).

Each row: the first call (cold: includes opening sessions or compiling), then the median over ``--reps`` warm
calls, images/s, the ratios to the naive loop and to today's default, achieved GFLOP/s (FLOPs counted once with
``torch.utils.flop_counter.FlopCounterMode``) as a fraction of a float32 matmul peak timed in the same
run, and the process's peak RSS. The machine's load average is printed: on a shared machine only the
ratios within one run mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ZIP = ROOT.parent / "shared" / "datasets" / "caltech101" / "caltech101_base.zip"
ALL_MODES = ("none", "torchscript", "inductor", "onnxruntime")
ENSEMBLE = "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2"
# variant -> (code: "new" or "today", encoder name, images per call: None = all in one call)
EMBED_VARIANTS = {"default": ("new", "efficientnet_lite0", None), "default-16": ("new", "efficientnet_lite0", 16),
                  "today": ("today", "efficientnet_lite0", None), "today-16": ("today", "efficientnet_lite0", 16),
                  "ensemble": ("new", ENSEMBLE, None)}


def extract_jpegs(zip_path: Path, n: int, target: Path, seed: int = 0) -> list[Path]:
    """N JPEGs drawn (seeded) from the whole zip, so every class and image size is represented."""
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(name for name in zf.namelist() if name.lower().endswith((".jpg", ".jpeg")))
        random.Random(seed).shuffle(names)
        paths = []
        for i, name in enumerate(names[:n]):
            path = target / f"{i:05d}_{Path(name).name}"
            path.write_bytes(zf.read(name))
            paths.append(path)
    return paths


# -- one variant, in its own process --------------------------------------------------------------
def naive_model():
    import timm

    from fewshot.embedding.encoders import _load_into, _packaged_weights_path, read_state_dict

    model = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    path = _packaged_weights_path("efficientnet_lite0")
    _load_into(model, read_state_dict(path), source=str(path), by_position=True)
    return model


def run_variant(variant: str, paths: list[Path], reps: int) -> dict:
    import torch

    if variant.startswith("naive"):
        import timm
        from PIL import Image

        if variant == "naive-1thread":
            torch.set_num_threads(1)
        model = naive_model()
        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

        def call():
            with torch.no_grad():
                for path in paths:
                    model(transform(Image.open(path).convert("RGB")).unsqueeze(0))
    else:
        from fewshot import create_encoder

        _, name, per_call = EMBED_VARIANTS.get(variant, ("new", "efficientnet_lite0", None))
        if variant in EMBED_VARIANTS:
            encoder = create_encoder(name)
        elif variant == "onnxruntime":
            encoder = create_encoder(runtime="onnxruntime")
        else:
            encoder = create_encoder(compile=variant, runtime="torch")
        calls = [paths[i:i + per_call] for i in range(0, len(paths), per_call)] if per_call else [paths]

        def call():
            for part in calls:
                encoder.embed(part, progress=False)

    times, cpu = [], []
    for _ in range(reps + 1):  # the first call is cold: it pays for any compilation
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)  # all threads of this process
    return {"variant": variant, "cold_s": times[0], "warm_s": times[1:], "warm_cpu_s": cpu[1:],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(variant: str, folder: Path, reps: int, today: Path | None) -> dict:
    """Run one variant in a fresh process, importing fewshot from this tree or from today's (``today``)."""
    code = today if EMBED_VARIANTS.get(variant, ("new",))[0] == "today" else ROOT
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, __file__, "--worker", variant, "--folder", str(folder), "--reps", str(reps)],
                         check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_tree(ref: str, target: Path) -> Path:
    """The package as of git commit ``ref``, written to ``target`` (``git archive``: no worktree, no checkout)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "fewshot"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def cache_exports(names: list[str]) -> None:
    """Export each encoder's network to ONNX once (the state after a first registration), before timing."""
    from fewshot import create_encoder
    from fewshot.embedding.runtime import cached_encoder_onnx

    for name in names:
        cached_encoder_onnx(create_encoder(name, runtime="torch"))


# -- measured once, in the parent --------------------------------------------------------------------
def gflop_per_image(name: str = "efficientnet_lite0") -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fewshot import create_encoder

    encoder = create_encoder(name, compile="none", runtime="torch")
    total = 0
    for member in getattr(encoder, "members", [encoder]):
        with FlopCounterMode(display=False) as counter:
            member._forward(torch.zeros(1, *member.data_config["input_size"]))
        total += counter.get_total_flops()
    return total / 1e9


def matmul_peak_gflops(n: int = 2048, reps: int = 7) -> float:
    """float32 matmul GFLOP/s with torch's default threads, best of ``reps``: the practical compute ceiling."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--data", type=Path, default=DEFAULT_ZIP, help="Caltech-101 zip (any zip of JPEGs works)")
    parser.add_argument("--reps", type=int, default=5, help="warm calls per variant (after one cold call)")
    parser.add_argument("--today", default="8a4e88d", help="git commit of today's code to compare with ('none': skip)")
    parser.add_argument("--modes", default="", help=f"modes to time too, comma-separated ({','.join(ALL_MODES)})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        paths = sorted(args.folder.glob("*.jpg"))
        print(json.dumps(run_variant(args.worker, paths, args.reps)))
        return

    if not args.data.is_file():
        sys.exit(f"zip of JPEGs not found at {args.data}; pass --data PATH")
    modes = [m for m in args.modes.split(",") if m]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fewshot-bench-") as tmp:
        os.environ["FEWSHOT_CACHE_DIR"] = str(Path(tmp) / "cache")  # this run's exports only, shared by its rows
        (Path(tmp) / "images").mkdir()
        paths = extract_jpegs(args.data, args.images, Path(tmp) / "images")
        today = None if args.today == "none" else export_tree(args.today, Path(tmp))
        cache_exports(ENSEMBLE.split("+"))
        gflop = {"efficientnet_lite0": gflop_per_image(), ENSEMBLE: gflop_per_image(ENSEMBLE)}
        peak = matmul_peak_gflops()
        # Naive first and last: its median over both brackets the run, in case the machine's load drifts.
        order = ["naive", "naive-1thread", "default", "default-16", "ensemble", *modes, "naive"]
        if today is not None:
            order[3:3] = ["today", "today-16"]
        results: dict[str, list[dict]] = {}
        for variant in order:
            print(f"  timing {variant} ...", file=sys.stderr, flush=True)
            results.setdefault(variant, []).append(spawn(variant, Path(tmp) / "images", args.reps, today))
        peak_after = matmul_peak_gflops()
    load_after = os.getloadavg()
    print_table(results, len(paths), gflop, peak, peak_after, load_before, load_after, args.reps)


def print_table(results: dict[str, list[dict]], n: int, gflop: dict[str, float], peak: float, peak_after: float,
                load_before, load_after, reps: int) -> None:
    import torch

    rate = {v: n / statistics.median([t for r in rs for t in r["warm_s"]]) for v, rs in results.items()}
    print(f"\n### Embedding throughput: {n} Caltech-101 JPEGs, end to end (decode + preprocess + network)\n")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
          + (" (SHARED/BUSY machine: compare ratios, not absolute numbers)" if max(load_before[0], load_after[0])
             > 0.5 * (os.cpu_count() or 1) else ""))
    print(f"models at their default sizes: Lite0 {gflop['efficientnet_lite0']:.3f} GFLOP/image, Lite0+1+2 "
          f"{gflop[ENSEMBLE]:.3f} (FlopCounterMode); float32 matmul peak {peak:.0f} GFLOP/s before, "
          f"{peak_after:.0f} after (2048^3, best of 7; the % column uses the higher); medians of {reps} warm calls\n")
    peak = max(peak, peak_after)
    today = rate.get("today")
    print("| variant | first call s (cold) | warm img/s (median) | vs naive | vs today's default | CPU ms/img "
          "| GFLOP/s | % of matmul peak | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    labels = {"naive": "naive loop (eager, batch 1, default threads)", "naive-1thread": "naive loop, 1 torch thread",
              "default": "`encoder.embed` defaults, one call", "default-16": "`encoder.embed` defaults, calls of 16",
              "today": "today's code: defaults, one call", "today-16": "today's code: defaults, calls of 16",
              "ensemble": "Lite0+Lite1+Lite2 ensemble, defaults, one call",
              "onnxruntime": "`encoder.embed`, runtime=onnxruntime"}
    for variant, rs in results.items():
        label = labels.get(variant, f"`encoder.embed`, compile={variant}")
        cold = statistics.median(r["cold_s"] for r in rs)
        rss = max(r["peak_rss_mb"] for r in rs)
        gflops = rate[variant] * gflop[ENSEMBLE if variant == "ensemble" else "efficientnet_lite0"]
        cpu_ms = 1000 * statistics.median([c for r in rs for c in r["warm_cpu_s"]]) / n
        vs_today = f"{rate[variant] / today:.2f}x" if today else "-"
        print(f"| {label} | {cold:.1f} | {rate[variant]:.1f} | {rate[variant] / rate['naive']:.2f}x | {vs_today} | "
              f"{cpu_ms:.1f} | {gflops:.0f} | {gflops / peak:.0%} | {rss:.0f} |")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    share = rate["default"] * gflop["efficientnet_lite0"] / peak
    print(f"\nTargets: defaults >= 3.5x the naive loop and >= 50% of the matmul peak: "
          f"{rate['default'] / rate['naive']:.2f}x ({verdict(rate['default'] >= 3.5 * rate['naive'])}), "
          f"{share:.0%} ({verdict(share >= 0.5)}); calls of 16 >= 3x: "
          f"{rate['default-16'] / rate['naive']:.2f}x ({verdict(rate['default-16'] >= 3 * rate['naive'])})"
          + (f"; Lite0+1+2 ensemble >= today's Lite0 default: {rate['ensemble'] / today:.2f}x "
             f"({verdict(rate['ensemble'] >= today)})" if today else "")
          + f". ({rate['default'] / rate['naive-1thread']:.2f}x the naive loop on one torch thread.) CPU ms/img counts "
          f"every thread of the process: it shows efficiency even when other jobs take the cores.")


if __name__ == "__main__":
    main()
