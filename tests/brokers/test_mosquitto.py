"""The Mosquitto config generator and runner (real mosquitto processes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from brokers.mosquitto import MosquittoBroker, MosquittoConfig, find_mosquitto, render_config, wait_for_port
from sdk.messaging.errors import ConnectFailed, PublishFailed
from sdk.messaging.transport import Message, MqttTransport, TLSConfig

pytestmark = [
    pytest.mark.broker,
    pytest.mark.mosquitto,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not installed"),
]


def test_render_config_has_the_settings_the_sdk_relies_on(tmp_path: Path) -> None:
    text = render_config(
        MosquittoConfig(persistence=True, max_queued_messages=5000, acl="topic read x"),
        port=1234, tls_port=None, workdir=tmp_path, pki=None, acl_file=tmp_path / "acl", password_file=None,
    )
    lines = set(text.splitlines())
    assert {"set_tcp_nodelay true", "max_queued_messages 5000", "persistence true",
            "listener 1234 127.0.0.1", f"acl_file {tmp_path / 'acl'}"} <= lines
    assert not any(line.startswith("cafile") for line in lines)


def test_restart_keeps_the_port() -> None:
    with MosquittoBroker() as m:
        port = m.port
        m.restart()
        assert m.port == port and m.running and wait_for_port("127.0.0.1", port, 2)
    assert not m.running and not m.workdir.exists()


async def test_acl_and_password_file() -> None:
    config = MosquittoConfig(
        allow_anonymous=False,
        passwords=(("alice", "pw-a"), ("bob", "pw-b")),
        acl="user alice\ntopic readwrite alice/#\n\nuser bob\ntopic read alice/#\n",
    )
    got: asyncio.Queue[Message] = asyncio.Queue()
    m = MosquittoBroker(config)
    await asyncio.to_thread(m.start)
    try:
        with pytest.raises(ConnectFailed) as info:
            await MqttTransport(m.url, username="alice", password="wrong").connect()
        assert info.value.reason in ("bad_credentials", "not_authorized")
        async with MqttTransport(m.url, username="alice", password="pw-a") as alice, \
                MqttTransport(m.url, username="bob", password="pw-b") as bob:
            await bob.subscribe("alice/#", qos=1,
                                handler=lambda t, p, *, retain, qos: got.put_nowait(Message(t, p, qos, retain)))
            # bob may only read: Mosquitto refuses his PUBLISH (MQTT 5 PUBACK reason 0x87)
            with pytest.raises(PublishFailed) as refused:
                await bob.publish("alice/x", b"from bob", qos=1)
            assert refused.value.reason == "not_authorized"
            await alice.publish("alice/x", b"hello", qos=1)
            assert (await asyncio.wait_for(got.get(), 5)).payload == b"hello"
            assert got.empty()
    finally:
        await asyncio.to_thread(m.cleanup)


async def test_tls_listener_can_require_client_certificates() -> None:
    m = MosquittoBroker(MosquittoConfig(tls=True, require_certificate=True))
    await asyncio.to_thread(m.start)
    try:
        pki = m.pki
        assert pki is not None
        with pytest.raises(ConnectFailed):
            await MqttTransport(m.tls_url, tls=TLSConfig(ca_file=str(pki.ca)), connect_timeout=3).connect()
        tls = TLSConfig(ca_file=str(pki.ca), cert_file=str(pki.client.cert), key_file=str(pki.client.key))
        async with MqttTransport(m.tls_url, tls=tls) as t:
            assert t.connected and t.protocol == "5"
    finally:
        await asyncio.to_thread(m.cleanup)
