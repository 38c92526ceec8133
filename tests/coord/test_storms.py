"""Admission under storms: bounded handshakes in flight, busy → retried, none lost, resumption
after a broker restart (no presentation signed per device), all converged."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from sdk.coord import protocol
from sdk.coord.backpressure import busy_delay, busy_message, retry_after
from sdk.coord.coordinator import Coordinator, parse_rules
from sdk.coord.coordinator.admission import AdmissionControl, WriteBatch
from sdk.coord.coordinator.auth import device_credential, present
from sdk.coord.coordinator.errors import AdmissionError, StoreError
from sdk.coord.device import Device, DeviceState
from sdk.coord.events import screen_available
from sdk.identity import Key, TrustPolicy
from sdk.messaging.envelope import Message
from tests.fixtures.waiting import until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]

RULES = [{
    "name": "companion", "event": "screen_available", "when": {"sender.kind": "display"},
    "target": {"select": "group", "group_prefix": "room:", "where": {"device.kind": "phone"}},
    "config": {"ui.companion.width": "{event.width}"},
}]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_admission_control_bounds_and_releases() -> None:
    clock = Clock()
    ac = AdmissionControl(3, slot_ttl=5.0, clock=clock)
    assert all(ac.begin(f"did:{i}") for i in range(3))
    assert ac.begin("did:1")                 # a repeated hello renews its own slot
    assert not ac.begin("did:9") and ac.busy == 1
    assert ac.inflight == 3 and ac.peak == 3
    assert ac.finish("did:0") and not ac.finish("did:0")
    assert ac.begin("did:9")
    clock.now += 5.1                         # the rest never sent their present
    assert ac.inflight == 0 and ac.expired == 3
    assert ac.snapshot()["peak"] == 3


def test_fresh_dids_cannot_take_every_slot() -> None:
    ac = AdmissionControl(8, unknown_share=0.5)
    assert all(ac.begin(f"did:flood{i}", known=False) for i in range(4))
    assert not ac.begin("did:flood-more", known=False)          # the unknown half is full
    assert all(ac.begin(f"did:fleet{i}") for i in range(4))     # the fleet's own devices get in
    assert not ac.begin("did:fleet-more")
    ac.finish("did:flood0")
    assert ac.begin("did:flood-more", known=False)


def test_retry_after_follows_the_admission_rate() -> None:
    clock = Clock()
    ac = AdmissionControl(100, clock=clock)
    for i in range(100):
        ac.begin(f"did:{i}")
    for i in range(50):                      # 50 admissions in one second: a cold start, the
        clock.now += 0.02                    # assumed 100 a second is the least rate for now
        ac.finish(f"did:{i}")
    assert ac.rate() == pytest.approx(ac.ASSUMED_RATE)
    for i in range(50, 100):                 # 50 a second for a whole window: measured
        clock.now += 0.02
        ac.finish(f"did:{i}")
    clock.now += 0.05
    assert ac.rate() == pytest.approx(50, rel=0.05)
    assert all(ac.begin(f"did:more{i}") for i in range(100))    # full again
    for i in range(50):                      # 50 refused: the later ones are sent further out
        assert not ac.begin(f"did:late{i}")
    assert 0.9 < ac.retry_after() < 1.1      # about 50 refused / 50 a second
    clock.now += 60                          # an idle minute: old rate, refusals and slots are gone
    assert ac.rate() is None and ac.retry_after() == 0.05 and ac.inflight == 0
    assert all(ac.begin(f"did:burst{i}") for i in range(50))
    for i in range(50):
        ac.finish(f"did:burst{i}")           # a burst: the rate is high, the hint short
    assert ac.rate() == pytest.approx(50 / 0.05) and ac.retry_after() == 0.05
    with pytest.raises(ValueError):
        AdmissionControl(0)


def test_a_coordinator_ramping_up_is_judged_by_its_last_half_second() -> None:
    clock = Clock()
    ac = AdmissionControl(200, clock=clock)
    for i in range(200):
        ac.begin(f"did:{i}")
    for i in range(4):                       # a cold start: four handshakes in the first 1.5 s ...
        clock.now += 0.375
        ac.finish(f"did:{i}")
    assert ac.rate() == ac.ASSUMED_RATE      # (3.6 a second measured: not trusted yet)
    for i in range(4, 104):                  # ... then 100 in the next 0.4 s (250 a second)
        clock.now += 0.004
        ac.finish(f"did:{i}")
    # over the whole 2 s window that is 104 / 1.9 s (about 55 a second): the hint would send the
    # 100 refused devices away for about 1.8 s instead of 0.4 s
    assert ac.rate() == pytest.approx(100 / 0.5, rel=0.05)
    assert all(ac.begin(f"did:more{i}") for i in range(104))     # full again
    for i in range(100):
        assert not ac.begin(f"did:late{i}")
    assert 0.4 < ac.retry_after() < 0.6
    clock.now += 0.6                         # nothing finished in the last half second: the 2 s
    assert ac.rate() == pytest.approx(103 / 1.75, rel=0.05)         # window it is (the first left it)


def test_busy_hint_round_trip_and_jitter() -> None:
    text = f"did:x answered with an error: busy: {busy_message(0.4)}"
    assert retry_after(text) == pytest.approx(0.4)
    assert retry_after("busy: too many requests in progress") is None
    assert retry_after(busy_message(1e9)) == 30.0
    assert busy_delay(text, fallback=9, rng=lambda: 0.0) == pytest.approx(0.2)
    assert busy_delay(text, fallback=9, rng=lambda: 0.999) == pytest.approx(0.5996)
    assert busy_delay("busy", fallback=1.0, rng=lambda: 0.5) == 1.0


async def test_storm_after_broker_restart(restartable_broker: Any, tmp_path: Path) -> None:
    """N devices connect at once against a small in-flight bound (busy → retried, none lost), get a
    config, then the broker restarts: all re-admitted by resumption ticket and converged again."""
    if restartable_broker.kind == "embedded":
        # amqtt's Broker._run_broadcast iterates its sessions while clients (re)connect and drops
        # that broadcast (RuntimeError: dictionary changed size during iteration): under a storm
        # it loses messages, so this runs on Mosquitto
        pytest.skip("amqtt drops broadcasts while sessions change (a reconnect storm loses messages)")
    n = 200
    bound = 8
    issuer, ckey = Key.generate(), Key.generate()
    coord = Coordinator(ckey, broker=restartable_broker.url, data_dir=tmp_path / "coord", trust=TrustPolicy({}),
                        issuer=issuer, rules=parse_rules(RULES), heartbeat_ttl=600, max_admissions=bound)
    converged: list[dict[str, Any]] = []
    admitted: list[str] = []
    coord.add_listener(lambda what, info: converged.append(info) if what == "converged" else
                       admitted.append(info["did"]) if what == "admitted" else None)
    async with AsyncExitStack() as stack:
        await coord.start()
        stack.push_async_callback(coord.stop)
        applied: dict[str, int] = {}

        def make(kind: str) -> Device:
            key = Key.generate()
            cred = coord.issue_device_credential(key.did, kind=kind, groups=["room:storm"])

            def on_config(cfg: Any, did: str = key.did) -> None:
                applied[did] = cfg.version

            dev = Device(key, cred, broker=restartable_broker.url, coordinator=ckey.did, heartbeat_ttl=600,
                         auth_timeout=30, renew_after=None, on_config=on_config)
            stack.push_async_callback(dev.aclose)
            return dev

        phones = [make("phone") for _ in range(n)]
        await asyncio.gather(*(d.connect() for d in phones))         # the first storm: all at once
        ac = coord.admission
        assert all(d.state is DeviceState.ADMITTED for d in phones)
        assert len(set(admitted)) == n                                 # none lost
        assert ac.peak <= bound                                        # bounded in flight, at any time
        assert ac.busy > 0 and sum(d.busy_retries for d in phones) == ac.busy   # busy → retried
        assert ac.inflight == 0

        display = make("display")
        await display.connect()
        await display.publish_event(screen_available(800, 600))
        await until(lambda: sum(1 for v in applied.values() if v >= 1) == n, timeout=60, what="first config")
        await until(lambda: any(c.get("targets") == n for c in converged), timeout=30, what="converged")

        signed, resumed, busy = ac.signed, ac.resumed, ac.busy
        admitted.clear()
        converged.clear()
        await restartable_broker.restart()                             # the second storm
        everyone = [*phones, display]
        await until(lambda: len(set(admitted)) == n + 1, timeout=120, what="all re-admitted")
        await until(lambda: all(d.state is DeviceState.ADMITTED for d in everyone), timeout=30)
        # by resumption ticket, no presentation signed; only a device whose resumed request was lost
        # in the restart (the coordinator not yet subscribed again) falls back to a full handshake
        by_ticket = ac.resumed - resumed
        assert by_ticket >= 0.9 * (n + 1)
        assert ac.signed - signed == n + 1 - by_ticket
        assert ac.busy == busy and ac.peak <= bound

        await display.publish_event(screen_available(1024, 768))       # converged after the storm
        await until(lambda: all(applied.get(d.did) == 2 for d in phones), timeout=60, what="second config")
        await until(lambda: any(c.get("targets") == n for c in converged), timeout=30, what="converged")


async def test_connect_storm_is_bounded(broker: Any, tmp_path: Path) -> None:
    """Everyone at once against a bound of 4: refused hellos come back, all admitted, none lost
    (hello first: a handshake holds its slot from the hello to the present)."""
    n, bound = 40, 4
    issuer, ckey = Key.generate(), Key.generate()
    coord = Coordinator(ckey, broker=broker.url, data_dir=tmp_path / "coord", trust=TrustPolicy({}),
                        issuer=issuer, heartbeat_ttl=600, max_admissions=bound)
    async with AsyncExitStack() as stack:
        await coord.start()
        stack.push_async_callback(coord.stop)
        devices = []
        for _ in range(n):
            key = Key.generate()
            dev = Device(key, coord.issue_device_credential(key.did, kind="phone"), broker=broker.url,
                         coordinator=ckey.did, heartbeat_ttl=600, auth_timeout=30, renew_after=None,
                         direct_admission=False)
            stack.push_async_callback(dev.aclose)
            devices.append(dev)
        await asyncio.gather(*(d.connect() for d in devices))
        ac = coord.admission
        assert all(d.state is DeviceState.ADMITTED for d in devices)
        assert ac.finished == n and ac.inflight == 0 and ac.peak <= bound
        assert ac.busy > 0 and sum(d.busy_retries for d in devices) == ac.busy


# ---------------------------------------------------------------------------- batched admission writes


@pytest.fixture
def offline_coord(tmp_path: Path) -> Any:
    """A coordinator with its store open and no broker: presents are handed to it directly (real
    credentials, real presentations, real SQLite)."""
    coord = Coordinator(Key.generate(), broker="mqtt://127.0.0.1:1", data_dir=tmp_path, trust=TrustPolicy({}),
                        issuer=Key.generate(), heartbeat_ttl=600)
    coord.store = coord._open_store()
    yield coord
    if coord.store is not None:
        coord.store.close()


def _present_message(coord: Coordinator, key: Key, credential: Any, **extra: Any) -> Message:
    challenge = coord.challenges.issue(key.did)
    body = {"challenge": challenge, "vp": present(credential, key, challenge=challenge, domain=coord.did),
            "last_version": 0, **extra}
    return Message(topic=protocol.device_commands(protocol.token(coord.did)), sender=key.did,
                   kid=f"{key.did}#{key.did.removeprefix('did:key:')}", type=protocol.PRESENT,
                   id=f"m-{time.monotonic_ns()}", body=body, issued_at=time.time())


def _stored(path: Path) -> set[str]:
    """DIDs in the store file, read over a connection of its own (what survives a crash now)."""
    with sqlite3.connect(path) as db:
        return {did for (did,) in db.execute("SELECT did FROM devices")}


async def test_admissions_of_one_loop_turn_are_one_transaction_written_before_any_reply(
        offline_coord: Coordinator, tmp_path: Path) -> None:
    coord = offline_coord
    assert coord.issuer is not None and coord.store is not None
    keys = [Key.generate() for _ in range(40)]
    messages = [_present_message(coord, k, device_credential(coord.issuer, k.did, kind="phone", groups=["room:a"]))
                for k in keys]
    transactions: list[int] = []
    save = coord.store.save_devices

    def counted(rows: Any) -> None:
        rows = list(rows)
        transactions.append(len(rows))
        save(rows)

    coord.store.save_devices = counted          # type: ignore[method-assign]
    seen_at_reply: dict[str, bool] = {}

    async def admit(msg: Message) -> None:
        reply = await coord._present(msg)
        assert reply["session"]
        seen_at_reply[msg.sender] = msg.sender in _stored(tmp_path / "coordinator.db")

    await asyncio.gather(*(admit(m) for m in messages))
    assert transactions == [40]                                    # one commit for the 40
    assert seen_at_reply == {k.did: True for k in keys}            # each durable before its reply
    assert all(coord.registry.get(k.did).admitted for k in keys)   # type: ignore[union-attr]
    assert coord.device_writes.batches == 1 and coord.device_writes.largest == 40


async def test_a_crash_between_batch_and_flush_answers_no_one_and_loses_nothing(
        offline_coord: Coordinator, tmp_path: Path) -> None:
    coord = offline_coord
    assert coord.issuer is not None and coord.store is not None
    keys = [Key.generate() for _ in range(10)]
    creds = {k.did: device_credential(coord.issuer, k.did, kind="phone") for k in keys}
    tasks = [asyncio.ensure_future(coord._present(_present_message(coord, k, creds[k.did]))) for k in keys]
    await asyncio.sleep(0)              # each present runs up to its write; the flush is the next turn's
    assert len(coord.device_writes) == 10                         # every row waits in the batch
    assert coord.device_writes.discard() == 10                    # the process dies before the flush
    coord.store.close()
    coord.store = None
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(d, asyncio.CancelledError) for d in done)   # nobody was told "admitted"
    assert not any(coord.registry.get(k.did) for k in keys)
    assert _stored(tmp_path / "coordinator.db") == set()         # and nothing half-written

    again = Coordinator(coord.key, broker="mqtt://127.0.0.1:1", data_dir=tmp_path, trust=TrustPolicy({}),
                        issuer=coord.issuer, heartbeat_ttl=600)
    again.store = again._open_store()
    try:
        for k in keys:                                            # the devices come back: all admitted
            await again._present(_present_message(again, k, creds[k.did]))
        assert _stored(tmp_path / "coordinator.db") == {k.did for k in keys}
    finally:
        again.store.close()


async def test_a_failed_batch_refuses_every_admission_in_it_busy(offline_coord: Coordinator) -> None:
    coord = offline_coord
    assert coord.issuer is not None and coord.store is not None
    keys = [Key.generate() for _ in range(5)]
    creds = {k.did: device_credential(coord.issuer, k.did, kind="phone") for k in keys}
    coord.store.close()                                           # every write now fails
    results = await asyncio.gather(*(coord._present(_present_message(coord, k, creds[k.did])) for k in keys),
                                   return_exceptions=True)
    assert all(isinstance(r, AdmissionError) and r.reason == "busy" for r in results)
    assert not any(coord.registry.get(k.did) for k in keys)       # nobody admitted without a record
    coord.store = coord._open_store()
    for k in keys:                                                # a retry is admitted
        assert (await coord._present(_present_message(coord, k, creds[k.did])))["session"]


async def test_write_batch_waiters_share_one_flush_and_a_cancelled_one_leaves_it() -> None:
    flushed: list[list[int]] = []
    batch: WriteBatch[int] = WriteBatch(flushed.append, max_rows=3)
    first = [asyncio.ensure_future(batch.write(i)) for i in range(5)]
    await asyncio.sleep(0)
    first[3].cancel()                                             # the second batch still goes
    await asyncio.gather(*first, return_exceptions=True)
    assert flushed == [[0, 1, 2], [3, 4]] and batch.batches == 2 and batch.rows == 5

    def broken(rows: list[int]) -> None:
        raise StoreError("disk full")

    bad: WriteBatch[int] = WriteBatch(broken)
    results = await asyncio.gather(*(bad.write(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results) and bad.batches == 0


async def test_a_credential_revoked_while_its_row_is_written_is_refused_and_stays_revoked(
        offline_coord: Coordinator, tmp_path: Path) -> None:
    coord = offline_coord
    assert coord.issuer is not None and coord.store is not None
    key = Key.generate()
    cred = device_credential(coord.issuer, key.did, kind="phone")
    await coord._present(_present_message(coord, key, cred))       # admitted once
    pending = asyncio.ensure_future(coord._present(_present_message(coord, key, cred, capabilities=["cam"])))
    await asyncio.sleep(0)              # the re-admission waits for its batch to be written
    assert len(coord.device_writes) == 1
    coord.registry.revoke(key.did, [cred["id"]])                   # a status-list update lands meanwhile
    with pytest.raises(AdmissionError) as err:
        await pending
    assert err.value.reason == "revoked"
    assert coord.registry.get(key.did).state == "revoked"          # type: ignore[union-attr]
    with sqlite3.connect(tmp_path / "coordinator.db") as db:
        (record,) = db.execute("SELECT record FROM devices WHERE did = ?", (key.did,)).fetchone()
    assert '"state":"revoked"' in record                           # the batch's row did not win
