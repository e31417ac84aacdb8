"""``fewshot serve`` against hostile or careless clients: what junk requests and huge images cost it.

    .venv/bin/python benchmarks/serve_abuse.py [--junk 5000] [--repeats 3] [--images 1 8] [--side 9400]

1. ``--junk`` requests with made-up methods and random paths, no API key needed: the size of
   ``/metrics`` and the server's resident memory (VmRSS) before and after.
2. One request with N ``--side`` x ``--side`` PNGs (9400: 0.3 MB each, under Pillow's decompression-bomb limit) to
   ``/v1/predict``: wall time, status, and the server's peak resident memory above its resting size
   (VmHWM, reset through /proc/PID/clear_refs before each request). Medians over ``--repeats``.

The server is a real ``fewshot serve`` process on loopback with one registered class; the clients
run in this process. Extra arguments after ``--`` go to ``fewshot serve``.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from serve_server import start_server  # noqa: E402


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def junk_requests(client: httpx.Client, n: int) -> None:
    rng = random.Random(0)
    for _ in range(n):
        method = "".join(rng.choices(string.ascii_uppercase, k=8))
        path = "/" + "".join(rng.choices(string.ascii_lowercase, k=12))
        client.request(method, path)


def big_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.linear_gradient("L").resize((side, side)).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--junk", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--side", type=int, default=9400, help="width and height of the PNGs")
    args, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "reg", *serve_args)
        pid = server.process.pid
        try:
            with httpx.Client(base_url=server.url, timeout=600) as client:
                small = io.BytesIO()
                Image.new("RGB", (64, 64), (200, 30, 30)).save(small, format="PNG")
                r = client.post("/v1/classes/red/images", files=[("images", ("red.png", small.getvalue()))])
                assert r.status_code == 200, r.text
                before = (len(client.get("/metrics").content), memory_kb(pid, "VmRSS"))
                start = time.perf_counter()
                junk_requests(client, args.junk)
                took = time.perf_counter() - start
                after = (len(client.get("/metrics").content), memory_kb(pid, "VmRSS"))
                print(f"{args.junk} junk requests in {took:.1f} s: /metrics {before[0]:,} -> {after[0]:,} bytes, "
                      f"RSS {before[1] / 1024:.0f} -> {after[1] / 1024:.0f} MB")
                png, side = big_png(args.side), f"{args.side} x {args.side}"
                print(f"{side} PNG: {len(png) / 1e6:.2f} MB")
                for n in args.images:
                    times, peaks, statuses = [], [], set()
                    for _ in range(args.repeats):
                        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
                        resting = memory_kb(pid, "VmRSS")
                        start = time.perf_counter()
                        r = client.post("/v1/predict", files=[("images", (f"big{i}.png", png)) for i in range(n)])
                        times.append(time.perf_counter() - start)
                        peaks.append(memory_kb(pid, "VmHWM") - resting)
                        statuses.add(r.status_code)
                    print(f"{n} x {side} PNG in one request: status {sorted(statuses)}, median "
                          f"{statistics.median(times):.2f} s, peak RSS +{statistics.median(peaks) / 1024:.0f} MB "
                          f"(over {args.repeats}); answer: {r.text[:160]}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
