"""The operator API on real brokers: authorization, roles, audit, fleet queries, tags, properties."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from sdk.coord import protocol
from sdk.coord.coordinator import Coordinator, operator_credential
from sdk.coord.coordinator.operations import OperatorRequest
from sdk.coord.errors import OperatorError
from sdk.coord.operator import OperatorClient
from sdk.identity import Key, TrustPolicy

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


class Fleet:
    """A coordinator with an issuer key, and operators with credentials from it."""

    def __init__(self, url: str, data_dir: Path, stack: AsyncExitStack) -> None:
        self.url = url
        self.data_dir = data_dir
        self.stack = stack
        self.issuer = Key.generate()
        self.coord_key = Key.generate()
        self.coordinator: Coordinator | None = None

    async def start(self, **kwargs: Any) -> Coordinator:
        coord = Coordinator(self.coord_key, broker=self.url, data_dir=self.data_dir, trust=TrustPolicy({}),
                            issuer=self.issuer, **kwargs)
        await coord.start()
        self.coordinator = coord
        return coord

    async def operator(self, *roles: str, key: Key | None = None, credential: dict[str, Any] | None = None,
                       **kwargs: Any) -> OperatorClient:
        key = key or Key.generate()
        if credential is None:
            credential = operator_credential(self.issuer, key.did, roles=roles or ("read",), **kwargs)
        op = OperatorClient(self.url, key, credential, coordinator=self.coord_key.did, timeout=10.0)
        await op.connect()
        self.stack.push_async_callback(op.aclose)
        return op


@pytest.fixture
async def fleet(broker: Any, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with AsyncExitStack() as stack:
        f = Fleet(broker.url, tmp_path / "coord", stack)
        yield f
        if f.coordinator is not None:
            await f.coordinator.stop()


def _audit(coord: Coordinator, **kwargs: Any) -> list[dict[str, Any]]:
    coord.operators.flush()
    assert coord.store is not None
    return coord.store.audit(**kwargs)


async def test_dispatch_roles_and_audit(fleet: Fleet) -> None:
    coord = await fleet.start()

    def echo(req: OperatorRequest) -> Any:
        return {"operator": req.operator, "params": dict(req.params), "roles": sorted(req.roles)}

    coord.operations.register("test.echo", "write", echo)
    writer = await fleet.operator("write")
    reader = await fleet.operator("read")
    assert await writer.call("test.echo", {"x": 1}) == {"operator": writer.did, "params": {"x": 1},
                                                         "roles": ["write"]}
    with pytest.raises(OperatorError) as err:
        await reader.call("test.echo", {"x": 2})
    assert err.value.reason == "forbidden" and "'write'" in str(err.value)
    with pytest.raises(OperatorError) as err:
        await writer.call("no.such.op")
    assert err.value.reason == "unknown_op"
    with pytest.raises(OperatorError) as err:
        await writer.call("test.echo", {"deep": [[[[[[[[[[1]]]]]]]]]]})
    assert err.value.reason == "invalid_params"
    rows = _audit(coord)
    assert [(r["operator"], r["op"], r["outcome"]) for r in reversed(rows)] == [
        (writer.did, "test.echo", "ok"), (reader.did, "test.echo", "forbidden"),
        (writer.did, "no.such.op", "unknown_op"), (writer.did, "test.echo", "invalid_params")]
    assert rows[-1]["params"] == '{"x":1}'


async def test_unauthorized_operators_are_refused_with_a_reason(fleet: Fleet) -> None:
    coord = await fleet.start()
    coord.operations.register("test.ping", "read", lambda req: "pong")
    # no credential at all
    key = Key.generate()
    bare = OperatorClient(fleet.url, key, {}, coordinator=coord.did)
    await bare.connect()
    fleet.stack.push_async_callback(bare.aclose)
    with pytest.raises(OperatorError) as err:
        await bare.call("test.ping")
    assert err.value.reason == "not_authorized"
    # an issuer the coordinator does not trust
    stranger = Key.generate()
    untrusted = await fleet.operator(key=stranger, credential=operator_credential(Key.generate(), stranger.did))
    with pytest.raises(OperatorError) as err:
        await untrusted.call("test.ping")
    assert err.value.reason == "not_authorized"
    # expired
    late = Key.generate()
    from datetime import UTC, datetime, timedelta
    expired = operator_credential(fleet.issuer, late.did, valid_for=60,
                                  valid_from=datetime.now(UTC) - timedelta(hours=2))
    old = await fleet.operator(key=late, credential=expired)
    with pytest.raises(OperatorError) as err:
        await old.call("test.ping")
    assert err.value.reason == "not_authorized"
    # someone else's credential (subject is not the sender)
    thief = await fleet.operator(key=Key.generate(), credential=operator_credential(fleet.issuer, late.did))
    with pytest.raises(OperatorError) as err:
        await thief.call("test.ping")
    assert err.value.reason == "not_authorized"
    outcomes = [r["outcome"] for r in _audit(coord)]
    assert outcomes == ["not_authorized"] * 4


async def test_revoked_operator_is_refused(fleet: Fleet) -> None:
    coord = await fleet.start()
    coord.operations.register("test.ping", "read", lambda req: "pong")
    key = Key.generate()
    assert coord.store is not None and coord.issuer is not None
    from sdk.identity import status_entry
    index = coord.store.allocate_status_index(key.did)
    cred = operator_credential(fleet.issuer, key.did, roles=("admin",),
                               status=status_entry(protocol.status_list_url(fleet.issuer.did), index))
    op = await fleet.operator(key=key, credential=cred)
    assert await op.call("test.ping") == "pong"
    assert coord.operators.granted(key.did)
    await coord.revoke(key.did)
    assert not coord.operators.granted(key.did)        # the cached grant is gone with the new list
    with pytest.raises(OperatorError) as err:
        await op.call("test.ping")
    assert err.value.reason in ("revoked", "not_authorized")
    assert _audit(coord, limit=1)[0]["outcome"] == err.value.reason


async def test_flood_costs_no_verification_beyond_the_limiter(fleet: Fleet) -> None:
    coord = await fleet.start()
    coord.operations.register("test.ping", "read", lambda req: "pong")
    good = await fleet.operator("read")
    stranger = Key.generate()
    flood = await fleet.operator(key=stranger, credential=operator_credential(Key.generate(), stranger.did))
    before = coord.operators.authorizer.verifications
    results = await asyncio.gather(*(flood.call("test.ping") for _ in range(40)), return_exceptions=True)
    reasons = sorted({r.reason for r in results if isinstance(r, OperatorError)})
    assert len(results) == 40 and all(isinstance(r, OperatorError) for r in results)
    assert reasons == ["busy", "not_authorized"]
    spent = coord.operators.authorizer.verifications - before
    assert spent <= 12                               # the limiter's burst (10), never 40
    # an authorized operator is verified once, then not throttled while its grant is cached
    assert await good.call("test.ping") == "pong"
    answers = await asyncio.gather(*(good.call("test.ping") for _ in range(30)))
    assert answers == ["pong"] * 30
    assert coord.operators.authorizer.verifications - before == spent + 1
