"""Prometheus metrics for one HTTP app, in a registry of its own (apps never share counters)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _BackendStats(Collector):
    """Exports the backend's numeric ``stats()`` as ``autoglm_backend_<key>`` gauges at scrape time."""

    def __init__(self, stats: Callable[[], Mapping[str, object]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = self._stats()
        except Exception:  # a broken backend must not break /metrics
            log.exception("backend stats() failed during a metrics scrape")
            return
        for key, value in sorted(stats.items()):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            name = "autoglm_backend_" + "".join(c if c.isalnum() else "_" for c in key).lower()
            yield GaugeMetricFamily(name, f"Backend statistic {key!r}", value=float(value))


class Metrics:
    """The counters, gauges and histograms the server updates as it handles requests."""

    def __init__(self, stats: Callable[[], Mapping[str, object]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "autoglm_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter("autoglm_http_errors", "Failed requests by error reason", ["reason"],
                              registry=r)
        self.prompt_tokens = Counter("autoglm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("autoglm_completion_tokens", "Completion tokens generated",
                                         registry=r)
        self.latency = Histogram(
            "autoglm_request_latency_seconds",
            "Time from request to last byte",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "autoglm_time_to_first_token_seconds",
            "Time from request to first generated token",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("autoglm_http_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("autoglm_http_active_requests", "Requests holding a generation slot", registry=r)
        if stats is not None:
            r.register(_BackendStats(stats))

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


__all__ = ["Metrics"]
