"""The zero-set-up default broker: amqtt in-process, loopback only, admitting only DID holders.

    async with EmbeddedBroker() as broker:          # 127.0.0.1, a free port
        async with MqttTransport(broker.url, **did_credentials(key)) as t: ...

amqtt speaks MQTT 3.1.1 only (the transport falls back automatically), drops denied publishes
silently, and queues offline QoS 1/2 messages only for non-anonymous persistent sessions
(DID-authenticated sessions qualify). Sessions live in memory: a restart forgets them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from amqtt.broker import Broker

from brokers.mosquitto import free_port

log = logging.getLogger(__name__)

OWN_TOPICS_ACL = "brokers.did_auth.own_topics_acl"
OPEN_ACL = "brokers.did_auth.open_acl"


class _Broker(Broker):
    """amqtt's broker, minus the traceback it logs when a client hangs up mid-CONNECT."""

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        try:
            await super().stream_connected(reader, writer, listener_name)
        except (OSError, asyncio.IncompleteReadError) as exc:
            # e.g. an MQTT 5 probe that amqtt misparsed, abandoned by the client
            log.debug("connection dropped during CONNECT: %r", exc)


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` (port 0 = a free port, kept across restarts)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        did_auth: bool = True,
        acl: str | None = OWN_TOPICS_ACL,
        admins: Sequence[str] = (),
        proof_window: float = 60.0,
        session_expiry: int = 3600,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.did_auth = did_auth
        self.acl = acl
        self.admins = tuple(admins)
        self.proof_window = proof_window
        self.session_expiry = session_expiry
        self._broker: Broker | None = None

    def _config(self) -> dict[str, Any]:
        plugins: dict[str, Any] = {}
        if self.did_auth:
            plugins["brokers.did_auth.DIDAuthPlugin"] = {"window": self.proof_window}
        else:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        if self.acl is not None:
            plugins["brokers.did_auth.DIDTopicPlugin"] = {"acl": self.acl, "admins": list(self.admins)}
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "timeout_disconnect_delay": 0,
            "session_expiry_interval": self.session_expiry,  # forget offline persistent sessions
            "plugins": plugins,
        }

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}?protocol=3.1.1"

    @property
    def running(self) -> bool:
        return self._broker is not None

    @property
    def rejections(self) -> list[tuple[str, str]]:
        """``(client_id, reason)`` of CONNECTs the DID auth plugin refused (empty without it)."""
        if self._broker is None:
            return []
        plugin = self._broker.plugins_manager.get_plugin("DIDAuthPlugin")
        return list(getattr(plugin, "rejections", []))

    async def start(self) -> None:
        if self._broker is not None:
            return
        broker = _Broker(self._config())
        await broker.start()
        self._broker = broker
        log.debug("embedded broker on %s", self.url)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            # amqtt drops the sessions before it closes its listeners, so reconnecting clients
            # would land on the dying broker: stop accepting first.
            for server in getattr(broker, "_servers", {}).values():
                instance = getattr(server, "instance", None)
                if instance is not None:
                    instance.close()
            await broker.shutdown()
            await asyncio.sleep(0)

    async def restart(self) -> None:
        """Stop and start on the same port (amqtt keeps no sessions across this)."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


__all__ = ["EmbeddedBroker", "OWN_TOPICS_ACL", "OPEN_ACL"]
