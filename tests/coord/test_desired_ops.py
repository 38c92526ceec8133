"""Operator desired state on real brokers: ``desired.set`` / ``desired.unset`` over did, group, tag
and where targets, pushed like rule-made versions, and pinned against later rule outputs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sdk.coord.coordinator.auth import operator_credential
from sdk.coord.coordinator.store import Store
from sdk.coord.device import Device
from sdk.coord.errors import OperatorError
from sdk.coord.events import screen_available
from sdk.coord.operator import OperatorClient
from sdk.identity import Key
from tests.coord.test_coordinator import Mesh, mesh, until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]
__all__ = ["mesh"]


async def _operator(mesh: Mesh, roles: tuple[str, ...] = ("write",)) -> OperatorClient:
    assert mesh.coordinator is not None and mesh.coordinator.issuer is not None
    key = Key.generate()
    vc = operator_credential(mesh.coordinator.issuer, key.did, roles=roles)
    op = OperatorClient(mesh.url, key, vc, coordinator=mesh.coordinator.did, timeout=15.0)
    await op.connect()
    mesh.stack.push_async_callback(op.aclose)
    return op


@pytest.fixture
async def operator(mesh: Mesh) -> AsyncIterator[OperatorClient]:
    await mesh.start_coordinator()
    yield await _operator(mesh)


async def _refused(aw: Any) -> OperatorError:
    with pytest.raises(OperatorError) as info:
        await aw
    return info.value


async def test_group_set_reaches_only_that_group(mesh: Mesh, operator: OperatorClient) -> None:
    got: dict[str, list[Any]] = {}
    devices: list[Device] = []
    for room in ("room:a", "room:a", "room:b"):
        dev = await mesh.device("phone", room=room, record=(seen := []))
        got[dev.did] = seen
        devices.append(dev)
    a1, a2, b = devices

    out = await operator.set({"group": "room:a"}, {"ui.theme": "dark", "ui.font": {"size": 14}})
    assert out == {"count": 2, "versions": {a1.did: 1, a2.did: 1}}
    await a1.wait_version(1, 10)
    await a2.wait_version(1, 10)
    for dev in (a1, a2):
        (cfg,) = got[dev.did]
        assert cfg.state == {"ui.theme": "dark", "ui.font": {"size": 14}}
        assert cfg.version == 1
    coord = mesh.coordinator
    assert coord is not None and coord.store is not None
    info = await mesh.wait_for("converged", lambda i: i["targets"] == 2)     # both reported applied
    assert info["failures"] == 0
    assert coord.store.latest_version(b.did) == 0 and got[b.did] == [] and b.last_version == 0
    history = coord.store.versions_since(a1.did, 0)
    assert [v.rules for v in history] == [(f"operator:{operator.did}",)]
    assert history[0].event_id is not None and history[0].event_id.startswith("op:")
    assert coord.store.pins(a1.did) == {"ui.theme": operator.did, "ui.font": operator.did}
    assert coord.store.pins(b.did) == {}
    # a did target
    out = await operator.set(b.did, {"ui.theme": "light"})
    assert out == {"count": 1, "versions": {b.did: 1}}
    await b.wait_version(1, 10)
    assert got[b.did][0].state == {"ui.theme": "light"}


async def test_where_and_tag_targets(mesh: Mesh, operator: OperatorClient) -> None:
    phone = await mesh.device("phone", room="room:w", record=[])
    sensor = await mesh.device("sensor", room="room:w", record=[])
    out = await operator.set({"where": {"kind": "sensor", "group": "room:w"}}, {"rate_hz": 5})
    assert out == {"count": 1, "versions": {sensor.did: 1}}
    await sensor.wait_version(1, 10)
    out = await operator.set({"where": {"kind": "sensor", "group": "room:nowhere"}}, {"rate_hz": 6})
    assert out == {"count": 0, "versions": {}}
    await operator.tag(phone.did, add=["canary"])
    out = await operator.set({"tag": "canary"}, {"ui.layout": "v4"})
    assert out == {"count": 1, "versions": {phone.did: 1}}
    await phone.wait_version(1, 10)
    assert mesh.coordinator is not None and mesh.coordinator.store is not None
    assert mesh.coordinator.store.latest_version(sensor.did) == 1


async def test_rules_keep_pinned_keys_until_unset(mesh: Mesh, operator: OperatorClient) -> None:
    display = await mesh.device("display", record=[])
    seen: list[Any] = []
    phone = await mesh.device("phone", record=seen)
    await operator.set(phone.did, {"ui.layout": "kiosk"})
    await phone.wait_version(1, 10)

    await display.publish_event(screen_available(800, 600))        # the rule sets ui.layout and more
    await phone.wait_version(2, 10)
    state = seen[-1].state
    assert state["ui.layout"] == "kiosk"                           # pinned: the operator's value stays
    assert state["ui.companion.resolution"] == "800x600"           # the rule's other keys apply
    assert "ui.layout" not in seen[-1].changes

    out = await operator.unset(phone.did, ["ui.layout", "never.set"])
    assert out == {"count": 1, "versions": {phone.did: 3}}
    await phone.wait_version(3, 10)
    assert "ui.layout" not in seen[-1].state and seen[-1].changes == {"ui.layout": None}
    assert mesh.coordinator is not None and mesh.coordinator.store is not None
    assert mesh.coordinator.store.pins(phone.did) == {}

    await display.publish_event(screen_available(1024, 768))       # the rules own the key again
    await phone.wait_version(4, 10)
    assert seen[-1].state["ui.layout"] == "companion"
    # nothing left to remove: no new version
    assert await operator.unset(phone.did, ["never.set"]) == {"count": 0, "versions": {}}


async def test_pins_survive_a_restart(mesh: Mesh, operator: OperatorClient) -> None:
    display = await mesh.device("display", record=[])
    seen: list[Any] = []
    phone = await mesh.device("phone", record=seen)
    await operator.set(phone.did, {"ui.layout": "kiosk"})
    await phone.wait_version(1, 10)
    assert mesh.coordinator is not None
    await mesh.coordinator.stop()
    await mesh.start_coordinator()
    await until(lambda: phone.admitted, what="the phone re-admitted")
    await display.wait_admitted(10)
    await display.publish_event(screen_available(800, 600))
    await phone.wait_version(2, 10)
    assert seen[-1].state["ui.layout"] == "kiosk" and seen[-1].state["ui.companion.width"] == 800


async def test_bad_requests_are_refused_with_reasons(mesh: Mesh, operator: OperatorClient) -> None:
    phone = await mesh.device("phone")
    for params, field in (({"target": {"did": phone.did}, "changes": {}}, "changes"),
                          ({"target": {"did": phone.did}, "changes": {"k": None}}, "desired.unset"),
                          ({"target": {"did": phone.did}, "changes": {"": 1}}, "changes"),
                          ({"target": {"did": phone.did}, "changes": {"k" * 129: 1}}, "changes"),
                          ({"target": {"did": phone.did}, "changes": {f"k{i}": i for i in range(257)}}, "257"),
                          ({"target": {"room": "x"}, "changes": {"k": 1}}, "target"),
                          ({"target": {"did": phone.did, "group": "g"}, "changes": {"k": 1}}, "target"),
                          ({"target": {"group": ""}, "changes": {"k": 1}}, "target.group"),
                          ({"changes": {"k": 1}}, "target")):
        err = await _refused(operator.call("desired.set", params))
        assert err.reason == "invalid_params" and field in str(err), params
    err = await _refused(operator.call("desired.unset", {"target": {"did": phone.did}, "keys": []}))
    assert err.reason == "invalid_params" and "keys" in str(err)
    err = await _refused(operator.set(Key.generate().did, {"k": 1}))
    assert err.reason == "not_found"
    reader = await _operator(mesh, roles=("read",))
    err = await _refused(reader.set(phone.did, {"k": 1}))
    assert err.reason == "forbidden" and "write" in str(err)
    # the config size bound holds across versions: the state would outgrow a signed envelope
    for i in range(2):                      # the document carries the changes and the whole state
        await operator.set(phone.did, {f"blob{i}": "x" * 60_000})
    err = await _refused(operator.set(phone.did, {"blob2": "x" * 60_000}))
    assert err.reason == "invalid_params" and "limit" in str(err)
    assert mesh.coordinator is not None and mesh.coordinator.store is not None
    assert mesh.coordinator.store.latest_version(phone.did) == 2
    assert "blob2" not in mesh.coordinator.store.pins(phone.did)          # nothing of it committed


def test_store_commits_versions_and_pins_together(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    out = store.commit_operator({"did:a": {"x": 1, "y": 2}, "did:b": {"x": 1}}, operator="did:op",
                                event_id="op:1", op="desired.set")
    assert [(c.did, c.version) for c in out] == [("did:a", 1), ("did:b", 1)]
    store.commit_operator({"did:a": {"x": None}}, operator="did:op", event_id="op:2", op="desired.unset",
                          unpin={"did:b": ["x"]})
    assert store.pinned("did:a") == {"y"} and store.pinned("did:b") == frozenset()
    store.close()
    again = Store(tmp_path / "s.db")
    assert again.pins("did:a") == {"y": "did:op"} and again.desired("did:a") == {"y": 2}
    assert again.events(5)[0]["type"] == "desired.unset"
    again.close()
