"""The zero-set-up default broker: amqtt in-process, loopback only, admitting only DID holders.

    async with EmbeddedBroker() as broker:          # 127.0.0.1, a free port
        async with MqttTransport(broker.url, **did_credentials(key)) as t: ...

amqtt speaks MQTT 3.1.1 only (the transport falls back automatically), drops denied publishes
silently, and queues offline QoS 1/2 messages only for non-anonymous persistent sessions
(DID-authenticated sessions qualify). Sessions live in memory: a restart forgets them.

The default own-topics ACL lets only ``admins`` publish device configs: pass the coordinator's
DID (``EmbeddedBroker(coordinator=key.did)`` or ``add_admin``). Retained messages are delivered
only where the ACL lets the subscriber ``receive`` them (amqtt itself skips that check).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.session import Session

from brokers.mosquitto import free_port

log = logging.getLogger(__name__)

OWN_TOPICS_ACL = "brokers.did_auth.own_topics_acl"
OPEN_ACL = "brokers.did_auth.open_acl"


class _Broker(Broker):
    """amqtt's broker with retained delivery filtered through the topic ACL, and without the
    traceback it logs when a client hangs up mid-CONNECT.

    amqtt 0.12 sends retained messages from ``_publish_retained_messages_for_subscription``
    without asking the topic plugins whether the subscriber may ``receive`` them, and calls it at
    every CONNECT for every filter any client has subscribed to, so a new client gets other
    clients' retained messages. This override delivers a retained message only for a filter the
    session itself holds, and only if the ``receive`` check allows it.
    """

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        try:
            await super().stream_connected(reader, writer, listener_name)
        except (OSError, asyncio.IncompleteReadError) as exc:
            # e.g. an MQTT 5 probe that amqtt misparsed, abandoned by the client
            log.debug("connection dropped during CONNECT: %r", exc)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if all(s.client_id != session.client_id for s, _ in holders):
            return  # another client's filter (amqtt replays every filter at CONNECT)
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                log.info("withheld retained %r from %s (ACL)", topic, session.username)
                continue
            out_qos = min(qos, retained.qos or qos)
            tasks.append(asyncio.ensure_future(
                handler.mqtt_publish(retained.topic, retained.data, out_qos, retain=True)))
        if tasks:
            await asyncio.wait(tasks)


if not hasattr(Broker, "_publish_retained_messages_for_subscription"):  # pragma: no cover
    raise ImportError("this amqtt has no Broker._publish_retained_messages_for_subscription: "
                      "brokers.embedded must be checked against it (retained ACL filtering)")


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` (port 0 = a free port, kept across restarts)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        did_auth: bool = True,
        acl: str | None = OWN_TOPICS_ACL,
        coordinator: str | None = None,
        admins: Sequence[str] = (),
        proof_window: float = 60.0,
        max_recent_proofs: int = 100_000,
        max_proofs_per_identity: int = 1_000,
        session_expiry: int = 3600,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.did_auth = did_auth
        self.acl = acl
        #: DIDs the ACL lets do anything: the coordinator first, then ``admins``.
        first = [coordinator] if coordinator else []
        self.admins: tuple[str, ...] = tuple(dict.fromkeys([*first, *admins]))
        self.proof_window = proof_window
        self.max_recent_proofs = max_recent_proofs
        self.max_proofs_per_identity = max_proofs_per_identity
        self.session_expiry = session_expiry
        self._broker: Broker | None = None

    def add_admin(self, did: str) -> None:
        """Let ``did`` (e.g. a coordinator started after the broker) publish configs; takes effect at once."""
        if did in self.admins:
            return
        self.admins = (*self.admins, did)
        broker = self._broker
        plugin = broker.plugins_manager.get_plugin("DIDTopicPlugin") if broker is not None else None
        if plugin is not None:
            plugin.admins = self.admins

    def _config(self) -> dict[str, Any]:
        plugins: dict[str, Any] = {}
        if self.did_auth:
            plugins["brokers.did_auth.DIDAuthPlugin"] = {
                "window": self.proof_window,
                "max_recent_proofs": self.max_recent_proofs,
                "max_proofs_per_identity": self.max_proofs_per_identity,
            }
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
        if self.acl == OWN_TOPICS_ACL and not self.admins:
            log.warning("embedded broker on %s has no coordinator/admins: nobody may publish device configs "
                        "(EmbeddedBroker(coordinator=did) or add_admin(did))", self.url)
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
