"""The operator API's dispatch: authorize an operator request, check its role, run it, audit it.

An operator is a DID holding an ``OperatorCredential`` from an issuer the coordinator trusts for
that type; its ``credentialSubject.roles`` (``read`` ⊂ ``write`` ⊂ ``admin``) decide what it may
do. Requests arrive as ``coord.operate`` on the coordinator's command topic (see
docs/COORDINATOR.md, "Operator API"); each operation is a handler registered under a name with
the role it needs::

    coordinator.operations.register("fleet.query", "read", handler)   # handler(OperatorRequest) -> JSON

:class:`OperatorAccess` does the rest for one coordinator: strict parsing of ``{op, params}``,
the credential check (cached per operator, so the command topic's gate can let known operators
through without any verification), the role check, and one audit row per request, refused or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdk.coord.coordinator.errors import InvalidValue
from sdk.coord.coordinator.values import check_json, strict_dumps
from sdk.coord.errors import OperatorError
from sdk.errors import AutoGLMError
from sdk.messaging.authz import Authorizer, CredentialRequirement
from sdk.messaging.envelope import Message
from sdk.messaging.errors import NotAuthorized

if TYPE_CHECKING:
    from sdk.coord.coordinator.daemon import Coordinator

log = logging.getLogger(__name__)

OPERATOR_CREDENTIAL = "OperatorCredential"
ROLES = ("read", "write", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}


@dataclass(frozen=True)
class OperatorRequest:
    """One authorized operator request, handed to an operation's handler."""

    coordinator: Coordinator
    operator: str
    roles: frozenset[str]
    op: str
    params: Mapping[str, Any] = field(default_factory=dict)


Handler = Callable[[OperatorRequest], Awaitable[Any] | Any]


@dataclass(frozen=True)
class Operation:
    name: str
    role: str
    handler: Handler


def has_role(roles: frozenset[str] | set[str], needed: str) -> bool:
    """Roles are cumulative: ``admin`` may do what ``write`` may, and ``write`` what ``read`` may."""
    best = max((_RANK[r] for r in roles if r in _RANK), default=-1)
    return best >= _RANK[needed]


class Operations:
    """The registry of named operations on one coordinator."""

    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}

    def register(self, name: str, role: str, handler: Handler) -> None:
        """Add (or replace) operation ``name`` needing ``role``."""
        if role not in _RANK:
            raise ValueError(f"unknown role {role!r} (one of {ROLES})")
        self._ops[name] = Operation(name, role, handler)

    def get(self, name: str) -> Operation:
        op = self._ops.get(name)
        if op is None:
            raise OperatorError(f"unknown operation {name!r}", reason="unknown_op")
        return op

    def names(self) -> list[str]:
        return sorted(self._ops)

    def __contains__(self, name: object) -> bool:
        return name in self._ops



# ---------------------------------------------------------------- dispatch

#: bounds on a request: the op name, the params document (strict JSON bytes, nesting)
MAX_OP_NAME = 64
MAX_PARAMS_BYTES = 64 * 1024
MAX_PARAMS_DEPTH = 8
#: bounds on an audit row's params summary (longer ones are cut and carry a digest)
MAX_AUDIT_PARAMS = 512
_OP_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")


def parse_request(body: Any) -> tuple[str, dict[str, Any]]:
    """``(op, params)`` from an operate request body, or :class:`OperatorError` ``invalid_params``."""
    if not isinstance(body, dict):
        raise OperatorError("an operator request is an object {op, params}", reason="invalid_params")
    extra = set(body) - {"op", "params"}
    if extra:
        raise OperatorError(f"unknown request field(s): {', '.join(sorted(extra))}", reason="invalid_params")
    op = body.get("op")
    if not isinstance(op, str) or not 0 < len(op) <= MAX_OP_NAME or not _OP_NAME.fullmatch(op):
        raise OperatorError(f"op must be an operation name of at most {MAX_OP_NAME} characters",
                            reason="invalid_params")
    params = body.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise OperatorError("params must be an object", reason="invalid_params")
    try:
        check_json(params, what="params", max_depth=MAX_PARAMS_DEPTH)
        size = len(strict_dumps(params).encode())
    except InvalidValue as exc:
        raise OperatorError(str(exc), reason="invalid_params") from exc
    if size > MAX_PARAMS_BYTES:
        raise OperatorError(f"params exceed {MAX_PARAMS_BYTES} bytes", reason="invalid_params")
    return op, params


def params_summary(params: Mapping[str, Any]) -> str:
    """The params as the audit keeps them: strict JSON, cut at :data:`MAX_AUDIT_PARAMS` with a digest."""
    try:
        text = strict_dumps(params, sort_keys=True)
    except InvalidValue:
        text = repr(params)
    if len(text) <= MAX_AUDIT_PARAMS:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    return f"{text[:MAX_AUDIT_PARAMS - 48]}...sha256:{digest}"


class OperatorAuthorizer(Authorizer):
    """An :class:`Authorizer` that can tell a cached grant without verifying anything, and counts
    the verifications it does (each is a signature check: what a flood must not buy)."""

    def __init__(self, requirement: CredentialRequirement, *, max_entries: int = 10_000) -> None:
        super().__init__(max_entries=max_entries)
        self.requirement = requirement
        self.verifications = 0

    def granted(self, sender: str, *, now: float | None = None) -> bool:
        """True when ``sender`` holds an unexpired cached grant (no verification done)."""
        hit = self._grants.get((sender, id(self.requirement)))
        return hit is not None and (time.time() if now is None else now) < hit[0]

    def authorize(self, msg: Message, req: CredentialRequirement, *, now: float | None = None) -> Any:
        if not self.granted(msg.sender, now=now):
            self.verifications += 1
        return super().authorize(msg, req, now=now)

    def check(self, msg: Message, *, now: float | None = None) -> Any:
        """The verification result of ``msg``'s OperatorCredential, or :class:`NotAuthorized`."""
        return self.authorize(msg, self.requirement, now=now)


def roles_of(result: Any) -> frozenset[str]:
    """The known roles in a verified OperatorCredential's subject."""
    credential = getattr(result, "credential", None) or {}
    subject = credential.get("credentialSubject") if isinstance(credential, Mapping) else None
    if isinstance(subject, list):
        subject = subject[0] if subject else None
    roles = subject.get("roles") if isinstance(subject, Mapping) else None
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list):
        return frozenset()
    return frozenset(r for r in roles if isinstance(r, str) and r in _RANK)


@dataclass(frozen=True)
class AuditEntry:
    """One operator request as the audit table keeps it."""

    at: float
    operator: str
    op: str
    params: str
    outcome: str          # "ok" or the refusal's reason


class OperatorAccess:
    """Authorization, dispatch and audit of ``coord.operate`` requests for one coordinator."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.requirement = CredentialRequirement(OPERATOR_CREDENTIAL, coordinator.trust,
                                                 verify_options={"status": coordinator.checker})
        self.authorizer = OperatorAuthorizer(self.requirement)
        self._audit: list[AuditEntry] = []
        coordinator.status_source.add_listener(self._on_status_list)

    def _on_status_list(self, url: str, credential: Any) -> None:
        self.authorizer.status_changed(url)          # a revoked operator is verified (and refused) again

    def granted(self, sender: str) -> bool:
        """True when ``sender`` is an operator with a cached grant (the gate lets it through)."""
        return self.authorizer.granted(sender)

    async def dispatch(self, msg: Message) -> dict[str, Any]:
        """Serve one operate request: ``{"ok": true, "result": ...}`` or raise :class:`OperatorError`."""
        op = _op_hint(msg.body)
        params: Mapping[str, Any] = {}
        t0 = time.perf_counter()
        try:
            if not msg.encrypted:
                raise OperatorError("operator requests must be encrypted to the coordinator",
                                    reason="not_encrypted")
            try:
                result = self.authorizer.check(msg)
            except NotAuthorized as exc:
                reason = exc.reason if exc.reason in ("revoked", "suspended") else "not_authorized"
                raise OperatorError(str(exc), reason=reason) from exc
            roles = roles_of(result)
            op, params = parse_request(msg.body)
            operation = self.coordinator.operations.get(op)
            if not has_role(roles, operation.role):
                raise OperatorError(f"{op} needs the {operation.role!r} role (held: "
                                    f"{', '.join(sorted(roles)) or 'none'})", reason="forbidden")
            out = operation.handler(OperatorRequest(self.coordinator, msg.sender, roles, op, params))
            if inspect.isawaitable(out):
                out = await out
            try:
                strict_dumps(out)
            except InvalidValue as exc:
                raise OperatorError(f"{op} produced a result that is not JSON: {exc}",
                                    reason="handler_error") from exc
        except OperatorError as exc:
            self.record(msg.sender, op, params, exc.reason)
            log.warning("operator %s: %s refused: %s: %s", msg.sender, op, exc.reason, exc)
            raise
        except AutoGLMError as exc:
            self.record(msg.sender, op, params, exc.reason)
            log.warning("operator %s: %s failed: %s: %s", msg.sender, op, exc.reason, exc)
            raise OperatorError(str(exc), reason=exc.reason) from exc
        except asyncio.CancelledError:
            self.record(msg.sender, op, params, "cancelled")
            raise
        except Exception as exc:
            self.record(msg.sender, op, params, "handler_error")
            log.exception("operator %s: %s raised", msg.sender, op)
            raise OperatorError(f"{op} failed: {type(exc).__name__}", reason="handler_error") from exc
        self.record(msg.sender, op, params, "ok")
        log.info("operator %s: %s ok (%.1f ms)", msg.sender, op, (time.perf_counter() - t0) * 1000)
        return {"ok": True, "result": out}

    # -- audit: rows are queued and written in one transaction per loop turn
    def record(self, operator: str, op: str, params: Mapping[str, Any], outcome: str) -> None:
        """Queue an audit row for ``operator``'s request (written on the next loop turn)."""
        self._audit.append(AuditEntry(time.time(), operator, op, params_summary(params), outcome))
        if len(self._audit) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:            # no loop: write now
                self.flush()

    def flush(self) -> None:
        """Write the queued audit rows (one transaction)."""
        batch, self._audit = self._audit, []
        store = self.coordinator.store
        if not batch:
            return
        if store is None:
            log.error("%d audit row(s) lost: the coordinator's store is closed", len(batch))
            return
        try:
            store.add_audit([(e.at, e.operator, e.op, e.params, e.outcome) for e in batch])
        except AutoGLMError as exc:
            log.error("could not write %d audit row(s): %s", len(batch), exc)


def _op_hint(body: Any) -> str:
    """The op name for the audit of a request refused before it was parsed."""
    op = body.get("op") if isinstance(body, dict) else None
    return op if isinstance(op, str) and 0 < len(op) <= MAX_OP_NAME and _OP_NAME.fullmatch(op) else "?"


__all__ = [
    "OPERATOR_CREDENTIAL",
    "ROLES",
    "AuditEntry",
    "Operation",
    "OperatorAccess",
    "OperatorAuthorizer",
    "OperatorRequest",
    "Operations",
    "has_role",
    "params_summary",
    "parse_request",
    "roles_of",
]
