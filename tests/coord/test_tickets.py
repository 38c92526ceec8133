"""Resumption tickets that outlive the coordinator instance that issued them, and their renewal.

A ticket's digest and expiry are kept with the device's record (the row admission writes, before
the reply), so a coordinator restarted on the same store (or a standby promoted over a shared
one) re-admits the device by ticket: one round trip, no presentation signed by the coordinator.
A coordinator on an EMPTY store announces another deployment and devices do not try their ticket.
An admitted device renews its ticket before it expires (``coord.ticket``), bounded per device.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from sdk.coord.coordinator import Coordinator
from sdk.coord.coordinator.auth import RESUME_TTL, TICKET_RENEW_INTERVAL, Challenges, ticket_digest
from sdk.coord.coordinator.errors import AdmissionError
from sdk.coord.coordinator.store import Store
from sdk.coord.device import Device, DeviceState
from sdk.identity import Key, TrustPolicy
from tests.fixtures.waiting import until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------- Challenges.restore


def test_a_restored_ticket_is_accepted_once_from_its_did_until_it_expires() -> None:
    clock = Clock(1000.0)
    ch = Challenges(clock=clock)
    ticket = "t" * 24
    assert ch.restore("did:a", ticket_digest(ticket), expires=5000.0 + 60, now=5000.0)
    assert not ch.restore("did:b", ticket_digest("x" * 24), expires=4999.0, now=5000.0)   # expired already
    with pytest.raises(AdmissionError) as err:
        ch.consume("u" * 24, "did:a")              # another value: the digest does not match
    assert err.value.reason == "wrong_challenge"
    with pytest.raises(AdmissionError):
        ch.consume(ticket, "did:b")                # not the DID it was issued to
    ch.consume(ticket, "did:a")
    assert ch.restored_used == 1 and ch.restored == 0
    with pytest.raises(AdmissionError):
        ch.consume(ticket, "did:a")                # single use

    ch.restore("did:c", ticket_digest(ticket), expires=5000.0 + 60, now=5000.0)
    clock.now += 61                                # past its remaining lifetime (monotonic)
    with pytest.raises(AdmissionError):
        ch.consume(ticket, "did:c")
    ch.restore("did:d", ticket_digest(ticket), expires=5000.0 + 60, now=5000.0)
    ch.forget_restored("did:d")                    # the record got a newer ticket
    with pytest.raises(AdmissionError):
        ch.consume(ticket, "did:d")


# ---------------------------------------------------------------------------- restart on one store


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


def _auth(coord: Coordinator) -> dict[str, float]:
    return {s.labels["result"]: s.value for m in coord.metrics.auth.collect() for s in m.samples
            if s.name.endswith("_total")}


def _stored_ticket(data_dir: Path, did: str) -> Any:
    store = Store(data_dir / "coordinator.db")
    try:
        return next(r for r in store.load_devices() if r["did"] == did).get("ticket")
    finally:
        store.close()


class Fleet:
    def __init__(self, broker: str, tmp: Path, stack: AsyncExitStack) -> None:
        self.broker, self.tmp, self.stack = broker, tmp, stack
        self.key, self.issuer = Key.generate(), Key.generate()

    async def coordinator(self, data: str = "coord", **kw: Any) -> Coordinator:
        coord = Coordinator(self.key, broker=self.broker, data_dir=self.tmp / data, trust=TrustPolicy({}),
                            issuer=self.issuer, **kw)
        await coord.start()
        self.stack.push_async_callback(coord.stop)
        return coord

    async def device(self, coord: Coordinator, **kw: Any) -> Device:
        key = Key.generate()
        cred = coord.issue_device_credential(key.did, kind="phone", groups=["room:t"])
        dev = Device(key, cred, broker=self.broker, coordinator=self.key.did, renew_after=None, **kw)
        self.stack.push_async_callback(dev.aclose)
        await dev.connect()
        return dev


async def test_a_restarted_coordinator_on_the_same_store_re_admits_by_ticket_once(
        embedded_broker: Any, tmp_path: Path, stack: AsyncExitStack) -> None:
    fleet = Fleet(embedded_broker.url, tmp_path, stack)
    first = await fleet.coordinator()
    dev = await fleet.device(first)
    assert dev.admission is not None and first.deployment is not None
    old_ticket = dev._ticket
    assert old_ticket is not None and old_ticket[1] == first.deployment
    # the record holds the ticket's digest and expiry (never the ticket)
    row = _stored_ticket(tmp_path / "coord", dev.did)
    assert row["digest"] == ticket_digest(old_ticket[0]) and row["expires"] > time.time() + RESUME_TTL - 60
    assert old_ticket[0] not in (tmp_path / "coord" / "coordinator.db").read_bytes().decode("latin-1")

    # re-admitted by that ticket with the same instance: the record now holds the next one
    await dev.authenticate()
    assert first.admission.resumed == 1
    used, current = old_ticket[0], dev._ticket
    assert current is not None and _stored_ticket(tmp_path / "coord", dev.did)["digest"] == ticket_digest(current[0])
    await first.stop()

    second = await fleet.coordinator()             # a new boot over the same store: the same deployment
    assert second.deployment == first.deployment and second.boot != first.boot
    assert second.challenges.restored == 1
    await until(lambda: dev.admission is not None and dev.admission.boot == second.boot, 15, what="re-admitted")
    assert second.admission.resumed == 1 and second.admission.signed == 0
    assert second.challenges.restored_used == 1
    auth = _auth(second)
    assert auth.get("resumed") == 1 and "wrong_challenge" not in auth, auth
    # the ticket used on the first instance before the restart is not good on the second
    with pytest.raises(AdmissionError) as err:
        await dev._present(used)
    assert err.value.reason == "wrong_challenge"
    assert dev.state is DeviceState.ADMITTED


async def test_a_coordinator_on_an_empty_store_is_another_deployment_and_no_ticket_is_tried(
        embedded_broker: Any, tmp_path: Path, stack: AsyncExitStack) -> None:
    fleet = Fleet(embedded_broker.url, tmp_path, stack)
    first = await fleet.coordinator("a")
    dev = await fleet.device(first)
    await first.stop()
    second = await fleet.coordinator("b")          # same identity, empty store
    assert second.deployment != first.deployment
    await until(lambda: dev.admission is not None and dev.admission.boot == second.boot, 15, what="re-admitted")
    auth = _auth(second)
    assert auth.get("admitted") == 1 and "wrong_challenge" not in auth and "resumed" not in auth, auth
    assert second.admission.resumed == 0


# ---------------------------------------------------------------------------- renewal


async def test_an_admitted_device_renews_its_ticket_so_it_resumes_past_the_first_ones_lifetime(
        embedded_broker: Any, tmp_path: Path, stack: AsyncExitStack) -> None:
    """Time injected on both sides (the device's and the coordinator's clocks), not slept."""
    fleet = Fleet(embedded_broker.url, tmp_path, stack)
    coord = await fleet.coordinator()
    mono, wall = Clock(time.monotonic()), Clock(time.time())
    coord.challenges.clock, coord.ticket_clock = mono, wall
    dev = await fleet.device(coord, heartbeat_ttl=0.3)
    dev_clock = Clock(time.monotonic())             # the ticket's renewal time was taken on this scale
    dev.clock = dev_clock
    first = dev._ticket
    assert first is not None and not dev.ticket_due()

    # too soon: the coordinator bounds renewals per device (one per TICKET_RENEW_INTERVAL)
    assert not await dev.renew_ticket()
    assert _auth(coord).get("ticket_too_soon") == 1 and dev._ticket == first

    # 50-70 % of the way to expiry (spread per ticket) the heartbeat asks for a fresh one
    for clock in (mono, wall, dev_clock):
        clock.now += RESUME_TTL * 0.72
    assert dev.ticket_due()
    await until(lambda: dev.tickets_renewed == 1, 10, what="the ticket renewed by the heartbeat")
    renewed = dev._ticket
    assert renewed is not None and renewed[0] != first[0] and not dev.ticket_due()
    assert _stored_ticket(tmp_path / "coord", dev.did)["digest"] == ticket_digest(renewed[0])
    assert _auth(coord).get("ticket_renewed") == 1

    # past the first ticket's lifetime: it is refused, the renewed one re-admits by ticket
    for clock in (mono, wall):
        clock.now += RESUME_TTL * 0.3
    with pytest.raises(AdmissionError):
        await dev._present(first[0])
    resumed = coord.admission.resumed
    await dev.authenticate()
    assert coord.admission.resumed == resumed + 1 and dev.state is DeviceState.ADMITTED


async def test_only_an_admitted_device_gets_a_ticket(embedded_broker: Any, tmp_path: Path,
                                                     stack: AsyncExitStack) -> None:
    from sdk.coord import protocol
    from sdk.messaging import SecureClient
    from sdk.messaging.errors import RemoteError

    fleet = Fleet(embedded_broker.url, tmp_path, stack)
    coord = await fleet.coordinator()
    stranger = Key.generate()
    async with SecureClient(embedded_broker.url, stranger) as client:
        with pytest.raises(RemoteError) as err:
            await client.request(protocol.device_commands(protocol.token(coord.did)), {}, type=protocol.TICKET,
                                 timeout=5)
    assert err.value.reason == "not_admitted"
    assert TICKET_RENEW_INTERVAL < RESUME_TTL / 2    # a device renewing at half-life is never refused


async def test_a_resumption_refused_busy_keeps_its_ticket_for_the_retry(
        embedded_broker: Any, tmp_path: Path, stack: AsyncExitStack, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = Fleet(embedded_broker.url, tmp_path, stack)
    coord = await fleet.coordinator()
    dev = await fleet.device(coord)
    ticket = dev._ticket
    assert ticket is not None
    real_present = dev._present
    tried: list[str] = []

    async def busy_once(challenge: str) -> Any:
        tried.append(challenge)
        if len(tried) == 1:         # as the client answers past max_serving, before any admission check
            raise AdmissionError("too many requests in progress", reason="busy")
        return await real_present(challenge)

    monkeypatch.setattr(dev, "_present", busy_once)
    signed, resumed = coord.admission.signed, coord.admission.resumed
    with pytest.raises(AdmissionError) as err:
        await dev.authenticate()
    assert err.value.reason == "busy" and dev._ticket == ticket     # kept for the retry
    await dev.authenticate()        # what connect() and the re-authentication loop do after busy
    assert tried == [ticket[0], ticket[0]]          # the same ticket, twice: no hello in between
    assert coord.admission.resumed == resumed + 1 and coord.admission.signed == signed
    assert dev.state is DeviceState.ADMITTED and dev._ticket is not None and dev._ticket != ticket
