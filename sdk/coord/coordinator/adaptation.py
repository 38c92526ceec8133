"""Adaptation metrics of a push or a roll-out: the e(t) curve, convergence percentiles, λ, cost.

``e(t)`` is the part of the targeted devices not yet converged (not reported applied, or failed)
``t`` seconds after the change was committed. The error decay rate is λ = −d/dt ln e(t); it is
fitted by least squares as the negative slope of ln e over the convergence window: the points
of the curve with ``0 < e < 1`` (while the first reports arrive up to the last one before all
converged). Resource cost is the coordinator's CPU seconds (``time.process_time`` deltas over the
window) and the config bytes sent, per converged device; ``cost_ratio`` divides the CPU seconds
per converged device by the mean convergence time (CPU seconds per device per second of waiting).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: points kept in an exported curve
MAX_CURVE_POINTS = 200
#: convergence times and e(t) points a settled push keeps (its λ is fitted on all of them first)
SETTLED_SAMPLES = 1000


def fit_lambda(points: Iterable[tuple[float, float]]) -> float | None:
    """λ from ``(t, e)`` points: minus the least-squares slope of ln e on t, over points with
    ``0 < e < 1`` (with ``e = 1`` points only the last before the decay starts); None when fewer
    than two points remain or every t is the same."""
    usable = [(t, e) for t, e in points if 0.0 < e <= 1.0 and math.isfinite(t)]
    # the plateau at e = 1 before the first report is not decay: keep only its last point
    start = 0
    for i, (_, e) in enumerate(usable):
        if e < 1.0:
            start = max(0, i - 1)
            break
    else:
        return None
    window = usable[start:]
    if len(window) < 2:
        return None
    ts = [t for t, _ in window]
    ys = [math.log(e) for _, e in window]
    n = len(window)
    mt, my = sum(ts) / n, sum(ys) / n
    sxx = sum((t - mt) ** 2 for t in ts)
    if sxx <= 0:
        return None
    sxy = sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True))
    return -sxy / sxx


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of ``values`` by nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def weighted_percentile(values: Sequence[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of ``(value, weight)`` pairs by nearest rank (each value counts
    ``weight`` times); :func:`percentile` when every weight is 1. None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    total = sum(w for _, w in ordered)
    rank = max(q * total, min(w for _, w in ordered) / 2)   # nearest rank: at least the first value
    seen = 0.0
    for v, w in ordered:
        seen += w
        if seen >= rank - 1e-9 * total:
            return v
    return ordered[-1][0]


def quantile_sample(values: Sequence[float], limit: int) -> list[float]:
    """At most ``limit`` values standing for ``values``: every ``len/limit``-th of them in order
    (the smallest and largest kept), so their percentiles are those of ``values`` within
    ``1/limit``."""
    ordered = sorted(values)
    if len(ordered) <= limit:
        return ordered
    step = (len(ordered) - 1) / (limit - 1)
    return [ordered[round(i * step)] for i in range(limit)]


def downsample(points: Sequence[tuple[float, float]], limit: int = MAX_CURVE_POINTS) -> list[list[float]]:
    """At most ``limit`` points of a curve, evenly spread, first and last kept."""
    if len(points) <= limit:
        return [[round(t, 6), round(e, 6)] for t, e in points]
    step = (len(points) - 1) / (limit - 1)
    picked = [points[round(i * step)] for i in range(limit)]
    return [[round(t, 6), round(e, 6)] for t, e in picked]


@dataclass
class Convergence:
    """The convergence of one push: ``targets`` devices committed at ``started`` (wall clock)."""

    targets: int
    started: float = field(default_factory=time.time)
    cpu_start: float = field(default_factory=time.process_time)
    bytes_sent: int = 0
    converged: int = 0               # reported applied
    failed: int = 0
    times: list[float] = field(default_factory=list)           # per converged device: seconds
    points: list[tuple[float, float]] = field(default_factory=list)
    cpu_seconds: float | None = None                            # set when the push is done
    done: float | None = None
    #: how many converged devices each entry of ``times`` stands for (above 1 once compacted)
    time_weight: float = 1.0
    #: λ fitted on the whole curve when the push settled (the curve kept is downsampled)
    fitted_lambda: float | None = None

    def __post_init__(self) -> None:
        if not self.points and self.targets:
            self.points.append((0.0, 1.0))

    @property
    def error(self) -> float:
        """e: the part of the targets not converged (1 with no targets reported yet)."""
        return 1.0 if not self.targets else (self.targets - self.converged) / self.targets

    def settled(self) -> bool:
        """Every target reported (applied or failed)."""
        return self.converged + self.failed >= self.targets

    def observe(self, status: str, *, at: float | None = None) -> None:
        """Count one target's report (``applied`` converges it; anything else is a failure)."""
        at = time.time() if at is None else at
        if status == "applied":
            self.converged += 1
            self.times.append(max(0.0, at - self.started))
        else:
            self.failed += 1
        self.points.append((max(0.0, at - self.started), self.error))
        if self.settled() and self.done is None:
            self.done = at
            self.cpu_seconds = time.process_time() - self.cpu_start
            self.compact()

    def compact(self, limit: int = SETTLED_SAMPLES) -> None:
        """Keep at most ``limit`` convergence times (a quantile sample, each standing for
        ``time_weight`` devices) and curve points, after fitting λ on all of them: a settled push
        of N devices holds O(limit), not O(N) (the coordinator keeps the last 100)."""
        if self.fitted_lambda is None:
            self.fitted_lambda = fit_lambda(self.points)
        if len(self.times) > limit:
            count = len(self.times) * self.time_weight
            self.times = quantile_sample(self.times, limit)
            self.time_weight = count / len(self.times)
        if len(self.points) > limit:
            self.points = [(t, e) for t, e in downsample(self.points, limit)]

    @property
    def decay(self) -> float | None:
        """λ of this push (fitted when it settled, else on the curve so far)."""
        return self.fitted_lambda if self.fitted_lambda is not None else fit_lambda(self.points)

    def cpu(self) -> float:
        """CPU seconds over the window (so far, while not done)."""
        return self.cpu_seconds if self.cpu_seconds is not None else time.process_time() - self.cpu_start

    def to_doc(self) -> dict[str, Any]:
        """A JSON document that :meth:`from_doc` reads back (curve downsampled)."""
        return {"targets": self.targets, "started": self.started, "bytes_sent": self.bytes_sent,
                "converged": self.converged, "failed": self.failed, "times": self.times[-10_000:],
                "time_weight": self.time_weight, "lambda": self.fitted_lambda,
                "points": downsample(self.points, 1000), "cpu_seconds": self.cpu(), "done": self.done}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Convergence:
        c = cls(int(doc.get("targets", 0)), started=float(doc.get("started", time.time())),
                bytes_sent=int(doc.get("bytes_sent", 0)), converged=int(doc.get("converged", 0)),
                failed=int(doc.get("failed", 0)), times=[float(t) for t in doc.get("times", [])],
                points=[(float(t), float(e)) for t, e in doc.get("points", [])])
        cpu = float(doc.get("cpu_seconds") or 0.0)
        c.cpu_start = time.process_time() - cpu       # CPU after a restart adds to what was spent
        c.done = doc.get("done")
        if c.done is not None:
            c.cpu_seconds = cpu
        weight, lam = doc.get("time_weight"), doc.get("lambda")
        if isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight >= 1:
            c.time_weight = float(weight)
        if isinstance(lam, (int, float)) and not isinstance(lam, bool) and math.isfinite(lam):
            c.fitted_lambda = float(lam)
        return c


def summarize(pushes: Sequence[Convergence]) -> dict[str, Any]:
    """Metrics over several pushes (the stages of a roll-out): convergence p50/p95 across targets,
    λ (the mean of each push's fit), CPU seconds, bytes sent and the cost ratio."""
    times = [(t, p.time_weight) for p in pushes for t in p.times]
    lambdas = [lam for p in pushes if (lam := p.decay) is not None]
    converged = sum(p.converged for p in pushes)
    cpu = sum(p.cpu() for p in pushes)
    sent = sum(p.bytes_sent for p in pushes)
    weight = sum(w for _, w in times)
    mean_time = sum(t * w for t, w in times) / weight if times else None
    cost_ratio = None
    if converged and mean_time:
        cost_ratio = (cpu / converged) / mean_time
    return {
        "convergence_p50": weighted_percentile(times, 0.5),
        "convergence_p95": weighted_percentile(times, 0.95),
        "lambda": sum(lambdas) / len(lambdas) if lambdas else None,
        "cpu_seconds": round(cpu, 6),
        "bytes_sent": sent,
        "cpu_per_device": cpu / converged if converged else None,
        "bytes_per_device": sent / converged if converged else None,
        "cost_ratio": cost_ratio,
    }


class PushMetrics:
    """e(t), convergence, λ and CPU of every push (rule-made, operator or roll-out stage), fed by
    the coordinator's ``committed`` and ``report`` events; the newest ``keep`` settled pushes are
    kept, at most ``max_open`` unsettled ones (the oldest is dropped beyond it)."""

    def __init__(self, *, keep: int = 100, max_open: int = 1000) -> None:
        self.keep = keep
        self.max_open = max_open
        self.open: dict[str, Convergence] = {}
        self.settled: list[tuple[str, Convergence]] = []
        self._targets: dict[tuple[str, int], str] = {}
        self._members: dict[str, list[tuple[str, int]]] = {}

    def on_event(self, what: str, info: dict[str, Any]) -> None:
        """A coordinator listener: ``committed`` opens a push, ``report`` counts a target."""
        if what == "committed":
            event_id, versions = str(info.get("event_id")), dict(info.get("versions") or {})
            if not versions or event_id in self.open:
                return
            if len(self.open) >= self.max_open:
                self._drop(next(iter(self.open)))
            self.open[event_id] = Convergence(len(versions))
            keys = [(did, int(v)) for did, v in versions.items()]
            self._members[event_id] = keys
            for key in keys:
                self._targets[key] = event_id
        elif what == "report":
            found = self._targets.pop((str(info.get("did")), int(info.get("version", 0))), None)
            conv = self.open.get(found) if found is not None else None
            if found is None or conv is None:
                return
            conv.observe(str(info.get("status")))
            if conv.settled():
                self._drop(found)
                self.settled.append((found, conv))
                del self.settled[:-self.keep]

    def _drop(self, event_id: str) -> None:
        self.open.pop(event_id, None)
        for key in self._members.pop(event_id, []):
            if self._targets.get(key) == event_id:
                del self._targets[key]

    def last(self) -> tuple[str, Convergence] | None:
        """The newest settled push."""
        return self.settled[-1] if self.settled else None

    def summary(self) -> dict[str, Any]:
        """Pushes open and settled; the newest settled one's metrics; λ p50 over the settled ones."""
        lambdas = [lam for _, c in self.settled if (lam := c.decay) is not None]
        out: dict[str, Any] = {"open": len(self.open), "settled": len(self.settled),
                               "lambda_p50": percentile(lambdas, 0.5), "last": None}
        last = self.last()
        if last is not None:
            event_id, conv = last
            out["last"] = {"event_id": event_id, "targets": conv.targets, "failed": conv.failed,
                           **summarize([conv])}
        return out


__all__ = ["Convergence", "MAX_CURVE_POINTS", "PushMetrics", "SETTLED_SAMPLES", "downsample", "fit_lambda",
           "percentile", "quantile_sample", "summarize", "weighted_percentile"]
