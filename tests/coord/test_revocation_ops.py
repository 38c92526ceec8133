"""CLI-issued device credentials and ``device.revoke`` on real brokers: a coordinator whose
[issuer] holds the CLI's key admits them (its status list verifies them) and revokes them by DID,
the device being told within 1 s; the offline index ledger never collides with the coordinator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.coord.coordinator import Coordinator, operator_credential
from sdk.coord.coordinator.auth import coordinator_credential
from sdk.coord.coordinator.config import load_config
from sdk.coord.device import Device, DeviceState
from sdk.coord.device.enrollment import enroll
from sdk.coord.errors import AdmissionError, OperatorError
from sdk.coord.operator import OperatorClient
from sdk.identity import Key, TrustPolicy, load_credential
from sdk.identity.keystore import KdfParams, Keystore
from sdk.identity.status_ledger import OFFLINE_RANGE, StatusLedger, ledger_path
from sdk.messaging.errors import MessagingError
from sdk.messaging.status import status_list_url

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]
PASS = "issuer passphrase"


class Shop:
    """An issuer keystore used by the CLI and by the coordinator's [issuer], plus helpers."""

    def __init__(self, url: str, tmp: Path, stack: AsyncExitStack) -> None:
        self.url, self.tmp, self.stack = url, tmp, stack
        self.issuer = Key.generate()
        self.keystore = tmp / "issuer.keystore"
        Keystore.create(self.keystore, PASS, self.issuer, kdf=KdfParams.interactive())
        self.coord_key = Key.generate()
        self.admin_key = Key.generate()
        self.coordinator: Coordinator | None = None
        self.runner = CliRunner()

    def cli(self, *args: Any) -> dict[str, Any]:
        result = self.runner.invoke(app, [str(a) for a in args],
                                    env={"AUTOGLM_KEYSTORE": str(self.keystore), "AUTOGLM_PASSPHRASE": PASS})
        assert result.exit_code == 0, result.output
        out: dict[str, Any] = json.loads(result.stdout)
        return out

    def cli_fails(self, *args: Any) -> str:
        result = self.runner.invoke(app, [str(a) for a in args],
                                    env={"AUTOGLM_KEYSTORE": str(self.keystore), "AUTOGLM_PASSPHRASE": PASS})
        assert result.exit_code == 1, result.output
        return str(result.output)

    def issue(self, did: str, *extra: Any) -> dict[str, Any]:
        out = self.tmp / f"vc-{did[-8:]}.json"
        self.cli("vc", "issue", "-s", did, "-t", "DeviceCredential", "-c", 'kind="phone"',
                 "-c", 'groups=["room:hall"]', "-o", out, "--json", *extra)
        cred = load_credential(out)
        assert isinstance(cred, dict)
        return cred

    def config(self, *, with_issuer: bool = True) -> Path:
        (self.tmp / "coordinator-vc.json").write_text(json.dumps(coordinator_credential(self.issuer,
                                                                                        self.coord_key.did)))
        text = f"""
[coordinator]
broker = "{self.url}"
data_dir = "data"

[identity]
key = "{self.coord_key.private_key_multibase}"
credential = "coordinator-vc.json"

[[trust]]
issuer = "{self.issuer.did}"
types = ["DeviceCredential", "OperatorCredential"]
"""
        if with_issuer:
            text += f"""
[issuer]
keystore = "{self.keystore.name}"
passphrase_env = "H3_ISSUER_PASSPHRASE"
credential_valid_for = "1h"
"""
        path = self.tmp / ("coordinator.toml" if with_issuer else "coordinator-no-issuer.toml")
        path.write_text(text)
        return path

    async def start(self, config: Path) -> Coordinator:
        coord = Coordinator.from_config(load_config(config))
        await coord.start()
        self.coordinator = coord
        return coord

    async def stop(self) -> None:
        if self.coordinator is not None:
            await self.coordinator.stop()
            self.coordinator = None

    async def admin(self, *roles: str) -> OperatorClient:
        key = self.admin_key if roles == ("admin",) else Key.generate()
        cred = operator_credential(self.issuer, key.did, roles=roles)
        op = OperatorClient(self.url, key, cred, coordinator=self.coord_key.did, timeout=10.0)
        await op.connect()
        self.stack.push_async_callback(op.aclose)
        return op

    async def device(self, key: Key, credential: dict[str, Any], **kwargs: Any) -> Device:
        dev = Device(key, credential, broker=self.url, coordinator=self.coord_key.did, **kwargs)
        self.stack.push_async_callback(dev.aclose)
        await dev.connect()
        return dev


@pytest.fixture
async def shop(broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Shop]:
    monkeypatch.setenv("H3_ISSUER_PASSPHRASE", PASS)
    async with AsyncExitStack() as stack:
        s = Shop(broker.url, tmp_path, stack)
        yield s
        await s.stop()


def test_cli_device_credential_defaults_and_ledger(tmp_path: Path) -> None:
    shop = Shop("mqtt://unused", tmp_path, AsyncExitStack())
    first = shop.issue(Key.generate().did)
    status = first["credentialStatus"]
    assert status["statusListCredential"] == status_list_url(shop.issuer.did)
    assert status["statusPurpose"] == "revocation" and int(status["statusListIndex"]) == OFFLINE_RANGE.start
    start = time.mktime(time.strptime(first["validFrom"], "%Y-%m-%dT%H:%M:%SZ"))
    end = time.mktime(time.strptime(first["validUntil"], "%Y-%m-%dT%H:%M:%SZ"))
    assert end - start == 30 * 86400                                 # 30 days by default
    assert first["id"].startswith("urn:uuid:")
    second = shop.issue(Key.generate().did, "--valid-for", "12h")
    assert int(second["credentialStatus"]["statusListIndex"]) == OFFLINE_RANGE.start + 1
    assert time.mktime(time.strptime(second["validUntil"], "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(
        time.strptime(second["validFrom"], "%Y-%m-%dT%H:%M:%SZ")) == 12 * 3600
    bare = shop.issue(Key.generate().did, "--no-status", "--no-expiry")
    assert "credentialStatus" not in bare and "validUntil" not in bare
    ledger = StatusLedger(ledger_path(shop.keystore)).issued(shop.issuer.did)
    assert sorted(ledger) == [OFFLINE_RANGE.start, OFFLINE_RANGE.start + 1]
    assert ledger[OFFLINE_RANGE.start]["subject"] == first["credentialSubject"]["id"]

    taken = shop.cli_fails(
        "vc", "issue", "-s", Key.generate().did, "-t", "DeviceCredential", "--status-index",
        OFFLINE_RANGE.start, "--json")
    assert "index_in_use" in taken
    reserved = shop.cli_fails("vc", "issue", "-s", Key.generate().did, "-t", "DeviceCredential",
                              "--status-index", 5, "--json")
    assert "index_reserved" in reserved                              # the coordinator's range
    assert "invalid_input" in shop.cli_fails("vc", "issue", "-s", Key.generate().did, "-t", "DeviceCredential",
                                             "--valid-for", "soon", "--json")


async def test_cli_issued_credential_admitted_and_revoked_within_a_second(shop: Shop) -> None:
    key = Key.generate()
    credential = shop.issue(key.did)
    index = int(credential["credentialStatus"]["statusListIndex"])

    # without [issuer] nobody publishes this issuer's status list: refused, as before
    coord = await shop.start(shop.config(with_issuer=False))
    with pytest.raises(AdmissionError) as info:
        await shop.device(key, credential)
    assert info.value.reason == "status_unavailable"
    await shop.stop()

    coord = await shop.start(shop.config())
    assert coord.issuer is not None and coord.issuer.did == shop.issuer.did
    phone = await shop.device(key, credential)
    assert phone.admitted
    # the coordinator's own allocations stay clear of the offline range
    key2 = Key.generate()
    admin = await shop.admin("admin")
    token = (await admin.token(kind="phone"))["token"]
    enrolled = await enroll(key2, broker=shop.url, coordinator=shop.coord_key.did, token=token,
                            trust=TrustPolicy({shop.issuer.did: {"DeviceCredential"}}))
    assert int(enrolled["credentialStatus"]["statusListIndex"]) not in OFFLINE_RANGE
    other = await shop.device(key2, enrolled)

    writer = await shop.admin("write")
    with pytest.raises(OperatorError) as refused:
        await writer.revoke(key.did, reason="lost")
    assert refused.value.reason == "forbidden"
    with pytest.raises(OperatorError) as missing:
        await admin.revoke(Key.generate().did, reason="typo")
    assert missing.value.reason == "not_found"

    figures: list[tuple[float, float]] = []          # (request -> device revoked, reply -> revoked)
    for dev, idx in ((phone, index), (other, int(enrolled["credentialStatus"]["statusListIndex"]))):
        seen: list[float] = []

        async def watch(d: Device = dev, out: list[float] = seen) -> None:
            while d.state is not DeviceState.REVOKED:
                await asyncio.sleep(0.001)
            out.append(time.perf_counter())

        watcher = asyncio.ensure_future(watch())
        sent = time.perf_counter()
        result = await admin.revoke(dev.did, reason="stolen")
        replied = time.perf_counter()
        assert result == {"did": dev.did, "revoked": [idx], "published": True}
        await asyncio.wait_for(watcher, 1.0)                      # told within 1 s of the reply
        figures.append((seen[0] - sent, seen[0] - replied))
        assert coord.store is not None and (coord.store.revocation(dev.did) or {}).get("reason") == "stolen"
        with pytest.raises(AdmissionError) as cut:
            await dev.authenticate()
        assert cut.value.reason == "revoked"
    print("device.revoke: request -> device revoked, reply -> device revoked (ms):",
          [(round(a * 1000, 1), round(b * 1000, 1)) for a, b in figures])
    assert max(a for a, _ in figures) < 1.0

    # after a restart the revoked CLI-issued credential stays refused (the list comes from the store)
    await shop.stop()
    await shop.start(shop.config())
    again = Device(key, credential, broker=shop.url, coordinator=shop.coord_key.did)
    shop.stack.push_async_callback(again.aclose)
    with pytest.raises(AdmissionError) as info:
        await again.connect()
    assert info.value.reason == "revoked"


async def test_autoglm_coordinator_with_issuer_admits_and_revokes_a_cli_credential(shop: Shop) -> None:
    key = Key.generate()
    credential = shop.issue(key.did)
    env = {**os.environ, "H3_ISSUER_PASSPHRASE": PASS}
    proc = subprocess.Popen([sys.executable, "-c", "from sdk.cli import main; main()", "coordinator",
                             "--config", str(shop.config())], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        phone = None
        for _ in range(150):                                   # the daemon may still be starting
            dev = Device(key, credential, broker=shop.url, coordinator=shop.coord_key.did, auth_timeout=2)
            try:
                await dev.connect()
                phone = dev
                break
            except (AdmissionError, MessagingError):
                await dev.aclose()
                await asyncio.sleep(0.1)
        assert phone is not None and phone.admitted
        shop.stack.push_async_callback(phone.aclose)
        admin = await shop.admin("admin")
        result = await admin.revoke(key.did, reason="stolen")
        assert result["revoked"] == [int(credential["credentialStatus"]["statusListIndex"])]
        deadline = time.monotonic() + 1.0
        while phone.state is not DeviceState.REVOKED and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert phone.state is DeviceState.REVOKED
    finally:
        proc.send_signal(signal.SIGINT)           # the embedded broker runs in this loop: do not block it
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
