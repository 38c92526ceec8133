"""Read-side and bookkeeping operator operations: ``fleet.query``, ``device.show``, ``tags.set``,
``audit.list``; plus the coordinator's handling of devices' reported properties.

Registered on every coordinator by :func:`register_fleet_ops`; tags and properties are loaded
from the store at start by :func:`load_operator_state`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdk.coord import properties as reported_properties
from sdk.coord.coordinator.operations import OperatorRequest
from sdk.coord.coordinator.queries import credential_state, fleet_query, resolve_target
from sdk.coord.coordinator.registry import DeviceRecord
from sdk.coord.errors import OperatorError
from sdk.errors import AutoGLMError
from sdk.messaging.envelope import Message

if TYPE_CHECKING:
    from sdk.coord.coordinator.daemon import Coordinator

log = logging.getLogger(__name__)

#: tags: names, how many per device, how many per request
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/\-]{0,63}")
MAX_TAGS = 64
MAX_TAG_CHANGES = 64
HISTORY = 20
MAX_AUDIT = 500


def _invalid(message: str) -> OperatorError:
    return OperatorError(message, reason="invalid_params")


def _only(params: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise _invalid(f"{unknown[0]}: unknown parameter (known: {', '.join(known)})")


def _record(request: OperatorRequest, did: Any) -> DeviceRecord:
    if not isinstance(did, str) or not did.startswith("did:") or len(did) > 512:
        raise _invalid("did: a device DID is required")
    rec = request.coordinator.registry.get(did)
    if rec is None:
        raise OperatorError(f"no device {did}", reason="not_found")
    return rec


# ---------------------------------------------------------------- operations
def fleet_query_op(request: OperatorRequest) -> dict[str, Any]:
    """``fleet.query``: one page of matching devices (or their count)."""
    return fleet_query(request.coordinator).page(request.params)


def device_show(request: OperatorRequest) -> dict[str, Any]:
    """``device.show``: everything known about one device."""
    _only(request.params, ("did",))
    rec = _record(request, request.params.get("did"))
    coordinator = request.coordinator
    store = coordinator.store
    if store is None:
        raise OperatorError("the coordinator is not running", reason="busy")
    desired_version, reported_version = fleet_query(coordinator).versions(rec.did)
    reported = store.reported(rec.did)
    view = rec.view()
    return {
        "did": rec.did, "kind": rec.kind, "name": rec.name, "groups": view["groups"], "tags": view["tags"],
        "capabilities": view["capabilities"], "attributes": view["attributes"], "presence": rec.state,
        "last_seen": rec.last_seen, "first_seen": rec.first_seen,
        "credential": {"id": rec.credential_id, "issuer": rec.issuer, "valid_until": rec.valid_until,
                       "status": credential_state(rec, time.time())},
        "desired": store.desired(rec.did), "desired_version": desired_version,
        "reported": reported.state, "reported_version": reported_version, "report_status": reported.status,
        "delta": store.delta(rec.did), "properties": dict(rec.properties),
        "properties_at": rec.properties_at or None,
        "history": store.history(rec.did, limit=HISTORY),
    }


def _tag_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TAG_CHANGES or not all(
            isinstance(t, str) and TAG.fullmatch(t) for t in value):
        raise _invalid(f"{what}: a list of at most {MAX_TAG_CHANGES} tags (letters, digits, _ . : / -; "
                       "1-64 characters)")
    return list(dict.fromkeys(value))


def tags_set(request: OperatorRequest) -> dict[str, Any]:
    """``tags.set``: add and remove operator tags on the target devices (one transaction)."""
    _only(request.params, ("target", "add", "remove"))
    add = _tag_list(request.params.get("add"), "add")
    remove = _tag_list(request.params.get("remove"), "remove")
    if not add and not remove:
        raise _invalid("add / remove: at least one tag to add or remove")
    both = sorted(set(add) & set(remove))
    if both:
        raise _invalid(f"add / remove: {both[0]!r} is in both")
    coordinator = request.coordinator
    dids = resolve_target(coordinator, request.params.get("target"))
    changes: dict[str, tuple[list[str], list[str]]] = {}
    new_tags: dict[str, frozenset[str]] = {}
    for did in dids:
        rec = coordinator.registry.get(did)
        if rec is None:
            continue
        tags = (rec.tags | set(add)) - set(remove)
        if len(tags) > MAX_TAGS:
            raise _invalid(f"add: {did} would hold {len(tags)} tags (at most {MAX_TAGS})")
        if tags != rec.tags:
            changes[did] = ([t for t in add if t not in rec.tags], [t for t in remove if t in rec.tags])
            new_tags[did] = frozenset(tags)
    if coordinator.store is None:
        raise OperatorError("the coordinator is not running", reason="busy")
    coordinator.store.update_tags(changes)                 # durable before the registry changes
    for did, tags in new_tags.items():
        coordinator.registry.set_tags(did, tags)
    if new_tags:
        log.info("operator %s tagged %d device(s): +%s -%s", request.operator, len(new_tags), add, remove)
    return {"count": len(dids), "changed": len(new_tags)}


def audit_list(request: OperatorRequest) -> dict[str, Any]:
    """``audit.list``: the newest audit entries."""
    params = request.params
    _only(params, ("limit", "operator", "op", "before"))
    limit = params.get("limit", 50)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT:
        raise _invalid(f"limit: an integer from 1 to {MAX_AUDIT}")
    for key in ("operator", "op"):
        value = params.get(key)
        if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 512):
            raise _invalid(f"{key}: a string")
    before = params.get("before")
    if before is not None and (isinstance(before, bool) or not isinstance(before, int) or before < 1):
        raise _invalid("before: an audit entry id")
    coordinator = request.coordinator
    coordinator.operators.flush()
    if coordinator.store is None:
        raise OperatorError("the coordinator is not running", reason="busy")
    return {"entries": coordinator.store.audit(limit=limit, operator=params.get("operator"),
                                               op=params.get("op"), before=before)}


def register_fleet_ops(coordinator: Coordinator) -> None:
    """Register ``fleet.query``, ``device.show`` (read), ``tags.set`` (write), ``audit.list`` (admin)."""
    coordinator.operations.register("fleet.query", "read", fleet_query_op)
    coordinator.operations.register("device.show", "read", device_show)
    coordinator.operations.register("tags.set", "write", tags_set)
    coordinator.operations.register("audit.list", "admin", audit_list)


# ---------------------------------------------------------------- state at start, properties
def load_operator_state(coordinator: Coordinator) -> None:
    """Put the stored tags and reported properties on the registry's records (at start)."""
    store = coordinator.store
    assert store is not None
    for did, tags in store.load_tags().items():
        coordinator.registry.set_tags(did, tags)
    for did, (props, at) in store.load_properties().items():
        rec = coordinator.registry.get(did)
        if rec is not None:
            rec.properties, rec.properties_at = props, at


def handle_properties(coordinator: Coordinator, msg: Message, rec: DeviceRecord) -> str | None:
    """Merge an admitted device's reported properties; returns a rejection reason, or None."""
    body = msg.body
    if not isinstance(body, dict) or set(body) != {"properties"}:
        log.warning("properties from %s refused: the body must be {\"properties\": {...}}", rec.did)
        return "malformed"
    try:
        merged = reported_properties.merge(rec.properties, body["properties"])
    except reported_properties.InvalidProperties as exc:
        log.warning("properties from %s refused: %s: %s", rec.did, exc.reason, exc)
        return exc.reason
    if merged == rec.properties:
        return None
    now = time.time()
    store = coordinator.store
    assert store is not None
    try:
        store.save_properties(rec.did, merged, now=now)
    except AutoGLMError as exc:
        log.error("properties from %s not persisted: %s", rec.did, exc)
        return "store_error"
    rec.properties, rec.properties_at = merged, now
    return None


__all__ = ["HISTORY", "MAX_TAGS", "audit_list", "device_show", "fleet_query_op", "handle_properties",
           "load_operator_state", "register_fleet_ops", "tags_set"]
