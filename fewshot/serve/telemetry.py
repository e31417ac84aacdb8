"""Prometheus metrics of the service: requests, latencies, batch sizes, classes, errors.

Written with ``prometheus_client`` into a registry of the service's own. Every label has a bounded set
of values, whatever clients send: the endpoint is a route's name ("unmatched" for paths no route
serves, "static" for the page's files), the method a standard HTTP method or "other", the status one
the service itself answers. So ``/metrics`` stays the same size however many junk requests arrive.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CONTENT_TYPE = CONTENT_TYPE_LATEST


def method_label(method: str) -> str:
    """The method as a metric label: made-up methods share one value, "other"."""
    return method if method in METHODS else "other"


class Telemetry:
    """The service's metrics (thread-safe: prometheus_client locks each series)."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("fewshot_requests", "HTTP requests by endpoint, method and status.",
                                 ["endpoint", "method", "status"], registry=self.registry)
        self._errors = Counter("fewshot_errors", "HTTP responses with a 4xx or 5xx status.", ["status"],
                               registry=self.registry)
        self._latency = Histogram("fewshot_request_seconds", "Request latency by endpoint.", ["endpoint"],
                                  buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self._batches = Histogram("fewshot_batch_size", "Images per model batch of predictions.",
                                  buckets=BATCH_BUCKETS, registry=self.registry)
        self._classes = Gauge("fewshot_classes", "Classes in the registry.", registry=self.registry)

    def record_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """One response; ``endpoint`` must come from a bounded set (a route's name)."""
        self._requests.labels(endpoint, method_label(method), str(status)).inc()
        if status >= 400:
            self._errors.labels(str(status)).inc()
        self._latency.labels(endpoint).observe(seconds)

    def record_batch(self, size: int) -> None:
        self._batches.observe(size)

    def render(self, classes: int) -> bytes:
        """The Prometheus text exposition (``CONTENT_TYPE``)."""
        self._classes.set(classes)
        return generate_latest(self.registry)
