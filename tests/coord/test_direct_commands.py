"""Direct commands on real brokers: an operator's ``device.call`` reaches a device's handler, and
every failure comes back as one clear reason (offline, timeout, no such method, handler error)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sdk.coord import protocol
from sdk.coord.coordinator import Coordinator
from sdk.coord.coordinator.auth import operator_credential
from sdk.coord.device import SyncDevice
from sdk.errors import MessagingError
from sdk.identity import Key
from sdk.messaging.client import SecureClient
from sdk.messaging.errors import RemoteError, RequestTimeout
from tests.coord.test_coordinator import Mesh, mesh, until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]
__all__ = ["mesh"]


class Operator:
    """An operator on the wire: a SecureClient carrying its OperatorCredential."""

    def __init__(self, url: str, coordinator: Coordinator, roles: tuple[str, ...] = ("write",)) -> None:
        assert coordinator.issuer is not None
        self.key = Key.generate()
        self.coordinator = coordinator.did
        vc = operator_credential(coordinator.issuer, self.key.did, roles=roles)
        self.client = SecureClient(url, self.key, credentials=[vc])

    async def call(self, op: str, params: dict[str, Any], *, timeout: float = 15.0) -> Any:
        reply = await self.client.request(protocol.device_commands(protocol.token(self.coordinator)),
                                          {"op": op, "params": params}, type=protocol.OPERATE,
                                          encrypt_to=self.coordinator, timeout=timeout)
        assert reply.body["ok"] is True
        return reply.body["result"]

    async def refused(self, op: str, params: dict[str, Any], **kw: Any) -> MessagingError:
        with pytest.raises(MessagingError) as info:
            await self.call(op, params, **kw)
        return info.value


@pytest.fixture
async def operator(mesh: Mesh) -> AsyncIterator[Operator]:
    coord = await mesh.start_coordinator()
    op = Operator(mesh.url, coord)
    await op.client.connect()
    yield op
    await op.client.aclose()


async def test_call_returns_the_handlers_result(mesh: Mesh, operator: Operator) -> None:
    phone = await mesh.device("phone")
    seen: list[dict[str, Any]] = []

    @phone.command("echo")
    async def echo(args: dict[str, Any]) -> dict[str, Any]:
        seen.append(args)
        return {"echo": args, "from": phone.did}

    phone.register_command("count", lambda args: len(args["items"]))       # a sync handler

    out = await operator.call("device.call", {"did": phone.did, "method": "echo", "args": {"x": [1, "two"]}})
    assert out == {"result": {"echo": {"x": [1, "two"]}, "from": phone.did}}
    assert seen == [{"x": [1, "two"]}]
    out = await operator.call("device.call", {"did": phone.did, "method": "count", "args": {"items": [1, 2, 3]}})
    assert out == {"result": 3}
    assert phone.commands.names() == ["count", "echo"]


async def test_unknown_method_and_handler_error(mesh: Mesh, operator: Operator) -> None:
    phone = await mesh.device("phone")

    def broken(args: dict[str, Any]) -> None:
        raise ValueError(f"cannot reboot at level {args.get('level')}")

    phone.register_command("reboot", broken)
    phone.register_command("nan", lambda args: float("nan"))
    err = await operator.refused("device.call", {"did": phone.did, "method": "selfdestruct"})
    assert err.reason == "no_such_method" and "selfdestruct" in str(err)
    err = await operator.refused("device.call", {"did": phone.did, "method": "reboot", "args": {"level": 3}})
    assert err.reason == "handler_error" and "ValueError: cannot reboot at level 3" in str(err)
    err = await operator.refused("device.call", {"did": phone.did, "method": "nan"})
    assert err.reason == "handler_error" and "not usable JSON" in str(err)
    # the device keeps serving after its handler failed
    phone.register_command("ping", lambda args: "pong")
    assert await operator.call("device.call", {"did": phone.did, "method": "ping"}) == {"result": "pong"}


async def test_offline_and_unknown_devices_are_answered_at_once(mesh: Mesh, operator: Operator) -> None:
    phone = await mesh.device("phone")
    phone.register_command("ping", lambda args: "pong")
    await phone.aclose()
    await mesh.wait_for("offline", lambda i: i["did"] == phone.did)
    t0 = time.monotonic()
    err = await operator.refused("device.call", {"did": phone.did, "method": "ping", "timeout": 30})
    assert err.reason == "offline"
    assert time.monotonic() - t0 < 5.0                      # not the 30 s call timeout
    err = await operator.refused("device.call", {"did": Key.generate().did, "method": "ping"})
    assert err.reason == "not_found"


async def test_hanging_handler_times_out_cleanly(mesh: Mesh, operator: Operator) -> None:
    phone = await mesh.device("phone")
    cancelled = asyncio.Event()

    async def hang(args: dict[str, Any]) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    phone.register_command("hang", hang)
    phone.register_command("ping", lambda args: "pong")
    t0 = time.monotonic()
    err = await operator.refused("device.call", {"did": phone.did, "method": "hang", "timeout": 0.5})
    took = time.monotonic() - t0
    assert err.reason == "timeout" and 0.4 < took < 5.0
    await asyncio.wait_for(cancelled.wait(), 5)             # the device gave up on it at the expiry
    assert await operator.call("device.call", {"did": phone.did, "method": "ping"}) == {"result": "pong"}


async def test_bad_params_and_roles(mesh: Mesh, operator: Operator) -> None:
    phone = await mesh.device("phone")
    for params, field in (({"did": phone.did, "method": "x", "timeout": 61}, "timeout"),
                          ({"did": phone.did, "method": "x", "timeout": 0}, "timeout"),
                          ({"did": phone.did, "method": "x", "args": [1]}, "args"),
                          ({"did": phone.did, "method": "x", "args": {"b": "x" * 17000}}, "args"),
                          ({"did": phone.did, "method": ""}, "method"),
                          ({"method": "x"}, "did")):
        err = await operator.refused("device.call", params)
        assert err.reason == "invalid_params" and field in str(err), params
    assert mesh.coordinator is not None
    reader = Operator(mesh.url, mesh.coordinator, roles=("read",))
    async with reader.client:
        err = await reader.refused("device.call", {"did": phone.did, "method": "x"})
    assert err.reason == "forbidden" and "write" in str(err)


async def test_device_answers_calls_only_from_its_coordinator(mesh: Mesh, operator: Operator) -> None:
    phone = await mesh.device("phone")
    ran: list[Any] = []
    phone.register_command("unlock", ran.append)
    rogue_key = Key.generate()
    async with SecureClient(mesh.url, rogue_key) as rogue:
        with pytest.raises(RequestTimeout):
            await rogue.request(protocol.device_commands(phone.token), {"method": "unlock", "args": {}},
                                type=protocol.CALL, encrypt_to=phone.did, timeout=1.0)
    await until(lambda: phone.client.stats.rejected["wrong_sender"] >= 1, what="the rogue call rejected")
    assert ran == []
    # the coordinator's call still goes through
    assert await operator.call("device.call", {"did": phone.did, "method": "unlock"}) == {"result": None}
    assert ran == [{}]


async def test_device_refuses_a_plain_call_even_from_its_coordinator(mesh: Mesh, operator: Operator) -> None:
    phone = await mesh.device("phone")
    ran: list[Any] = []
    phone.register_command("unlock", ran.append)
    assert mesh.coordinator is not None
    with pytest.raises(RemoteError) as info:
        await mesh.coordinator.client.request(protocol.device_commands(phone.token), {"method": "unlock"},
                                              type=protocol.CALL, expect_from=phone.did, timeout=5.0)
    assert info.value.reason == "not_encrypted" and ran == []


async def test_sync_device_registers_commands(mesh: Mesh, operator: Operator) -> None:
    assert mesh.coordinator is not None
    key = Key.generate()
    cred = mesh.coordinator.issue_device_credential(key.did, kind="sensor", groups=["room:living"])
    dev = SyncDevice(key, cred, broker=mesh.url, coordinator=mesh.coord_key.did)

    @dev.command("read")
    def read(args: dict[str, Any]) -> dict[str, Any]:
        return {"celsius": 21.5, "unit": args.get("unit", "C")}

    await asyncio.to_thread(dev.__enter__)
    try:
        out = await operator.call("device.call", {"did": key.did, "method": "read", "args": {"unit": "C"}})
        assert out == {"result": {"celsius": 21.5, "unit": "C"}}
    finally:
        await asyncio.to_thread(dev.close)
