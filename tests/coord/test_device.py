"""Device SDK on real brokers: admission failures, forged configs, revocation, iterator mode."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sdk.coord import protocol
from sdk.coord.coordinator.auth import device_credential
from sdk.coord.device import REVOKED, Device
from sdk.coord.errors import AdmissionError, NotAdmitted
from sdk.coord.events import InvalidEvent, battery, screen_available
from sdk.coord.handshake import present
from sdk.errors import MessagingError
from sdk.identity import Key, TrustPolicy
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.client import SecureClient
from sdk.messaging.transport import MqttTransport
from tests.coord.test_coordinator import Mesh, mesh, until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


async def test_untrusted_issuer_and_expired_credential_refused(mesh: Mesh) -> None:
    await mesh.start_coordinator()
    stranger_issuer = Key.generate()
    key = Key.generate()
    cred = device_credential(stranger_issuer, key.did, kind="phone", groups=["room:living"])
    dev = Device(key, cred, broker=mesh.url, coordinator=mesh.coord_key.did,
                 trust=TrustPolicy({mesh.issuer.did: {"CoordinatorCredential"}}))
    with pytest.raises(AdmissionError) as info:
        await dev.connect()
    assert info.value.reason == "untrusted_issuer"
    assert not dev.admitted
    await dev.aclose()

    key2 = Key.generate()
    old = device_credential(mesh.issuer, key2.did, kind="phone", valid_for=60,
                            valid_from=datetime.now(UTC) - timedelta(days=2))
    dev2 = Device(key2, old, broker=mesh.url, coordinator=mesh.coord_key.did)
    with pytest.raises(AdmissionError) as info:
        await dev2.connect()
    assert info.value.reason == "expired"
    await dev2.aclose()
    refused = [i["reason"] for w, i in mesh.events if w == "refused"]
    assert refused == ["untrusted_issuer", "expired"]


async def test_wrong_and_reused_challenge_refused(mesh: Mesh) -> None:
    await mesh.start_coordinator()
    key = Key.generate()
    cred = mesh.coordinator.issue_device_credential(key.did, kind="phone")  # type: ignore[union-attr]
    cmd = protocol.device_commands(protocol.token(mesh.coord_key.did))
    async with SecureClient(mesh.url, key, **did_credentials(key)) as client:
        hello = await client.request(cmd, {"nonce": "n" * 16}, type=protocol.HELLO, timeout=5)
        challenge = hello.body["challenge"]
        vp = present(cred, key, challenge="not-the-challenge", domain=mesh.coord_key.did)
        with pytest.raises(MessagingError) as info:
            await client.request(cmd, {"challenge": challenge, "vp": vp}, type=protocol.PRESENT, timeout=5)
        assert info.value.reason == "wrong_challenge"
        # the challenge was consumed by that attempt: a correct VP over it is refused too
        vp = present(cred, key, challenge=challenge, domain=mesh.coord_key.did)
        with pytest.raises(MessagingError) as info:
            await client.request(cmd, {"challenge": challenge, "vp": vp}, type=protocol.PRESENT, timeout=5)
        assert info.value.reason == "wrong_challenge"


async def test_device_refuses_untrusted_coordinator(mesh: Mesh) -> None:
    await mesh.start_coordinator()
    key = Key.generate()
    cred = mesh.coordinator.issue_device_credential(key.did, kind="phone")  # type: ignore[union-attr]
    dev = Device(key, cred, broker=mesh.url, coordinator=mesh.coord_key.did,
                 trust=TrustPolicy({Key.generate().did: {"CoordinatorCredential"}}))
    with pytest.raises(AdmissionError) as info:
        await dev.connect()
    assert info.value.reason == "untrusted_coordinator"
    await dev.aclose()


async def test_forged_and_tampered_configs_never_reach_the_app(mesh: Mesh) -> None:
    await mesh.start_coordinator()
    got: list[Any] = []
    phone = await mesh.device("phone", record=got)
    mallory = Key.generate()
    body = {"device": phone.did, "version": 7, "changes": {"ui.layout": "evil"}, "state": {"ui.layout": "evil"}}
    config_topic = protocol.device_config(phone._token)
    async with SecureClient(mesh.url, mallory, **did_credentials(mallory)) as client:
        await client.publish(config_topic, body, type=protocol.CONFIG, qos=1)
    await until(lambda: "wrong_sender" in phone.rejected_configs)

    # a real coordinator-signed envelope with its body altered fails the signature check
    from sdk.messaging.envelope import Signer, b64d, b64e

    _, wire = Signer(mesh.coord_key).seal(config_topic, {**body, "version": 1}, type=protocol.CONFIG)
    h, p, s = wire.split(b".")
    payload = b64d(p).replace(b'"evil"', b'"eviL"')
    forged = h + b"." + b64e(payload) + b"." + s
    async with MqttTransport(mesh.url, **did_credentials(mallory)) as raw:
        await raw.publish(config_topic, forged, qos=1)
        await raw.publish(config_topic, b"not an envelope", qos=1)
    await until(lambda: phone.client.stats.rejected["bad_signature"] >= 1
                and phone.client.stats.rejected["malformed"] >= 1)
    await asyncio.sleep(0.1)
    assert got == [] and phone.last_version == 0

    # the device keeps working: a genuine config still arrives
    display = await mesh.device("display")
    await display.publish_event(screen_available(800, 600))
    await phone.wait_version(1, 10)
    assert [c.version for c in got] == [1]


async def test_revoked_device_disconnected_and_refused(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator()
    tablet = await mesh.device("tablet")
    display = await mesh.device("display")
    assert tablet.admitted
    t0 = time.monotonic()
    await coord.revoke(tablet.did)
    await until(lambda: tablet.state == REVOKED, timeout=1.0)     # within a second, by contract
    assert time.monotonic() - t0 < 1.0
    assert coord.registry.get(tablet.did).state == "revoked"     # type: ignore[union-attr]
    # its next messages are rejected by the coordinator
    await tablet.client.publish(protocol.device_events(tablet._token), battery("low").to_body(),
                                type=protocol.EVENT, qos=1)
    await mesh.wait_for("rejected", lambda i: i["did"] == tablet.did and i["reason"] == "revoked")
    with pytest.raises(NotAdmitted):
        await tablet.publish_event(battery("low"))
    with pytest.raises(AdmissionError) as info:
        await tablet.authenticate()
    assert info.value.reason == "revoked"
    # others are unaffected
    assert display.admitted
    # a second coordinator-side verifier sees the revocation via the retained status list
    assert protocol.status_list_url(mesh.issuer.did) in coord.status_source


async def test_status_list_is_published_retained(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator()
    tablet = await mesh.device("tablet")
    await coord.revoke(tablet.did)
    from sdk.identity import StatusChecker
    from sdk.messaging.status import MqttStatusListSource

    source = MqttStatusListSource(TrustPolicy({mesh.issuer.did: {"DeviceCredential"}}))  # verified, ordered
    viewer = Key.generate()
    async with SecureClient(mesh.url, viewer, **did_credentials(viewer)) as client:
        await source.attach(client)
        url = protocol.status_list_url(mesh.issuer.did)
        await until(lambda: url in source)
    checker = StatusChecker(source)
    with pytest.raises(Exception) as info:
        checker.check(mesh.credentials[tablet.did]["credentialStatus"], issuer=mesh.issuer.did)
    assert getattr(info.value, "reason", "") == "revoked"


async def test_iterator_mode_and_failure_reports(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator()
    phone = await mesh.device("phone")                          # no on_config: async iterator
    display = await mesh.device("display")
    seen: list[int] = []

    async def consume() -> None:
        async for cfg in phone.configs():
            seen.append(cfg.version)
            if cfg.version == 1:
                await cfg.fail("layout not supported")
            else:
                await cfg.ack()
            if cfg.version == 2:
                return

    task = asyncio.ensure_future(consume())
    await display.publish_event(screen_available(800, 600))
    await display.publish_event(screen_available(640, 480))
    await asyncio.wait_for(task, 10)
    assert seen == [1, 2]
    await mesh.wait_for("report", lambda i: i["version"] == 2)
    summary = coord.metrics.summary()
    assert summary["reports"] == {"applied": 1, "failed": 1} and summary["error_rate"] == 0.5
    assert coord.store.reported(phone.did).version == 2          # type: ignore[union-attr]


def test_event_helpers_validate() -> None:
    assert screen_available(800, 600, density=2.5).fields == {"width": 800, "height": 600, "density": 2.5}
    with pytest.raises(InvalidEvent):
        screen_available(0, 600)
    with pytest.raises(InvalidEvent):
        battery("exploding")
    with pytest.raises(InvalidEvent):
        screen_available(True, 600)  # type: ignore[arg-type]


async def test_sync_facade(mesh: Mesh) -> None:
    from sdk.coord.device import SyncDevice

    await mesh.start_coordinator()
    display = await mesh.device("display")
    key = Key.generate()
    cred = mesh.coordinator.issue_device_credential(key.did, kind="phone", groups=["room:living"])  # type: ignore[union-attr]
    got: list[Any] = []

    def run() -> None:
        with SyncDevice(key, cred, broker=mesh.url, coordinator=mesh.coord_key.did, on_config=got.append) as dev:
            assert dev.device.admitted
            ready.set()
            dev.wait_version(1, timeout=10)

    import threading

    ready = threading.Event()
    thread = threading.Thread(target=run)
    thread.start()
    await asyncio.to_thread(ready.wait, 10)
    await display.publish_event(screen_available(800, 600))
    await asyncio.to_thread(thread.join, 15)
    assert [c.version for c in got] == [1]


async def test_external_issuer_revocation_over_mqtt(broker: Any, tmp_path: Any) -> None:
    """The issuer is not the coordinator: its status list update, relayed over MQTT, revokes."""
    from sdk.coord.coordinator import Coordinator
    from sdk.coord.coordinator.auth import coordinator_credential
    from sdk.identity import StatusList, create_status_list_credential, status_entry
    from sdk.messaging.status import publish_status_list

    issuer, ckey, dkey = Key.generate(), Key.generate(), Key.generate()
    url = protocol.status_list_url(issuer.did)
    bits = StatusList()
    coord = Coordinator(ckey, broker=broker.url, data_dir=tmp_path, trust=TrustPolicy({issuer.did: ["DeviceCredential"]}),
                        credential=coordinator_credential(issuer, ckey.did))
    await coord.start()
    revoked_at: list[float] = []
    coord.add_listener(lambda what, info: revoked_at.append(time.monotonic()) if what == "revoked" else None)
    async with SecureClient(broker.url, issuer, **did_credentials(issuer)) as admin:
        await publish_status_list(admin, create_status_list_credential(issuer, url, status_list=bits))
        cred = device_credential(issuer, dkey.did, kind="phone", status=status_entry(url, 42))
        dev = Device(dkey, cred, broker=broker.url, coordinator=ckey.did)
        try:
            await until(lambda: url in coord.status_source)
            await dev.connect()
            assert dev.admitted
            bits.set(42)
            t0 = time.monotonic()
            await publish_status_list(admin, create_status_list_credential(issuer, url, status_list=bits))
            await until(lambda: dev.state == REVOKED, timeout=1.0)
            assert revoked_at and revoked_at[0] - t0 < 1.0
            with pytest.raises(AdmissionError) as info:
                await dev.authenticate()
            assert info.value.reason == "revoked"
        finally:
            await dev.aclose()
            await coord.stop()


async def test_full_flow_on_strict_topic_acl(embedded_broker_strict: Any, tmp_path: Any) -> None:
    """With the embedded broker's own-topics ACL, the coordination flow still works end to end."""
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        m = Mesh(embedded_broker_strict.url, tmp_path / "coord", stack)
        embedded_broker_strict.add_admin(m.coord_key.did)  # only the coordinator writes configs
        coord = await m.start_coordinator()
        stack.push_async_callback(coord.stop)
        display = await m.device("display")
        got: list[Any] = []
        phone = await m.device("phone", record=got)
        await display.publish_event(screen_available(800, 600))
        await phone.wait_version(1, 10)
        assert got[0].state["ui.companion.resolution"] == "800x600"
        await coord.revoke(phone.did)
        await until(lambda: phone.state == REVOKED, timeout=1.0)


async def test_coordinator_rejects_spoofed_topic_and_bad_events(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator()
    mallory = await mesh.device("phone")
    victim = await mesh.device("display")
    # an admitted device publishing on another device's events topic
    await mallory.client.publish(protocol.device_events(victim._token), screen_available(800, 600).to_body(),
                                 type=protocol.EVENT, qos=1)
    await mesh.wait_for("rejected", lambda i: i["reason"] == "wrong_topic_owner" and i["did"] == mallory.did)
    # malformed events and reports from an admitted device: rejected, logged, coordinator keeps going
    await victim.client.publish(protocol.device_events(victim._token), {"type": "screen_available",
                                "fields": {"width": "wide"}}, type=protocol.EVENT, qos=1)
    await mesh.wait_for("rejected", lambda i: i["reason"] == "invalid_event")
    await victim.client.publish(protocol.device_events(victim._token), {"version": 99, "status": "applied"},
                                type=protocol.REPORT, qos=1)
    await mesh.wait_for("rejected", lambda i: i["reason"] == "unknown_version")
    # a never-admitted DID is refused and told to authenticate
    stranger = Key.generate()
    async with SecureClient(mesh.url, stranger, **did_credentials(stranger)) as client:
        await client.publish(protocol.device_events(protocol.token(stranger.did)), battery("low").to_body(),
                             type=protocol.EVENT, qos=1)
        await mesh.wait_for("rejected", lambda i: i["did"] == stranger.did and i["reason"] == "not_admitted")
    assert coord.store.latest_version(victim.did) == 0     # type: ignore[union-attr]
    text = coord.metrics.prometheus().decode()
    assert 'autoglm_coord_rejected_total{reason="wrong_topic_owner"} 1.0' in text


async def test_unacknowledged_event_is_resent_after_a_ttl(mesh: Mesh) -> None:
    """An event the coordinator never saw (lost as the coordinator's link dropped) stays in the
    outbox and goes out again once a heartbeat TTL passes without an acknowledgement."""
    await mesh.start_coordinator()
    display = await mesh.device("display", heartbeat_ttl=0.6)
    got: list[Any] = []
    phone = await mesh.device("phone", record=got)
    display._outbox.add({**screen_available(800, 600).to_body(), "event_id": "lost-event-0001"})
    lost = display._outbox.get("lost-event-0001")
    assert lost is not None                   # marked sent in this admission, as if lost on the way
    lost.sent_gen, lost.sent_at = display._admission_gen, time.monotonic()
    await phone.wait_version(1, 10)
    await until(lambda: display.outbox == [])
    assert [c.event_id for c in got] == ["lost-event-0001"]


async def test_invalid_event_is_acknowledged_as_rejected_and_dropped(mesh: Mesh) -> None:
    await mesh.start_coordinator()
    display = await mesh.device("display")
    display._outbox.add(
        {"type": "screen_available", "fields": {"width": "wide"}, "event_id": "bad-event-00001"})
    await display._drain()
    await mesh.wait_for("rejected", lambda i: i["reason"] == "invalid_event")
    await until(lambda: display.outbox == [])              # not re-sent forever


async def test_revoked_device_does_not_queue_events(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator()
    tablet = await mesh.device("tablet")
    await coord.revoke(tablet.did)
    await until(lambda: tablet.state == REVOKED, timeout=5)
    with pytest.raises(NotAdmitted):
        await tablet.publish_event(battery("low"))
    assert tablet.outbox == []
