"""What crossed the broker: a raw subscriber to ``#`` recording every message as the broker saw it.

    sniffer = Sniffer(broker.url, **broker.credentials(Key.generate()))
    await sniffer.start()
    ...
    assert not sniffer.contains(b"my secret prompt")      # raw bytes and decoded base64url segments
    await sniffer.wait_for(lambda m: m.topic.startswith("autoglm/v1/inf/ad/"))

It connects with the plain transport (no signatures checked, nothing decrypted): exactly what
an honest-but-curious broker, or anyone subscribed to ``#``, can read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sdk.identity.hazmat.b64 import b64url_decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SniffedMessage:
    """One message the broker relayed."""

    topic: str
    payload: bytes
    retained: bool
    qos: int = 0

    def readable(self) -> bytes:
        """The payload plus each of its ``.``-separated base64url segments decoded (JWS/JWE parts)."""
        parts = [self.payload]
        for segment in self.payload.split(b"."):
            if len(segment) < 4:
                continue
            try:
                parts.append(b64url_decode(segment))
            except ValueError:
                continue
        return b"\n".join(parts)


class Sniffer:
    """Records ``(topic, payload, retained)`` of everything on ``topic_filter`` (default ``#``)."""

    def __init__(self, url: str, *, topic_filter: str = "#", **transport_options: Any) -> None:
        from sdk.messaging.transport import MqttTransport

        self.topic_filter = topic_filter
        self.messages: list[SniffedMessage] = []
        self._changed: asyncio.Event | None = None
        self.transport = MqttTransport(url, **transport_options)

    async def start(self) -> Sniffer:
        """Connect and subscribe (returns once the broker granted ``#``)."""
        self._changed = asyncio.Event()
        await self.transport.connect()
        await self.transport.subscribe(self.topic_filter, qos=1, handler=self._record)
        return self

    async def aclose(self) -> None:
        """Disconnect (the recorded messages stay)."""
        await self.transport.aclose()

    async def __aenter__(self) -> Sniffer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _record(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 0) -> None:
        self.messages.append(SniffedMessage(topic, bytes(payload), bool(retain), qos))
        if self._changed is not None:
            self._changed.set()

    # ------------------------------------------------------------------ assertions
    def topics(self) -> list[str]:
        """Distinct topics seen, in the order first seen."""
        return list(dict.fromkeys(m.topic for m in self.messages))

    def on(self, topic_prefix: str) -> list[SniffedMessage]:
        """Messages whose topic starts with ``topic_prefix``."""
        return [m for m in self.messages if m.topic.startswith(topic_prefix)]

    def contains(self, needle: bytes | str, *, decoded: bool = True) -> bool:
        """True if ``needle`` appears in any payload (``decoded``: also inside base64url segments)."""
        data = needle.encode("utf-8") if isinstance(needle, str) else needle
        return any(data in (m.readable() if decoded else m.payload) for m in self.messages)

    def containing(self, needle: bytes | str, *, decoded: bool = True) -> list[SniffedMessage]:
        """The messages :meth:`contains` would find ``needle`` in."""
        data = needle.encode("utf-8") if isinstance(needle, str) else needle
        return [m for m in self.messages if data in (m.readable() if decoded else m.payload)]

    def retained(self) -> list[SniffedMessage]:
        """Messages delivered as retained copies."""
        return [m for m in self.messages if m.retained]

    async def wait_for(self, predicate: Callable[[SniffedMessage], bool], timeout: float = 10.0
                       ) -> SniffedMessage:
        """The first recorded message matching ``predicate``, waiting up to ``timeout`` seconds for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while True:
            for msg in self.messages[seen:]:
                if predicate(msg):
                    return msg
            seen = len(self.messages)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no matching message within {timeout}s; topics seen: {self.topics()[:20]}")
            assert self._changed is not None, "start() the sniffer first"
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.25))
            except TimeoutError:
                pass

    async def wait_for_topic(self, topic_prefix: str, timeout: float = 10.0) -> SniffedMessage:
        """The first message on a topic starting with ``topic_prefix``."""
        return await self.wait_for(lambda m: m.topic.startswith(topic_prefix), timeout)

    def clear(self, topics: Iterable[str] | None = None) -> None:
        """Forget what was recorded (only on ``topics`` when given)."""
        if topics is None:
            self.messages.clear()
        else:
            drop = set(topics)
            self.messages[:] = [m for m in self.messages if m.topic not in drop]


__all__ = ["Sniffer", "SniffedMessage"]
