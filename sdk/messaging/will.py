"""Pre-signed MQTT wills: the broker publishes them for us when the connection dies uncleanly.

A will is signed when the client connects, so its ``iat`` is the connect time; subscribers read
it on a ``Retained.STATE`` subscription (ordered by the body's own version), where the freshness
window does not apply. Give it a version above every live message of the session.
"""

from __future__ import annotations

from typing import Any

from sdk.messaging.envelope import Signer
from sdk.messaging.transport import Will


def presigned_will(
    signer: Signer, topic: str, body: Any, *, type: str, ttl: float | None = None,  # noqa: A002
    credentials: list[Any] | tuple[Any, ...] | None = None, qos: int = 1, retain: bool = True,
) -> Will:
    """A :class:`Will` whose payload is an envelope signed now by ``signer`` (retained by default).

    ``credentials`` travel in the envelope like a live message's (for ``require=`` subscribers).
    """
    _, wire = signer.seal(topic, body, type=type, ttl=ttl, credentials=credentials)
    return Will(topic, wire, qos=qos, retain=retain)


__all__ = ["presigned_will"]
