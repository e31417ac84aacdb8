"""Prometheus text metrics of the service: requests, latencies, batch sizes, classes, errors.

Kept by hand (a few counters and histograms) so that the service needs no metrics library; the output
follows the Prometheus text exposition format, version 0.0.4.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for bound, count in zip(list(self.buckets) + ["+Inf"], self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {running}')
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{suffix} {self.total:.6f}", f"{name}_count{suffix} {self.n}"]


class Telemetry:
    """Thread-safe counters for ``/metrics``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._latency: dict[str, Histogram] = {}
        self._batches = Histogram(BATCH_BUCKETS)

    def record_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(endpoint, method, status)] += 1
            self._latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS_S)).observe(seconds)

    def record_batch(self, size: int) -> None:
        with self._lock:
            self._batches.observe(size)

    def render(self, classes: int) -> str:
        with self._lock:
            lines = ["# HELP fewshot_requests_total HTTP requests by endpoint, method and status.",
                     "# TYPE fewshot_requests_total counter"]
            lines += [f'fewshot_requests_total{{endpoint="{e}",method="{m}",status="{s}"}} {n}'
                      for (e, m, s), n in sorted(self._requests.items())]
            lines += ["# HELP fewshot_errors_total HTTP responses with a 4xx or 5xx status.",
                      "# TYPE fewshot_errors_total counter"]
            errors: dict[int, int] = defaultdict(int)
            for (_, _, status), n in self._requests.items():
                if status >= 400:
                    errors[status] += n
            lines += [f'fewshot_errors_total{{status="{s}"}} {n}' for s, n in sorted(errors.items())]
            lines += ["# HELP fewshot_request_seconds Request latency by endpoint.",
                      "# TYPE fewshot_request_seconds histogram"]
            for endpoint, hist in sorted(self._latency.items()):
                lines += hist.lines("fewshot_request_seconds", f'endpoint="{endpoint}"')
            lines += ["# HELP fewshot_batch_size Images per model batch of predictions.",
                      "# TYPE fewshot_batch_size histogram"]
            lines += self._batches.lines("fewshot_batch_size")
            lines += ["# HELP fewshot_classes Classes in the registry.", "# TYPE fewshot_classes gauge",
                      f"fewshot_classes {classes}"]
        return "\n".join(lines) + "\n"
