"""Adaptation metrics: convergence time, error rate, per-config resource cost.

Kept in memory for ``autoglm devices`` / status output and exported as Prometheus metrics on a
per-coordinator ``CollectorRegistry`` (several coordinators can live in one process).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sdk.coord.events import EVENT_SCHEMAS

_LAT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BYTES_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
#: Distinct event types that get their own label value; later ones count as "other".
MAX_EVENT_LABELS = 64
#: events still waiting for reports that convergence tracking keeps (the oldest is dropped beyond)
MAX_PENDING = 1000
OTHER = "other"


@dataclass
class Pending:
    """An event whose targets have not all reported yet."""

    event_id: str
    started: float                     # time.monotonic() when the event was received
    waiting: dict[str, int]            # did -> version that must be reported
    failures: int = 0
    targets: int = 0


@dataclass
class CoordinatorMetrics:
    """Counters, histograms and a window of recent convergence times."""

    window: int = 1000
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    max_event_labels: int = MAX_EVENT_LABELS
    max_pending: int = MAX_PENDING

    def __post_init__(self) -> None:
        r = self.registry
        self.events = Counter("autoglm_coord_events", "Events received (type label bounded, then 'other')",
                              ["type"], registry=r)
        self.store_behind = Counter("autoglm_coord_store_behind",
                                    "Admissions where the device was ahead of the state store", registry=r)
        self.sessions_ended = Counter("autoglm_coord_sessions_ended",
                                      "Sessions ended by the coordinator", ["reason"], registry=r)
        self.rejected = Counter("autoglm_coord_rejected", "Messages rejected", ["reason"], registry=r)
        self.configs = Counter("autoglm_coord_configs", "Config versions pushed", registry=r)
        self.reports = Counter("autoglm_coord_reports", "Config reports", ["status"], registry=r)
        self.convergence = Histogram("autoglm_coord_convergence_seconds",
                                     "Event received -> all targets applied", buckets=_LAT_BUCKETS,
                                     registry=r)
        self.config_bytes = Histogram("autoglm_coord_config_bytes", "Signed config size",
                                      buckets=_BYTES_BUCKETS, registry=r)
        self.apply_seconds = Histogram("autoglm_coord_config_apply_seconds",
                                       "Device-reported time to apply a config", buckets=_LAT_BUCKETS,
                                       registry=r)
        self.coordinator_seconds = Histogram("autoglm_coord_decision_seconds",
                                             "Coordinator time per event to evaluate rules and commit",
                                             buckets=_LAT_BUCKETS, registry=r)
        self.auth = Counter("autoglm_coord_auth", "Authentication attempts", ["result"], registry=r)
        self.devices = Gauge("autoglm_coord_devices", "Devices by state", ["state"], registry=r)
        self.error_rate_gauge = Gauge("autoglm_coord_error_rate", "Failed / all config reports", registry=r)
        # -- roll-outs: by state, the newest one's decay rate and cost, per-device convergence (rollouts.py)
        self.rollouts = Gauge("autoglm_coord_rollouts", "Roll-outs by state", ["state"], registry=r)
        self.rollout_decay_rate = Gauge("autoglm_coord_rollout_decay_rate",
                                        "Error decay rate lambda of the newest roll-out, per second", registry=r)
        self.rollout_cost_ratio = Gauge("autoglm_coord_rollout_cost_ratio",
                                        "Newest roll-out: CPU seconds per converged device over mean convergence time",
                                        registry=r)
        self.rollout_convergence = Histogram("autoglm_coord_rollout_convergence_seconds",
                                             "Roll-out stage commit -> device applied", buckets=_LAT_BUCKETS,
                                             registry=r)
        self.push_decay_rate = Gauge("autoglm_coord_push_decay_rate",
                                     "Error decay rate lambda of the newest settled push, per second", registry=r)
        #: the roll-outs' summary in status output (set by the roll-out engine)
        self.rollout_summary: Callable[[], dict[str, Any]] | None = None
        # -- end roll-outs
        self._recent: deque[float] = deque(maxlen=self.window)
        self._bytes: deque[int] = deque(maxlen=self.window)
        self._apply: deque[float] = deque(maxlen=self.window)
        self._work: deque[float] = deque(maxlen=self.window)
        self._event_labels: set[str] = set(EVENT_SCHEMAS)
        self.pending: dict[str, Pending] = {}
        self._by_target: dict[tuple[str, int], str] = {}
        self.applied = 0
        self.failed = 0
        self.pending_dropped = 0           # events given up on (never converged, beyond max_pending)

    # -------------------------------------------------------------- convergence tracking
    def start(self, event_id: str, waiting: dict[str, int]) -> None:
        """Begin timing an event that produced configs for ``waiting`` (did -> version)."""
        p = Pending(event_id, time.monotonic(), dict(waiting), targets=len(waiting))
        while len(self.pending) >= self.max_pending:     # devices that never report: bounded
            self._drop(next(iter(self.pending)))
        self.pending[event_id] = p
        for did, version in waiting.items():
            self._by_target[(did, version)] = event_id

    def _drop(self, event_id: str) -> None:
        p = self.pending.pop(event_id, None)
        if p is None:
            return
        self.pending_dropped += 1
        for did, version in p.waiting.items():
            if self._by_target.get((did, version)) == event_id:
                del self._by_target[(did, version)]

    def report(self, did: str, version: int, status: str, *, apply_ms: float | None = None
               ) -> tuple[str, float, int, int] | None:
        """Count one report; returns ``(event_id, seconds, targets, failures)`` when an event converged."""
        self.reports.labels(status).inc()
        if status == "applied":
            self.applied += 1
        else:
            self.failed += 1
        self.error_rate_gauge.set(self.error_rate)
        if apply_ms is not None and apply_ms >= 0:
            self.apply_seconds.observe(apply_ms / 1000)
            self._apply.append(apply_ms)
        event_id = self._by_target.pop((did, version), None)
        if event_id is None:
            return None
        p = self.pending.get(event_id)
        if p is None or p.waiting.get(did) != version:
            return None
        del p.waiting[did]
        if status != "applied":
            p.failures += 1
        if p.waiting:
            return None
        del self.pending[event_id]
        seconds = time.monotonic() - p.started
        self.convergence.observe(seconds)
        self._recent.append(seconds)
        return event_id, seconds, p.targets, p.failures

    def event(self, event_type: str) -> None:
        """Count one event; only the known types and the first ``max_event_labels`` others get a label."""
        if event_type not in self._event_labels:
            if len(self._event_labels) - len(EVENT_SCHEMAS) >= self.max_event_labels:
                event_type = OTHER
            else:
                self._event_labels.add(event_type)
        self.events.labels(event_type).inc()

    def config_sent(self, size: int) -> None:
        """Count one signed config of ``size`` bytes."""
        self.configs.inc()
        self.config_bytes.observe(size)
        self._bytes.append(size)

    def event_work(self, seconds: float) -> None:
        """Coordinator-side cost of deciding one event (rules evaluation and the SQLite commit)."""
        self.coordinator_seconds.observe(seconds)
        self._work.append(seconds)

    # -------------------------------------------------------------- summaries
    @property
    def error_rate(self) -> float:
        """Failed reports / all reports (0 when none)."""
        total = self.applied + self.failed
        return self.failed / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary for status output."""
        conv = sorted(self._recent)

        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            return values[min(len(values) - 1, int(q * len(values)))]

        out = {
            "convergence_ms": {
                "count": len(conv),
                "last": round(self._recent[-1] * 1000, 3) if self._recent else None,
                "p50": _ms(pct(conv, 0.5)),
                "p99": _ms(pct(conv, 0.99)),
            },
            "pending_events": len(self.pending), "pending_dropped": self.pending_dropped,
            "reports": {"applied": self.applied, "failed": self.failed},
            "error_rate": round(self.error_rate, 4),
            "config_cost": {
                "bytes_mean": round(statistics.fmean(self._bytes), 1) if self._bytes else None,
                "apply_ms_mean": round(statistics.fmean(self._apply), 3) if self._apply else None,
                "decision_ms_mean": _ms(statistics.fmean(self._work)) if self._work else None,
            },
        }
        if self.rollout_summary is not None:        # -- roll-outs
            out["rollouts"] = self.rollout_summary()
        return out

    def prometheus(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


__all__ = ["CoordinatorMetrics", "Pending", "MAX_EVENT_LABELS", "OTHER"]
