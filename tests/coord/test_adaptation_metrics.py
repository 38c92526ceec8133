"""Push metrics stay bounded per push: a settled push keeps a quantile sample and a downsampled
curve (λ fitted on everything first), and roll-up metrics weigh each sample by what it stands for."""

from __future__ import annotations

import math
import random

from sdk.coord.coordinator.adaptation import (
    SETTLED_SAMPLES,
    Convergence,
    PushMetrics,
    fit_lambda,
    percentile,
    summarize,
    weighted_percentile,
)


def test_weighted_percentile_with_unit_weights_is_the_nearest_rank_percentile() -> None:
    rng = random.Random(7)
    for n in (1, 2, 3, 10, 101, 1000):
        values = [rng.random() * 10 for _ in range(n)]
        for q in (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0):
            assert weighted_percentile([(v, 1.0) for v in values], q) == percentile(values, q)
    assert weighted_percentile([], 0.5) is None
    # weights count: one value standing for 99 devices outweighs two single ones
    assert weighted_percentile([(1.0, 1.0), (5.0, 99.0), (9.0, 1.0)], 0.5) == 5.0


def test_a_settled_push_keeps_a_bounded_sample_and_its_full_fit() -> None:
    n = 20_000
    rng = random.Random(3)
    conv = Convergence(n, started=0.0)
    full: list[tuple[float, float]] = [(0.0, 1.0)]
    times: list[float] = []
    for i, at in enumerate(sorted(rng.expovariate(2.0) for _ in range(n))):
        status = "failed" if i % 500 == 0 else "applied"
        if status == "applied":
            times.append(at)
        conv.observe(status, at=at)
        full.append((at, conv.error))
    assert conv.done is not None
    assert len(conv.times) <= SETTLED_SAMPLES and len(conv.points) <= SETTLED_SAMPLES
    assert math.isclose(conv.time_weight * len(conv.times), len(times))
    assert conv.decay == fit_lambda(full)                       # fitted on every point first
    got = summarize([conv])
    for q, key in ((0.5, "convergence_p50"), (0.95, "convergence_p95")):
        exact = percentile(times, q)
        assert exact is not None and abs(got[key] - exact) <= 0.01 * exact
    again = Convergence.from_doc(conv.to_doc())                  # persisted with roll-outs
    assert again.time_weight == conv.time_weight and again.decay == conv.decay
    assert summarize([again])["convergence_p50"] == got["convergence_p50"]


def test_roll_up_weighs_a_compacted_push_by_the_devices_it_stands_for() -> None:
    small = Convergence(10, started=0.0)
    for _ in range(10):
        small.observe("applied", at=1.0)
    big = Convergence(5000, started=0.0)
    for _ in range(5000):
        big.observe("applied", at=2.0)
    assert len(big.times) <= SETTLED_SAMPLES and len(small.times) == 10
    both = summarize([small, big])
    assert both["convergence_p50"] == 2.0 and both["convergence_p95"] == 2.0
    mean = (10 * 1.0 + 5000 * 2.0) / 5010
    cpu_per_device = both["cpu_per_device"]
    assert math.isclose(both["cost_ratio"], cpu_per_device / mean, rel_tol=1e-9)


def test_push_metrics_hold_settled_pushes_compacted() -> None:
    metrics = PushMetrics(keep=3)
    for k in range(5):
        versions = {f"did:key:z{k}-{i}": 1 for i in range(3000)}
        metrics.on_event("committed", {"event_id": f"ev{k}", "versions": versions})
        for did in versions:
            metrics.on_event("report", {"did": did, "version": 1, "status": "applied"})
    assert len(metrics.settled) == 3 and not metrics.open
    assert all(len(c.times) <= SETTLED_SAMPLES and len(c.points) <= SETTLED_SAMPLES for _, c in metrics.settled)
    assert metrics.summary()["settled"] == 3


def test_convergence_tracking_keeps_a_bounded_number_of_unconverged_events() -> None:
    from sdk.coord.coordinator.metrics import CoordinatorMetrics

    m = CoordinatorMetrics(max_pending=3)
    for k in range(5):                       # "did:key:zoff" never reports
        m.start(f"ev{k}", {"did:key:zon": k + 1, "did:key:zoff": k + 1})
        assert m.report("did:key:zon", k + 1, "applied") is None
    assert list(m.pending) == ["ev2", "ev3", "ev4"] and m.pending_dropped == 2
    assert ("did:key:zoff", 1) not in m._by_target and ("did:key:zoff", 5) in m._by_target
    assert m.report("did:key:zoff", 1, "applied") is None            # dropped: not counted
    done = m.report("did:key:zoff", 5, "applied")
    assert done is not None and done[0] == "ev4" and done[2] == 2
    assert m.summary()["pending_dropped"] == 2
