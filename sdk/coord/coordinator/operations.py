"""The operator API's dispatch: authorize an operator request, check its role, run it, audit it.

An operator is a DID holding an ``OperatorCredential`` from an issuer the coordinator trusts for
that type; its ``credentialSubject.roles`` (``read`` ⊂ ``write`` ⊂ ``admin``) decide what it may
do. Requests arrive as ``coord.operate`` on the coordinator's command topic (see
docs/OPERATIONS.md); each operation is a handler registered under a name with the role it needs::

    coordinator.operations.register("fleet.query", "read", handler)   # handler(OperatorRequest) -> JSON
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdk.coord.errors import OperatorError

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


__all__ = ["OPERATOR_CREDENTIAL", "ROLES", "Operation", "OperatorRequest", "Operations", "has_role"]
