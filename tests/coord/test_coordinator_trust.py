"""The coordinator's trust decisions: numbers at the boundary, sessions that end with their
credential, revocation that sticks, a cheap hello, and a state store that never loses data silently.

Hostile values the envelope parser now refuses on the wire (NaN, Infinity) are handed to the
daemon's handlers directly: the coordinator must refuse them whatever their source.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from sdk.coord import protocol
from sdk.coord.coordinator import Coordinator, parse_rules
from sdk.coord.coordinator.auth import present
from sdk.coord.coordinator.errors import AdmissionError, StoreCorrupt, StoreMissing
from sdk.coord.coordinator.metrics import MAX_EVENT_LABELS, CoordinatorMetrics
from sdk.coord.coordinator.registry import EXPIRED, ONLINE, REVOKED
from sdk.coord.events import screen_available
from sdk.identity import Key, StatusChecker, TrustPolicy
from sdk.messaging.envelope import Message
from tests.coord.test_coordinator import Mesh, mesh, until  # noqa: F401 - the fixture

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

NAN, INF = float("nan"), float("inf")


def message(coord: Coordinator, sender: str, type_: str, body: Any, *, topic: str | None = None) -> Message:
    """A verified message as the secure client hands it to a handler."""
    return Message(topic=topic or protocol.device_commands(protocol.token(coord.did)), sender=sender,
                   kid=f"{sender}#{sender.removeprefix('did:key:')}", type=type_,
                   id=f"m-{time.monotonic_ns()}", body=body, issued_at=time.time())


def present_body(coord: Coordinator, key: Key, credential: Any, **extra: Any) -> dict[str, Any]:
    challenge = coord.challenges.issue(key.did)
    return {"challenge": challenge, "vp": present(credential, key, challenge=challenge, domain=coord.did),
            "last_version": 0, **extra}


# ---------------------------------------------------------------------------- numbers are numbers


@pytest.mark.parametrize("ttl", [NAN, INF, -INF, -1, "30", True])
async def test_non_finite_heartbeat_ttl_admits_nothing(mesh: Mesh, ttl: Any) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    key = Key.generate()
    cred = coord.issue_device_credential(key.did, kind="phone", groups=["room:x"])
    body = present_body(coord, key, cred, heartbeat_ttl=ttl)
    with pytest.raises(AdmissionError) as err:
        await coord._present(message(coord, key.did, protocol.PRESENT, body))
    assert err.value.reason == "malformed"
    assert coord.registry.get(key.did) is None                          # nothing half-committed
    assert all(row["did"] != key.did for row in coord.store.load_devices())   # type: ignore[union-attr]

    ok = await coord._present(message(coord, key.did, protocol.PRESENT, present_body(coord, key, cred,
                                                                              heartbeat_ttl=0.5)))
    assert ok["heartbeat_ttl"] == 0.5
    rec = coord.registry.get(key.did)
    assert rec is not None and rec.state == ONLINE
    assert coord.sweep(now=time.time() + 5) == [key.did]                # a finite TTL expires


async def test_failed_admission_write_leaves_registry_untouched(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    key = Key.generate()
    cred = coord.issue_device_credential(key.did, kind="phone")
    store = coord.store
    assert store is not None
    store.close()                                                       # every write now fails
    with pytest.raises(AdmissionError) as err:
        await coord._present(message(coord, key.did, protocol.PRESENT, present_body(coord, key, cred)))
    assert err.value.reason == "busy"
    assert coord.registry.get(key.did) is None
    coord.store = None                                                  # already closed


async def test_unsignable_rule_output_commits_nothing_and_blocks_nothing(mesh: Mesh) -> None:  # noqa: F811
    rules = parse_rules([{
        "name": "level", "event": "doorbell", "target": {"select": "group", "group_prefix": "room:"},
        "config": {"ui.level": "{sender.attributes.level}", "ui.floor": "{event.floor}"},
    }])
    coord = await mesh.start_coordinator(rules=rules)
    bell = await mesh.device("doorbell", attributes={"level": 1})
    got: list[Any] = []
    phone = await mesh.device("phone", record=got)
    store = coord.store
    assert store is not None

    # an event field that is not a finite number: refused before any rule runs
    bad = message(coord, bell.did, protocol.EVENT, {"type": "doorbell", "fields": {"floor": NAN},
                                                    "event_id": "evt-nan-field"},
                  topic=protocol.device_events(protocol.token(bell.did)))
    await coord._on_device_message(bad)          # an event: its handling is awaitable
    assert store.latest_version(phone.did) == 0 and not store.event_processed(bell.did, "evt-nan-field")

    # a rule templating a value from another source (a device attribute) that cannot be signed
    coord.registry.get(bell.did).attributes["level"] = INF              # type: ignore[union-attr]
    evt = message(coord, bell.did, protocol.EVENT, {"type": "doorbell", "fields": {"floor": 2},
                                                    "event_id": "evt-inf-attr"},
                  topic=protocol.device_events(protocol.token(bell.did)))
    await coord._on_device_message(evt)
    info = await mesh.wait_for("rejected", lambda i: i["reason"] == "invalid_rule_output")
    assert info["did"] == bell.did
    assert store.latest_version(phone.did) == 0                         # nothing committed
    assert not store.event_processed(bell.did, "evt-inf-attr")

    # the device's configs are not blocked: the next good event commits v1 and it is applied
    coord.registry.get(bell.did).attributes["level"] = 3                # type: ignore[union-attr]
    await bell.custom_event("doorbell", floor=4)
    await phone.wait_version(1, 10)
    assert got[0].state == {"ui.level": 3, "ui.floor": 4}


async def test_report_and_announce_numbers_are_checked(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    dev = await mesh.device("tv")
    events = protocol.device_events(protocol.token(dev.did))
    for body in ({"version": 1, "status": "applied", "apply_ms": NAN},
                 {"version": NAN, "status": "applied"}, {"version": 2**70, "status": "applied"}):
        coord._handle_report(message(coord, dev.did, protocol.REPORT, body, topic=events))
    assert coord._on_device_message(message(coord, dev.did, protocol.ANNOUNCE,   # handled at once
                                            {"attributes": {"size_in": INF}}, topic=events)) is None
    assert sum(w == "rejected" and i["reason"] == "malformed" for w, i in mesh.events) == 4
    assert "size_in" not in coord.registry.get(dev.did).attributes      # type: ignore[union-attr]


def test_event_type_label_is_bounded() -> None:
    metrics = CoordinatorMetrics()
    for i in range(500):
        metrics.event(f"attacker-type-{i}")
    metrics.event("screen_available")
    text = metrics.prometheus().decode()
    labels = [line for line in text.splitlines() if line.startswith("autoglm_coord_events_total{")]
    assert len(labels) == MAX_EVENT_LABELS + 2                          # the first N, "other", a known type
    assert 'autoglm_coord_events_total{type="other"} 436.0' in text


# ---------------------------------------------------------------------------- sessions end with credentials


async def test_session_ends_when_credential_expires(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    key = Key.generate()
    # validFrom is a minute back: this credential is valid for two to three more seconds
    mesh.credentials[key.did] = coord.issue_device_credential(key.did, kind="phone", valid_for=63)
    dev = await mesh.device("phone", key=key, renew_after=None)        # no renewal: it expires
    assert dev.admitted
    info = await mesh.wait_for("session_ended", lambda i: i["did"] == key.did, timeout=10)
    assert info["reason"] == "credential_expired"
    rec = coord.registry.get(key.did)
    assert rec is not None and rec.state == EXPIRED and not rec.admitted
    await until(lambda: not dev.admitted)                               # the device is told
    # events from the ended session are refused
    mesh.events.clear()
    await dev.client.publish(protocol.device_events(protocol.token(key.did)),
                             {"type": "screen_lost", "fields": {}}, type=protocol.EVENT, qos=1)
    info = await mesh.wait_for("rejected", lambda i: i["did"] == key.did)
    assert info["reason"] == "not_admitted"
    assert not any(w == "event" for w, _ in mesh.events)
    assert 'autoglm_coord_sessions_ended_total{reason="credential_expired"} 1.0' in \
        coord.metrics.prometheus().decode()


async def test_event_after_valid_until_is_refused_before_the_timer(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    dev = await mesh.device("display")
    rec = coord.registry.get(dev.did)
    assert rec is not None and rec.session is not None
    rec.session.valid_until = time.time() - 1                           # lapsed, timer not yet run
    evt = message(coord, dev.did, protocol.EVENT, screen_available(800, 600).to_body(),
                  topic=protocol.device_events(protocol.token(dev.did)))
    assert coord._on_device_message(evt) is None       # refused before any work is started
    assert rec.state == EXPIRED
    assert [i["reason"] for w, i in mesh.events if w == "rejected"] == ["not_admitted"]
    assert not any(w == "event" for w, _ in mesh.events)


# ---------------------------------------------------------------------------- revoked stays revoked


async def test_revoked_stays_revoked_whatever_later_messages_say(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    key = Key.generate()
    dev = await mesh.device("phone", key=key)
    url = protocol.status_list_url(mesh.issuer.did)
    old_list = coord.status_source(url)                                 # the pre-revocation list
    await coord.revoke(key.did)
    await mesh.wait_for("revoked", lambda i: i["did"] == key.did)
    await until(lambda: dev.state == "revoked")

    presence = protocol.device_presence(protocol.token(key.did))
    for type_, body in ((protocol.PRESENCE, {"state": "online"}), (protocol.HEARTBEAT, {"seq": 1}),
                        (protocol.PRESENCE, {"state": "offline", "reason": "closed"})):
        coord._on_presence(message(coord, key.did, type_, body, topic=presence))
    assert coord.registry.get(key.did).state == REVOKED                 # type: ignore[union-attr]

    # a verifier shown the old list again: the same credential is still never admitted
    coord.checker = StatusChecker(lambda u: old_list if u == url else None)
    coord._on_status_list(url, old_list)
    assert coord.registry.get(key.did).state == REVOKED                 # type: ignore[union-attr]
    with pytest.raises(AdmissionError) as err:
        await coord._present(message(coord, key.did, protocol.PRESENT,
                               present_body(coord, key, mesh.credentials[key.did])))
    assert err.value.reason == "revoked"
    assert coord.registry.get(key.did).state == REVOKED                 # type: ignore[union-attr]

    await coord.stop()                                                  # and across a restart
    again = await mesh.start_coordinator()
    again.checker = StatusChecker(lambda u: old_list if u == url else None)
    assert again.registry.get(key.did).state == REVOKED                 # type: ignore[union-attr]
    with pytest.raises(AdmissionError) as err:
        await again._present(message(again, key.did, protocol.PRESENT,
                               present_body(again, key, mesh.credentials[key.did])))
    assert err.value.reason == "revoked"


# ---------------------------------------------------------------------------- a cheap hello


async def test_hello_flood_costs_bounded_signatures(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator(hello_rate=20, hello_burst=20)
    signed = [0]
    sign = coord.key.sign

    def counting_sign(data: bytes) -> bytes:
        signed[0] += 1
        return sign(data)

    coord.key.sign = counting_sign                                      # type: ignore[method-assign]
    refused = 0
    for _ in range(300):                                                # fresh DIDs, one hello each
        msg = message(coord, Key.generate().did, protocol.HELLO, {"nonce": "n" * 16})
        assert coord._gate(msg) is None
        try:
            reply = coord._hello(msg)
            assert "vp" in reply and "challenge" in reply
        except AdmissionError as exc:
            assert exc.reason == "busy"
            refused += 1
    assert signed[0] <= 25 and refused >= 275
    # one sender repeating itself is cut off by the gate before any work
    noisy = Key.generate().did
    gated = [coord._gate(message(coord, noisy, protocol.HELLO, {})) for _ in range(50)]
    assert sum(g is not None and g.reason == "busy" for g in gated) >= 35
    # a hello without a nonce costs no signature; the coordinator proves itself at present
    before = signed[0]
    for _ in range(100):
        reply = coord._hello(message(coord, Key.generate().did, protocol.HELLO, {}))
        assert "vp" not in reply and reply["challenge"]
    assert signed[0] == before
    # a legitimate device still gets in (it retries a "busy" answer)
    dev = await mesh.device("phone")
    assert dev.admitted


async def test_nonce_less_hello_then_present_proves_the_coordinator(mesh: Mesh) -> None:  # noqa: F811
    from sdk.coord.coordinator.auth import COORDINATOR_CREDENTIAL, check_presentation

    coord = await mesh.start_coordinator()
    key = Key.generate()
    cred = coord.issue_device_credential(key.did, kind="phone")
    hello = coord._hello(message(coord, key.did, protocol.HELLO, {}))
    challenge = hello["challenge"]
    body = {"challenge": challenge, "vp": present(cred, key, challenge=challenge, domain=coord.did),
            "last_version": 0, "nonce": "device-nonce-1"}
    reply = await coord._present(message(coord, key.did, protocol.PRESENT, body))
    admitted = check_presentation(reply["vp"], challenge="device-nonce-1", domain=key.did,
                                  trust=TrustPolicy({mesh.issuer.did: {COORDINATOR_CREDENTIAL}}),
                                  credential_type=COORDINATOR_CREDENTIAL, expected_holder=coord.did)
    assert admitted.holder == coord.did


# ---------------------------------------------------------------------------- state never lost silently


@pytest.mark.parametrize("content", [b"", b"this is not a database" * 100], ids=["empty", "garbage"])
async def test_corrupt_or_empty_store_refuses_to_start(mesh: Mesh, content: bytes) -> None:  # noqa: F811
    mesh.data_dir.mkdir(parents=True)
    (mesh.data_dir / "coordinator.db").write_bytes(content)
    with pytest.raises(StoreCorrupt) as err:
        await mesh.start_coordinator()
    assert err.value.reason == "store_corrupt"
    assert (mesh.data_dir / "coordinator.db").read_bytes() == content   # untouched
    coord = await mesh.start_coordinator(fresh=True)
    assert coord.started and list(mesh.data_dir.glob("coordinator.db.corrupt-*"))


async def test_missing_store_with_devices_ahead_refuses_then_never_rolls_back(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    display = await mesh.device("display")
    phone_key = Key.generate()
    phone = await mesh.device("phone", key=phone_key, record=[])
    for width in (800, 1024, 1280):
        await display.publish_event(screen_available(width, 600))
    await phone.wait_version(3, 10)
    await coord.stop()
    await phone.aclose()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{mesh.data_dir / 'coordinator.db'}{suffix}").unlink(missing_ok=True)

    with pytest.raises(StoreMissing) as err:
        await mesh.start_coordinator()
    assert err.value.reason == "store_missing"
    coord = await mesh.start_coordinator(fresh=True)
    got: list[Any] = []
    phone = await mesh.device("phone", key=phone_key, record=got, last_version=3)
    info = await mesh.wait_for("store_behind", lambda i: i["did"] == phone_key.did)
    assert info["reported"] == 3 and info["stored"] == 0 and info["error"].reason == "store_behind"
    assert "autoglm_coord_store_behind_total 1.0" in coord.metrics.prometheus().decode()
    await display.wait_admitted(10)
    await display.publish_event(screen_available(640, 480))
    await phone.wait_version(4, 10)                                     # continues after the device
    assert [c.version for c in got] == [4]


async def test_revocations_survive_a_deleted_issuer_state_file(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    key = Key.generate()
    await mesh.device("phone", key=key)
    first_index = mesh.credentials[key.did]["credentialStatus"]["statusListIndex"]
    await coord.revoke(key.did)
    await mesh.wait_for("revoked", lambda i: i["did"] == key.did)
    await coord.stop()
    (mesh.data_dir / "issuer-state.json").unlink(missing_ok=True)       # the old home of this state

    coord = await mesh.start_coordinator()
    other = Key.generate()
    cred = coord.issue_device_credential(other.did, kind="phone")
    assert cred["credentialStatus"]["statusListIndex"] != first_index    # an index is never handed out twice
    coord.registry._devices.pop(key.did)
    with pytest.raises(AdmissionError) as err:
        await coord._present(message(coord, key.did, protocol.PRESENT,
                               present_body(coord, key, mesh.credentials[key.did])))
    assert err.value.reason == "revoked"                                # the status list still says so


async def test_legacy_issuer_state_file_is_migrated_once(mesh: Mesh) -> None:  # noqa: F811
    mesh.data_dir.mkdir(parents=True)
    legacy = {"next_index": 3, "by_did": {"did:key:zA": [0, 1], "did:key:zB": [2]}, "revoked": [1]}
    (mesh.data_dir / "issuer-state.json").write_text(json.dumps(legacy))
    coord = await mesh.start_coordinator()
    store = coord.store
    assert store is not None
    assert store.revoked_indexes() == [1] and store.issued_indexes("did:key:zA") == [0, 1]
    assert not (mesh.data_dir / "issuer-state.json").exists()
    assert (mesh.data_dir / "issuer-state.json.migrated").exists()
    cred = coord.issue_device_credential(Key.generate().did, kind="phone")
    assert cred["credentialStatus"]["statusListIndex"] == "3"
    await coord.stop()
    (mesh.data_dir / "issuer-state.json").write_text(json.dumps(legacy))    # a stale copy comes back
    coord = await mesh.start_coordinator()
    assert coord.store.revoked_indexes() == [1]                         # type: ignore[union-attr]
    assert (mesh.data_dir / "issuer-state.json").exists()               # not imported a second time


async def test_corrupt_issuer_state_file_is_a_typed_error(mesh: Mesh) -> None:  # noqa: F811
    mesh.data_dir.mkdir(parents=True)
    (mesh.data_dir / "issuer-state.json").write_text('{"next_index": 1, "revoked": [')
    with pytest.raises(StoreCorrupt) as err:
        await mesh.start_coordinator()
    assert err.value.reason == "issuer_state_corrupt"
    await asyncio.sleep(0)
    coord = await mesh.start_coordinator(fresh=True)
    assert coord.started


async def test_replayed_presence_never_keeps_a_device_alive(mesh: Mesh) -> None:  # noqa: F811
    """Presence is ordered state: a captured heartbeat re-published (even retained) is never newer."""
    from sdk.messaging.broker_auth import did_credentials
    from sdk.messaging.transport import MqttTransport

    coord = await mesh.start_coordinator(sweep_interval=0.05, heartbeat_ttl=0.6)
    key = Key.generate()
    topic = protocol.device_presence(protocol.token(key.did))
    wires: list[bytes] = []
    sniffer = MqttTransport(mesh.url, **did_credentials(Key.generate()))
    await sniffer.connect()
    mesh.stack.push_async_callback(sniffer.aclose)
    await sniffer.subscribe(topic, qos=1, handler=lambda t, p, **kw: wires.append(p))
    dev = await mesh.device("phone", key=key)
    await until(lambda: len(wires) >= 2)                                # online note + a heartbeat
    dev.pause_heartbeats()
    await mesh.wait_for("expired", lambda i: i["did"] == key.did)
    def kind(wire: bytes) -> str:
        payload = wire.split(b".")[1]
        return str(json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))["typ"])

    captured = [w for w in wires if w and kind(w) == protocol.HEARTBEAT]
    assert captured
    seen = coord.client.stats.stale_state
    for wire in captured:                                               # replay all, live and retained
        await sniffer.publish(topic, wire, qos=1)
        await sniffer.publish(topic, wire, qos=1, retain=True)
    await until(lambda: coord.client.stats.stale_state >= seen + 2 * len(captured))
    rec = coord.registry.get(key.did)
    assert rec is not None and rec.state == EXPIRED                     # not revived by old heartbeats
    await sniffer.publish(topic, b"", qos=1, retain=True)               # clear the retained copy
