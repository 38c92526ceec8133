"""Brokers for tests: an embedded amqtt broker or a Mosquitto process, on free loopback ports.

    async with running_broker("embedded") as broker:      # or "mosquitto"
        client = SecureClient(broker.url, key, **broker.credentials(key))

The embedded broker runs in the test's event loop with DID authentication on and an open topic
ACL; Mosquitto runs in open-for-tests mode (plain TCP, anonymous clients, persistence so QoS 1
sessions survive :meth:`TestBroker.restart`). Passing ``broker.credentials(key)`` works on both.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sdk.identity import Key

KINDS = ("embedded", "mosquitto")


class BrokerUnavailable(RuntimeError):
    """The broker kind asked for cannot run here (Mosquitto not installed, amqtt missing)."""


@dataclass
class TestBroker:
    """A running broker: ``url``, ``kind``, ``await restart()`` and ``credentials(key)``."""

    __test__ = False

    kind: str
    url: str
    server: Any = field(repr=False)  # brokers.embedded.EmbeddedBroker | brokers.mosquitto.MosquittoBroker
    #: ``async`` callables run (last first) before the broker stops: clients bound to it
    cleanups: list[Callable[[], Awaitable[Any]]] = field(default_factory=list, repr=False)

    @staticmethod
    def credentials(key: Key) -> dict[str, Any]:
        """``username``/``password`` keywords for ``MqttTransport``/``SecureClient`` (a DID proof per CONNECT)."""
        from sdk.messaging.broker_auth import did_credentials

        return did_credentials(key)

    async def restart(self) -> None:
        """Stop and start again on the same port (the embedded broker forgets sessions and retained messages)."""
        if self.kind == "embedded":
            await self.server.restart()
        else:
            await asyncio.to_thread(self.server.restart)


def mosquitto_installed() -> bool:
    """True when a mosquitto binary is on PATH (or at /usr/sbin/mosquitto)."""
    from brokers.mosquitto import find_mosquitto

    return find_mosquitto() is not None


@contextlib.asynccontextmanager
async def running_broker(kind: str = "embedded") -> AsyncIterator[TestBroker]:
    """Start a broker of ``kind`` for the block; stop it (and remove its files) after."""
    if kind == "embedded":
        try:
            from brokers.embedded import OPEN_ACL, EmbeddedBroker
        except ImportError as exc:
            raise BrokerUnavailable("the embedded broker needs amqtt: pip install 'open-autoglm-sdk[broker]'") \
                from exc
        server = EmbeddedBroker(acl=OPEN_ACL)
        await server.start()
        try:
            yield TestBroker("embedded", server.url, server)
        finally:
            await server.stop()
    elif kind == "mosquitto":
        from brokers.mosquitto import MosquittoBroker, MosquittoConfig

        if not mosquitto_installed():
            raise BrokerUnavailable("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
        # its own temporary directory: mosquitto may drop root privileges and cannot read a 0700 tmp_path
        m = MosquittoBroker(MosquittoConfig.open_for_tests(persistence=True))
        await asyncio.to_thread(m.start)
        try:
            yield TestBroker("mosquitto", m.url, m)
        finally:
            await asyncio.to_thread(m.cleanup)
    else:
        raise ValueError(f"broker kind must be one of {KINDS}, not {kind!r}")


__all__ = ["TestBroker", "BrokerUnavailable", "running_broker", "mosquitto_installed", "KINDS"]
