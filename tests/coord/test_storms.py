"""Admission under storms: bounded handshakes in flight, busy → retried, none lost, resumption
after a broker restart (no presentation signed per device), all converged."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from sdk.coord.backpressure import busy_delay, busy_message, retry_after
from sdk.coord.coordinator import Coordinator, parse_rules
from sdk.coord.coordinator.admission import AdmissionControl
from sdk.coord.device import Device, DeviceState
from sdk.coord.events import screen_available
from sdk.identity import Key, TrustPolicy
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
    for i in range(50):                      # 50 admissions in one second
        clock.now += 0.02
        ac.finish(f"did:{i}")
    assert ac.rate() == pytest.approx(51, rel=0.05)
    assert all(ac.begin(f"did:more{i}") for i in range(50))     # full again
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
    """Everyone at once against a bound of 4: refused hellos come back, all admitted, none lost."""
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
                         coordinator=ckey.did, heartbeat_ttl=600, auth_timeout=30, renew_after=None)
            stack.push_async_callback(dev.aclose)
            devices.append(dev)
        await asyncio.gather(*(d.connect() for d in devices))
        ac = coord.admission
        assert all(d.state is DeviceState.ADMITTED for d in devices)
        assert ac.finished == n and ac.inflight == 0 and ac.peak <= bound
        assert ac.busy > 0 and sum(d.busy_retries for d in devices) == ac.busy
