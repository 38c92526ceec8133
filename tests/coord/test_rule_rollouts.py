"""Rules marked to roll out: ``[rules.rollout]`` validated at load; an event firing such a rule
starts a staged roll-out (canary first, stage by stage), a failing canary rolls back, and a
re-sent event starts no second roll-out, while the event's other rules commit at once."""

from __future__ import annotations

from typing import Any

import pytest

from sdk.coord.coordinator.errors import RuleError
from sdk.coord.coordinator.rollouts import rank_key
from sdk.coord.coordinator.rule_rollouts import rollout_name, start_rule_rollouts
from sdk.coord.coordinator.rules import parse_rules
from sdk.coord.events import screen_available
from tests.coord.test_coordinator import Mesh, mesh, until
from tests.coord.test_rollouts import _engine, _fleet, _operator, _wait_state

__all__ = ["mesh"]
KEY = "ui.layout"


def _rules(rollout: Any) -> list[dict[str, Any]]:
    return [
        {"name": "phones-layout", "event": "screen_available",
         "target": {"select": "group", "group_prefix": "room:", "where": {"device.kind": "phone"}},
         "config": {KEY: "companion-{event.width}"}, "rollout": rollout},
        {"name": "display-mode", "event": "screen_available", "target": {"select": "sender"},
         "config": {"ui.mode": "host"}},
    ]


@pytest.mark.parametrize(("rollout", "message"), [
    ("fast", "rollout: must be a table"),
    ({"canary": {"count": 0}}, "canary.count"),
    ({"canary": {"count": 1, "percent": 5}}, "canary"),
    ({"steps": [50, 90]}, "end at 100"),
    ({"steps": [50, 100], "factor": 2}, "not both"),
    ({"factor": 0.5}, "factor"),
    ({"bake": -1}, "bake"),
    ({"max_failed": 2}, "max_failed"),
    ({"timeout": 0}, "timeout"),
    ({"health": [{"property": "app.crashes", "op": "near", "value": 0}]}, "health[].op"),
    ({"smoke": {"args": {}}}, "smoke.method"),
    ({"canry": {"count": 1}}, "unknown key"),
])
def test_rollout_table_is_validated_at_load(rollout: Any, message: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rules(_rules(rollout))
    assert "rule 'phones-layout' rollout" in str(info.value) and message in str(info.value)
    assert info.value.reason == "invalid_rule"


def test_rollout_table_parses() -> None:
    rules = parse_rules(_rules({"canary": {"percent": 20}, "factor": 3, "cap": 50, "bake": 2,
                                "min_applied": 1.0, "max_failed": 0.1, "timeout": 60,
                                "health": [{"property": "app.crashes", "op": "le", "value": 0}],
                                "smoke": {"method": "ui.check", "timeout": 5}}))
    plan = rules.rules[0].rollout
    assert plan is not None and rules.rules[1].rollout is None
    assert plan.canary == {"percent": 20.0} and plan.growth == {"factor": 3.0, "cap": 50.0} and plan.bake == 2
    assert plan.gates.min_applied == 1.0 and plan.gates.timeout == 60
    assert plan.gates.smoke is not None and plan.gates.smoke.method == "ui.check"


def _commits(mesh: Mesh, rollout_id: str) -> list[set[str]]:
    return [set(info["versions"]) for what, info in mesh.events
            if what == "committed" and info["event_id"].startswith(f"rollout:{rollout_id}:")
            and not info["event_id"].endswith(":restore")]


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_event_rolls_out_stage_by_stage_once(mesh: Mesh) -> None:
    rules = parse_rules(_rules({"canary": {"count": 2}, "steps": [50, 100], "bake": 0.3,
                                "min_applied": 1.0, "max_failed": 0.0, "timeout": 30}))
    await mesh.start_coordinator(rules=rules)
    op = await _operator(mesh)
    _, got = await _fleet(mesh, 10)
    display_got: list[Any] = []
    display = await mesh.device("display", room="room:ro", record=display_got)
    eid = await display.publish_event(screen_available(800, 600))
    await display.wait_version(1, 10)                     # the plain rule committed at once
    assert display_got[0].state == {"ui.mode": "host"}
    await until(lambda: display.outbox == [], what="event acknowledged")
    listed = (await op.call("rollout.ls", {}))["rollouts"]
    assert [r["name"] for r in listed] == [rollout_name("phones-layout", eid)]
    rollout_id = listed[0]["id"]
    doc = await _wait_state(op, rollout_id, "completed")
    assert [s["size"] for s in doc["stages"]] == [2, 5, 10]
    assert doc["operator"] == "rule:phones-layout" and doc["change"]["set"] == {KEY: "companion-800"}
    order = sorted(got, key=lambda d: rank_key(rollout_id, d))
    assert _commits(mesh, rollout_id) == [set(order[:2]), set(order[2:5]), set(order[5:])]  # canary first
    for did in order:
        assert [c.state for c in got[did]] == [{KEY: "companion-800"}], did
    coord = mesh.coordinator
    assert coord is not None and coord.store is not None and coord.store.pins(order[0]) == {}
    # the same event re-sent in a fresh envelope: a duplicate, no second roll-out
    display._outbox.add({**screen_available(800, 600).to_body(), "event_id": eid})   # re-send, same event id
    await display._drain()
    await until(lambda: any(w == "duplicate" and i["event_id"] == eid for w, i in mesh.events)
                and display.outbox == [], what="duplicate acknowledged")
    assert len(_engine(mesh).rollouts) == 1
    assert [c.version for c in display_got] == [1]
    # a re-send that finds the roll-out started but the event not processed (a crash in between)
    actions = coord.rules.evaluate(screen_available(800, 600), display.did, coord.registry)
    assert await start_rule_rollouts(coord, display.did, eid, actions)
    assert len(_engine(mesh).rollouts) == 1


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_failing_canary_aborts_and_restores(mesh: Mesh) -> None:
    rules = parse_rules(_rules({"canary": {"count": 2}, "steps": [100], "bake": 0.3,
                                "min_applied": 1.0, "max_failed": 0.0, "timeout": 30}))
    await mesh.start_coordinator(rules=rules)
    op = await _operator(mesh)
    _, got = await _fleet(mesh, 8, fail=1)
    display = await mesh.device("display", room="room:ro")
    await display.publish_event(screen_available(640, 480))
    await until(lambda: len(_engine(mesh).rollouts) == 1, what="roll-out started")
    rollout_id = next(iter(_engine(mesh).rollouts))
    doc = await _wait_state(op, rollout_id, "rolled_back")
    assert doc["reason"].startswith("max_failed")
    order = sorted(got, key=lambda d: rank_key(rollout_id, d))
    for did in order[:2]:                 # the canary took the change, then a restoring version
        assert [c.state for c in got[did]] == [{KEY: "companion-640"}, {}], did
    for did in order[2:]:                 # the rest never saw it
        assert got[did] == [], did
    assert _commits(mesh, rollout_id) == [set(order[:2])]
