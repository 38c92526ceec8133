"""Mesh errors (node, router, gateway), each with a stable ``reason``.

    MeshError (sdk.errors)
    ├── NoNode             no_node         no live node serves the model (or none is left to fail over to)
    │   └── NoCapableNode  no_capable_node nodes serve the model, but none advertises a feature the
    │                                      request needs (``needs``: json_schema, json_object, tools)
    ├── NotPermitted       not_permitted   every node refused the peer; ``node_reason`` says why:
    │                                      not_authorized | revoked | scope_model | scope_max_tokens
    ├── MeshOverloaded     overloaded      every node was busy (engine queue full or rate limited)
    ├── MeshTimeout        timeout         no first token / the stream stalled and no node could go on
    ├── NodeRequestError   <node reason>   the node rejected the request itself (invalid_request,
    │                                      prompt_too_long...): retrying elsewhere would not help
    └── NoNodeTrust        no_node_trust   a router was built without a node trust policy (which
                                           issuers' InferenceNodeCredential make a node usable)
"""

from __future__ import annotations

from sdk.errors import MeshError

#: Reasons a node gives when it refuses a peer's credential (error replies, ``NotPermitted.node_reason``).
PERMISSION_REASONS = frozenset({"not_authorized", "revoked", "scope_model", "scope_max_tokens"})
#: Reasons a node gives when it is too busy for this peer right now.
BUSY_REASONS = frozenset({"overloaded", "rate_limited", "too_many_streams", "busy", "shutting_down"})


class NoNode(MeshError):
    """No live node advertises the requested model."""

    reason = "no_node"


class NoCapableNode(NoNode):
    """Live nodes serve the model but none advertises every feature in ``needs`` (constrained
    output, tools): the request is not sent where it would be answered unconstrained."""

    reason = "no_capable_node"

    def __init__(self, message: str = "", *, needs: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        self.needs = needs


class NotPermitted(MeshError):
    """The nodes refused this peer; ``node_reason`` is the (first) node's reason code."""

    reason = "not_permitted"

    def __init__(self, message: str = "", *, node_reason: str = "not_authorized") -> None:
        super().__init__(message)
        self.node_reason = node_reason


class MeshOverloaded(MeshError):
    """Every candidate node was overloaded or rate-limited this peer."""

    reason = "overloaded"


class MeshTimeout(MeshError):
    """No node produced a (next) token in time."""

    reason = "timeout"


class NodeRequestError(MeshError):
    """The node found the request itself invalid; ``reason`` is the node's (e.g. ``invalid_request``)."""

    reason = "invalid_request"


class NoNodeTrust(MeshError):
    """A router needs a node trust policy (or, for tests and development only,
    ``require_node_credential=False``)."""

    reason = "no_node_trust"


__all__ = [
    "MeshError",
    "NoNodeTrust",
    "NoNode",
    "NoCapableNode",
    "NotPermitted",
    "MeshOverloaded",
    "MeshTimeout",
    "NodeRequestError",
    "PERMISSION_REASONS",
    "BUSY_REASONS",
]
