"""Staged roll-outs on real brokers: canary failures abort and roll back, healthy roll-outs
complete stage by stage, pause/resume, a crashed coordinator resumes, offline devices catch up
to their stage, smoke and health gates; and the adaptation metrics' λ fit."""

from __future__ import annotations

import asyncio
import itertools
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sdk.coord.coordinator.adaptation import Convergence, PushMetrics, fit_lambda, percentile, summarize
from sdk.coord.coordinator.auth import operator_credential
from sdk.coord.coordinator.daemon import Coordinator
from sdk.coord.coordinator.errors import StoreError
from sdk.coord.coordinator.rollouts import RolloutEngine, rank_key, stage_sizes
from sdk.coord.coordinator.store import SCHEMA_VERSION, Store
from sdk.coord.device import Device
from sdk.coord.errors import OperatorError
from sdk.coord.operator import OperatorClient
from sdk.identity import Key
from tests.coord.test_coordinator import Mesh, mesh, until

__all__ = ["mesh"]
broker_tests = [pytest.mark.broker, pytest.mark.timeout(180)]
KEY = "ui.layout"


# ---------------------------------------------------------------- metrics and stage arithmetic
def test_lambda_fits_a_known_rate() -> None:
    points = [(t / 20, math.exp(-0.7 * t / 20)) for t in range(0, 101)]
    lam = fit_lambda([(0.0, 1.0), *points])
    assert lam is not None and abs(lam - 0.7) / 0.7 < 0.01
    # through the tracker: 1,000 targets converging on the same curve
    conv = Convergence(1000, started=0.0)
    for i in range(1, 1000):
        t = -math.log(1 - i / 1000) / 0.7              # the time e reaches 1 - i/1000
        conv.observe("applied", at=t)
    lam = fit_lambda(conv.points)
    assert lam is not None and abs(lam - 0.7) / 0.7 < 0.01
    assert fit_lambda([(0.0, 1.0), (1.0, 1.0)]) is None     # no decay: no rate
    summary = summarize([conv])
    assert summary["lambda"] == pytest.approx(lam)
    assert summary["convergence_p50"] == pytest.approx(-math.log(0.5) / 0.7, rel=0.01)
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0


def test_push_metrics_follow_commits_and_reports() -> None:
    pushes = PushMetrics(keep=2)
    pushes.on_event("committed", {"event_id": "e1", "versions": {"did:a": 1, "did:b": 3}})
    pushes.on_event("report", {"did": "did:a", "version": 1, "status": "applied"})
    pushes.on_event("report", {"did": "did:b", "version": 2, "status": "applied"})     # not the pushed one
    assert pushes.summary()["open"] == 1 and pushes.last() is None
    pushes.on_event("report", {"did": "did:b", "version": 3, "status": "failed"})
    summary = pushes.summary()
    assert summary["open"] == 0 and summary["settled"] == 1
    assert summary["last"]["event_id"] == "e1" and summary["last"]["failed"] == 1
    for i in range(3):
        pushes.on_event("committed", {"event_id": f"x{i}", "versions": {"did:c": i + 1}})
        pushes.on_event("report", {"did": "did:c", "version": i + 1, "status": "applied"})
    assert [e for e, _ in pushes.settled] == ["x1", "x2"]


def test_stage_sizes() -> None:
    assert stage_sizes(100, {"percent": 10}, {"steps": [25, 50, 100]}) == [10, 25, 50, 100]
    assert stage_sizes(100, {"count": 5}, {"factor": 2.0}) == [5, 10, 20, 40, 80, 100]
    assert stage_sizes(100, {"count": 5}, {"factor": 4.0, "cap": 30}) == [5, 20, 50, 80, 100]
    assert stage_sizes(3, {"percent": 10}, {"steps": [50, 100]}) == [1, 2, 3]
    assert stage_sizes(5000, {"percent": 1}, {"steps": [10, 50, 100]}) == [50, 500, 2500, 5000]


def test_store_migrates_to_the_rollout_schema(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE rollouts")
    db.execute("DROP TABLE rollout_members")
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    store = Store(path)
    assert store.schema_version == SCHEMA_VERSION >= 4
    store.save_rollout("r1", "running", {"x": 1}, created=1.0, members=[("did:a", 0, {"stage": 0})])
    assert store.load_rollouts()[0]["doc"] == {"x": 1}
    assert store.load_rollout_members("r1") == [("did:a", 0, {"stage": 0})]
    store.close()


# ---------------------------------------------------------------- helpers
async def _operator(mesh: Mesh) -> OperatorClient:
    assert mesh.coordinator is not None and mesh.coordinator.issuer is not None
    key = Key.generate()
    vc = operator_credential(mesh.coordinator.issuer, key.did, roles=("write",))
    op = OperatorClient(mesh.url, key, vc, coordinator=mesh.coordinator.did, timeout=20.0)
    await op.connect()
    mesh.stack.push_async_callback(op.aclose)
    return op


def _engine(mesh: Mesh) -> RolloutEngine:
    assert mesh.coordinator is not None
    engine = mesh.coordinator.rollouts
    assert isinstance(engine, RolloutEngine)
    return engine


async def _fleet(mesh: Mesh, n: int, *, room: str = "room:ro", fail: int = 0,
                 **kwargs: Any) -> tuple[list[Device], dict[str, list[Any]]]:
    """``n`` devices recording their configs; the first ``fail`` of a roll-out's canary order fail it."""
    got: dict[str, list[Any]] = {}
    dids: list[str] = []

    def recorder(did: str) -> Any:
        def on_config(cfg: Any) -> None:
            got[did].append(cfg)
            event = cfg.event_id or ""
            if fail and event.startswith("rollout:") and not event.endswith(":restore"):
                rollout_id = event.split(":")[1]
                if did in sorted(dids, key=lambda d: rank_key(rollout_id, d))[:fail]:
                    raise RuntimeError("the new layout crashed the app")
        return on_config

    devices = []
    for _ in range(n):
        key = Key.generate()
        got[key.did] = []
        dids.append(key.did)
        devices.append(await mesh.device("phone", room=room, key=key, on_config=recorder(key.did), **kwargs))
    return devices, got


async def _status(op: OperatorClient, rollout_id: str) -> dict[str, Any]:
    result: dict[str, Any] = await op.call("rollout.status", {"id": rollout_id})
    return result


async def _wait_state(op: OperatorClient, rollout_id: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
    doc: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal doc
        doc = await _status(op, rollout_id)
        return doc["state"] == state

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"roll-out {rollout_id} is {doc.get('state')}, not {state}: {doc.get('reason')}")
        await asyncio.sleep(0.05)
    return doc


# ---------------------------------------------------------------- roll-outs on brokers
@pytest.mark.broker
@pytest.mark.timeout(240)
async def test_canary_failures_abort_and_roll_back(mesh: Mesh) -> None:
    await mesh.start_coordinator(rules=None)
    op = await _operator(mesh)
    _, got = await _fleet(mesh, 100, fail=3)
    out = await op.call("rollout.start", {
        "name": "layout v4", "target": {"group": "room:ro"}, "change": {"set": {KEY: "v4"}},
        "stages": {"canary": {"percent": 10}, "growth": {"steps": [50, 100]}}, "bake": 0.5,
        "gates": {"min_applied": 1.0, "max_failed": 0.05, "timeout": 30}})
    assert out["stages"] == [10, 50, 100] and out["state"] == "running"
    rollout_id = out["id"]
    doc = await _wait_state(op, rollout_id, "rolled_back")
    assert doc["reason"].startswith("max_failed")
    order = sorted(got, key=lambda d: rank_key(rollout_id, d))
    canary, rest = order[:10], order[10:]
    for did in canary:               # every canary took the change, then a higher restoring version
        assert [c.version for c in got[did]] == [1, 2], did
        assert got[did][0].state == {KEY: "v4"} and got[did][1].state == {} and got[did][1].changes == {KEY: None}
    failing = order[:3]
    coord = mesh.coordinator
    assert coord is not None and coord.store is not None
    store = coord.store
    for did in failing:
        assert store.report_status(did, 1) == "failed"
        await until(lambda did=did: store.reported(did).version == 2, what="restore applied")  # type: ignore[misc]
    for did in rest:                 # the other 90 never saw the change
        assert got[did] == [] and coord.store.latest_version(did) == 0
    assert doc["stages"][0]["failed"] >= 1 and doc["stages"][1]["started"] is None
    assert doc["rollback"]["devices"] == 10 and doc["rollback"]["restored"] == 10
    assert coord.store.pins(canary[0]) == {}            # the restored key is the rules' again
    listed = await op.call("rollout.ls", {"state": "rolled_back"})
    assert [r["id"] for r in listed["rollouts"]] == [rollout_id]
    with pytest.raises(OperatorError) as info:
        await op.call("rollout.resume", {"id": rollout_id})
    assert info.value.reason == "invalid_state"


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_healthy_rollout_completes_stage_by_stage(mesh: Mesh) -> None:
    await mesh.start_coordinator(rules=None)
    op = await _operator(mesh)
    _, got = await _fleet(mesh, 20)
    outsider, outside = await _fleet(mesh, 2, room="room:other")
    out = await op.call("rollout.start", {
        "target": {"group": "room:ro"}, "change": {"set": {KEY: "v5", "ui.font": 14}},
        "stages": {"canary": {"count": 2}, "growth": {"factor": 2.0, "cap": 50}}, "bake": 0.2,
        "gates": {"min_applied": 1.0, "max_failed": 0.0}})
    assert out["stages"] == [2, 4, 8, 16, 20]
    doc = await _wait_state(op, out["id"], "completed")
    stages = doc["stages"]
    for prev, nxt in itertools.pairwise(stages):
        assert prev["passed"] is not None and prev["promoted"] <= nxt["started"]
        assert nxt["started"] - prev["passed"] >= 0.2          # each stage baked before the next
    engine = _engine(mesh)
    r = engine.get(out["id"])
    for did, configs in got.items():
        (cfg,) = configs
        assert cfg.state == {KEY: "v5", "ui.font": 14}
        started = stages[r.members[did].stage]["started"]
        assert cfg.received_at >= started                        # never before its stage
    assert all(v == [] for v in outside.values()) and outsider
    assert doc["counts"] == {"applied": 20}
    metrics = doc["metrics"]
    assert metrics["convergence_p50"] > 0 and metrics["convergence_p95"] >= metrics["convergence_p50"]
    assert metrics["bytes_sent"] > 0 and metrics["cpu_seconds"] > 0
    assert doc["curve"][0] == [0.0, 1.0] and doc["curve"][-1][1] == 0.0
    text = mesh.coordinator.metrics.prometheus().decode()  # type: ignore[union-attr]
    assert 'autoglm_coord_rollouts{state="completed"} 1.0' in text
    summary = mesh.coordinator.metrics.summary()["rollouts"]  # type: ignore[union-attr]
    assert summary["by_state"] == {"completed": 1} and summary["active"] == []    # in status.json too
    pushes = summary["pushes"]                       # every push's adaptation metrics: one per stage here
    assert pushes["settled"] == 5 and pushes["open"] == 0 and pushes["last"]["targets"] == 4
    assert pushes["last"]["convergence_p95"] > 0


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_pause_holds_the_stage_and_resume_continues(mesh: Mesh) -> None:
    await mesh.start_coordinator(rules=None)
    op = await _operator(mesh)
    _, got = await _fleet(mesh, 6)
    out = await op.call("rollout.start", {
        "target": {"group": "room:ro"}, "change": {"set": {KEY: "v6"}},
        "stages": {"canary": {"count": 2}, "growth": {"steps": [100]}}, "bake": 0.1})
    rollout_id = out["id"]
    paused = await op.call("rollout.pause", {"id": rollout_id})
    assert paused["state"] == "paused" and paused["stage"] == 0
    await until(lambda: sum(len(v) for v in got.values()) == 2, what="the canary applied")
    engine = _engine(mesh)
    r = engine.get(rollout_id)
    await until(lambda: r.counts(0).get("applied") == 2, what="canary reports counted")
    seen = engine.ticks
    await until(lambda: engine.ticks >= seen + 5, what="the engine ticked while paused")
    doc = await _status(op, rollout_id)
    assert doc["state"] == "paused" and doc["stage"] == 0 and doc["stages"][1]["started"] is None
    assert sum(len(v) for v in got.values()) == 2
    resumed = await op.call("rollout.resume", {"id": rollout_id})
    assert resumed["state"] == "running"
    await _wait_state(op, rollout_id, "completed")
    assert all(len(v) == 1 for v in got.values())


def _crash(coord: Coordinator) -> None:
    """Stop ``coord`` the way a kill -9 would: no clean shutdown, nothing flushed."""
    coord.started = False
    for task in [coord._sweeper, *coord._tasks]:
        if task is not None:
            task.cancel()


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_coordinator_crash_mid_stage_resumes(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator(rules=None)
    op = await _operator(mesh)
    _, got = await _fleet(mesh, 8)
    out = await op.call("rollout.start", {
        "target": {"group": "room:ro"}, "change": {"set": {KEY: "v7"}},
        "stages": {"canary": {"count": 2}, "growth": {"steps": [50, 100]}}, "bake": 1.0})
    rollout_id = out["id"]
    await until(lambda: sum(len(v) for v in got.values()) == 2, what="the canary applied")
    _crash(coord)
    await coord.client.transport.aclose()
    assert coord.store is not None
    coord.store.close()
    coord._lock.release()                                   # a dead process's flock goes with it

    await mesh.start_coordinator(rules=None)                # same key, same data dir
    op2 = await _operator(mesh)
    doc = await _wait_state(op2, rollout_id, "completed", timeout=60)
    assert [s["size"] for s in doc["stages"]] == [2, 4, 8]
    for did, configs in got.items():
        assert [c.version for c in configs] == [1], did     # exactly once, across the crash
        assert configs[0].state == {KEY: "v7"}


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_offline_device_catches_up_to_its_stage(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.start_coordinator(rules=None)
    op = await _operator(mesh)
    _, got = await _fleet(mesh, 7)                          # stages of 2, 2 and 4 devices with the late one
    late_key = Key.generate()
    late_seen: list[Any] = []
    late = await mesh.device("phone", room="room:ro", key=late_key, record=late_seen,
                             state_file=tmp_path / "late.json")
    await late.aclose()                                     # offline for the roll-out
    coord = mesh.coordinator
    assert coord is not None
    await until(lambda: not coord.registry.get(late_key.did).admitted, what="offline")  # type: ignore[union-attr]
    out = await op.call("rollout.start", {
        "target": {"group": "room:ro"}, "change": {"set": {KEY: "v8"}},
        "stages": {"canary": {"count": 2}, "growth": {"steps": [50, 100]}}, "bake": 3.0,
        "gates": {"min_applied": 0.5, "max_failed": 0.0}})
    assert out["stages"] == [2, 4, 8]
    rollout_id = out["id"]
    r = _engine(mesh).get(rollout_id)
    stage = r.members[late_key.did].stage
    await until(lambda: r.stage >= stage and r.passed[stage] is not None, timeout=30, what="its stage passed")
    await op.call("rollout.pause", {"id": rollout_id})     # while its stage bakes
    assert r.stage == stage and r.state == "paused"
    back = await mesh.device("phone", room="room:ro", key=late_key, record=late_seen,
                             state_file=tmp_path / "late.json")
    await back.wait_version(1, 15)
    assert [c.state for c in late_seen] == [{KEY: "v8"}]
    for did, configs in got.items():                        # the others: exactly what their stage says
        if r.members[did].stage <= stage:
            await until(lambda configs=configs: len(configs) == 1, what="stage member applied")  # type: ignore[misc]
        else:
            assert configs == []


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_smoke_failure_blocks_promotion(mesh: Mesh) -> None:
    await mesh.start_coordinator(rules=None)
    op = await _operator(mesh)
    devices, got = await _fleet(mesh, 6)
    calls: list[str] = []
    engine = _engine(mesh)

    def smoke_for(did: str) -> Any:
        def smoke(args: dict[str, Any]) -> dict[str, Any]:
            calls.append(did)
            (r,) = engine.rollouts.values()
            return {"ok": did != r.by_stage[0][0].did, "screen": args.get("screen")}   # the first canary fails
        return smoke

    for dev in devices:
        dev.commands.register("smoke", smoke_for(dev.did))
    out = await op.call("rollout.start", {
        "target": {"group": "room:ro"}, "change": {"set": {KEY: "v9"}},
        "stages": {"canary": {"count": 2}, "growth": {"steps": [100]}}, "bake": 0,
        "gates": {"smoke": {"method": "smoke", "args": {"screen": "home"}, "timeout": 5}}})
    rollout_id = out["id"]
    r = engine.get(rollout_id)
    await until(lambda: len(calls) == 2, what="both canaries ran the smoke check")
    await until(lambda: any((m.smoke or "").startswith("failed") for m in r.by_stage[0]), what="smoke failed")
    seen = engine.ticks
    await until(lambda: engine.ticks >= seen + 5, what="the engine evaluated the gates again")
    doc = await _status(op, rollout_id)
    assert doc["state"] == "running" and doc["stage"] == 0
    gate = doc["stages"][0]["gates"]["smoke"]
    assert gate["ok"] is False and gate["value"] == {"passed": 1, "failed": 1}
    assert sorted(calls) == sorted(m.did for m in r.by_stage[0])
    assert sum(len(v) for v in got.values()) == 2            # nobody beyond the canary
    aborted = await op.call("rollout.abort", {"id": rollout_id})
    assert aborted["state"] in ("aborted", "rolled_back") and aborted["reason"].startswith("aborted by")


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_health_property_gate_aborts(mesh: Mesh) -> None:
    await mesh.start_coordinator(rules=None)
    op = await _operator(mesh)
    engine = _engine(mesh)
    devices: list[Device] = []
    got: dict[str, list[Any]] = {}

    def crashes(did: str) -> int:               # the second canary's app crashes on the new layout
        (r,) = engine.rollouts.values()
        return 2 if did == r.by_stage[0][1].did else 0

    def recorder(did: str) -> Any:
        async def on_config(cfg: Any) -> None:
            got[did].append(cfg)
            dev = next(d for d in devices if d.did == did)
            await dev.report_properties({"app": {"crashes": crashes(did) if cfg.state else 0}})
        return on_config

    for _ in range(6):
        key = Key.generate()
        got[key.did] = []
        devices.append(await mesh.device("phone", room="room:ro", key=key, on_config=recorder(key.did)))
    out = await op.call("rollout.start", {
        "target": {"group": "room:ro"}, "change": {"set": {KEY: "v10"}},
        "stages": {"canary": {"count": 3}, "growth": {"steps": [100]}}, "bake": 0.2,
        "gates": {"max_failed": 0.0, "health": [{"property": "app.crashes", "op": "le", "value": 0}]}})
    r = engine.get(out["id"])
    doc = await _wait_state(op, out["id"], "rolled_back")
    assert doc["reason"].startswith("max_failed")             # the unhealthy canary counts as failed
    coord = mesh.coordinator
    assert coord is not None and coord.store is not None
    for m in r.by_stage[0]:                                   # every canary applied: only health failed
        assert coord.store.report_status(m.did, 1) == "applied"
        assert [c.version for c in got[m.did]] == [1, 2]
    assert all(got[m.did] == [] for m in r.by_stage[1])


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_bad_requests_are_refused(mesh: Mesh) -> None:
    await mesh.start_coordinator(rules=None)
    op = await _operator(mesh)
    await _fleet(mesh, 1)
    base = {"target": {"group": "room:ro"}, "change": {"set": {KEY: "x"}}}
    for params in ({**base, "change": {}}, {**base, "stages": {"canary": {"count": 0}}},
                   {**base, "stages": {"growth": {"steps": [50, 40]}}}, {**base, "gates": {"max_failed": 2}},
                   {**base, "gates": {"health": [{"property": "a", "op": "like", "value": 1}]}},
                   {**base, "bake": -1}, {**base, "extra": 1}, {**base, "target": {"group": "room:none"}}):
        with pytest.raises(OperatorError) as info:
            await op.call("rollout.start", params)
        assert info.value.reason == "invalid_params", params
    with pytest.raises(OperatorError) as info:
        await op.call("rollout.status", {"id": "ro-nope"})
    assert info.value.reason == "not_found"

    coord = mesh.coordinator
    assert coord is not None and coord.store is not None

    def broken(*args: Any, **kwargs: Any) -> Any:      # the disk fails under the stage's commit
        raise StoreError("state store write failed: disk I/O error")

    coord.store.commit_rollout = broken                 # type: ignore[method-assign]
    with pytest.raises(OperatorError) as info:
        await op.call("rollout.start", base)
    assert info.value.reason == "store_error"
    assert await op.call("rollout.ls") == {"rollouts": []}    # nothing half-started is left
