"""``desired.set`` / ``desired.unset``: operators write desired state, and how it meets the rules'.

Targets are ``{"did": ...}``, ``{"group": ...}`` (a credential group or an operator tag),
``{"tag": ...}`` or ``{"where": {...}}`` (a fleet query). All targets get their new version in one
transaction, recorded with ``operator:<did>`` as its rule, then pushed by the same pump as
rule-made versions (signed per device).

Precedence: a key an operator set is *pinned* on that device; a later rule output leaves pinned
keys alone (its other keys still apply). ``desired.unset`` removes the key and its pin, so the
rules own it again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdk.coord.coordinator import queries
from sdk.coord.coordinator.errors import InvalidValue
from sdk.coord.coordinator.operations import OperatorRequest
from sdk.coord.coordinator.values import check_json, strict_dumps
from sdk.coord.errors import OperatorError

if TYPE_CHECKING:
    from sdk.coord.coordinator.daemon import Coordinator
    from sdk.coord.coordinator.store import Store

log = logging.getLogger(__name__)

MAX_KEYS = 256
MAX_KEY = 128
#: the reply lists each target's new version up to this many devices (the count is always exact)
MAX_REPLY_VERSIONS = 1000

Merged = dict[str, tuple[dict[str, Any], tuple[str, ...]]]


def _invalid(msg: str) -> OperatorError:
    return OperatorError(msg, reason="invalid_params")


def _check_key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY:
        raise _invalid(f"{what}: keys are strings of 1-{MAX_KEY} characters, got {str(key)[:40]!r}")
    return key


def check_changes(changes: Any, *, max_bytes: int) -> dict[str, Any]:
    """Validate ``desired.set`` changes: a strict-JSON object of 1-256 keys within ``max_bytes``."""
    if not isinstance(changes, dict) or not changes:
        raise _invalid("changes: a non-empty object {key: value} is required")
    if len(changes) > MAX_KEYS:
        raise _invalid(f"changes: at most {MAX_KEYS} keys, got {len(changes)}")
    for key, value in changes.items():
        _check_key(key, "changes")
        if value is None:
            raise _invalid(f"changes: {key!r} is null; remove keys with desired.unset")
    try:
        check_json(changes, what="changes")
        size = len(strict_dumps(changes).encode())
    except InvalidValue as exc:
        raise _invalid(str(exc)) from exc
    if size > max_bytes:
        raise _invalid(f"changes: {size} bytes, above the config limit of {max_bytes}")
    return dict(changes)


def check_keys(keys: Any) -> list[str]:
    """Validate ``desired.unset`` keys: a list of 1-256 distinct key names."""
    if not isinstance(keys, list) or not keys:
        raise _invalid("keys: a non-empty list of key names is required")
    if len(keys) > MAX_KEYS:
        raise _invalid(f"keys: at most {MAX_KEYS}, got {len(keys)}")
    return list(dict.fromkeys(_check_key(k, "keys") for k in keys))


def resolve_target(coordinator: Coordinator, target: Any) -> list[str]:
    """The DIDs a target names, sorted (see :func:`sdk.coord.coordinator.queries.resolve_target`)."""
    return sorted(queries.resolve_target(coordinator, target))


def drop_pinned(store: Store, merged: Mapping[str, tuple[dict[str, Any], tuple[str, ...]]]) -> Merged:
    """Rule outputs without the keys operators pinned (a device left with no change drops out)."""
    out: Merged = {}
    for did, (changes, rules) in merged.items():
        pinned = store.pinned(did)
        kept = {k: v for k, v in changes.items() if k not in pinned} if pinned else changes
        if len(kept) < len(changes):
            log.info("device %s: rule(s) %s left pinned key(s) %s as the operator set them", did,
                     ",".join(rules), sorted(set(changes) - set(kept)))
        if kept:
            out[did] = (kept, rules)
    return out


async def apply_operator_changes(coordinator: Coordinator, operator: str, op: str,
                                 changes_by_device: Mapping[str, Mapping[str, Any]], *,
                                 unpin: Mapping[str, list[str]] | None = None) -> dict[str, int]:
    """Commit an operator's changes (one transaction, with pins) and start their push; ``{did: version}``."""
    from sdk.coord.coordinator.daemon import MAX_CONFIG_BYTES

    store = coordinator.store
    if store is None:
        raise OperatorError("the coordinator is not running", reason="busy")
    event_id = f"op:{uuid.uuid4().hex}"
    try:
        versions = store.commit_operator(changes_by_device, operator=operator, event_id=event_id, op=op,
                                         unpin=unpin, max_bytes=MAX_CONFIG_BYTES)
    except InvalidValue as exc:
        raise _invalid(f"changes: {exc}") from exc
    log.info("operator %s: %s committed %d version(s) (%s)", operator, op, len(versions), event_id)
    # answered once durable: a set to thousands of devices must not outlast the operator's timeout
    await coordinator.push_desired(event_id, versions, wait=False)
    return {c.did: c.version for c in versions}


def _result(versions: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"count": len(versions)}
    if len(versions) > MAX_REPLY_VERSIONS:
        out["versions"] = {d: versions[d] for d in sorted(versions)[:MAX_REPLY_VERSIONS]}
        out["versions_truncated"] = True
    else:
        out["versions"] = versions
    return out


async def desired_set(request: OperatorRequest) -> dict[str, Any]:
    """``desired.set`` (write): ``{target, changes}`` → ``{count, versions}``; the keys are pinned."""
    from sdk.coord.coordinator.daemon import MAX_CONFIG_BYTES

    params = request.params
    changes = check_changes(params.get("changes"), max_bytes=MAX_CONFIG_BYTES)
    dids = resolve_target(request.coordinator, params.get("target"))
    if not dids:
        return _result({})
    versions = await apply_operator_changes(request.coordinator, request.operator, request.op,
                                            {did: changes for did in dids})
    return _result(versions)


async def desired_unset(request: OperatorRequest) -> dict[str, Any]:
    """``desired.unset`` (write): ``{target, keys}`` → ``{count, versions}``; the keys are removed and
    unpinned (a device holding none of them gets no new version)."""
    params = request.params
    keys = check_keys(params.get("keys"))
    dids = resolve_target(request.coordinator, params.get("target"))
    store = request.coordinator.store
    if store is None or not dids:
        return _result({})
    changes: dict[str, dict[str, Any]] = {}
    unpin: dict[str, list[str]] = {}
    for did in dids:
        state, pinned = store.desired(did), store.pinned(did)
        present = [k for k in keys if k in state]
        if present:
            changes[did] = dict.fromkeys(present)
        stale = [k for k in keys if k in pinned and k not in state]
        if stale:
            unpin[did] = stale
    if not changes and not unpin:
        return _result({})
    versions = await apply_operator_changes(request.coordinator, request.operator, request.op, changes,
                                            unpin=unpin)
    return _result(versions)


def register_desired_ops(coordinator: Coordinator) -> None:
    """Register ``desired.set`` and ``desired.unset`` on ``coordinator``."""
    coordinator.operations.register("desired.set", "write", desired_set)
    coordinator.operations.register("desired.unset", "write", desired_unset)


__all__ = ["apply_operator_changes", "check_changes", "check_keys", "desired_set", "desired_unset", "drop_pinned",
           "register_desired_ops", "resolve_target"]
