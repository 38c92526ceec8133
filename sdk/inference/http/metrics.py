"""Prometheus metrics for one HTTP app, in a registry of its own (apps never share counters).

Names follow Prometheus conventions (``promtool check metrics`` passes): running totals are
counters ending ``_total``, units are spelled out in base units (``_seconds``, ``_per_second``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

#: ``stats()`` keys that are running totals (engine and mesh router): exported as counters.
COUNTER_STATS: frozenset[str] = frozenset({
    "completed_requests", "generated_tokens", "prefix_cache_hits", "prefix_cache_lookups", "kv_preemptions",  # engine
    "requests", "completed", "failovers", "errors", "adverts", "adverts_rejected", "nodes_revoked",  # router
})

#: Abbreviated unit suffixes in ``stats()`` keys → (base-unit suffix, factor to base units).
_UNIT_SUFFIXES: tuple[tuple[str, str, float], ...] = (
    ("_per_s", "_per_second", 1.0),
    ("_ms", "_seconds", 0.001),
    ("_s", "_seconds", 1.0),
)


def stat_metric_name(key: str) -> tuple[str, float]:
    """The ``autoglm_backend_`` metric base name for a ``stats()`` key, and the factor its value
    is scaled by (``tokens_per_s`` → ``autoglm_backend_tokens_per_second``, ``uptime_ms`` →
    ``autoglm_backend_uptime_seconds`` x 0.001)."""
    name = "".join(c if c.isalnum() else "_" for c in key).lower()
    factor = 1.0
    for short, full, scale in _UNIT_SUFFIXES:
        if name.endswith(short):
            name, factor = name[: -len(short)] + full, scale
            break
    name = name.removesuffix("_total")
    return "autoglm_backend_" + name, factor


class _BackendStats(Collector):
    """Exports the backend's numeric ``stats()`` at scrape time: running totals (``counters``) as
    ``autoglm_backend_<key>_total`` counters, the rest as ``autoglm_backend_<key>`` gauges."""

    def __init__(self, stats: Callable[[], Mapping[str, object]], counters: Collection[str]) -> None:
        self._stats = stats
        self._counters = frozenset(counters)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        try:
            stats = self._stats()
        except Exception:  # a broken backend must not break /metrics
            log.exception("backend stats() failed during a metrics scrape")
            return
        seen: set[str] = set()
        for key, value in sorted(stats.items()):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            name, factor = stat_metric_name(key)
            if name in seen:  # two keys that normalise to one name: keep the first
                continue
            seen.add(name)
            if key in self._counters:
                yield CounterMetricFamily(name, f"Backend running total {key!r}", value=float(value) * factor)
            else:
                yield GaugeMetricFamily(name, f"Backend statistic {key!r}", value=float(value) * factor)


class Metrics:
    """The counters, gauges and histograms the server updates as it handles requests."""

    def __init__(self, stats: Callable[[], Mapping[str, object]] | None = None, *,
                 counters: Collection[str] = COUNTER_STATS) -> None:
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
            r.register(_BackendStats(stats, counters))

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


__all__ = ["Metrics", "COUNTER_STATS", "stat_metric_name"]
