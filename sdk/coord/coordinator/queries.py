"""Fleet queries: a ``where`` document checked once, then evaluated over the registry's indexes.

Every key is optional and they are ANDed::

    {"kind": "phone", "group": "room:living", "tag": "canary", "capability": "gpu",
     "attributes": {"os": "android"}, "reported": {"battery.low": true},
     "presence": "online", "credential": "expiring", "desired_version": {"ge": 3},
     "reported_version": 2, "converged": false, "state": {"ui.layout": "v3"}, "did_prefix": "did:key:z6Mk"}

``kind`` / ``group`` / ``tag`` / ``capability`` (a name, or a list meaning any of them) narrow the
candidates through the registry's indexes first; the other keys are checked per candidate from
memory (desired versions from the store's cache, reported versions from :class:`ReportedVersions`),
never with one SQL query per device. Results are sorted by DID and paged with an opaque cursor; a
page holds at most ``limit`` rows and :data:`MAX_PAGE_BYTES` of them.
A malformed document raises :class:`~sdk.coord.errors.OperatorError` ``invalid_params`` naming the field.
"""

from __future__ import annotations

import bisect
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdk.coord.coordinator.registry import EXPIRED, OFFLINE, ONLINE, REVOKED, DeviceRecord
from sdk.coord.coordinator.values import strict_dumps
from sdk.coord.errors import OperatorError
from sdk.identity.hazmat import b64
from sdk.identity.hazmat import json as strict_json
from sdk.messaging.envelope import DEFAULT_MAX_BYTES

if TYPE_CHECKING:
    from sdk.coord.coordinator.daemon import Coordinator

#: a credential is "expiring" when it ends within this many seconds
EXPIRING_WITHIN = 7 * 86400.0
MAX_LIMIT = 1000
#: a page holds at most ``limit`` rows and at most this many bytes of them (the reply is one
#: encrypted envelope): a shorter page still carries ``next_cursor``
MAX_PAGE_BYTES = DEFAULT_MAX_BYTES // 2
DEFAULT_LIMIT = 100
MAX_NAMES = 64            # names in a kind/group/tag/capability list
MAX_NAME = 256
MAX_MATCH_KEYS = 32       # keys in an attributes/reported/state object
PRESENCE = (ONLINE, OFFLINE, EXPIRED, REVOKED)
CREDENTIAL = ("valid", "expiring", "expired", "revoked")
_COMPARE = {"lt": int.__lt__, "le": int.__le__, "gt": int.__gt__, "ge": int.__ge__, "eq": int.__eq__}
_INDEXED = ("kind", "group", "tag", "capability")
KEYS = (*_INDEXED, "attributes", "reported", "presence", "credential", "desired_version",
        "reported_version", "converged", "state", "did_prefix")
_MISSING = object()


def _invalid(message: str) -> OperatorError:
    return OperatorError(message, reason="invalid_params")


@dataclass(frozen=True)
class Where:
    """A checked ``where`` document."""

    kind: frozenset[str] | None = None
    group: frozenset[str] | None = None
    tag: frozenset[str] | None = None
    capability: frozenset[str] | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    reported: Mapping[str, Any] = field(default_factory=dict)
    presence: str | None = None
    credential: str | None = None
    desired_version: tuple[tuple[str, int], ...] = ()
    reported_version: tuple[tuple[str, int], ...] = ()
    converged: bool | None = None
    state: Mapping[str, Any] = field(default_factory=dict)
    did_prefix: str | None = None

    @classmethod
    def parse(cls, where: Any, *, what: str = "where") -> Where:
        """Check ``where``; raises ``invalid_params`` naming the offending field."""
        if where is None:
            return cls()
        if not isinstance(where, dict):
            raise _invalid(f"{what}: an object of filters is required")
        unknown = sorted(set(where) - set(KEYS))
        if unknown:
            raise _invalid(f"{what}.{unknown[0]}: unknown filter (known: {', '.join(KEYS)})")
        out: dict[str, Any] = {}
        for key in _INDEXED:
            if key in where:
                out[key] = _names(where[key], f"{what}.{key}")
        for key in ("attributes", "reported", "state"):
            if key in where:
                out[key] = _match(where[key], f"{what}.{key}")
        for key, choices in (("presence", PRESENCE), ("credential", CREDENTIAL)):
            if key in where:
                if where[key] not in choices:
                    raise _invalid(f"{what}.{key}: one of {', '.join(choices)}")
                out[key] = where[key]
        for key in ("desired_version", "reported_version"):
            if key in where:
                out[key] = _version(where[key], f"{what}.{key}")
        if "converged" in where:
            if not isinstance(where["converged"], bool):
                raise _invalid(f"{what}.converged: true or false")
            out["converged"] = where["converged"]
        if "did_prefix" in where:
            prefix = where["did_prefix"]
            if not isinstance(prefix, str) or not 0 < len(prefix) <= MAX_NAME:
                raise _invalid(f"{what}.did_prefix: a string of 1-{MAX_NAME} characters")
            out["did_prefix"] = prefix
        return cls(**out)


def _names(value: Any, what: str) -> frozenset[str]:
    values = value if isinstance(value, list) else [value]
    if not values or len(values) > MAX_NAMES or not all(
            isinstance(v, str) and 0 < len(v) <= MAX_NAME for v in values):
        raise _invalid(f"{what}: a name (1-{MAX_NAME} characters) or a list of at most {MAX_NAMES}")
    return frozenset(values)


def _match(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not value or len(value) > MAX_MATCH_KEYS:
        raise _invalid(f"{what}: an object of 1-{MAX_MATCH_KEYS} key = value pairs")
    for key in value:
        if not 0 < len(key) <= MAX_NAME:
            raise _invalid(f"{what}: keys are 1-{MAX_NAME} characters")
    return dict(value)


def _version(value: Any, what: str) -> tuple[tuple[str, int], ...]:
    def number(v: Any, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 2**53 - 1:
            raise _invalid(f"{where}: a non-negative integer")
        return v

    if isinstance(value, dict):
        if not value or not set(value) <= set(_COMPARE):
            raise _invalid(f"{what}: an integer or an object of {', '.join(_COMPARE)}")
        return tuple((op, number(v, f"{what}.{op}")) for op, v in sorted(value.items()))
    return (("eq", number(value, what)),)


class ReportedVersions:
    """Each device's newest applied version, kept in memory from the coordinator's reports."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self._versions: dict[str, int] | None = None

    def _load(self) -> dict[str, int]:
        """Read the store once; from then on the coordinator's ``report`` events keep it current."""
        if self._versions is None:
            store = self.coordinator.store
            if store is None:
                return {}
            self._versions = store.reported_versions()
            self.coordinator.add_listener(self._on_event)
        return self._versions

    def _on_event(self, what: str, info: dict[str, Any]) -> None:
        if what == "report" and info.get("status") == "applied" and self._versions is not None:
            did, version = info.get("did"), info.get("version")
            if isinstance(did, str) and isinstance(version, int) and version > self._versions.get(did, 0):
                self._versions[did] = version

    def get(self, did: str) -> int:
        return self._load().get(did, 0)

    def all(self) -> Mapping[str, int]:
        """Every device's reported version (read-only view of the cache)."""
        return self._load()


def credential_state(rec: DeviceRecord, now: float) -> str:
    """``revoked``, ``expired``, ``expiring`` or ``valid`` for ``rec``'s last admitted credential."""
    if rec.state == REVOKED:
        return "revoked"
    if rec.valid_until is not None:
        if rec.valid_until <= now:
            return "expired"
        if rec.valid_until - now <= EXPIRING_WITHIN:
            return "expiring"
    return "valid"


def _holds(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    return all(_same(actual.get(key, _MISSING), value) for key, value in expected.items())


def _same(a: Any, b: Any) -> bool:
    """JSON equality that keeps ``true`` apart from ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def _compare(ops: tuple[tuple[str, int], ...], value: int) -> bool:
    return all(_COMPARE[op](value, bound) for op, bound in ops)


class FleetQuery:
    """Evaluates :class:`Where` documents over one coordinator's registry and store."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.reported = ReportedVersions(coordinator)

    def versions(self, did: str) -> tuple[int, int]:
        """``(desired_version, reported_version)`` of ``did``, from memory."""
        store = self.coordinator.store
        desired = store.latest_version(did) if store is not None else 0
        return desired, self.reported.get(did)

    def _candidates(self, where: Where) -> set[str] | None:
        """The DIDs the indexed keys allow (None: no indexed key, every device)."""
        registry = self.coordinator.registry
        lookups: list[tuple[frozenset[str] | None, Callable[[str], set[str]]]] = [
            (where.kind, registry.with_kind), (where.tag, registry.with_tag),
            (where.group, registry.members), (where.capability, lambda c: set(registry.with_capability(c)))]
        out: set[str] | None = None
        for names, lookup in lookups:
            if names is None:
                continue
            found: set[str] = set()
            for name in names:
                found |= lookup(name)
            out = found if out is None else out & found
            if not out:
                return out
        return out

    def _checks(self, where: Where, now: float) -> list[Callable[[DeviceRecord], bool]]:
        checks: list[Callable[[DeviceRecord], bool]] = []
        if where.did_prefix is not None:
            prefix = where.did_prefix
            checks.append(lambda r: r.did.startswith(prefix))
        if where.presence is not None:
            presence = where.presence
            checks.append(lambda r: r.state == presence)
        if where.credential is not None:
            wanted = where.credential
            if wanted == "valid":
                checks.append(lambda r: credential_state(r, now) in ("valid", "expiring"))
            else:
                checks.append(lambda r: credential_state(r, now) == wanted)
        if where.attributes:
            attrs = where.attributes
            checks.append(lambda r: _holds(attrs, r.attributes))
        if where.reported:
            props = where.reported
            checks.append(lambda r: _holds(props, r.properties))
        store = self.coordinator.store
        latest = store.latest_version if store is not None else (lambda did: 0)
        reported = self.reported.all()
        if where.desired_version:
            ops = where.desired_version
            checks.append(lambda r: _compare(ops, latest(r.did)))
        if where.reported_version:
            rops = where.reported_version
            checks.append(lambda r: _compare(rops, reported.get(r.did, 0)))
        if where.converged is not None:
            converged = where.converged
            checks.append(lambda r: (latest(r.did) == reported.get(r.did, 0)) == converged)
        if where.state:
            state = where.state
            checks.append(lambda r: store is not None and _holds(state, store.desired(r.did)))
        return checks

    def select(self, where: Where, *, after: str | None = None, now: float | None = None) -> list[str]:
        """Every matching DID after ``after``, sorted."""
        now = time.time() if now is None else now
        registry = self.coordinator.registry
        candidates = self._candidates(where)
        if candidates is None:
            ordered: Iterable[str] = registry.dids()
        else:
            ordered = sorted(candidates)
        if after is not None:
            ordered = [d for d in ordered if d > after]
        checks = self._checks(where, now)
        get = registry.get
        if not checks:
            return [did for did in ordered if get(did) is not None]
        out = []
        for did in ordered:
            rec = get(did)
            if rec is None:
                continue
            for check in checks:
                if not check(rec):
                    break
            else:
                out.append(did)
        return out

    def row(self, rec: DeviceRecord) -> dict[str, Any]:
        """A device as a query result lists it."""
        desired, reported = self.versions(rec.did)
        return {"did": rec.did, "kind": rec.kind, "name": rec.name, "groups": sorted(rec.groups),
                "tags": sorted(rec.tags), "state": rec.state, "desired_version": desired,
                "reported_version": reported, "converged": desired == reported,
                "valid_until": rec.valid_until, "last_seen": rec.last_seen}

    def page(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The ``fleet.query`` operation: ``{total, devices, next_cursor}`` or ``{total}``."""
        unknown = sorted(set(params) - {"where", "limit", "cursor", "count"})
        if unknown:
            raise _invalid(f"{unknown[0]}: unknown parameter (known: where, limit, cursor, count)")
        where = Where.parse(params.get("where"))
        count = params.get("count", False)
        if not isinstance(count, bool):
            raise _invalid("count: true or false")
        limit = params.get("limit", DEFAULT_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise _invalid(f"limit: an integer from 1 to {MAX_LIMIT}")
        after = decode_cursor(params.get("cursor"))
        if count:
            return {"total": len(self.select(where))}
        matched = self.select(where)
        start = 0
        if after is not None:
            start = bisect.bisect_right(matched, after)
        registry = self.coordinator.registry
        rows: list[dict[str, Any]] = []
        budget = MAX_PAGE_BYTES
        last = start
        for last in range(start, min(start + limit, len(matched))):
            rec = registry.get(matched[last])
            if rec is None:
                continue
            row = self.row(rec)
            budget -= len(strict_dumps(row)) + 1
            if budget < 0 and rows:          # the reply must fit one signed, encrypted envelope
                last -= 1
                break
            rows.append(row)
        more = last + 1 < len(matched)
        return {"total": len(matched), "devices": rows,
                "next_cursor": encode_cursor(matched[last]) if more and last >= start else None}


def encode_cursor(after: str) -> str:
    """An opaque cursor that continues after DID ``after``."""
    return b64.b64url_encode(strict_dumps({"after": after}).encode()).decode()


def decode_cursor(cursor: Any) -> str | None:
    """The DID a cursor continues after (None for no cursor); ``invalid_params`` when not one of ours."""
    if cursor is None:
        return None
    if not isinstance(cursor, str) or not 0 < len(cursor) <= 4 * MAX_NAME:
        raise _invalid("cursor: the next_cursor of a previous page, or null")
    try:
        doc = strict_json.loads(b64.b64url_decode(cursor, max_len=4 * MAX_NAME), max_depth=2)
    except (ValueError, TypeError) as exc:
        raise _invalid("cursor: not a cursor from this coordinator") from exc
    after = doc.get("after") if isinstance(doc, dict) else None
    if not isinstance(after, str) or not after:
        raise _invalid("cursor: not a cursor from this coordinator")
    return after


def select(coordinator: Coordinator, where: Any) -> list[str]:
    """Every DID matching the ``where`` document (checked; ``invalid_params`` otherwise), sorted."""
    return fleet_query(coordinator).select(Where.parse(where, what="target.where"))


def resolve_target(coordinator: Coordinator, target: Any) -> list[str]:
    """The DIDs a target names: ``{did}`` (``not_found`` when unknown), ``{group}``, ``{tag}`` or
    ``{where}``; revoked devices are left out unless ``where`` asks for them by presence."""
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in ("did", "group", "tag",
                                                                                      "where"):
        raise _invalid("target: one of {did | group | tag | where: ...} is required")
    kind, value = next(iter(target.items()))
    registry = coordinator.registry
    if kind == "where":
        where = Where.parse(value, what="target.where")
    else:
        if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
            raise _invalid(f"target.{kind}: a string of 1-{MAX_NAME} characters is required")
        if kind == "did":
            if value not in registry:
                raise OperatorError(f"no device {value}", reason="not_found")
            return [value]
        where = Where(group=frozenset([value])) if kind == "group" else Where(tag=frozenset([value]))
    dids = fleet_query(coordinator).select(where)
    if where.presence is None:
        dids = [d for d in dids if (r := registry.get(d)) is not None and r.state != REVOKED]
    return dids


_QUERIES: weakref.WeakKeyDictionary[Coordinator, FleetQuery] = weakref.WeakKeyDictionary()


def fleet_query(coordinator: Coordinator) -> FleetQuery:
    """The coordinator's :class:`FleetQuery` (made on first use)."""
    query = _QUERIES.get(coordinator)
    if query is None:
        query = _QUERIES[coordinator] = FleetQuery(coordinator)
    return query


__all__ = ["KEYS", "EXPIRING_WITHIN", "FleetQuery", "ReportedVersions", "Where", "credential_state",
           "decode_cursor", "encode_cursor", "fleet_query", "resolve_target", "select"]
