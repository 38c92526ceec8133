"""The zero-set-up default broker: amqtt in-process, loopback only, admitting only DID holders.

    async with EmbeddedBroker() as broker:          # 127.0.0.1, a free port
        async with MqttTransport(broker.url, **did_credentials(key)) as t: ...

amqtt speaks MQTT 3.1.1 only (the transport falls back automatically), drops denied publishes
silently, and queues offline QoS 1/2 messages only for non-anonymous persistent sessions
(DID-authenticated sessions qualify). Sessions live in memory: a restart forgets them.

The default own-topics ACL lets only ``admins`` publish device configs: pass the coordinator's
DID (``EmbeddedBroker(coordinator=key.did)`` or ``add_admin``). Retained messages are delivered
only where the ACL lets the subscriber ``receive`` them (amqtt itself skips that check), and a
client id stays with the DID whose session holds it (amqtt touches sessions before it checks
credentials). See docs/BROKERS.md for the amqtt behaviour worked around here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from brokers.mosquitto import free_port

log = logging.getLogger(__name__)

OWN_TOPICS_ACL = "brokers.did_auth.own_topics_acl"
OPEN_ACL = "brokers.did_auth.open_acl"


class _Broker(Broker):
    """amqtt's broker with retained delivery filtered through the topic ACL, CONNECTs
    authenticated before any session is touched, and without the traceback it logs when a
    client hangs up mid-CONNECT.

    amqtt 0.12 sends retained messages from ``_publish_retained_messages_for_subscription``
    without asking the topic plugins whether the subscriber may ``receive`` them, and calls it at
    every CONNECT for every filter any client has subscribed to, so a new client gets other
    clients' retained messages. This override delivers a retained message only for a filter the
    session itself holds, and only if the ``receive`` check allows it.

    amqtt also deletes (clean session) or resumes (persistent session) the session of a CONNECT's
    client id, and takes over a connected one, before it checks the CONNECT's credentials. Here
    the CONNECT is authenticated first, and a client id held by another DID's connected or
    persistent session is refused (reason ``client_id_taken``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._preauth: dict[int, bool] = {}  # id(session) -> verdict, consumed by _authenticate

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        # amqtt 0.12.1's method, with authentication (and the client id check) before the
        # existing session of that client id is deleted or resumed
        try:
            handler, client_session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager)
        except AMQTTError as exc:
            log.debug("[MQTT-3.1.0-1] %s:%s: cannot read first packet as CONNECT: %s",
                      remote_address, remote_port, exc)
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            log.debug("invalid connection from %s:%s", remote_address, remote_port)
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            log.debug("no data from %s:%s: %s", remote_address, remote_port, exc)
            raise AMQTTError(exc) from exc

        ok = await super()._authenticate(client_session, None)
        existing = self._sessions.get(client_session.client_id) if client_session.client_id else None
        if ok and existing is not None and existing[0].username != client_session.username \
                and (existing[0].transitions.is_connected() or not existing[0].clean_session):
            log.warning("refused CONNECT of %s as client %r: that client id belongs to another DID's session",
                        client_session.username, client_session.client_id)
            plugin = self.plugins_manager.get_plugin("DIDAuthPlugin")
            if plugin is not None:
                plugin.rejections.append((client_session.client_id, "client_id_taken"))
            ok = False
        if len(self._preauth) > 10_000:
            self._preauth.clear()
        self._preauth[id(client_session)] = ok
        if not ok:
            if not client_session.client_id:
                client_session.client_id = gen_client_id()
            client_session.parent = 0
            return handler, client_session

        if client_session.clean_session:
            if client_session.client_id:
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()
            client_session.parent = 0
        elif existing is not None:
            old = existing[0]
            old.will_flag = client_session.will_flag
            old.will_message = client_session.will_message
            old.will_topic = client_session.will_topic
            old.will_qos = client_session.will_qos
            old.keep_alive = client_session.keep_alive
            old.username = client_session.username
            old.password = client_session.password
            self._preauth[id(old)] = self._preauth.pop(id(client_session))
            client_session = old
            client_session.parent = 1
        else:
            client_session.parent = 0

        timeout_disconnect_delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(timeout_disconnect_delay, int):
            client_session.keep_alive += timeout_disconnect_delay
        return handler, client_session

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        verdict = self._preauth.pop(id(session), None)
        if verdict is not None:
            return verdict
        return await super()._authenticate(session, listener)

    async def _handle_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, client_session: Session,
        handler: BrokerProtocolHandler, server: Any, listener_name: str,
    ) -> None:
        if self._preauth.get(id(client_session)) is False:
            # refused: answer without touching any session (amqtt would register this one under
            # the client id, or take over the connected one, before looking at the verdict)
            del self._preauth[id(client_session)]
            handler.attach(client_session, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            return
        await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)

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


for _name in ("_publish_retained_messages_for_subscription", "_initialize_client_session",
              "_handle_client_session", "_authenticate"):
    if not hasattr(Broker, _name):  # pragma: no cover
        raise ImportError(f"this amqtt has no Broker.{_name}: brokers.embedded must be checked against it")


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
