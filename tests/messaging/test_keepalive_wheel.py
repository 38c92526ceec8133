"""The shared keepalive ticker: each connection is looked at when its keepalive may fall due,
not every interval, and a real idle connection still pings and stays up."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sdk.identity import Key
from sdk.messaging import paho_internals as _paho
from sdk.messaging import transport as tr
from sdk.messaging.transport import MqttTransport

KEY = Key.from_seed(bytes(range(32)))


class FakeConnection:
    """Stands in for a transport: counts ticks and says when it is next due."""

    def __init__(self, name: str, every: float, *, fail: bool = False) -> None:
        self.client_id = name
        self.every = every
        self.fail = fail
        self.ticks: list[float] = []

    def _tick(self) -> float:
        self.ticks.append(time.monotonic())
        if self.fail:
            raise RuntimeError("tick bug")
        return time.monotonic() + self.every


@pytest.fixture
async def fast_ticker(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(tr._Ticker, "INTERVAL", 0.02)  # noqa: SLF001
    return tr._Ticker(asyncio.get_running_loop())  # noqa: SLF001


async def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_a_connection_is_looked_at_when_due_not_every_interval(fast_ticker: Any) -> None:
    busy = FakeConnection("busy", every=0.0)      # due again at once: ticked every interval
    idle = FakeConnection("idle", every=0.5)      # due every 25 intervals
    fast_ticker.add(busy)
    fast_ticker.add(idle)
    await _until(lambda: len(idle.ticks) >= 2)
    gap = idle.ticks[1] - idle.ticks[0]
    assert gap >= 0.5 - 0.02 - 0.001                # not more than one interval before it was due
    # the busy one saw every interval meanwhile: the ticker ran ~25 times, the idle one twice
    assert len(busy.ticks) >= 15
    assert len(idle.ticks) <= 3
    fast_ticker.discard(busy)
    fast_ticker.discard(idle)


async def test_a_discarded_connection_is_not_ticked_and_a_failing_one_stops_nobody(fast_ticker: Any) -> None:
    gone = FakeConnection("gone", every=0.0)
    broken = FakeConnection("broken", every=0.0, fail=True)
    witness = FakeConnection("witness", every=0.0)
    for c in (gone, broken, witness):
        fast_ticker.add(c)
    await _until(lambda: len(gone.ticks) >= 1)
    fast_ticker.discard(gone)
    seen = len(gone.ticks)
    start = len(witness.ticks)
    await _until(lambda: len(witness.ticks) >= start + 10)   # ten more rounds went by
    assert len(gone.ticks) == seen
    assert len(broken.ticks) >= 10                 # raised each time, was looked at again
    fast_ticker.discard(broken)
    fast_ticker.discard(witness)


def test_keepalive_due_follows_the_last_traffic_and_an_outstanding_ping() -> None:
    class Paho:
        _keepalive = 30
        _last_msg_out = 0.0
        _last_bytes_received = 0.0
        _ping_t = 0.0

    now = time.monotonic()
    c = Paho()
    c._last_msg_out, c._last_bytes_received = now - 5, now - 10
    assert _paho.keepalive_due(c) == pytest.approx(now + 20, abs=0.5)   # the older of the two
    c._ping_t = now - 25                                                 # waiting for PINGRESP
    assert _paho.keepalive_due(c) == pytest.approx(now + 5, abs=0.5)
    c._keepalive = 0
    assert _paho.keepalive_due(c) > now + 30                             # no keepalive at all
    assert _paho.keepalive_due(object()) == pytest.approx(now + 1, abs=0.5)   # unknown paho


@pytest.mark.broker
async def test_an_idle_connection_pings_and_stays_up(broker: Any) -> None:
    async with MqttTransport(broker.url, **broker.credentials(KEY), keepalive=1) as t:
        client = t._client  # noqa: SLF001
        assert client is not None
        first = client._last_bytes_received  # noqa: SLF001
        # nothing is sent or received by the app: only the keepalive's PINGREQ/PINGRESP move it
        await _until(lambda: client._last_bytes_received >= first + 2)  # noqa: SLF001
        assert t.connected and t.reconnects == 0
