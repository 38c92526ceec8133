"""Renewal before expiry (the device never loses admission) and key rotation, on real brokers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from sdk.coord.coordinator import Coordinator, operator_credential
from sdk.coord.coordinator.registry import REVOKED
from sdk.coord.device import Device, DeviceState
from sdk.coord.device.enrollment import EnrollmentError, enroll, rotate_key
from sdk.coord.events import screen_available
from sdk.coord.operator import OperatorClient
from sdk.identity import Key, TrustPolicy, load_credential
from tests.fixtures.waiting import until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


def _until(cred: dict[str, Any]) -> float:
    return datetime.fromisoformat(cred["validUntil"].replace("Z", "+00:00")).timestamp()


class Site:
    def __init__(self, url: str, data_dir: Path, stack: AsyncExitStack) -> None:
        self.url, self.data_dir, self.stack = url, data_dir, stack
        self.issuer, self.coord_key, self.admin_key = Key.generate(), Key.generate(), Key.generate()
        self.coordinator: Coordinator | None = None
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def start(self) -> Coordinator:
        coord = Coordinator(self.coord_key, broker=self.url, data_dir=self.data_dir, trust=TrustPolicy({}),
                            issuer=self.issuer)
        coord.add_listener(lambda what, info: self.events.append((what, info)))
        await coord.start()
        self.coordinator = coord
        return coord

    async def admin(self) -> OperatorClient:
        cred = operator_credential(self.issuer, self.admin_key.did, roles=("admin",))
        op = OperatorClient(self.url, self.admin_key, cred, coordinator=self.coord_key.did, timeout=10.0)
        await op.connect()
        self.stack.push_async_callback(op.aclose)
        return op

    async def enrolled(self, kind: str, *, valid_for: float, groups: tuple[str, ...] = ("room:a",),
                       key: Key | None = None) -> tuple[Key, dict[str, Any]]:
        admin = await self.admin()
        token = (await admin.token(kind=kind, groups=groups, valid_for=valid_for))["token"]
        key = key or Key.generate()
        cred = await enroll(key, broker=self.url, coordinator=self.coord_key.did, token=token,
                            trust=TrustPolicy({self.issuer.did: {"DeviceCredential"}}))
        return key, cred

    async def device(self, key: Key, credential: dict[str, Any], **kwargs: Any) -> Device:
        dev = Device(key, credential, broker=self.url, coordinator=self.coord_key.did, **kwargs)
        await dev.connect()
        self.stack.push_async_callback(dev.aclose)
        return dev


@pytest.fixture
async def site(broker: Any, tmp_path: Path) -> AsyncIterator[Site]:
    async with AsyncExitStack() as stack:
        s = Site(broker.url, tmp_path / "coord", stack)
        yield s
        if s.coordinator is not None:
            await s.coordinator.stop()


async def test_renewal_before_expiry_never_loses_admission(site: Site, tmp_path: Path) -> None:
    coord = await site.start()
    key, first = await site.enrolled("phone", valid_for=6)
    assert _until(first) - time.time() <= 6.5
    path = tmp_path / "phone-vc.json"
    phone = await site.device(key, first, credential_file=path)      # renewal is on by default (2/3)
    assert phone.renewal is not None and phone.renewal.renew_after == pytest.approx(2 / 3)
    lapses: list[tuple[float, str]] = []

    async def watch() -> None:                       # every 5 ms: was the device ever not admitted?
        while True:
            if not phone.admitted:
                lapses.append((time.time(), str(phone.state)))
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    try:
        # two renewals: at ~4 s and ~8 s, each before the credential in use runs out
        await until(lambda: phone.renewal is not None and phone.renewal.renewed >= 2, timeout=20,
                    what="two renewals")
        assert time.time() > _until(first) + 1           # the first credential is long expired
    finally:
        watcher.cancel()
    assert lapses == []
    assert not [i for w, i in site.events if w == "session_ended"]
    renewed = phone.credential
    assert isinstance(renewed, dict) and renewed is not first and _until(renewed) > _until(first)
    # the same status index: revocation by DID still covers the renewed credential
    assert renewed["credentialStatus"] == first["credentialStatus"]
    assert load_credential(path) == renewed
    rec = coord.registry.get(key.did)
    assert rec is not None and rec.admitted and rec.session is not None
    assert rec.session.valid_until == pytest.approx(_until(renewed))
    await phone.publish_event(screen_available(640, 480))   # still fully admitted
    await until(lambda: any(w == "event" and i["did"] == key.did for w, i in site.events))
    # revoking the DID covers the renewed credential (same index)
    admin = await site.admin()
    result = await admin.revoke(key.did, reason="decommissioned")
    assert result["revoked"] == [int(first["credentialStatus"]["statusListIndex"])]
    await until(lambda: phone.state is DeviceState.REVOKED, timeout=1.0, what="revoked notice")


async def test_renewal_refused_for_another_issuers_credential(site: Site) -> None:
    from sdk.coord.coordinator.auth import device_credential

    other_issuer = Key.generate()
    coord = Coordinator(site.coord_key, broker=site.url, data_dir=site.data_dir,
                        trust=TrustPolicy({other_issuer.did: {"DeviceCredential"}}), issuer=site.issuer)
    await coord.start()
    site.coordinator = coord
    key = Key.generate()
    foreign = device_credential(other_issuer, key.did, kind="phone", valid_for=600)
    phone = await site.device(key, foreign, renew_after=0.5,
                              trust=TrustPolicy({site.issuer.did: {"CoordinatorCredential"}}))
    assert phone.admitted and phone.renewal is not None
    with pytest.raises(EnrollmentError) as info:
        await phone.renewal.renew_once()
    assert info.value.reason == "not_issuer" and phone.admitted


async def test_renewal_refused_for_an_unadmitted_device(site: Site) -> None:
    await site.start()
    key, cred = await site.enrolled("phone", valid_for=600)
    phone = await site.device(key, cred, renew_after=0.5)
    assert phone.renewal is not None
    stranger = Device(Key.generate(), cred, broker=site.url, coordinator=site.coord_key.did, renew_after=0.5)
    await stranger.connect(authenticate=False)
    site.stack.push_async_callback(stranger.aclose)
    assert stranger.renewal is not None
    with pytest.raises(EnrollmentError) as info:
        await stranger.renewal.renew_once()
    assert info.value.reason == "not_admitted"
    renewed = await phone.renewal.renew_once()           # on demand, admitted: works
    assert renewed["credentialStatus"] == cred["credentialStatus"] and phone.admitted


async def test_key_rotation_moves_the_credential_and_revokes_the_old_did(site: Site) -> None:
    coord = await site.start()
    old_key, cred = await site.enrolled("tablet", valid_for=600, groups=("room:b",))
    old = await site.device(old_key, cred)
    assert old.admitted
    new_key = Key.generate()
    fresh = await old.rotate_key(new_key)                    # the old key proves the hand-over
    subject = fresh["credentialSubject"]
    assert subject["id"] == new_key.did and subject["kind"] == "tablet" and subject["groups"] == ["room:b"]
    assert fresh["credentialStatus"]["statusListIndex"] != cred["credentialStatus"]["statusListIndex"]
    await until(lambda: old.state is DeviceState.REVOKED, timeout=5, what="old DID revoked")
    rec = coord.registry.get(old_key.did)
    assert rec is not None and rec.state == REVOKED
    new = await site.device(new_key, fresh)
    assert new.admitted

    # an old DID the coordinator never admitted is refused; so is rotating a revoked DID
    with pytest.raises(EnrollmentError) as info:
        await rotate_key(Key.generate(), Key.generate(), broker=site.url, coordinator=site.coord_key.did)
    assert info.value.reason == "not_found"
    with pytest.raises(EnrollmentError) as info:
        await rotate_key(old_key, Key.generate(), broker=site.url, coordinator=site.coord_key.did)
    assert info.value.reason == "revoked"


async def test_renewal_stops_once_when_the_coordinator_cannot_renew(site: Site) -> None:
    from sdk.coord.coordinator.auth import coordinator_credential, device_credential

    issuer = Key.generate()
    coord = Coordinator(site.coord_key, broker=site.url, data_dir=site.data_dir,          # no issuer key
                        trust=TrustPolicy({issuer.did: {"DeviceCredential"}}),
                        credential=coordinator_credential(issuer, site.coord_key.did))
    await coord.start()
    site.coordinator = coord
    key = Key.generate()
    cred = device_credential(issuer, key.did, kind="phone", valid_for=90)   # from a minute back: due now
    phone = await site.device(key, cred)
    assert phone.renewal is not None
    await until(lambda: phone.renewal is not None and phone.renewal.last_error is not None, timeout=10,
                what="the renewal attempt")
    assert phone.renewal.last_error == "unknown_command"
    await until(lambda: phone.renewal is not None and (phone.renewal._task is None or phone.renewal._task.done()),
                what="renewal stopped")
    assert phone.admitted and phone.credential is cred
