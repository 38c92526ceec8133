"""Staged roll-outs: a desired-state change goes to a target set stage by stage, behind health gates.

A roll-out sorts its targets by SHA-256(roll-out id + DID) (the canary is deterministic and
reproducible), cuts them into cumulative stages (a canary, then fixed steps or exponential
growth), and commits the change only for the devices of the stage it is in: devices outside the
current stage never see it, and an offline stage member gets it from the normal pump when it
comes back. A stage is promoted once its gates pass and then hold for the bake time:

- ``min_applied``: applied members / stage members;
- ``max_failed``: (failed + unhealthy) members / stage members; above it the roll-out aborts;
- ``health``: device-reported properties (``app.crashes le 0``) of every applied member; a
  violating member counts as unhealthy (a failure);
- ``smoke``: a direct command each canary member runs after applying; a failed smoke blocks
  promotion;
- ``timeout``: the gates must pass within it after the stage's commit, or the roll-out aborts.

Abort rolls back: every member that took the change gets a new, higher version restoring its
previous values of the changed keys (keys someone changed since are left alone). The state is
persisted (``rollouts`` / ``rollout_members``); after a restart timers are re-derived from the
persisted timestamps and reports recorded meanwhile are read back from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdk.coord.coordinator.adaptation import Convergence, PushMetrics, downsample, summarize
from sdk.coord.coordinator.errors import InvalidValue
from sdk.coord.coordinator.values import strict_dumps
from sdk.coord.errors import CoordinationError, OperatorError

if TYPE_CHECKING:
    from sdk.coord.coordinator.daemon import Coordinator
    from sdk.coord.protocol import ConfigVersion

log = logging.getLogger(__name__)

RUNNING, PAUSED, COMPLETED, ABORTED, ROLLED_BACK, CANCELLED = (
    "running", "paused", "completed", "aborted", "rolled_back", "cancelled")
STATES = (RUNNING, PAUSED, COMPLETED, ABORTED, ROLLED_BACK, CANCELLED)
#: states in which the engine still has work (reports to count, timers to run)
ACTIVE = (RUNNING, PAUSED, ABORTED)
#: seconds between two gate evaluations
TICK = 0.2
#: seconds between two persisted snapshots of a roll-out's counters and curves
SAVE_EVERY = 1.0
#: a roll-out's curve (whole target set) keeps this many points in its state document
MAX_POINTS = 1000

_OPS = {"le": lambda a, b: a <= b, "lt": lambda a, b: a < b, "eq": lambda a, b: a == b,
        "ge": lambda a, b: a >= b, "gt": lambda a, b: a > b}


def rank_key(rollout_id: str, did: str) -> str:
    """The canary order of ``did`` in roll-out ``rollout_id``: SHA-256(id + did), hex."""
    return hashlib.sha256((rollout_id + did).encode()).hexdigest()


@dataclass(frozen=True)
class HealthCheck:
    """A device-reported property that must hold on every applied member (``app.crashes le 0``)."""

    property: str
    op: str
    value: Any

    def holds(self, properties: Mapping[str, Any]) -> bool | None:
        """True/False, or None when the device has not reported the property."""
        actual = lookup(properties, self.property)
        if actual is None:
            return None
        try:
            return bool(_OPS[self.op](actual, self.value))
        except TypeError:
            return False


@dataclass(frozen=True)
class Smoke:
    """The canary's smoke check: ``method(args)`` on each canary member after it applied."""

    method: str
    args: dict[str, Any] = field(default_factory=dict)
    timeout: float = 10.0


@dataclass(frozen=True)
class Gates:
    min_applied: float = 0.95
    max_failed: float = 0.05
    timeout: float | None = None
    health: tuple[HealthCheck, ...] = ()
    smoke: Smoke | None = None

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"min_applied": self.min_applied, "max_failed": self.max_failed,
                               "timeout": self.timeout,
                               "health": [{"property": h.property, "op": h.op, "value": h.value}
                                          for h in self.health]}
        if self.smoke is not None:
            doc["smoke"] = {"method": self.smoke.method, "args": self.smoke.args, "timeout": self.smoke.timeout}
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Gates:
        smoke = doc.get("smoke")
        return cls(float(doc.get("min_applied", 0.95)), float(doc.get("max_failed", 0.05)),
                   None if doc.get("timeout") is None else float(doc["timeout"]),
                   tuple(HealthCheck(h["property"], h["op"], h["value"]) for h in doc.get("health", [])),
                   None if smoke is None else Smoke(smoke["method"], dict(smoke.get("args") or {}),
                                                    float(smoke.get("timeout", 10.0))))


@dataclass(frozen=True)
class RolloutSpec:
    """A validated ``rollout.start`` request."""

    name: str | None
    target: Any
    set: dict[str, Any]
    unset: tuple[str, ...]
    canary: dict[str, float]               # {"count": n} or {"percent": p}
    growth: dict[str, Any]                 # {"steps": [...]} or {"factor": f, "cap": p}
    bake: float
    gates: Gates

    @property
    def keys(self) -> tuple[str, ...]:
        return (*self.set, *self.unset)

    def changes(self) -> dict[str, Any]:
        """The desired-state patch (``None`` removes a key)."""
        return {**self.set, **dict.fromkeys(self.unset)}


def lookup(properties: Mapping[str, Any], name: str) -> Any:
    """``name`` in reported properties: the flat key, else a dotted path into nested objects."""
    if name in properties:
        return properties[name]
    value: Any = properties
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def stage_sizes(total: int, canary: Mapping[str, float], growth: Mapping[str, Any]) -> list[int]:
    """Cumulative stage sizes for ``total`` targets: the canary, then growth, ending at ``total``.

    Steps are cumulative percentages; ``factor`` multiplies the cumulative size each stage, each
    stage adding at most ``cap`` percent of the targets."""
    if total <= 0:
        return []
    if "count" in canary:
        first = int(canary["count"])
    else:
        first = math.ceil(float(canary["percent"]) * total / 100)
    sizes = [min(total, max(1, first))]
    if "steps" in growth:
        for pct in growth["steps"]:
            sizes.append(min(total, max(1, math.ceil(float(pct) * total / 100))))
    else:
        factor = float(growth.get("factor", 2.0))
        cap = max(1, math.ceil(float(growth.get("cap", 100.0)) * total / 100))
        while sizes[-1] < total:
            grown = max(sizes[-1] + 1, math.ceil(sizes[-1] * factor))
            sizes.append(min(total, sizes[-1] + cap, grown))
    out: list[int] = []
    for size in sizes:
        if not out or size > out[-1]:
            out.append(size)
    if out[-1] < total:
        out.append(total)
    return out


@dataclass
class Member:
    """One target device of a roll-out."""

    did: str
    rank: int
    stage: int
    status: str = "waiting"        # waiting, pending, applied, failed; restoring, restored, restore_failed
    version: int = 0               # the version that carried the change (0: not committed)
    previous: dict[str, Any] | None = None     # {"values": {key: value or None}, "pinned": [keys]}
    committed: float = 0.0
    done: float = 0.0
    smoke: str | None = None       # None, "running", "ok", "failed: <reason>"
    restore: int = 0               # the restoring version (0: none)
    outcome: str | None = None     # what the device reported for the change: applied or failed

    def to_doc(self) -> dict[str, Any]:
        return {"stage": self.stage, "status": self.status, "version": self.version, "previous": self.previous,
                "committed": self.committed, "done": self.done, "smoke": self.smoke, "restore": self.restore,
                "outcome": self.outcome}

    @classmethod
    def from_doc(cls, did: str, rank: int, doc: Mapping[str, Any]) -> Member:
        return cls(did, rank, int(doc["stage"]), str(doc.get("status", "waiting")), int(doc.get("version", 0)),
                   doc.get("previous"), float(doc.get("committed", 0.0)), float(doc.get("done", 0.0)),
                   doc.get("smoke"), int(doc.get("restore", 0)), doc.get("outcome"))

    @property
    def took_change(self) -> bool:
        return self.version > 0


@dataclass
class Rollout:
    """A roll-out's state: its spec, stages, members and per-stage timestamps and convergence."""

    id: str
    operator: str
    spec: RolloutSpec
    sizes: list[int]
    created: float
    state: str = RUNNING
    stage: int = 0
    reason: str | None = None
    started: list[float | None] = field(default_factory=list)     # stage commit times
    passed: list[float | None] = field(default_factory=list)      # gates first passed
    promoted: list[float | None] = field(default_factory=list)
    members: dict[str, Member] = field(default_factory=dict)
    by_stage: list[list[Member]] = field(default_factory=list)
    pushes: list[Convergence | None] = field(default_factory=list)
    restore_push: Convergence | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    applied_total: int = 0
    paused_at: float | None = None
    dirty: set[str] = field(default_factory=set)
    saved: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.sizes)
        for attr in ("started", "passed", "promoted"):
            values = getattr(self, attr)
            values.extend([None] * (n - len(values)))
        self.pushes.extend([None] * (n - len(self.pushes)))

    def index(self) -> None:
        """Group members by stage (after loading or creating them)."""
        self.by_stage = [[] for _ in self.sizes]
        for m in sorted(self.members.values(), key=lambda m: m.rank):
            self.by_stage[m.stage].append(m)

    def to_doc(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "name": spec.name, "operator": self.operator, "target": spec.target,
            "change": {"set": spec.set, "unset": list(spec.unset)},
            "stages_spec": {"canary": spec.canary, "growth": spec.growth}, "bake": spec.bake,
            "gates": spec.gates.to_doc(), "sizes": self.sizes, "stage": self.stage, "reason": self.reason,
            "started": self.started, "passed": self.passed, "promoted": self.promoted, "paused_at": self.paused_at,
            "pushes": [None if p is None else p.to_doc() for p in self.pushes],
            "restore_push": None if self.restore_push is None else self.restore_push.to_doc(),
            "points": downsample(self.points, MAX_POINTS),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Rollout:
        doc = row["doc"]
        stages = doc["stages_spec"]
        spec = RolloutSpec(doc.get("name"), doc["target"], dict(doc["change"]["set"]),
                           tuple(doc["change"]["unset"]), dict(stages["canary"]), dict(stages["growth"]),
                           float(doc["bake"]), Gates.from_doc(doc["gates"]))
        r = cls(row["id"], doc["operator"], spec, [int(s) for s in doc["sizes"]], float(row["created"]),
                state=row["state"], stage=int(doc["stage"]), reason=doc.get("reason"),
                started=list(doc["started"]), passed=list(doc["passed"]), promoted=list(doc["promoted"]),
                pushes=[None if p is None else Convergence.from_doc(p) for p in doc.get("pushes", [])],
                restore_push=None if doc.get("restore_push") is None else Convergence.from_doc(doc["restore_push"]),
                points=[(float(t), float(e)) for t, e in doc.get("points", [])], paused_at=doc.get("paused_at"))
        return r

    def counts(self, stage: int | None = None) -> dict[str, int]:
        """Members by status (of one stage, or of the whole roll-out)."""
        members = self.by_stage[stage] if stage is not None else self.members.values()
        out: dict[str, int] = {}
        for m in members:
            out[m.status] = out.get(m.status, 0) + 1
        return out


Snapshot = tuple[dict[str, Any], dict[str, dict[str, Any]]]


def snapshot(r: Rollout) -> Snapshot:
    """``r``'s in-memory state, to put back when a commit fails (nothing was written then)."""
    fields = {"state": r.state, "stage": r.stage, "reason": r.reason, "started": list(r.started),
              "passed": list(r.passed), "promoted": list(r.promoted), "pushes": list(r.pushes),
              "restore_push": r.restore_push}
    return fields, {did: m.to_doc() for did, m in r.members.items()}


def put_back(r: Rollout, saved: Snapshot) -> None:
    fields, members = saved
    for name, value in fields.items():
        setattr(r, name, value)
    for did, doc in members.items():
        m = r.members[did]
        m.__dict__.update(Member.from_doc(did, m.rank, doc).__dict__)


class RolloutEngine:
    """The roll-outs of one coordinator: persisted state, the gate tick, reports, rollback."""

    def __init__(self, coordinator: Coordinator, *, tick: float = TICK) -> None:
        self.coordinator = coordinator
        self.tick_interval = tick
        self.rollouts: dict[str, Rollout] = {}
        self._by_did: dict[str, list[Rollout]] = {}
        self._task: asyncio.Task[Any] | None = None
        self._smoke: set[asyncio.Task[Any]] = set()
        #: gate evaluations done (a positive signal for "the engine looked again")
        self.ticks = 0
        self._listening = False
        #: the adaptation metrics of every push (not only roll-outs')
        self.pushes = PushMetrics()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load persisted roll-outs (reconciling reports recorded meanwhile) and start the tick."""
        if not self._listening:
            self._listening = True
            self.coordinator.add_listener(self._on_event)
            self.coordinator.add_listener(self.pushes.on_event)
            self.coordinator.metrics.rollout_summary = self.overview
        self.rollouts.clear()
        self._by_did.clear()
        store = self.coordinator.store
        assert store is not None
        for row in store.load_rollouts():
            try:
                r = Rollout.from_row(row)
                for did, rank, doc in store.load_rollout_members(r.id):
                    r.members[did] = Member.from_doc(did, rank, doc)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("roll-out %s in the store is unreadable (%s); skipped", row.get("id"), exc)
                continue
            r.index()
            self.rollouts[r.id] = r
            if r.state in ACTIVE:
                self._reconcile(r)
                self._track(r)
                log.info("roll-out %s resumed: %s at stage %d of %d", r.id, r.state, r.stage + 1, len(r.sizes))
        self._task = self.coordinator._spawn(self._run())   # noqa: SLF001 - cancelled with the coordinator

    def _track(self, r: Rollout) -> None:
        for did in r.members:
            self._by_did.setdefault(did, []).append(r)

    def _untrack(self, r: Rollout) -> None:
        for did in r.members:
            lst = self._by_did.get(did)
            if lst is not None and r in lst:
                lst.remove(r)
                if not lst:
                    del self._by_did[did]

    def _reconcile(self, r: Rollout) -> None:
        """Statuses of members whose reports were recorded while the engine was not running."""
        store = self.coordinator.store
        assert store is not None
        for m in r.members.values():
            if m.status == "pending":
                status = store.report_status(m.did, m.version)
                if status is None and store.reported(m.did).version >= m.version:
                    status = "applied"
                if status is not None:
                    self._settle(r, m, status, at=time.time())
            elif m.status == "restoring":
                status = store.report_status(m.did, m.restore)
                if status is None and store.reported(m.did).version >= m.restore:
                    status = "applied"
                if status is not None:
                    self._settle(r, m, status, at=time.time())
            if m.smoke == "running":
                m.smoke = None          # a smoke call cut by the restart runs again

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                await self.tick()
            except (CoordinationError, OperatorError) as exc:
                log.error("roll-out tick failed: %s", exc)
            except Exception:       # one bad evaluation must not stop every roll-out
                log.exception("roll-out tick failed")

    # ------------------------------------------------------------------ reports
    def _on_event(self, what: str, info: dict[str, Any]) -> None:
        if what != "report":
            return
        rollouts = self._by_did.get(info.get("did", ""))
        if not rollouts:
            return
        did, version, status = info["did"], int(info["version"]), str(info["status"])
        for r in list(rollouts):
            m = r.members[did]
            wanted = m.version if m.status == "pending" else m.restore if m.status == "restoring" else 0
            if wanted and (version == wanted or (version > wanted and status == "applied")):
                self._settle(r, m, status, at=time.time())

    def _settle(self, r: Rollout, m: Member, status: str, *, at: float) -> None:
        applied = status == "applied"
        if m.status == "restoring":
            m.status = "restored" if applied else "restore_failed"
            if r.restore_push is not None:
                r.restore_push.observe(status, at=at)
        else:
            m.status = m.outcome = "applied" if applied else "failed"
            m.done = at
            push = r.pushes[m.stage]
            if push is not None:
                push.observe(status, at=at)
            if applied:
                self.coordinator.metrics.rollout_convergence.observe(max(0.0, at - m.committed))
                r.applied_total += 1
                total = len(r.members)
                r.points.append((max(0.0, at - r.created), (total - r.applied_total) / total))
        r.dirty.add(m.did)

    # ------------------------------------------------------------------ operations
    def get(self, rollout_id: Any) -> Rollout:
        if not isinstance(rollout_id, str) or rollout_id not in self.rollouts:
            raise OperatorError(f"no roll-out {str(rollout_id)[:64]!r}", reason="not_found")
        return self.rollouts[rollout_id]

    async def create(self, spec: RolloutSpec, dids: list[str], *, operator: str) -> Rollout:
        """Start a roll-out of ``spec`` over ``dids``: persist it and commit its canary stage."""
        if not dids:
            raise OperatorError("target: no device matches", reason="invalid_params")
        rollout_id = f"ro-{uuid.uuid4().hex[:12]}"
        ordered = sorted(dids, key=lambda did: rank_key(rollout_id, did))
        sizes = stage_sizes(len(ordered), spec.canary, spec.growth)
        r = Rollout(rollout_id, operator, spec, sizes, time.time())
        stage = 0
        for rank, did in enumerate(ordered):
            while rank >= sizes[stage]:
                stage += 1
            r.members[did] = Member(did, rank, stage)
        r.index()
        r.points.append((0.0, 1.0))
        self.rollouts[rollout_id] = r
        self._track(r)
        log.info("roll-out %s by %s: %d device(s) in stages %s", rollout_id, operator, len(ordered), sizes)
        try:
            await self._start_stage(r, 0, all_members=True)
        except (OperatorError, CoordinationError):
            self._untrack(r)
            del self.rollouts[rollout_id]
            raise
        return r

    def pause(self, r: Rollout) -> None:
        if r.state != RUNNING:
            raise OperatorError(f"roll-out {r.id} is {r.state}, not running", reason="invalid_state")
        r.state, r.paused_at = PAUSED, time.time()
        self._save(r)
        log.info("roll-out %s paused at stage %d", r.id, r.stage + 1)

    def resume(self, r: Rollout) -> None:
        """Resume a paused roll-out; the stage's timeout and bake clocks restart."""
        if r.state != PAUSED:
            raise OperatorError(f"roll-out {r.id} is {r.state}, not paused", reason="invalid_state")
        now = time.time()
        r.state, r.paused_at = RUNNING, None
        r.started[r.stage] = now
        r.passed[r.stage] = None
        self._save(r)
        log.info("roll-out %s resumed at stage %d", r.id, r.stage + 1)

    def cancel(self, r: Rollout) -> None:
        """Stop: no further stage; what applied stays."""
        if r.state not in (RUNNING, PAUSED):
            raise OperatorError(f"roll-out {r.id} is {r.state}", reason="invalid_state")
        r.state, r.reason = CANCELLED, "cancelled by an operator"
        self._save(r)
        self._untrack(r)
        log.info("roll-out %s cancelled at stage %d", r.id, r.stage + 1)

    async def abort(self, r: Rollout, reason: str) -> None:
        """Stop and roll back every member that took the change (a new, higher version each)."""
        if r.state not in (RUNNING, PAUSED):
            raise OperatorError(f"roll-out {r.id} is {r.state}", reason="invalid_state")
        store = self.coordinator.store
        if store is None:
            raise OperatorError("the coordinator is not running", reason="busy")
        from sdk.coord.coordinator.daemon import MAX_CONFIG_BYTES

        spec = r.spec
        ours = spec.changes()
        changes: dict[str, dict[str, Any]] = {}
        pin: dict[str, list[str]] = {}
        unpin: dict[str, list[str]] = {}
        touched: list[Member] = []
        now = time.time()
        saved = snapshot(r)
        for m in r.members.values():
            if not m.took_change or m.status in ("restoring", "restored", "restore_failed"):
                continue
            previous = m.previous or {"values": {}, "pinned": []}
            desired = store.desired(m.did)
            restore: dict[str, Any] = {}
            for key, value in ours.items():
                if desired.get(key) != value:
                    continue                        # changed since: left as it is now
                old = previous["values"].get(key)
                if old != value:
                    restore[key] = old
            if not restore:
                m.status = "restored"
                r.dirty.add(m.did)
                continue
            was_pinned = set(previous.get("pinned", []))
            pin[m.did] = [k for k, v in restore.items() if v is not None and k in was_pinned]
            unpin[m.did] = [k for k in restore if k not in was_pinned or restore[k] is None]
            changes[m.did] = restore
            m.restore = store.latest_version(m.did) + 1
            m.status = "restoring"
            touched.append(m)
        r.state, r.reason = ABORTED, reason
        r.restore_push = Convergence(len(touched), started=now)
        event_id = f"rollout:{r.id}:restore"
        rows = [(m.did, m.rank, m.to_doc()) for m in r.members.values() if m.status in ("restoring", "restored")]
        try:
            versions = store.commit_rollout(changes, operator=r.operator, event_id=event_id, op="rollout.abort",
                                            pin=pin, unpin=unpin, rollout_id=r.id, state=r.state, doc=r.to_doc(),
                                            created=r.created, members=rows, now=now, max_bytes=MAX_CONFIG_BYTES)
        except InvalidValue as exc:
            put_back(r, saved)
            raise OperatorError(f"rollback of {r.id}: {exc}", reason="invalid_params") from exc
        except CoordinationError:
            put_back(r, saved)
            raise
        for cv in versions:
            r.members[cv.did].restore = cv.version
        r.dirty.clear()
        log.warning("roll-out %s aborted at stage %d (%s): %d device(s) rolled back", r.id, r.stage + 1,
                    reason, len(versions))
        await self._push(event_id, versions, r.restore_push)
        if not touched:
            self._finish_rollback(r)

    # ------------------------------------------------------------------ stages
    async def _start_stage(self, r: Rollout, stage: int, *, all_members: bool = False) -> None:
        """Commit the change for ``stage``'s members (their previous values recorded with it)."""
        from sdk.coord.coordinator.daemon import MAX_CONFIG_BYTES

        store = self.coordinator.store
        if store is None:
            raise OperatorError("the coordinator is not running", reason="busy")
        spec = r.spec
        keys = spec.keys
        change = spec.changes()
        now = time.time()
        members = r.by_stage[stage]
        changes: dict[str, dict[str, Any]] = {}
        saved = snapshot(r)
        for m in members:
            desired, pinned = store.desired(m.did), store.pinned(m.did)
            m.previous = {"values": {k: desired.get(k) for k in keys}, "pinned": sorted(pinned & set(keys))}
            m.version = store.latest_version(m.did) + 1
            m.status, m.committed = "pending", now
            changes[m.did] = change
        if stage > 0:
            r.promoted[stage - 1] = now
        r.stage, r.started[stage], r.passed[stage] = stage, now, None
        push = Convergence(len(members), started=now)
        r.pushes[stage] = push
        event_id = f"rollout:{r.id}:{stage}"
        rows = [(m.did, m.rank, m.to_doc()) for m in (r.members.values() if all_members else members)]
        by_rule = r.operator.startswith("rule:")        # a rule's roll-out (rule_rollouts.py) pins nothing
        try:
            versions = store.commit_rollout(
                changes, operator=r.operator, event_id=event_id, op="rollout.start",
                pin={did: list(spec.set) for did in changes if not by_rule},
                unpin={did: list(spec.unset) for did in changes if not by_rule},
                rollout_id=r.id, state=r.state, doc=r.to_doc(), created=r.created, members=rows, now=now,
                max_bytes=MAX_CONFIG_BYTES)
        except InvalidValue as exc:
            put_back(r, saved)
            raise OperatorError(f"change: {exc}", reason="invalid_params") from exc
        except CoordinationError:
            put_back(r, saved)
            raise
        for cv in versions:
            r.members[cv.did].version = cv.version
        r.saved = time.monotonic()
        log.info("roll-out %s: stage %d of %d committed for %d device(s)", r.id, stage + 1, len(r.sizes),
                 len(versions))
        await self._push(event_id, versions, push)

    async def _push(self, event_id: str, versions: list[ConfigVersion], push: Convergence) -> None:
        push.bytes_sent += sum(len(strict_dumps(cv.to_body())) for cv in versions)
        if versions:
            await self.coordinator.push_desired(event_id, versions, wait=False)

    def _finish_rollback(self, r: Rollout) -> None:
        r.state = ROLLED_BACK
        self._save(r)
        self._untrack(r)
        log.info("roll-out %s rolled back", r.id)

    # ------------------------------------------------------------------ gates
    def gates(self, r: Rollout, stage: int, now: float | None = None) -> dict[str, dict[str, Any]]:
        """``{name: {ok, value, limit}}`` of ``stage``'s gates (O(stage members))."""
        now = time.time() if now is None else now
        members = r.by_stage[stage]
        n = len(members) or 1
        g = r.spec.gates
        applied = [m for m in members if m.outcome == "applied"]
        failed = sum(1 for m in members if m.outcome == "failed")
        out: dict[str, dict[str, Any]] = {}
        unhealthy = 0
        if g.health:
            registry = self.coordinator.registry
            for check in g.health:
                bad = unknown = 0
                for m in applied:
                    rec = registry.get(m.did)
                    holds = check.holds(rec.properties if rec is not None else {})
                    if holds is None:
                        unknown += 1
                    elif not holds:
                        bad += 1
                unhealthy = max(unhealthy, bad)
                out[f"health:{check.property}"] = {"ok": bad == 0 and unknown == 0 and len(applied) == len(members),
                                                   "value": bad, "limit": f"{check.op} {check.value!r}",
                                                   "unknown": unknown}
        out["applied"] = {"ok": len(applied) / n >= g.min_applied, "value": round(len(applied) / n, 6),
                          "limit": g.min_applied}
        out["failed"] = {"ok": (failed + unhealthy) / n <= g.max_failed,
                         "value": round((failed + unhealthy) / n, 6), "limit": g.max_failed}
        if g.smoke is not None and stage == 0:
            passed = sum(1 for m in members if m.smoke == "ok")
            smoke_failed = sum(1 for m in members if m.smoke is not None and m.smoke.startswith("failed"))
            out["smoke"] = {"ok": smoke_failed == 0 and passed >= len(applied) and passed > 0,
                            "value": {"passed": passed, "failed": smoke_failed}, "limit": g.smoke.method}
        started = r.started[stage]
        if g.timeout is not None and started is not None:
            elapsed = (r.paused_at if r.state == PAUSED and r.paused_at else now) - started
            out["timeout"] = {"ok": elapsed <= g.timeout, "value": round(elapsed, 3), "limit": g.timeout}
        return out

    async def tick(self, now: float | None = None) -> None:
        """Evaluate every running roll-out's gates once: smoke calls, abort, bake, promotion."""
        self.ticks += 1
        for r in list(self.rollouts.values()):
            if r.state == RUNNING:
                await self._evaluate(r, time.time() if now is None else now)
            elif r.state == ABORTED and all(m.status != "restoring" for m in r.members.values()):
                self._finish_rollback(r)
            if r.state in ACTIVE and r.dirty and time.monotonic() - r.saved >= SAVE_EVERY:
                self._save(r)
        self._export()

    def _export(self) -> None:
        """Prometheus: roll-outs by state; the newest roll-out's λ and cost ratio."""
        metrics = self.coordinator.metrics
        counts = dict.fromkeys(STATES, 0)
        for r in self.rollouts.values():
            counts[r.state] += 1
        for state, n in counts.items():
            metrics.rollouts.labels(state).set(n)
        if self.rollouts:
            newest = max(self.rollouts.values(), key=lambda r: r.created)
            summary = summarize([p for p in newest.pushes if p is not None])
            metrics.rollout_decay_rate.set(summary["lambda"] or 0.0)
            metrics.rollout_cost_ratio.set(summary["cost_ratio"] or 0.0)
        last = self.pushes.last()
        if last is not None:
            lam = summarize([last[1]])["lambda"]
            metrics.push_decay_rate.set(lam or 0.0)

    async def _evaluate(self, r: Rollout, now: float) -> None:
        stage = r.stage
        smoke = r.spec.gates.smoke
        if smoke is not None and stage == 0:
            for m in r.by_stage[0]:
                if m.status == "applied" and m.smoke is None:
                    m.smoke = "running"
                    task = self.coordinator._spawn(self._run_smoke(r, m, smoke))   # noqa: SLF001
                    self._smoke.add(task)
                    task.add_done_callback(self._smoke.discard)
        gates = self.gates(r, stage, now)
        if not gates["failed"]["ok"]:
            await self.abort(r, f"max_failed: {gates['failed']['value']:.3g} of stage {stage + 1} failed "
                                f"(limit {r.spec.gates.max_failed:g})")
            return
        ok = all(g["ok"] for name, g in gates.items() if name != "timeout")
        if not ok:
            if "timeout" in gates and not gates["timeout"]["ok"]:
                failing = sorted(n for n, g in gates.items() if not g["ok"] and n != "timeout")
                await self.abort(r, f"timeout: stage {stage + 1} gates {', '.join(failing)} did not pass "
                                    f"within {r.spec.gates.timeout:g}s")
            return
        if r.passed[stage] is None:
            r.passed[stage] = now
            self._save(r)
            log.info("roll-out %s: stage %d gates passed; baking %gs", r.id, stage + 1, r.spec.bake)
        passed = r.passed[stage]
        assert passed is not None
        if now - passed < r.spec.bake:
            return
        if stage + 1 < len(r.sizes):
            await self._start_stage(r, stage + 1)
        else:
            r.promoted[stage] = now
            r.state = COMPLETED
            self._save(r)
            self._untrack(r)
            log.info("roll-out %s completed: %d device(s)", r.id, len(r.members))

    async def _run_smoke(self, r: Rollout, m: Member, smoke: Smoke) -> None:
        from sdk.coord.coordinator.commands_ops import call_device

        try:
            result = await call_device(self.coordinator, m.did, smoke.method, dict(smoke.args),
                                       timeout=smoke.timeout)
        except OperatorError as exc:
            m.smoke = f"failed: {exc.reason}"
        else:
            bad = result is False or (isinstance(result, Mapping) and result.get("ok") is False)
            m.smoke = "failed: result" if bad else "ok"
        if m.smoke != "ok":
            log.warning("roll-out %s: smoke %s on %s %s", r.id, smoke.method, m.did, m.smoke)
        r.dirty.add(m.did)

    # ------------------------------------------------------------------ persistence and views
    def _save(self, r: Rollout) -> None:
        store = self.coordinator.store
        if store is None:
            return
        rows = [(did, r.members[did].rank, r.members[did].to_doc()) for did in r.dirty]
        try:
            store.save_rollout(r.id, r.state, r.to_doc(), created=r.created, members=rows)
        except CoordinationError as exc:
            log.error("roll-out %s not persisted: %s", r.id, exc)
            return
        r.dirty.clear()
        r.saved = time.monotonic()

    def flush(self) -> None:
        """Persist every roll-out's pending changes (on a clean stop)."""
        for r in self.rollouts.values():
            if r.dirty:
                self._save(r)

    def summary(self, r: Rollout) -> dict[str, Any]:
        """The ``rollout.ls`` row of ``r``."""
        return {"id": r.id, "name": r.spec.name, "state": r.state, "stage": r.stage, "stages": r.sizes,
                "counts": r.counts(), "created": r.created}

    def status(self, r: Rollout) -> dict[str, Any]:
        """The ``rollout.status`` document of ``r``."""
        now = time.time()
        stages = []
        for i, size in enumerate(r.sizes):
            members = r.by_stage[i]
            counts = r.counts(i)
            applied = sum(1 for m in members if m.outcome == "applied")
            failed = sum(1 for m in members if m.outcome == "failed")
            committed = r.started[i] is not None
            stages.append({
                "index": i, "size": size, "members": len(members), "applied": applied, "failed": failed,
                "pending": counts.get("pending", 0) if committed else len(members),
                "gates": self.gates(r, i, now) if committed else {},
                "started": r.started[i], "passed": r.passed[i], "promoted": r.promoted[i],
            })
        pushes = [p for p in r.pushes if p is not None]
        doc = {"id": r.id, "name": r.spec.name, "state": r.state, "stage": r.stage, "stages": stages,
               "reason": r.reason, "operator": r.operator, "created": r.created, "counts": r.counts(),
               "target": r.spec.target, "change": {"set": r.spec.set, "unset": list(r.spec.unset)},
               "metrics": summarize(pushes), "curve": downsample(r.points)}
        if r.restore_push is not None:
            doc["rollback"] = {"devices": r.restore_push.targets, "restored": r.restore_push.converged,
                               "failed": r.restore_push.failed}
        return doc

    def overview(self) -> dict[str, Any]:
        """Roll-outs by state and the active ones' stage and λ (for status output)."""
        by_state: dict[str, int] = {}
        active = []
        for r in self.rollouts.values():
            by_state[r.state] = by_state.get(r.state, 0) + 1
            if r.state in ACTIVE:
                metrics = summarize([p for p in r.pushes if p is not None])
                active.append({"id": r.id, "name": r.spec.name, "state": r.state, "stage": r.stage,
                               "stages": len(r.sizes), "counts": r.counts(), "lambda": metrics["lambda"]})
        return {"by_state": by_state, "active": active, "pushes": self.pushes.summary()}

    async def aclose(self) -> None:
        """Cancel running smoke calls and persist pending changes."""
        for task in list(self._smoke):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self.flush()


__all__ = ["Gates", "HealthCheck", "Member", "Rollout", "RolloutEngine", "RolloutSpec", "Smoke", "STATES",
           "lookup", "rank_key", "stage_sizes"]
