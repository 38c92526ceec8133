"""Per-subscription inbound policy: who may send, what must be encrypted, what retained means.

A topic carries either *messages* (each one happens once: retained copies get the same freshness
and replay checks as live ones, or are dropped) or *state* (the latest value matters: messages are
ordered by the state's own ``(key, version)`` and anything not strictly newer is ignored, which is
what makes a retained or re-published copy harmless). Requests never run from a retained copy.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from typing import Any

from sdk.messaging.authz import CredentialRequirement
from sdk.messaging.envelope import Message
from sdk.messaging.errors import RejectedMessage

#: ``order(message) -> (key, version)``; versions are compared with ``>``; None means malformed.
StateOrder = Callable[[Message], "tuple[Hashable, Any] | None"]
#: ``gate(message) -> rejection or None``: runs after verification, before authorization.
Gate = Callable[[Message], "RejectedMessage | None"]
Senders = Collection[str] | Callable[[str], bool]


class Retained(enum.Enum):
    """What a message delivered with the MQTT retain flag means on a subscription."""

    #: Checked like any other message (freshness window, replay cache).
    MESSAGES = "messages"
    #: Ignored before verification.
    DROP = "drop"
    #: State: ordered by ``order``; freshness and replay are replaced by "strictly newer".
    STATE = "state"


@dataclass(frozen=True)
class InboundPolicy:
    """Checks a subscription applies to every verified message before its handler runs."""

    require: CredentialRequirement | None = None
    senders: Senders | None = None
    encrypted: bool = False
    retained: Retained = Retained.MESSAGES
    order: StateOrder | None = None
    gate: Gate | None = None
    serve: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.retained, Retained):
            raise TypeError("retained must be a Retained member")
        if self.require is not None and not isinstance(self.require, CredentialRequirement):
            raise TypeError("require must be a CredentialRequirement")
        if self.retained is Retained.STATE:
            if self.serve:
                raise ValueError("requests cannot be retained state")
            if not callable(self.order):
                raise TypeError("Retained.STATE needs order=callable(message) -> (key, version)")
        elif self.order is not None:
            raise ValueError("order= only applies to Retained.STATE")
        if self.gate is not None and not callable(self.gate):
            raise TypeError("gate must be callable")
        if self.senders is not None and not callable(self.senders):
            if isinstance(self.senders, str) or not all(isinstance(s, str) for s in self.senders):
                raise TypeError("senders must be a collection of DIDs or a callable")
            object.__setattr__(self, "senders", frozenset(s.partition("#")[0] for s in self.senders))

    def sender_allowed(self, did: str) -> bool:
        if self.senders is None:
            return True
        if callable(self.senders):
            return bool(self.senders(did))
        return did in self.senders


__all__ = ["Retained", "InboundPolicy", "StateOrder", "Gate", "Senders"]
