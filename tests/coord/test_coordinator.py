"""Coordinator + devices on real brokers (embedded amqtt and Mosquitto): flows, catch-up, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from sdk.coord.coordinator import Coordinator, load_rules
from sdk.coord.coordinator.registry import EXPIRED, ONLINE
from sdk.coord.device import Device
from sdk.coord.events import screen_available, screen_lost
from sdk.identity import Key, TrustPolicy
from tests.fixtures.waiting import until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


class Mesh:
    """A coordinator with an issuer key plus helpers to add devices (all torn down at the end)."""

    def __init__(self, url: str, data_dir: Path, stack: AsyncExitStack) -> None:
        self.url = url
        self.data_dir = data_dir
        self.stack = stack
        self.issuer = Key.generate()
        self.coord_key = Key.generate()
        self.coordinator: Coordinator | None = None
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.credentials: dict[str, Any] = {}

    async def start_coordinator(self, **kwargs: Any) -> Coordinator:
        kwargs.setdefault("rules", load_rules(EXAMPLES / "rules.toml"))
        coord = Coordinator(self.coord_key, broker=self.url, data_dir=self.data_dir, trust=TrustPolicy({}),
                            issuer=self.issuer, **kwargs)
        coord.add_listener(lambda what, info: self.events.append((what, info)))
        await coord.start()
        self.coordinator = coord
        return coord

    async def device(self, kind: str, *, room: str = "room:living", key: Key | None = None,
                     record: list[Any] | None = None, connect: bool = True, **kwargs: Any) -> Device:
        assert self.coordinator is not None
        key = key or Key.generate()
        if key.did not in self.credentials:
            self.credentials[key.did] = self.coordinator.issue_device_credential(key.did, kind=kind, groups=[room])
        if record is not None:
            kwargs["on_config"] = record.append
        dev = Device(key, self.credentials[key.did], broker=self.url, coordinator=self.coord_key.did, **kwargs)
        if connect:
            await dev.connect()
            self.stack.push_async_callback(dev.aclose)
        return dev

    async def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], bool] = lambda i: True,
                       timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for w, info in self.events:
                if w == what and predicate(info):
                    return info
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {what!r} event in {timeout}s; saw {[w for w, _ in self.events]}")


@pytest.fixture
async def mesh(broker: Any, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with AsyncExitStack() as stack:
        m = Mesh(broker.url, tmp_path / "coord", stack)
        yield m
        if m.coordinator is not None:
            await m.coordinator.stop()




async def test_full_flow_display_to_phone(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator()
    got: list[Any] = []
    display = await mesh.device("display")
    phone = await mesh.device("phone", record=got)
    other_room = await mesh.device("phone", room="room:kitchen", record=(kitchen := []))
    assert display.admitted and phone.admitted and other_room.admitted

    await display.publish_event(screen_available(800, 600, density=160))
    info = await mesh.wait_for("converged")
    await phone.wait_version(1, 10)
    assert info["targets"] == 1 and info["failures"] == 0 and info["seconds"] > 0
    (cfg,) = got
    assert cfg.state["ui.layout"] == "companion" and cfg.state["ui.companion.resolution"] == "800x600"
    assert cfg.state["ui.companion.display"] == display.did
    assert kitchen == []                                   # other room untouched

    status = coord.status()
    row = next(d for d in status["devices"] if d["did"] == phone.did)
    assert row["desired_version"] == 1 and row["reported_version"] == 1 and row["delta"] == {}
    assert status["metrics"]["convergence_ms"]["count"] == 1
    assert status["metrics"]["error_rate"] == 0
    assert status["metrics"]["config_cost"]["bytes_mean"] > 100
    text = coord.metrics.prometheus().decode()
    assert "autoglm_coord_convergence_seconds_count 1.0" in text
    assert 'autoglm_coord_reports_total{status="applied"} 1.0' in text


async def test_offline_device_catches_up_exactly_once(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.start_coordinator()
    display = await mesh.device("display")
    phone_key = Key.generate()
    state_file = tmp_path / "phone-state.json"
    first: list[Any] = []
    phone = await mesh.device("phone", key=phone_key, record=first, connect=False, state_file=state_file)
    await phone.connect()
    await display.publish_event(screen_available(800, 600))
    await phone.wait_version(1, 10)
    await phone.aclose()                                    # goes offline

    await display.publish_event(screen_available(1024, 768))
    await display.publish_event(screen_lost())
    await display.publish_event(screen_available(1280, 720))
    await mesh.wait_for("committed", lambda i: i["versions"].get(phone_key.did) == 4)

    again: list[Any] = []
    phone2 = await mesh.device("phone", key=phone_key, record=again, state_file=state_file)
    assert phone2.admission is not None and phone2.admission.pending == 3
    await phone2.wait_version(4, 10)
    await asyncio.sleep(0.3)                                # give duplicates a chance to show up
    assert [c.version for c in again] == [2, 3, 4]
    assert again[1].state["ui.layout"] == "standalone" and "ui.companion.width" not in again[1].state
    assert again[-1].state["ui.companion.resolution"] == "1280x720"
    store = mesh.coordinator.store  # type: ignore[union-attr]
    await until(lambda: store.reported(phone_key.did).version == 4)
    assert store.delta(phone_key.did) == {}


async def test_coordinator_restart_mid_push_loses_nothing(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator()
    display = await mesh.device("display")
    phones = [await mesh.device("phone", record=[]) for _ in range(6)]
    records = {p.did: p.on_config.__self__ for p in phones}  # type: ignore[union-attr]

    crashed = asyncio.get_running_loop().create_future()

    def crash(what: str, info: dict[str, Any]) -> None:
        if what == "committed" and not crashed.done():
            # the versions are committed; drop the broker link before the pushes go out
            coord.client.transport._drop_socket()           # noqa: SLF001 - simulate a crash
            crashed.set_result(info)

    coord.add_listener(crash)
    await display.publish_event(screen_available(800, 600))
    info = await asyncio.wait_for(crashed, 10)
    assert len(info["versions"]) == 6
    coord.started = False                                  # crash: no clean shutdown messages
    for task in [coord._sweeper, *coord._tasks]:           # noqa: SLF001
        if task is not None:
            task.cancel()
    await coord.client.transport.aclose()
    coord.store.close()                                     # type: ignore[union-attr]
    coord._lock.release()                                   # noqa: SLF001 - a dead process's flock goes with it

    mesh.events.clear()
    await mesh.start_coordinator()                          # same key, same data dir
    for p in phones:
        await p.wait_version(1, 15)
    await asyncio.sleep(0.3)
    for did, rec in records.items():
        assert [c.version for c in rec] == [1], did
        assert rec[0].state["ui.companion.resolution"] == "800x600"


async def test_two_displays_racing(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator()
    a = await mesh.device("display")
    b = await mesh.device("display")
    got: list[Any] = []
    phone = await mesh.device("phone", record=got)
    await asyncio.gather(a.publish_event(screen_available(800, 600)), b.publish_event(screen_available(1920, 1080)))
    await phone.wait_version(2, 10)
    await asyncio.sleep(0.2)
    assert [c.version for c in got] == [1, 2]
    store = coord.store
    assert store is not None
    await until(lambda: store.reported(phone.did).version == 2)
    assert store.desired(phone.did) == got[-1].state
    assert store.delta(phone.did) == {}
    assert got[-1].state["ui.companion.resolution"] in ("800x600", "1920x1080")


async def test_expired_heartbeat_expires_device_then_it_recovers(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator(sweep_interval=0.05, heartbeat_ttl=0.6)   # the default TTL
    got: list[Any] = []
    phone = await mesh.device("phone", record=got)
    display = await mesh.device("display", heartbeat_ttl=30)                      # asks for its own
    assert phone.admission.heartbeat_ttl == 0.6 and display.admission.heartbeat_ttl == 30  # type: ignore[union-attr]
    phone.pause_heartbeats()
    info = await mesh.wait_for("expired", lambda i: i["did"] == phone.did, timeout=10)
    assert info["did"] == phone.did
    assert coord.registry.get(phone.did).state == EXPIRED  # type: ignore[union-attr]
    assert coord.registry.get(display.did).state == ONLINE  # type: ignore[union-attr]
    # the phone stays silent: an event for it is committed and waits for its return
    await display.publish_event(screen_available(800, 600))
    await mesh.wait_for("committed")
    assert got == []
    # any message from the expired phone is refused with a re-auth notice; it re-authenticates
    await phone.client.publish(f"autoglm/v1/dev/{phone._token}/presence", {"seq": 1}, type="coord.heartbeat")
    await phone.wait_version(1, 10)
    assert coord.registry.get(phone.did).state == ONLINE  # type: ignore[union-attr]


async def test_broker_restart(restartable_broker: Any, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        mesh = Mesh(restartable_broker.url, tmp_path / "coord", stack)
        coord = await mesh.start_coordinator()
        stack.push_async_callback(coord.stop)
        display = await mesh.device("display")
        got: list[Any] = []
        phone = await mesh.device("phone", record=got)
        await display.publish_event(screen_available(800, 600))
        await phone.wait_version(1, 10)

        mesh.events.clear()
        await restartable_broker.restart()
        # both devices reconnect on their own and re-authenticate (catch-up point)
        for dev in (display, phone):
            await mesh.wait_for("admitted", lambda i, d=dev.did: i["did"] == d, timeout=30)
            await dev.wait_admitted(20)
        await display.publish_event(screen_available(1024, 768))
        await phone.wait_version(2, 20)
        assert [c.version for c in got] == [1, 2]
        assert got[-1].state["ui.companion.resolution"] == "1024x768"


@pytest.mark.slow
async def test_kill_9_coordinator_subprocess_mid_push(broker: Any, tmp_path: Path) -> None:
    issuer, ckey = Key.generate(), Key.generate()
    from sdk.coord.coordinator.auth import coordinator_credential, device_credential

    (tmp_path / "coord-vc.json").write_text(__import__("json").dumps(coordinator_credential(issuer, ckey.did)))
    data = tmp_path / "data"
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'rules_file = "{EXAMPLES / "rules.toml"}"\n[coordinator]\nbroker = "{broker.url}"\n'
                   f'data_dir = "{data}"\n[identity]\nkey = "{ckey.private_key_multibase}"\n'
                   f'credential = "coord-vc.json"\n[[trust]]\nissuer = "{issuer.did}"\n'
                   f'types = ["DeviceCredential"]\n')

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", "from sdk.cli import main; main()", "coordinator",
                                 "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    proc = spawn()
    async with AsyncExitStack() as stack:
        async def dev(kind: str, record: list[Any] | None = None) -> Device:
            key = Key.generate()
            cred = device_credential(issuer, key.did, kind=kind, groups=["room:x"])
            d = Device(key, cred, broker=broker.url, coordinator=ckey.did,
                       on_config=record.append if record is not None else None, auth_timeout=2)
            for _ in range(100):                              # the daemon may still be starting
                try:
                    await d.connect()
                    break
                except Exception:                            # noqa: BLE001
                    await d.aclose()
                    d = Device(key, cred, broker=broker.url, coordinator=ckey.did,
                               on_config=record.append if record is not None else None, auth_timeout=2)
                    await asyncio.sleep(0.1)
            stack.push_async_callback(d.aclose)
            return d

        try:
            display = await dev("display")
            records = [[] for _ in range(30)]
            phones = [await dev("phone", r) for r in records]
            await display.publish_event(screen_available(800, 600))
            db = data / "coordinator.db"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:                # kill -9 as soon as the commit is visible
                try:
                    n = sqlite3.connect(db).execute("SELECT COUNT(*) FROM desired").fetchone()[0]
                except sqlite3.Error:
                    n = 0
                if n:
                    break
                await asyncio.sleep(0.001)
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM desired").fetchone()[0] == 30
            proc = spawn()
            for p in phones:
                await p.wait_version(1, 30)
            await asyncio.sleep(0.3)
            assert all([c.version for c in r] == [1] for r in records)
        finally:
            proc.send_signal(signal.SIGINT)       # the embedded broker runs in this loop: do not block it
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def test_will_marks_device_offline_and_announcements_feed_rules(mesh: Mesh) -> None:
    from sdk.coord.coordinator import parse_rules

    rules = parse_rules([{
        "name": "banner", "event": "doorbell",
        "target": {"select": "capability", "capability": "ui.banner"},
        "config": {"ui.banner": "door {event.floor}"},
    }])
    coord = await mesh.start_coordinator(rules=rules)
    bell = await mesh.device("doorbell")
    got: list[Any] = []
    tv = await mesh.device("tv", record=got)
    await tv.announce(capabilities=["ui.banner"], attributes={"size_in": 55})
    await until(lambda: "ui.banner" in coord.registry.get(tv.did).view()["capabilities"])  # type: ignore[union-attr]
    assert coord.registry.get(tv.did).attributes == {"size_in": 55}  # type: ignore[union-attr]
    await bell.custom_event("doorbell", floor=2)
    await tv.wait_version(1, 10)
    assert got[0].changes == {"ui.banner": "door 2"}

    # an unclean disconnect: the broker publishes the pre-signed will, the coordinator notes it
    await tv.client.transport.abort()                    # noqa: SLF001 - drop TCP without DISCONNECT
    info = await mesh.wait_for("offline", lambda i: i["did"] == tv.did)
    assert info["reason"] == "connection_lost"
    assert coord.registry.get(tv.did).state == "offline"  # type: ignore[union-attr]


async def test_prometheus_endpoint(mesh: Mesh) -> None:
    import urllib.request

    from brokers.mosquitto import free_port

    port = free_port()
    await mesh.start_coordinator(metrics_port=port)
    await mesh.device("phone")
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    assert 'autoglm_coord_auth_total{result="admitted"} 1.0' in text
    assert "autoglm_coord_convergence_seconds_bucket" in text


async def test_coordinator_offline_then_online_same_boot(mesh: Mesh) -> None:
    """The coordinator's link drops (its will says offline) and comes back with the same boot."""
    from sdk.coord import protocol

    coord = await mesh.start_coordinator()
    display = await mesh.device("display")
    got: list[Any] = []
    phone = await mesh.device("phone", record=got)
    presence = protocol.coordinator_presence(protocol.token(coord.did))
    await coord.client.publish(presence, {"state": "offline", "boot": coord.boot}, type=protocol.PRESENCE,
                               retain=True, qos=1)
    await until(lambda: phone.state == "waiting" and display.state == "waiting")
    mesh.events.clear()
    await coord._announce()                                 # noqa: SLF001 - what a reconnect does
    for dev in (display, phone):
        await mesh.wait_for("admitted", lambda i, d=dev.did: i["did"] == d, timeout=10)
        await dev.wait_admitted(10)
    await display.publish_event(screen_available(800, 600))
    await phone.wait_version(1, 10)
    assert [c.version for c in got] == [1]


async def test_event_sent_while_coordinator_down_is_applied_once(mesh: Mesh, tmp_path: Path) -> None:
    """Coordinator stopped → the display's event waits in its outbox → a restarted coordinator
    (same data dir) gets it on re-admission and the phone applies the config exactly once."""
    from sdk.coord.device.outbox import read_journal

    coord = await mesh.start_coordinator()
    state_file = tmp_path / "display-state.json"
    display = await mesh.device("display", state_file=state_file)
    journal = display._outbox.path                          # noqa: SLF001
    assert journal is not None
    got: list[Any] = []
    phone = await mesh.device("phone", record=got)
    await coord.stop()
    await until(lambda: display.state == "waiting" and phone.state == "waiting")

    eid = await display.publish_event(screen_available(800, 600), wait_admitted=0.2)
    assert display.outbox == [eid]                          # queued, not lost, not raised
    assert [b["event_id"] for b in read_journal(journal)] == [eid]

    mesh.events.clear()
    await mesh.start_coordinator()                          # same key, same data dir, new boot
    await phone.wait_version(1, 15)
    await until(lambda: display.outbox == [])               # acknowledged
    assert read_journal(journal) == []
    await asyncio.sleep(0.3)                                # give duplicates a chance to show up
    assert [c.version for c in got] == [1]
    assert got[0].event_id == eid and got[0].state["ui.companion.resolution"] == "800x600"
    store = mesh.coordinator.store  # type: ignore[union-attr]
    assert store.latest_version(phone.did) == 1
    assert [i["event_id"] for w, i in mesh.events if w == "event"] == [eid]


async def test_redelivered_event_is_applied_once_across_restart(mesh: Mesh) -> None:
    """The same event delivered again after a restart (the broker's copy twice, then the device's
    re-send in a fresh envelope) is acknowledged as a duplicate and changes nothing."""
    from sdk.coord import protocol
    from sdk.messaging.broker_auth import did_credentials
    from sdk.messaging.transport import MqttTransport

    coord = await mesh.start_coordinator()
    display = await mesh.device("display")
    got: list[Any] = []
    phone = await mesh.device("phone", record=got)
    events_topic = protocol.device_events(protocol.token(display.did))
    wires: list[bytes] = []
    sniffer = MqttTransport(mesh.url, **did_credentials(Key.generate()))
    await sniffer.connect()
    mesh.stack.push_async_callback(sniffer.aclose)
    await sniffer.subscribe(events_topic, qos=1, handler=lambda t, p, **kw: wires.append(p))

    eid = await display.publish_event(screen_available(800, 600))
    await phone.wait_version(1, 10)
    await until(lambda: display.outbox == [] and len(wires) == 1)

    await coord.stop()                                      # its in-memory replay cache goes too
    mesh.events.clear()
    coord = await mesh.start_coordinator()
    for dev in (display, phone):
        await mesh.wait_for("admitted", lambda i, d=dev.did: i["did"] == d, timeout=15)
        await dev.wait_admitted(10)
    for _ in range(2):                                      # the same envelope, delivered twice
        await sniffer.publish(events_topic, wires[0], qos=1)
    display._outbox.add({**screen_available(800, 600).to_body(), "event_id": eid})  # noqa: SLF001 - re-send
    await display._drain()                                  # noqa: SLF001
    await until(lambda: sum(w == "duplicate" for w, _ in mesh.events) == 2 and display.outbox == [])
    await until(lambda: coord.client.stats.rejected["replayed"] >= 1)    # the second raw copy
    await asyncio.sleep(0.3)
    assert [c.version for c in got] == [1]
    assert coord.store.latest_version(phone.did) == 1       # type: ignore[union-attr]
    assert not any(w in ("event", "committed") for w, _ in mesh.events)
    assert coord.store.event_processed(display.did, eid)    # type: ignore[union-attr]


async def test_queued_event_survives_device_and_broker_restart(restartable_broker: Any,
                                                               tmp_path: Path) -> None:
    """Coordinator down, event queued in the device's state file, the device process and the broker
    restart (amqtt forgets every session), then the coordinator returns: applied exactly once."""
    async with AsyncExitStack() as stack:
        mesh = Mesh(restartable_broker.url, tmp_path / "coord", stack)
        coord = await mesh.start_coordinator()
        display_key = Key.generate()
        state_file = tmp_path / "display-state.json"
        display = await mesh.device("display", key=display_key, connect=False, state_file=state_file)
        await display.connect()
        got: list[Any] = []
        phone = await mesh.device("phone", record=got)
        await coord.stop()
        await until(lambda: display.state == "waiting")
        eid = await display.publish_event(screen_available(800, 600), wait_admitted=0.2)
        await display.aclose()                              # the device process ends, event queued on disk

        await restartable_broker.restart()
        mesh.events.clear()
        coord = await mesh.start_coordinator()
        stack.push_async_callback(coord.stop)
        display2 = await mesh.device("display", key=display_key, state_file=state_file)
        await phone.wait_version(1, 30)
        await until(lambda: display2.outbox == [], timeout=20)
        await asyncio.sleep(0.3)
        assert [c.version for c in got] == [1] and got[0].event_id == eid
        assert coord.store.latest_version(phone.did) == 1   # type: ignore[union-attr]
