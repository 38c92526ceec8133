"""The send queue bound: ``max_pending`` refuses at once, or with ``queue_wait`` waits its turn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sdk.identity import Key
from sdk.messaging.errors import SendQueueFull
from sdk.messaging.transport import MqttTransport, TransportConfig
from tests.fixtures.brokers import BrokerHandle

pytestmark = pytest.mark.broker


def _client(h: BrokerHandle, **kw: Any) -> MqttTransport:
    options: dict[str, Any] = {**h.credentials(Key.generate()), **kw}
    return MqttTransport(h.url, **options)


async def test_queue_full_at_once_without_queue_wait(broker: BrokerHandle) -> None:
    async with _client(broker, max_pending=2) as t:
        topic = f"test/sendq/{Key.generate().did[-12:]}"
        results = await asyncio.gather(*(t.publish(topic, b"x", qos=1) for _ in range(6)),
                                       return_exceptions=True)
        refused = [r for r in results if isinstance(r, SendQueueFull)]
        assert refused and all(r.reason == "queue_full" for r in refused)
        assert sum(r is None for r in results) >= 2


async def test_queue_wait_lets_every_publish_through_in_turn(broker: BrokerHandle) -> None:
    async with _client(broker, max_pending=3, queue_wait=30) as t:
        topic = f"test/sendq/{Key.generate().did[-12:]}"
        peak = [0]

        async def one(i: int) -> None:
            await t.publish(topic, str(i).encode(), qos=1)
            peak[0] = max(peak[0], t.pending)

        await asyncio.gather(*(one(i) for i in range(200)))
        assert t.pending == 0 and peak[0] <= 3


def test_queue_wait_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        TransportConfig(queue_wait=-1)
