"""Device trust rules on real brokers: replayed retained commands and configs, expired credentials."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from sdk.coord import protocol
from sdk.coord.device import DeviceState
from sdk.coord.errors import NotAdmitted
from sdk.coord.events import screen_available
from sdk.identity import Key
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.envelope import Signer
from sdk.messaging.transport import MqttTransport
from tests.coord.test_coordinator import Mesh, mesh, until  # noqa: F401 - the fixture

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


def _admissions(m: Mesh, did: str) -> int:
    return sum(1 for w, i in m.events if w == "admitted" and i["did"] == did)


async def _raw(m: Mesh) -> MqttTransport:
    raw = MqttTransport(m.url, **did_credentials(Key.generate()))
    await raw.connect()
    m.stack.push_async_callback(raw.aclose)
    return raw


async def test_captured_command_replayed_with_the_retain_flag_runs_once(mesh: Mesh) -> None:
    await mesh.start_coordinator()
    phone = await mesh.device("phone")
    cmd = protocol.device_commands(protocol.token(phone.did))
    # a genuine coordinator notice, as captured on the wire
    _, wire = Signer(mesh.coord_key).seal(cmd, {"notice": protocol.NOTICE_REAUTH, "reason": "test"},
                                          type=protocol.NOTICE)
    raw = await _raw(mesh)
    await raw.publish(cmd, wire, qos=1)
    await until(lambda: _admissions(mesh, phone.did) == 2 and phone.admitted)   # it ran once
    try:
        await raw.publish(cmd, wire, qos=1, retain=True)                        # replayed, retained
        await until(lambda: phone.client.stats.rejected["replayed"] >= 1)
    finally:
        await raw.publish(cmd, b"", qos=1, retain=True)                         # clear it
    assert _admissions(mesh, phone.did) == 2 and phone.admitted


async def test_captured_config_replayed_with_the_retain_flag_applies_once(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.start_coordinator()
    display = await mesh.device("display")
    key, state_file = Key.generate(), tmp_path / "phone.json"
    got: list[Any] = []
    phone = await mesh.device("phone", key=key, record=got, state_file=state_file)
    config_topic = protocol.device_config(protocol.token(phone.did))
    wires: list[bytes] = []
    raw = await _raw(mesh)
    await raw.subscribe(config_topic, qos=1, handler=lambda t, p, **kw: wires.append(p) if p else None)
    await display.publish_event(screen_available(800, 600))
    await phone.wait_version(1, 10)
    await until(lambda: len(wires) == 1)
    try:
        await raw.publish(config_topic, wires[0], qos=1, retain=True)          # the same process
        await until(lambda: phone.client.stats.stale_state >= 1)
        assert [c.version for c in got] == [1]
        await phone.aclose()                                                    # the device restarts
        again: list[Any] = []
        phone2 = await mesh.device("phone", key=key, record=again, state_file=state_file)
        stats = phone2.client.stats              # the retained copy: before or after the floor is seeded
        await until(lambda: stats.stale_state + stats.rejected["stale_state"] >= 1)
        assert again == [] and phone2.last_version == 1
    finally:
        await raw.publish(config_topic, b"", qos=1, retain=True)


def _valid_until(cred: dict[str, Any]) -> float:
    return datetime.fromisoformat(cred["validUntil"].replace("Z", "+00:00")).timestamp()


async def test_expired_credential_is_renewed_from_the_provider(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator()
    key = Key.generate()
    short = coord.issue_device_credential(key.did, kind="phone", valid_for=63)   # ~3 s left
    fresh: list[dict[str, Any]] = []

    def provider() -> dict[str, Any]:
        fresh.append(coord.issue_device_credential(key.did, kind="phone"))
        return fresh[-1]

    mesh.credentials[key.did] = short
    phone = await mesh.device("phone", key=key, credential_provider=provider, renew_after=None)
    assert phone.admitted and phone.credential is short
    await mesh.wait_for("session_ended", lambda i: i["did"] == phone.did, timeout=15)
    await until(lambda: _admissions(mesh, phone.did) == 2 and phone.admitted, timeout=15)
    assert phone.credential is fresh[0] and len(fresh) == 1
    assert time.time() >= _valid_until(short)


async def test_expired_credential_without_a_fresh_one_says_so(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator()
    key = Key.generate()
    mesh.credentials[key.did] = coord.issue_device_credential(key.did, kind="phone", valid_for=63)
    phone = await mesh.device("phone", key=key, renew_after=None)      # no renewal: it expires
    await until(lambda: phone.state is DeviceState.EXPIRED, timeout=15)
    assert phone.state_reason == "expired" and not phone.admitted
    with pytest.raises(NotAdmitted) as info:
        await phone.wait_admitted(1)
    assert info.value.reason == "expired"
    eid = await phone.publish_event(screen_available(640, 480), wait_admitted=0.1)   # kept for later
    assert phone.outbox == [eid]
    phone.update_credential(coord.issue_device_credential(key.did, kind="phone"))
    await phone.wait_admitted(10)
    await until(lambda: phone.outbox == [])
