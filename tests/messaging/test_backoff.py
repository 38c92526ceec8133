"""Reconnect backoff: jitter bounds and growth (pure functions), and spread after a broker restart."""

from __future__ import annotations

import asyncio
import random
import statistics
from typing import Any

import pytest

from sdk.identity import Key
from sdk.messaging.transport import Backoff, MqttTransport, TransportConfig, backoff_delay
from tests.fixtures.brokers import BrokerHandle
from tests.fixtures.waiting import until


def test_no_jitter_doubles_up_to_the_cap() -> None:
    delays = [backoff_delay(n, base=0.1, cap=2.0, jitter="none") for n in range(8)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])
    assert backoff_delay(10_000, base=0.1, cap=2.0, jitter="none") == 2.0   # no overflow


@pytest.mark.parametrize("attempt", [0, 1, 3, 6, 20])
def test_full_jitter_stays_in_zero_to_ceiling(attempt: int) -> None:
    rng = random.Random(attempt).random
    ceiling = min(5.0, 0.05 * 2 ** attempt)
    values = [backoff_delay(attempt, base=0.05, cap=5.0, rng=rng) for _ in range(2000)]
    assert all(0 <= v <= ceiling for v in values)
    # spread over the whole window, not bunched: the mean is about half the ceiling
    assert statistics.fmean(values) == pytest.approx(ceiling / 2, rel=0.1)
    assert min(values) < ceiling * 0.05 and max(values) > ceiling * 0.95


def test_full_jitter_extremes_of_the_random_source() -> None:
    assert backoff_delay(3, base=0.1, cap=10, rng=lambda: 0.0) == 0.0
    assert backoff_delay(3, base=0.1, cap=10, rng=lambda: 0.999999) == pytest.approx(0.8, rel=1e-5)


def test_decorrelated_jitter_bounds_and_growth() -> None:
    b = Backoff(0.05, 3.0, "decorrelated", rng=random.Random(7).random)
    prev = 0.05
    values = []
    for _ in range(500):
        d = b.next()
        assert 0.05 <= d <= min(3.0, 3 * prev) + 1e-12
        prev = d
        values.append(d)
    assert max(values) > 2.0            # it grows to near the cap
    assert len(set(values)) == len(values)
    b.reset()
    assert b.attempt == 0 and b.next() <= 0.15 + 1e-12


def test_backoff_grows_on_average_and_resets() -> None:
    loops = [Backoff(0.05, 10.0, rng=random.Random(seed).random) for seed in range(300)]
    means = []
    for attempt in range(6):
        means.append(statistics.fmean(b.next() for b in loops))
        assert means[-1] <= 0.05 * 2 ** attempt
    assert means == sorted(means)
    loops[0].reset()
    assert loops[0].attempt == 0 and loops[0].previous is None


@pytest.mark.parametrize("kw", [dict(base=0, cap=1), dict(base=2, cap=1), dict(base=0.1, cap=1, jitter="sometimes")])
def test_bad_settings_raise_value_error(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, **kw)  # type: ignore[arg-type]


def test_config_validates_backoff() -> None:
    with pytest.raises(ValueError):
        TransportConfig(backoff_min=1.0, backoff_max=0.5)
    with pytest.raises(ValueError):
        TransportConfig(backoff_jitter="often")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TransportConfig(connect_timeout=0)


def _client(h: BrokerHandle, client_id: str) -> MqttTransport:
    options: dict[str, Any] = {**h.credentials(Key.generate()), "backoff_min": 0.2, "backoff_max": 1.0,
                               "client_id": client_id}
    return MqttTransport(h.url, **options)


async def test_reconnects_after_a_broker_restart_are_spread(restartable_broker: BrokerHandle) -> None:
    """Clients dropped at the same instant sleep different, bounded delays before reconnecting."""
    h = restartable_broker
    n = 16
    clients = [_client(h, f"backoff-{i}-{Key.generate().did[-8:]}") for i in range(n)]
    await asyncio.gather(*(c.connect() for c in clients))
    try:
        await h.restart()
        await until(lambda: all(c.reconnects >= 1 and c.connected for c in clients), timeout=30)
        slept = [sum(c.reconnect_delays) for c in clients]
        firsts = [c.reconnect_delays[0] for c in clients if c.reconnect_delays]
        assert firsts, "no client had to wait for the broker"
        assert all(0 <= d <= 1.0 for c in clients for d in c.reconnect_delays)
        assert len(set(firsts)) == len(firsts)                 # not in lock-step
        assert max(slept) - min(slept) > 0.05, slept
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
