"""Declarative adaptation rules: match an event, pick target devices, produce a templated config.

A rule (TOML, in the coordinator config or a rules file)::

    [[rules]]
    name = "companion-layout"
    event = "screen_available"
    [rules.when]                      # all must hold; path = literal (equality) or {op = value}
    "sender.kind" = "display"
    "event.width" = { gte = 320 }
    [rules.target]
    select = "group"                  # "sender" | "group" | "capability"
    group_prefix = "room:"            # group: devices sharing a group (or operator tag) starting with this
    [rules.target.where]              # conditions on each candidate target device
    "device.kind" = "phone"
    [rules.config]                    # flat dotted keys; "{event.x}" / "{sender.x}" templates
    "ui.layout" = "companion"
    "ui.companion.resolution" = "{event.width}x{event.height}"

``policy = "model"`` with a ``[rules.model]`` table hands the config to a model, ``[rules.config]``
being the fallback (see :mod:`sdk.coord.coordinator.model_policy`).

Everything is validated at load, and errors name the rule and the offending key.
"""

from __future__ import annotations

import logging
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sdk.coord.coordinator.errors import RuleError
from sdk.coord.coordinator.rollouts import Gates
from sdk.coord.events import _EVENT_TYPE_RE, EVENT_SCHEMAS, Event

if TYPE_CHECKING:
    from sdk.coord.coordinator.model_policy import ModelSpec

log = logging.getLogger(__name__)

OPS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "exists", "prefix")
SELECTS = ("sender", "group", "capability")
DEVICE_FIELDS = ("did", "kind", "groups", "tags", "capabilities", "attributes", "name")
_TEMPLATE_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_\-]+)+)\}")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_RULE_KEYS = {"name", "event", "when", "target", "config", "unset", "description", "rollout", "policy", "model"}
POLICIES = ("declarative", "model")
_ROLLOUT_KEYS = ("canary", "steps", "factor", "cap", "bake", "min_applied", "max_failed", "timeout", "health",
                 "smoke")
_TARGET_KEYS = {"select", "group_prefix", "capability", "include_sender", "where"}
_MISSING = object()


class DeviceIndex(Protocol):
    """What rule evaluation needs from the registry."""

    def view(self, did: str) -> dict[str, Any] | None: ...
    def sharing_group(self, did: str, prefix: str) -> Iterable[str]: ...
    def with_capability(self, capability: str) -> Iterable[str]: ...


@dataclass(frozen=True)
class Condition:
    """``path op value`` over the evaluation context (``event.*``, ``sender.*``, ``device.*``)."""

    path: str
    op: str
    value: Any

    def holds(self, ctx: Mapping[str, Any]) -> bool:
        """True when the condition holds in ``ctx``; a missing field never matches (except exists=false)."""
        actual = lookup(ctx, self.path)
        if self.op == "exists":
            return (actual is not _MISSING) == bool(self.value)
        if actual is _MISSING:
            return False
        try:
            match self.op:
                case "eq":
                    return bool(actual == self.value)
                case "ne":
                    return bool(actual != self.value)
                case "gt":
                    return bool(actual > self.value)
                case "gte":
                    return bool(actual >= self.value)
                case "lt":
                    return bool(actual < self.value)
                case "lte":
                    return bool(actual <= self.value)
                case "in":
                    return actual in self.value
                case "not_in":
                    return actual not in self.value
                case "contains":
                    return self.value in actual
                case "prefix":
                    if isinstance(actual, (list, tuple, set, frozenset)):
                        return any(isinstance(a, str) and a.startswith(self.value) for a in actual)
                    return isinstance(actual, str) and actual.startswith(self.value)
        except TypeError:
            return False
        return False


@dataclass(frozen=True)
class Target:
    """Which devices a rule's config goes to."""

    select: str
    group_prefix: str = ""
    capability: str | None = None
    include_sender: bool = False
    where: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class RolloutPlan:
    """A rule's ``[rules.rollout]``: its changes go out in stages behind these gates."""

    canary: dict[str, float]
    growth: dict[str, Any]
    bake: float
    gates: Gates


@dataclass(frozen=True)
class Rule:
    """One validated rule."""

    name: str
    event: str
    when: tuple[Condition, ...]
    target: Target
    config: dict[str, Any]
    unset: tuple[str, ...] = ()
    description: str = ""
    rollout: RolloutPlan | None = None
    model: ModelSpec | None = None      # policy = "model": the model decides, ``config`` is the fallback


@dataclass(frozen=True)
class Action:
    """The result of a matched rule: these devices get these changes (``None`` = unset key);
    with ``rollout``, staged instead of committed to every target at once; with ``model``, the
    changes are the fallback of a decision the model makes per target (``context``: event, sender)."""

    rule: str
    targets: tuple[str, ...]
    changes: dict[str, Any] = field(default_factory=dict)
    rollout: RolloutPlan | None = None
    model: ModelSpec | None = None
    context: Mapping[str, Any] = field(default_factory=dict)


def lookup(ctx: Mapping[str, Any], path: str) -> Any:
    """Resolve a dotted path in nested dicts; returns a private sentinel when missing."""
    cur: Any = ctx
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            return _MISSING
    return cur


def render(value: Any, ctx: Mapping[str, Any], *, rule: str = "?") -> Any:
    """Fill ``{event.x}`` placeholders; a string that is exactly one placeholder keeps its type."""
    if isinstance(value, str):
        whole = _TEMPLATE_RE.fullmatch(value)
        if whole:
            found = lookup(ctx, whole.group(1))
            return None if found is _MISSING else found

        def sub(m: re.Match[str]) -> str:
            found = lookup(ctx, m.group(1))
            return "" if found is _MISSING or found is None else str(found)

        return _TEMPLATE_RE.sub(sub, value)
    if isinstance(value, list):
        return [render(v, ctx, rule=rule) for v in value]
    if isinstance(value, dict):
        return {k: render(v, ctx, rule=rule) for k, v in value.items()}
    return value


class RuleSet:
    """An ordered list of rules, indexed by event type."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._by_event: dict[str, list[Rule]] = {}
        for r in self.rules:
            self._by_event.setdefault(r.event, []).append(r)

    def __len__(self) -> int:
        return len(self.rules)

    def for_event(self, event_type: str) -> list[Rule]:
        """Rules listening to ``event_type`` (in file order)."""
        return self._by_event.get(event_type, [])

    def evaluate(self, event: Event, sender_did: str, devices: DeviceIndex) -> list[Action]:
        """Every matching rule's action for ``event`` sent by ``sender_did``."""
        rules = self.for_event(event.type)
        if not rules:
            return []
        sender = devices.view(sender_did) or {"did": sender_did}
        ctx: dict[str, Any] = {"event": event.fields, "sender": sender}
        actions: list[Action] = []
        for rule in rules:
            if not all(c.holds(ctx) for c in rule.when):
                continue
            targets = _select(rule.target, sender_did, devices)
            if not targets:
                log.debug("rule %s matched event %s but selected no device", rule.name, event.type)
                continue
            changes = {k: render(v, ctx, rule=rule.name) for k, v in rule.config.items()}
            for key in rule.unset:
                changes[key] = None
            actions.append(Action(rule.name, tuple(targets), changes, rule.rollout, rule.model,
                                  ctx if rule.model is not None else {}))
        return actions


def _select(target: Target, sender_did: str, devices: DeviceIndex) -> list[str]:
    if target.select == "sender":
        candidates: Iterable[str] = (sender_did,)
    elif target.select == "group":
        candidates = devices.sharing_group(sender_did, target.group_prefix)
    else:
        candidates = devices.with_capability(target.capability or "")
    out: list[str] = []
    for did in candidates:
        if did == sender_did and target.select != "sender" and not target.include_sender:
            continue
        view = devices.view(did)
        if view is None:
            continue
        if target.where:
            ctx = {"device": view}
            if not all(c.holds(ctx) for c in target.where):
                continue
        out.append(did)
    return sorted(set(out))


# ---------------------------------------------------------------- loading and validation


def _fail(where: str, msg: str) -> RuleError:
    err = RuleError(f"{where}: {msg}")
    log.warning("rule rejected at load: %s", err)
    return err


def _check_finite(where: str, value: Any) -> None:
    """TOML allows ``nan`` and ``inf``: a rule must never carry them into a condition or a config."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(where, f"non-finite number {value!r} (numbers must be finite)")
    if isinstance(value, list):
        for v in value:
            _check_finite(where, v)
    elif isinstance(value, dict):
        for v in value.values():
            _check_finite(where, v)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def _check_path(where: str, path: str, roots: tuple[str, ...], event_type: str | None) -> None:
    parts = path.split(".")
    if len(parts) < 2 or parts[0] not in roots or not all(parts):
        raise _fail(where, f"path {path!r} must start with one of {', '.join(r + '.' for r in roots)}")
    root, first = parts[0], parts[1]
    if root in ("sender", "device"):
        if first not in DEVICE_FIELDS:
            raise _fail(where, f"{path!r}: devices have no field {first!r} "
                               f"(known: {', '.join(DEVICE_FIELDS)})")
        if first != "attributes" and len(parts) > 2:
            raise _fail(where, f"{path!r}: only '{root}.attributes' has sub-fields")
    if root == "event" and event_type in EVENT_SCHEMAS:
        schema = EVENT_SCHEMAS[event_type]
        if first not in schema:
            raise _fail(where, f"event {event_type!r} has no field {first!r} "
                               f"(known: {', '.join(schema)})")


def _conditions(where: str, table: Any, roots: tuple[str, ...], event_type: str | None
                ) -> tuple[Condition, ...]:
    if table is None:
        return ()
    if not isinstance(table, dict):
        raise _fail(where, "must be a table of path = value or path = {op = value}")
    out: list[Condition] = []
    for path, spec in table.items():
        here = f"{where}.{path!r}"
        _check_path(here, path, roots, event_type)
        if isinstance(spec, dict):
            if not spec:
                raise _fail(here, "empty condition table")
            for op, value in spec.items():
                _check_finite(here, value)
                if op not in OPS:
                    raise _fail(here, f"unknown operator {op!r} (known: {', '.join(OPS)})")
                if op in ("in", "not_in") and not isinstance(value, list):
                    raise _fail(here, f"operator {op!r} needs a list")
                if op in ("gt", "gte", "lt", "lte") and (
                        isinstance(value, bool) or not isinstance(value, (int, float, str))):
                    raise _fail(here, f"operator {op!r} needs a number or string")
                if op == "exists" and not isinstance(value, bool):
                    raise _fail(here, "operator 'exists' needs true or false")
                if op == "prefix" and not isinstance(value, str):
                    raise _fail(here, "operator 'prefix' needs a string")
                out.append(Condition(path, op, value))
        else:
            _check_finite(here, spec)
            out.append(Condition(path, "eq", spec))
    return tuple(out)


def _check_templates(where: str, value: Any, event_type: str) -> None:
    if isinstance(value, str):
        for m in _TEMPLATE_RE.finditer(value):
            _check_path(f"{where} template {m.group(0)}", m.group(1), ("event", "sender"), event_type)
        stray = _TEMPLATE_RE.sub("", value)
        if "{" in stray and "}" in stray[stray.index("{"):]:
            raise _fail(where, f"malformed template in {value!r} (use {{event.field}} or {{sender.field}})")
    elif isinstance(value, list):
        for v in value:
            _check_templates(where, v, event_type)


def _rollout(where: str, raw: Any) -> RolloutPlan | None:
    """``[rules.rollout]``: the stage and gate settings of ``rollout.start``, flattened."""
    from sdk.coord.coordinator.rollout_ops import _gates, _number, _stages
    from sdk.coord.errors import OperatorError

    if raw is None:
        return None
    where = f"{where} rollout"
    if not isinstance(raw, dict):
        raise _fail(where, "must be a table")
    unknown = set(raw) - set(_ROLLOUT_KEYS)
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)} (allowed: {sorted(_ROLLOUT_KEYS)})")
    if "steps" in raw and ("factor" in raw or "cap" in raw):
        raise _fail(where, "give 'steps' or 'factor' (+ 'cap'), not both")
    growth = ({"steps": raw["steps"]} if "steps" in raw
              else {k: raw[k] for k in ("factor", "cap") if k in raw})
    try:
        canary, out_growth = _stages({"canary": raw.get("canary", {"percent": 10}), "growth": growth})
        bake = _number(raw.get("bake", 0), "bake", low=0, high=7 * 86400.0)
        gates = _gates({k: raw[k] for k in ("min_applied", "max_failed", "timeout", "health", "smoke")
                        if k in raw})
    except OperatorError as exc:
        message = str(exc)
        for prefix in ("stages.growth.", "stages.", "gates."):
            message = message.replace(prefix, "")
        raise _fail(where, message) from exc
    return RolloutPlan(canary, out_growth, bake, gates)


def parse_rule(raw: Any, index: int = 0) -> Rule:
    """Validate one rule table; raises :class:`RuleError` naming the rule and key."""
    label = f"rule #{index + 1}"
    if not isinstance(raw, dict):
        raise _fail(label, "must be a table")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(label, "needs a non-empty 'name'")
    where = f"rule {name!r}"
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)} (allowed: {sorted(_RULE_KEYS)})")
    event_type = raw.get("event")
    if not isinstance(event_type, str) or not _EVENT_TYPE_RE.match(event_type):
        raise _fail(where, "needs 'event', an event type such as \"screen_available\"")
    when = _conditions(f"{where} when", raw.get("when"), ("event", "sender"), event_type)

    tgt = raw.get("target")
    if not isinstance(tgt, dict):
        raise _fail(where, "needs a [target] table with 'select'")
    unknown = set(tgt) - _TARGET_KEYS
    if unknown:
        raise _fail(f"{where} target", f"unknown key(s) {sorted(unknown)} (allowed: {sorted(_TARGET_KEYS)})")
    select = tgt.get("select")
    if select not in SELECTS:
        raise _fail(f"{where} target", f"'select' must be one of {', '.join(SELECTS)}, got {select!r}")
    capability = tgt.get("capability")
    if select == "capability" and (not isinstance(capability, str) or not capability):
        raise _fail(f"{where} target", "select = \"capability\" needs 'capability'")
    if capability is not None and not isinstance(capability, str):
        raise _fail(f"{where} target", "'capability' must be a string")
    prefix = tgt.get("group_prefix", "")
    if not isinstance(prefix, str):
        raise _fail(f"{where} target", "'group_prefix' must be a string")
    include_sender = tgt.get("include_sender", False)
    if not isinstance(include_sender, bool):
        raise _fail(f"{where} target", "'include_sender' must be true or false")
    where_conds = _conditions(f"{where} target.where", tgt.get("where"), ("device",), None)
    if capability and select != "capability":
        where_conds += (Condition("device.capabilities", "contains", capability),)
    target = Target(select, prefix, capability, include_sender, where_conds)

    config_raw = raw.get("config", {})
    if not isinstance(config_raw, dict):
        raise _fail(where, "'config' must be a table")
    config = _flatten(config_raw)
    for key, value in config.items():
        if not _KEY_RE.match(key):
            raise _fail(f"{where} config", f"bad key {key!r}")
        _check_templates(f"{where} config.{key}", value, event_type)
        _check_finite(f"{where} config.{key}", value)
    unset = raw.get("unset", [])
    if not isinstance(unset, list) or not all(isinstance(k, str) and _KEY_RE.match(k) for k in unset):
        raise _fail(where, "'unset' must be a list of config keys")
    if not config and not unset:
        raise _fail(where, "produces nothing: give 'config' and/or 'unset'")
    overlap = set(config) & set(unset)
    if overlap:
        raise _fail(where, f"keys both set and unset: {sorted(overlap)}")
    desc = raw.get("description", "")
    rollout = _rollout(where, raw.get("rollout"))
    model = _model(where, raw, event_type, config, rollout)
    return Rule(name, event_type, when, target, config, tuple(unset), str(desc), rollout, model)


def _model(where: str, raw: Mapping[str, Any], event_type: str, config: Mapping[str, Any],
           rollout: RolloutPlan | None) -> ModelSpec | None:
    """``policy = "model"`` and its ``[rules.model]`` table (model_policy.py)."""
    policy = raw.get("policy", "declarative")
    if policy not in POLICIES:
        raise _fail(where, f"'policy' must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy != "model":
        if "model" in raw:
            raise _fail(where, "[rules.model] needs policy = \"model\" (before the rule's tables)")
        return None
    if not config:
        raise _fail(where, "policy = \"model\" needs [rules.config]: the fallback when the model fails")
    if rollout is not None:
        raise _fail(where, "policy = \"model\" cannot be combined with [rules.rollout]")
    from sdk.coord.coordinator.model_policy import parse_model_spec

    return parse_model_spec(where, raw.get("model"), event_type=event_type, config=config)


def parse_rules(raw: Any) -> RuleSet:
    """Validate a list of rule tables (names must be unique)."""
    if raw is None:
        return RuleSet()
    if not isinstance(raw, list):
        raise _fail("rules", "must be an array of tables ([[rules]])")
    rules = [parse_rule(r, i) for i, r in enumerate(raw)]
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise _fail(f"rule {r.name!r}", "duplicate name")
        seen.add(r.name)
    return RuleSet(rules)


def load_rules(path: str | Path) -> RuleSet:
    """Load ``[[rules]]`` from a TOML file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(str(p), f"cannot read rules file: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise _fail(str(p), f"not valid TOML: {exc}") from exc
    return parse_rules(data.get("rules", []))


__all__ = [
    "Action",
    "Condition",
    "DeviceIndex",
    "RolloutPlan",
    "Rule",
    "RuleSet",
    "Target",
    "OPS",
    "POLICIES",
    "SELECTS",
    "load_rules",
    "parse_rule",
    "parse_rules",
    "render",
    "lookup",
]
