"""The roll-out operator operations: ``rollout.start``, ``rollout.ls``, ``rollout.status``,
``rollout.pause``, ``rollout.resume``, ``rollout.cancel`` and ``rollout.abort``.

``rollout.start`` (write) takes ``{name?, target, change: {set, unset}, stages: {canary, growth},
bake, gates}`` (see :mod:`sdk.coord.coordinator.rollouts` and docs/COORDINATOR.md, "Roll-outs")
and answers ``{id, stages, state}``; the other write operations take ``{id}`` and answer the
roll-out's status document.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdk.coord.coordinator.commands_ops import MAX_ARGS_BYTES, MAX_TIMEOUT
from sdk.coord.coordinator.desired_ops import check_changes, check_keys, resolve_target
from sdk.coord.coordinator.errors import InvalidValue
from sdk.coord.coordinator.operations import OperatorRequest
from sdk.coord.coordinator.rollouts import _OPS, STATES, Gates, HealthCheck, RolloutEngine, RolloutSpec, Smoke
from sdk.coord.coordinator.values import check_json, strict_dumps
from sdk.coord.errors import OperatorError

if TYPE_CHECKING:
    from sdk.coord.coordinator.daemon import Coordinator

MAX_NAME = 128
MAX_STEPS = 32
MAX_HEALTH = 16
MAX_SECONDS = 7 * 86400.0


def _invalid(message: str) -> OperatorError:
    return OperatorError(message, reason="invalid_params")


def _only(doc: Mapping[str, Any], known: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise _invalid(f"{what}: unknown field {unknown[0]!r} (known: {', '.join(known)})")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{what}: an object is required")
    return value


def _number(value: Any, what: str, *, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(f"{what}: a number is required")
    if value > high or value < low or (low_open and value == low):
        raise _invalid(f"{what}: {value!r} is out of range ({'(' if low_open else '['}{low:g}, {high:g}])")
    return float(value)


def _change(doc: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    from sdk.coord.coordinator.daemon import MAX_CONFIG_BYTES

    doc = _object(doc, "change")
    _only(doc, ("set", "unset"), "change")
    sets = check_changes(doc["set"], max_bytes=MAX_CONFIG_BYTES) if doc.get("set") else {}
    unset = tuple(check_keys(doc["unset"])) if doc.get("unset") else ()
    if not sets and not unset:
        raise _invalid("change: set and/or unset keys are required")
    both = sorted(set(sets) & set(unset))
    if both:
        raise _invalid(f"change: {both[0]!r} is both set and unset")
    return sets, unset


def _stages(doc: Any) -> tuple[dict[str, float], dict[str, Any]]:
    doc = _object(doc if doc is not None else {"canary": {"percent": 10}, "growth": {"factor": 2.0}}, "stages")
    _only(doc, ("canary", "growth"), "stages")
    canary = _object(doc.get("canary", {"percent": 10}), "stages.canary")
    if set(canary) == {"count"}:
        count = canary["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise _invalid("stages.canary.count: a whole number >= 1 is required")
        out_canary: dict[str, float] = {"count": count}
    elif set(canary) == {"percent"}:
        out_canary = {"percent": _number(canary["percent"], "stages.canary.percent", low=0, high=100,
                                         low_open=True)}
    else:
        raise _invalid("stages.canary: {count: n} or {percent: p} is required")
    growth = _object(doc.get("growth", {"factor": 2.0}), "stages.growth")
    if "steps" in growth:
        _only(growth, ("steps",), "stages.growth")
        steps = growth["steps"]
        if not isinstance(steps, list) or not 0 < len(steps) <= MAX_STEPS:
            raise _invalid(f"stages.growth.steps: a list of 1-{MAX_STEPS} cumulative percentages is required")
        values = [_number(s, "stages.growth.steps", low=0, high=100, low_open=True) for s in steps]
        if any(b <= a for a, b in itertools.pairwise(values)) or values[-1] != 100:
            raise _invalid("stages.growth.steps: percentages must increase and end at 100")
        out_growth: dict[str, Any] = {"steps": values}
    else:
        _only(growth, ("factor", "cap"), "stages.growth")
        out_growth = {"factor": _number(growth.get("factor", 2.0), "stages.growth.factor", low=1, high=100,
                                        low_open=True),
                      "cap": _number(growth.get("cap", 100.0), "stages.growth.cap", low=0, high=100,
                                     low_open=True)}
    return out_canary, out_growth


def _gates(doc: Any) -> Gates:
    doc = _object(doc if doc is not None else {}, "gates")
    _only(doc, ("min_applied", "max_failed", "timeout", "health", "smoke"), "gates")
    min_applied = _number(doc.get("min_applied", 0.95), "gates.min_applied", low=0, high=1)
    max_failed = _number(doc.get("max_failed", 0.05), "gates.max_failed", low=0, high=1)
    timeout = None if doc.get("timeout") is None else _number(doc["timeout"], "gates.timeout", low=0,
                                                               high=MAX_SECONDS, low_open=True)
    health = doc.get("health") or []
    if not isinstance(health, list) or len(health) > MAX_HEALTH:
        raise _invalid(f"gates.health: a list of at most {MAX_HEALTH} checks is required")
    checks = []
    for item in health:
        item = _object(item, "gates.health[]")
        _only(item, ("property", "op", "value"), "gates.health[]")
        prop, op, value = item.get("property"), item.get("op", "le"), item.get("value")
        if not isinstance(prop, str) or not 0 < len(prop) <= 256:
            raise _invalid("gates.health[].property: a property name is required")
        if op not in _OPS:
            raise _invalid(f"gates.health[].op: one of {', '.join(sorted(_OPS))}")
        if value is None or isinstance(value, (dict, list)):
            raise _invalid("gates.health[].value: a number, string or boolean is required")
        if isinstance(value, float) and not math.isfinite(value):
            raise _invalid("gates.health[].value: a finite number is required")
        checks.append(HealthCheck(prop, op, value))
    smoke = None
    if doc.get("smoke") is not None:
        s = _object(doc["smoke"], "gates.smoke")
        _only(s, ("method", "args", "timeout"), "gates.smoke")
        method, args = s.get("method"), s.get("args") or {}
        if not isinstance(method, str) or not 0 < len(method) <= 128:
            raise _invalid("gates.smoke.method: a method name is required")
        args = _object(args, "gates.smoke.args")
        try:
            check_json(args, what="gates.smoke.args")
            if len(strict_dumps(args).encode()) > MAX_ARGS_BYTES:
                raise InvalidValue(f"larger than {MAX_ARGS_BYTES} bytes")
        except InvalidValue as exc:
            raise _invalid(f"gates.smoke.args: {exc}") from exc
        smoke = Smoke(method, args, _number(s.get("timeout", 10.0), "gates.smoke.timeout", low=0,
                                            high=MAX_TIMEOUT, low_open=True))
    return Gates(min_applied, max_failed, timeout, tuple(checks), smoke)


def parse_spec(params: Mapping[str, Any]) -> RolloutSpec:
    """A :class:`RolloutSpec` from ``rollout.start`` params, or :class:`OperatorError` ``invalid_params``."""
    _only(params, ("name", "target", "change", "stages", "bake", "gates"), "params")
    name = params.get("name")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME):
        raise _invalid(f"name: a string of 1-{MAX_NAME} characters")
    if params.get("target") is None:
        raise _invalid("target: {did|group|tag|where} is required")
    sets, unset = _change(params.get("change"))
    canary, growth = _stages(params.get("stages"))
    bake = _number(params.get("bake", 0), "bake", low=0, high=MAX_SECONDS)
    return RolloutSpec(name, params["target"], sets, unset, canary, growth, bake, _gates(params.get("gates")))


def _engine(request: OperatorRequest) -> RolloutEngine:
    engine = getattr(request.coordinator, "rollouts", None)
    if not isinstance(engine, RolloutEngine) or request.coordinator.store is None:
        raise OperatorError("the coordinator is not running", reason="busy")
    return engine


def _id(request: OperatorRequest) -> Any:
    _only(request.params, ("id",), "params")
    return _engine(request).get(request.params.get("id"))


async def rollout_start(request: OperatorRequest) -> dict[str, Any]:
    """``rollout.start`` (write) → ``{id, stages, state}``."""
    spec = parse_spec(request.params)
    engine = _engine(request)
    dids = resolve_target(request.coordinator, spec.target)
    r = await engine.create(spec, dids, operator=request.operator)
    return {"id": r.id, "stages": r.sizes, "state": r.state}


def rollout_ls(request: OperatorRequest) -> dict[str, Any]:
    """``rollout.ls`` (read) ``{state?}`` → ``{rollouts: [...]}``, oldest first."""
    _only(request.params, ("state",), "params")
    state = request.params.get("state")
    if state is not None and state not in STATES:
        raise _invalid(f"state: one of {', '.join(STATES)}")
    engine = _engine(request)
    return {"rollouts": [engine.summary(r) for r in engine.rollouts.values() if state in (None, r.state)]}


def rollout_status(request: OperatorRequest) -> dict[str, Any]:
    """``rollout.status`` (read) ``{id}`` → the status document."""
    return _engine(request).status(_id(request))


def rollout_pause(request: OperatorRequest) -> dict[str, Any]:
    engine, r = _engine(request), _id(request)
    engine.pause(r)
    return engine.status(r)


def rollout_resume(request: OperatorRequest) -> dict[str, Any]:
    engine, r = _engine(request), _id(request)
    engine.resume(r)
    return engine.status(r)


def rollout_cancel(request: OperatorRequest) -> dict[str, Any]:
    engine, r = _engine(request), _id(request)
    engine.cancel(r)
    return engine.status(r)


async def rollout_abort(request: OperatorRequest) -> dict[str, Any]:
    engine, r = _engine(request), _id(request)
    await engine.abort(r, f"aborted by {request.operator}")
    return engine.status(r)


def register_rollout_ops(coordinator: Coordinator) -> RolloutEngine:
    """Create ``coordinator``'s roll-out engine and register the ``rollout.*`` operations."""
    engine = RolloutEngine(coordinator)
    ops = coordinator.operations
    ops.register("rollout.start", "write", rollout_start)
    ops.register("rollout.ls", "read", rollout_ls)
    ops.register("rollout.status", "read", rollout_status)
    for name, handler in (("pause", rollout_pause), ("resume", rollout_resume), ("cancel", rollout_cancel),
                          ("abort", rollout_abort)):
        ops.register(f"rollout.{name}", "write", handler)
    return engine


__all__ = ["parse_spec", "register_rollout_ops", "rollout_abort", "rollout_cancel", "rollout_ls",
           "rollout_pause", "rollout_resume", "rollout_start", "rollout_status"]
