"""Calibration of a registry with one big class: time and peak memory against its example count.

Each count runs in a fresh process: a registry (in memory, examples stored) with one class of ``n``
random ``--dim`` examples, then ``fewshot.registry.calibration.calibrate``; prints the median wall time of
``--repeats`` calibrations and the peak memory growth over the registry itself (Linux: VmHWM reset
once the registry is built). ``--limit-gb`` caps each process's address space (a run that needs more
reports a MemoryError instead of taking the machine's memory).

    .venv/bin/python benchmarks/calibration_scale.py [--counts 5000 10000 25000] [--dim 1280] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np
from fewshot.registry.calibration import calibrate
from fewshot.registry import Registry
n, dim, repeats, limit = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
reg = Registry(dim, store_examples=True)
reg.add_class("big", np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32))
before = status_kb("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak = current RSS: measure the calibration, not the registry
times = []
try:
    for _ in range(repeats):
        start = time.monotonic()
        calibration = calibrate(reg)
        times.append(time.monotonic() - start)
except MemoryError:
    print(json.dumps({"error": "MemoryError", "peak_mb": (status_kb("VmHWM:") - before) / 1024}))
    sys.exit(0)
print(json.dumps({"median_s": statistics.median(times), "peak_mb": (status_kb("VmHWM:") - before) / 1024,
                  "threshold": calibration.per_class["big"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[5000, 10000, 25000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit-gb", type=float, default=6.0, help="address-space cap per run (0: none)")
    args = parser.parse_args()
    print("examples\tmedian s\tpeak MB over the registry\tper-class threshold")
    for n in args.counts:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.dim), str(args.repeats),
                              str(int(args.limit_gb * 2**30))], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{n}\tfailed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout)
        if "error" in r:
            print(f"{n}\t{r['error']} at {args.limit_gb:g} GB\t{r['peak_mb']:.0f}")
        else:
            print(f"{n}\t{r['median_s']:.2f}\t{r['peak_mb']:.0f}\t{r['threshold']:.4f}")


if __name__ == "__main__":
    main()
