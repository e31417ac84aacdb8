"""``fewshot serve`` under concurrent clients: throughput, p50/p99 latency and mean batch size, with
dynamic batching on (the default) and off (``--max-batch 1``), against today's code in the same run, and
the CLI's per-call cost.

    .venv/bin/python benchmarks/serve.py [--classes 1000] [--clients 1 4 16] [--requests 8] [--repeats 5]
                                         [--today REF]

"Today" is the package as of git commit ``--today`` (exported with ``git archive`` to a temporary folder;
``none`` skips it), served with its own defaults (TorchScript); this tree's service runs onnxruntime and
decodes uploads in its decode pool.

The registry holds ``--classes`` synthetic classes in the real encoder's space (as in
``benchmarks/latency.py``: embeddings of crops of scikit-image's photos plus noise). Each client is a
thread with its own HTTP connection that POSTs one JPEG photo (about 400 px, a different one each
time; the server's embedding cache is off, so every request runs the network) to ``/v1/predict`` and
waits for the answer, ``--requests`` times per client (at least 24 requests per run). The server is a real
``fewshot serve`` process on loopback, warmed up before timing; the clients run in this process on the
same 2 cores. Batch sizes come from the server's ``/metrics``. Figures are medians over ``--repeats``
runs. "Server CPU ms/req" is the server process's CPU time per request, the figure least moved by other
work on the machine (req/s and latency need a quiet machine to mean much). The CLI row is ``fewshot
predict REG photo.jpg --json`` as a new process (median of 3): what each prediction costs without a
service.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
import httpx  # noqa: E402
from latency import crops, photo_paths, prototypes  # noqa: E402
from serve_server import start_server  # noqa: E402

from fewshot import FewShotClassifier  # noqa: E402


def build_registry(path: Path, n_classes: int) -> None:
    classifier = FewShotClassifier(cache=False, progress=False)
    sources = classifier._embed(crops(photo_paths(), 4)).vectors
    classifier.registry_.add_many([f"class-{i}" for i in range(n_classes)], prototypes(sources, n_classes))
    classifier.save(path)


def query_jpegs(n: int = 32) -> list[bytes]:
    from PIL import Image

    out = []
    for array in crops(photo_paths(), max(1, n // len(photo_paths()) + 1), seed=7)[:n]:
        image = Image.fromarray(array)
        image.thumbnail((400, 400))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def batch_stats(client: httpx.Client) -> tuple[float, float]:
    lines = client.get("/metrics").text.splitlines()
    values = {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("fewshot_batch_size_")}
    return values["fewshot_batch_size_count"], values["fewshot_batch_size_sum"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux): the server's cost, whatever else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_clients(url: str, clients: int, per_client: int, photos: list[bytes], pid: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    go = threading.Barrier(clients + 1)

    def client(k: int):
        with httpx.Client(base_url=url, timeout=120) as c:
            c.get("/healthz")  # connect before the clock starts
            go.wait()
            for i in range(per_client):
                photo = photos[(k * per_client + i) % len(photos)]
                t = time.perf_counter()
                r = c.post("/v1/predict", params={"top_k": 5}, files=[("images", ("q.jpg", photo, "image/jpeg"))])
                elapsed = time.perf_counter() - t
                if r.status_code != 200 or r.json()[0]["error"]:
                    raise RuntimeError(f"prediction failed: {r.status_code} {r.text[:200]}")
                with lock:
                    latencies.append(elapsed)

    with httpx.Client(base_url=url) as probe:
        before, cpu_before = batch_stats(probe), cpu_seconds(pid)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        go.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        after, cpu_after = batch_stats(probe), cpu_seconds(pid)
    ms = np.array(latencies) * 1e3
    return {"throughput": len(latencies) / wall, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "batch": (after[1] - before[1]) / max(1, after[0] - before[0]),
            "cpu_ms": (cpu_after - cpu_before) * 1e3 / len(latencies)}


def measure_mode(registry: Path, extra: list[str], args, photos, code: Path = HERE.parent) -> dict[int, dict]:
    server = start_server(registry, *extra, code=code)
    try:
        pid = server.process.pid
        run_clients(server.url, 2, 4, photos, pid)  # warm-up: allocator, first batches
        results = {}
        for clients in args.clients:
            per_client = max(args.requests, -(-24 // clients))
            runs = [run_clients(server.url, clients, per_client, photos, pid) for _ in range(args.repeats)]
            results[clients] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"  {code.name}, {' '.join(extra) or 'batching on'}: {clients} clients done", file=sys.stderr,
                  flush=True)
        return results
    finally:
        server.stop()


def cli_seconds(registry: Path, photo: bytes) -> float:
    with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
        f.write(photo)
        f.flush()
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        times = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fewshot", "predict", str(registry), f.name, "--json", "--no-cache"],
                           check=True, capture_output=True, env=env)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def export_tree(ref: str, target: Path) -> Path:
    """The package as of git commit ``ref``, written to ``target`` (``git archive``: no worktree, no checkout)."""
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", ref, "fewshot"], check=True,
                             capture_output=True)
    target.mkdir()
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=8, help="requests per client per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--today", default="8a4e88d", help="git commit of today's code to compare with ('none': skip)")
    args = parser.parse_args()
    photos = query_jpegs()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEWSHOT_CACHE_DIR"] = str(Path(tmp) / "cache")  # the service exports once, at start-up
        registry = Path(tmp) / "reg"
        build_registry(registry, args.classes)
        rows = {"on": measure_mode(registry, [], args, photos),
                "off": measure_mode(registry, ["--max-batch", "1"], args, photos)}
        if args.today != "none":
            today = export_tree(args.today, Path(tmp) / "today")
            rows["today, on"] = measure_mode(registry, [], args, photos, code=today)
            rows["today, off"] = measure_mode(registry, ["--max-batch", "1"], args, photos, code=today)
        cli = cli_seconds(registry, photos[0])
    load = max(load_before, os.getloadavg()[0])
    print(f"\n`fewshot serve`, {args.classes} classes, one JPEG per request, medians of {args.repeats} runs "
          f"(load average {load:.1f}, {os.cpu_count()} CPUs)\n")
    base = "today, on" if "today, on" in rows else "off"
    print(f"| clients | service | req/s | p50 ms | p99 ms | mean batch | server CPU ms/req | req/s vs {base} | "
          f"req/s vs off | CPU/req vs {base} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for clients in args.clients:
        for name, by_clients in rows.items():
            off = rows["today, off" if name.startswith("today") else "off"][clients]  # the same code, unbatched
            r, ref = by_clients[clients], rows[base][clients]
            print(f"| {clients} | {name} | {r['throughput']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | "
                  f"{r['batch']:.1f} | {r['cpu_ms']:.0f} | {r['throughput'] / ref['throughput']:.2f}x | "
                  f"{r['throughput'] / off['throughput']:.2f}x | {r['cpu_ms'] / ref['cpu_ms']:.2f}x |")
    sequential = rows["off"][min(args.clients)]["throughput"]
    print(f"\nCLI `fewshot predict` per call (new process): {cli:.2f} s = {1 / cli:.2f} predictions/s; "
          f"the service with batching off, {min(args.clients)} client: {sequential:.1f}/s "
          f"({sequential * cli:.0f}x the CLI)")
    top = max(args.clients)
    on = rows["on"][top]
    ratio = on["throughput"] / rows[base][top]["throughput"]
    print(f"Targets at {top} clients: p99 <= 250 ms: {on['p99']:.0f} ms ({'met' if on['p99'] <= 250 else 'NOT met'}); "
          f"throughput >= 1.7x {base}: {ratio:.2f}x ({'met' if ratio >= 1.7 else 'NOT met'})")


if __name__ == "__main__":
    main()
