"""Enrollment on real brokers: one-time tokens (auto and manual approval), used and expired
tokens (also across a restart), and manufacturer credentials from trusted and untrusted issuers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from sdk.coord.coordinator import Coordinator, operator_credential
from sdk.coord.coordinator.config import IssuerConfig
from sdk.coord.coordinator.enrollment import token_hash
from sdk.coord.device import Device
from sdk.coord.device.enrollment import EnrollmentError
from sdk.coord.errors import OperatorError
from sdk.coord.operator import OperatorClient
from sdk.identity import V2_CONTEXT, Key, TrustPolicy, issue_credential, load_credential
from tests.fixtures.waiting import until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


class Site:
    """A coordinator with an issuer key, an admin operator, and helpers to enroll devices."""

    def __init__(self, url: str, data_dir: Path, stack: AsyncExitStack) -> None:
        self.url = url
        self.data_dir = data_dir
        self.stack = stack
        self.issuer = Key.generate()
        self.coord_key = Key.generate()
        self.admin_key = Key.generate()
        self.coordinator: Coordinator | None = None
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def start(self, trust: TrustPolicy | None = None, **kwargs: Any) -> Coordinator:
        coord = Coordinator(self.coord_key, broker=self.url, data_dir=self.data_dir,
                            trust=trust or TrustPolicy({}), issuer=self.issuer, **kwargs)
        coord.add_listener(lambda what, info: self.events.append((what, info)))
        await coord.start()
        self.coordinator = coord
        return coord

    async def stop(self) -> None:
        if self.coordinator is not None:
            await self.coordinator.stop()
            self.coordinator = None

    async def admin(self) -> OperatorClient:
        cred = operator_credential(self.issuer, self.admin_key.did, roles=("admin",))
        op = OperatorClient(self.url, self.admin_key, cred, coordinator=self.coord_key.did, timeout=10.0)
        await op.connect()
        self.stack.push_async_callback(op.aclose)
        return op

    async def enroll(self, key: Key, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("trust", TrustPolicy({self.issuer.did: {"DeviceCredential"}}))
        return await Device.enroll(key, broker=self.url, coordinator=self.coord_key.did, **kwargs)

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
        await s.stop()


async def test_token_enrollment_auto_admits_the_device(site: Site, tmp_path: Path) -> None:
    coord = await site.start()
    admin = await site.admin()
    made = await admin.token(kind="phone", groups=["room:living"], ttl=600, valid_for=3600)
    assert made["token"].startswith("agt_") and made["expires"] > time.time() + 500
    assert coord.store is not None
    with coord.store._lock:                                    # only the token's digest is stored
        stored = [r[0] for r in coord.store._db.execute("SELECT token_hash FROM enroll_tokens")]
    assert stored == [token_hash(made["token"])] and made["token"] not in stored

    key = Key.generate()
    path = tmp_path / "phone-vc.json"
    cred = await site.enroll(key, token=made["token"], credential_file=path)
    assert cred["credentialSubject"]["id"] == key.did and cred["issuer"] == site.issuer.did
    assert cred["credentialSubject"]["kind"] == "phone" and cred["credentialSubject"]["groups"] == ["room:living"]
    assert cred["credentialStatus"]["statusListIndex"] is not None
    assert load_credential(path) == cred                       # stored atomically by enroll()

    phone = await site.device(key, cred)
    assert phone.admitted
    rec = coord.registry.get(key.did)
    assert rec is not None and rec.kind == "phone" and rec.groups == frozenset({"room:living"})


async def test_used_token_refused_even_after_a_restart(site: Site) -> None:
    await site.start()
    admin = await site.admin()
    token = (await admin.token(kind="sensor", uses=1))["token"]
    first = Key.generate()
    await site.enroll(first, token=token)
    again = await site.enroll(first, token=token)              # a lost reply: the same answer, no second use
    assert again["credentialSubject"]["id"] == first.did

    with pytest.raises(EnrollmentError) as info:
        await site.enroll(Key.generate(), token=token)
    assert info.value.reason == "token_used"

    await site.stop()
    await site.start()                                         # the store remembers the use
    with pytest.raises(EnrollmentError) as info:
        await site.enroll(Key.generate(), token=token)
    assert info.value.reason == "token_used"
    with pytest.raises(EnrollmentError) as info:
        await site.enroll(Key.generate(), token="agt_" + "x" * 32)
    assert info.value.reason == "not_authorized"


async def test_expired_token_refused(site: Site) -> None:
    await site.start()
    admin = await site.admin()
    made = await admin.token(kind="sensor", uses=5, ttl=1)
    await until(lambda: time.time() > made["expires"] + 0.05, timeout=5, what="token expiry")
    with pytest.raises(EnrollmentError) as info:
        await site.enroll(Key.generate(), token=made["token"])
    assert info.value.reason == "token_expired"
    with pytest.raises(OperatorError) as bad:
        await admin.token(kind="sensor", uses=0)
    assert bad.value.reason == "invalid_params" and "uses" in str(bad.value)


async def test_manual_approval_and_denial(site: Site) -> None:
    await site.start()
    admin = await site.admin()
    token = (await admin.token(kind="tablet", groups=["room:kitchen"], uses=2, approve="manual"))["token"]
    key, other = Key.generate(), Key.generate()
    waiting = asyncio.ensure_future(site.enroll(key, token=token, wait=30))
    denied = asyncio.ensure_future(site.enroll(other, token=token, wait=30))
    pending: list[dict[str, Any]] = []

    async def fetch() -> None:
        pending[:] = await admin.pending()

    for _ in range(200):
        await fetch()
        if {r["did"] for r in pending} == {key.did, other.did}:
            break
        await asyncio.sleep(0.05)
    assert {r["did"] for r in pending} == {key.did, other.did}
    assert not waiting.done()                                  # held until an operator decides
    row = next(r for r in pending if r["did"] == key.did)
    assert row["kind"] == "tablet" and row["via"].startswith("token:")

    approved = await admin.approve(row["id"])
    assert approved == {"did": key.did, "id": row["id"], "approved": True}
    cred = await asyncio.wait_for(waiting, 15)
    assert cred["credentialSubject"]["id"] == key.did and cred["credentialSubject"]["groups"] == ["room:kitchen"]

    assert (await admin.deny(other.did))["denied"] is True
    with pytest.raises(EnrollmentError) as info:
        await asyncio.wait_for(denied, 15)
    assert info.value.reason == "denied"
    assert await admin.pending() == []
    with pytest.raises(OperatorError) as missing:
        await admin.approve(row["id"])
    assert missing.value.reason == "not_found"


async def test_pending_request_times_out_on_the_device(site: Site) -> None:
    await site.start()
    admin = await site.admin()
    token = (await admin.token(kind="tablet", approve="manual"))["token"]
    with pytest.raises(EnrollmentError) as info:
        await site.enroll(Key.generate(), token=token, wait=0.5)
    assert info.value.reason == "pending"


def _manufacturer_credential(issuer: Key, did: str) -> dict[str, Any]:
    doc = {"@context": [V2_CONTEXT], "id": "urn:uuid:5d1e0c6a-mfr-0001",
           "type": ["VerifiableCredential", "ManufacturerCredential"], "issuer": issuer.did,
           "validFrom": "2024-01-01T00:00:00Z", "validUntil": "2036-01-01T00:00:00Z",
           "credentialSubject": {"id": did, "kind": "display", "capabilities": ["screen"], "serial": "SN-1"}}
    signed = issue_credential(doc, issuer)
    assert isinstance(signed, dict)
    return signed


async def test_manufacturer_credential_trusted_and_untrusted(site: Site) -> None:
    maker, rogue = Key.generate(), Key.generate()
    coord = await site.start(trust=TrustPolicy({maker.did: {"ManufacturerCredential"}}),
                             issuer_config=IssuerConfig(manufacturer_approve="auto", credential_valid_for=600))
    key = Key.generate()
    cred = await site.enroll(key, manufacturer_credential=_manufacturer_credential(maker, key.did))
    assert cred["credentialSubject"]["kind"] == "display"
    assert cred["credentialSubject"]["capabilities"] == ["screen"]
    dev = await site.device(key, cred)
    assert dev.admitted

    bad = Key.generate()
    with pytest.raises(EnrollmentError) as info:
        await site.enroll(bad, manufacturer_credential=_manufacturer_credential(rogue, bad.did))
    assert info.value.reason == "untrusted_issuer"
    stolen = Key.generate()                  # someone else's manufacturer credential: not its holder
    with pytest.raises(EnrollmentError) as info:
        await site.enroll(stolen, manufacturer_credential=_manufacturer_credential(maker, key.did))
    assert info.value.reason in ("holder_mismatch", "bad_signature")
    assert coord.registry.get(bad.did) is None and coord.registry.get(stolen.did) is None
