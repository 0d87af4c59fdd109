"""The service's Prometheus metrics, in a registry of its own (``GET /metrics``).

| metric | type | labels |
|---|---|---|
| ``remap_requests_total`` | counter | ``route`` (the route template), ``method``, ``status`` |
| ``remap_errors_total`` | counter | ``route``, ``error`` (the JSON error's short name) |
| ``remap_request_seconds`` | histogram | ``route``: whole requests, as the server saw them |
| ``remap_stage_seconds`` | histogram | ``stage``: see below |
| ``remap_embed_batch_size`` | histogram | images per model call |
| ``remap_index_size`` | gauge | images in the index |
| ``remap_log_records`` | gauge | changes logged since the last compaction |
| ``remap_ready`` | gauge | 1 once the model answered its warm-up and the index is loaded |

Stages: ``queue`` (waiting for a batch), ``embed`` (the model call), ``search``, ``qe`` (query
expansion: neighbours' descriptors and the second search), ``log`` (a change logged, fsync'ed
and applied).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: from a cached search (~0.1 ms) to a slow model call under load.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The metrics above, registered in their own `CollectorRegistry` (so several apps in
    one process, as in the tests, do not collide)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "remap_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.errors = Counter(
            "remap_errors", "Error answers by kind", ["route", "error"], registry=r
        )
        self.request_seconds = Histogram(
            "remap_request_seconds",
            "Request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "remap_stage_seconds",
            "Latency per stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "remap_embed_batch_size", "Images per model call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.index_size = Gauge("remap_index_size", "Images in the index", registry=r)
        self.log_records = Gauge(
            "remap_log_records", "Changes logged since the last compaction", registry=r
        )
        self.ready = Gauge("remap_ready", "1 when the service is ready", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
