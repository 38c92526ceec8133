"""How a device connects: its SUBSCRIBEs (reply topic included) and its "online" presence go out
before the first acknowledgement comes back (one round trip), then the handshake admits it."""

from __future__ import annotations

from typing import Any

import pytest

from sdk.coord import protocol
from sdk.coord.device import Device
from sdk.identity import Key
from sdk.messaging import topics
from sdk.messaging.transport import MqttTransport
from tests.coord.test_coordinator import Mesh, mesh  # noqa: F401 - the fixture

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


async def test_subscribes_and_presence_leave_before_the_first_ack(mesh: Mesh, monkeypatch: Any) -> None:  # noqa: F811
    await mesh.start_coordinator()
    key = Key.generate()
    cred = mesh.coordinator.issue_device_credential(key.did, kind="phone")  # type: ignore[union-attr]
    dev = Device(key, cred, broker=mesh.url, coordinator=mesh.coord_key.did)
    mine = dev.client.transport
    log: list[tuple[str, str]] = []
    send_batch = MqttTransport._send_subscribe_batch
    on_subscribe = MqttTransport._on_subscribe
    publish = MqttTransport.publish

    def recording_batch(self: MqttTransport, batch: Any) -> None:
        if self is mine and not batch.sent:
            log.append(("subscribe", ""))           # one SUBSCRIBE packet ...
            log.extend(("sub", f) for f in batch.filters)   # ... with these filters
        send_batch(self, batch)

    def recording_suback(self: MqttTransport, *args: Any) -> None:
        if self is mine:
            log.append(("suback", ""))
        on_subscribe(self, *args)

    async def recording_publish(self: MqttTransport, topic: str, payload: Any = b"", **kw: Any) -> None:
        if self is mine:
            log.append(("pub", topic))
        await publish(self, topic, payload, **kw)
        if self is mine:
            log.append(("puback", topic))

    monkeypatch.setattr(MqttTransport, "_send_subscribe_batch", recording_batch)
    monkeypatch.setattr(MqttTransport, "_on_subscribe", recording_suback)
    monkeypatch.setattr(MqttTransport, "publish", recording_publish)
    try:
        await dev.connect()
        assert dev.admitted
        token = protocol.token(key.did)
        first_ack = next(i for i, (what, _) in enumerate(log) if what in ("suback", "puback"))
        before = log[:first_ack]
        assert {f for what, f in before if what == "sub"} == {
            dev.client.reply_topic, topics.STATUS_TREE, protocol.device_config(token),
            protocol.device_commands(token)}
        assert ("pub", protocol.device_presence(token)) in before
        # the handshake (hello, then present) starts only once all of them are acknowledged
        coord_cmd = protocol.device_commands(protocol.token(mesh.coord_key.did))
        hello = log.index(("pub", coord_cmd))
        assert all(what in ("suback", "puback") for what, _ in log[first_ack:hello])
        # the four leave in one SUBSCRIBE, acknowledged by one SUBACK
        assert [e[0] for e in log[:hello]].count("subscribe") == 1
        assert [e[0] for e in log[:hello]].count("suback") == 1
    finally:
        await dev.aclose()
