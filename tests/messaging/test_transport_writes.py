"""How the transport writes: packets queued in one loop turn leave together; a lone one at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sdk.identity import Key
from sdk.messaging.transport import MqttTransport
from tests.fixtures.waiting import until

pytestmark = pytest.mark.broker

KEY = Key.from_seed(bytes(range(32)))


def _client(h: Any, **kw: Any) -> MqttTransport:
    return MqttTransport(h.url, **h.credentials(KEY), **kw)


class WriteCounter:
    """Counts the real paho client's loop_write() calls (and still calls it)."""

    def __init__(self, t: MqttTransport) -> None:
        client = t._client
        assert client is not None
        self.calls = 0
        self._write = client.loop_write

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self._write(*args, **kwargs)

        client.loop_write = counting  # type: ignore[method-assign]


async def test_a_fan_out_from_many_tasks_leaves_in_few_writes(broker: Any) -> None:
    n = 400
    got: list[bytes] = []
    async with _client(broker) as sub, _client(broker) as pub:
        await sub.subscribe("fan/#", qos=1, handler=lambda topic, payload, **_: got.append(payload))
        writes = WriteCounter(pub)
        loop = asyncio.get_running_loop()
        removed: list[Any] = []
        remove_writer = loop.remove_writer

        def counting_remove_writer(fd: Any) -> bool:
            removed.append(fd)
            return remove_writer(fd)

        loop.remove_writer = counting_remove_writer  # type: ignore[method-assign]
        # one task per message, all started in the same loop turn (as a coordinator's fan-out is)
        await asyncio.wait_for(asyncio.gather(
            *(asyncio.create_task(pub.publish(f"fan/{i}", b"%d" % i, qos=1)) for i in range(n))), 30)
        assert writes.calls <= n // 20, writes.calls  # every PUBLISH acknowledged, few writes
        await until(lambda: len(got) == n, timeout=30)
        assert sorted(got) == sorted(b"%d" % i for i in range(n))
        assert pub.pending == 0
        del loop.remove_writer  # the loop's own method again
        assert removed == []  # paho reported "nothing to write" many times; no writer was ever added


async def test_a_lone_publish_is_written_in_the_turn_it_is_made(broker: Any) -> None:
    async with _client(broker) as pub:
        writes = WriteCounter(pub)
        for i in range(3):  # also after a previous one (the per-turn marker is reset)
            task = asyncio.create_task(pub.publish("lone/x", b"x", qos=1))
            before = writes.calls
            await asyncio.sleep(0)  # the task's first step runs, then this one resumes
            assert writes.calls == before + 1, i  # written inline, not in a later call_soon flush
            await asyncio.wait_for(task, 5)
            await asyncio.sleep(0)


async def test_a_second_publish_in_the_same_turn_waits_for_the_shared_flush(broker: Any) -> None:
    async with _client(broker) as pub:
        writes = WriteCounter(pub)
        tasks = [asyncio.create_task(pub.publish(f"two/{i}", b"x", qos=1)) for i in range(3)]
        await asyncio.sleep(0)  # all three ran their first step in one turn
        assert writes.calls == 1  # the first went out at once, the others wait for one flush
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert writes.calls == 2
