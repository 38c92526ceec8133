"""Coordination message types and topics (on top of the signed envelopes of docs/PROTOCOL.md).

    device → coordinator  dev/{coord}/cmd       coord.hello   (request)  {nonce}
                                                coord.present (request)  {challenge, vp, last_version,
                                                                          capabilities?, attributes?}
    device → coordinator  dev/{device}/events   coord.event     {type, fields, event_id?}
                                                coord.report    {version, status, reason?, apply_ms?}
                                                coord.announce  {capabilities?, attributes?}
    device → coordinator  dev/{device}/presence coord.presence  {state, ttl}  (retained; will = offline)
                                                coord.heartbeat {seq}
    coordinator → device  dev/{device}/config   coord.config    ConfigVersion document
    coordinator → device  dev/{device}/cmd      coord.notice    {notice: revoked|reauth|not_admitted, reason}
                                                coord.event_ack {event_id, reason?,
                                                                 status: processed|duplicate|rejected}
    coordinator           dev/{coord}/presence  coord.presence  {state, boot} (retained)
    issuer/coordinator    status/{issuer}       coord.status_list  status list credential (retained)
"""

from __future__ import annotations

from sdk.coord import topics

HELLO = "coord.hello"
PRESENT = "coord.present"
EVENT = "coord.event"
REPORT = "coord.report"
ANNOUNCE = "coord.announce"
PRESENCE = "coord.presence"
HEARTBEAT = "coord.heartbeat"
CONFIG = "coord.config"
NOTICE = "coord.notice"
EVENT_ACK = "coord.event_ack"
STATUS_LIST = "coord.status_list"

ACK_PROCESSED = "processed"
ACK_DUPLICATE = "duplicate"
ACK_REJECTED = "rejected"

NOTICE_REVOKED = "revoked"
NOTICE_REAUTH = "reauth"
NOTICE_NOT_ADMITTED = "not_admitted"

APPLIED = "applied"
FAILED = "failed"

ALL_STATUS_LISTS = topics.ALL_STATUS_LISTS


def token(did: str) -> str:
    """The topic-safe id of a DID (see ``topics.client_token``)."""
    return topics.client_token(did)


def status_list_topic(issuer_did: str) -> str:
    """Where ``issuer_did`` publishes its status list credential (retained)."""
    return topics.status_list(topics.client_token(issuer_did))


def status_list_url(issuer_did: str) -> str:
    """The id (URL) of the status list credential an issuer publishes over MQTT."""
    return f"urn:autoglm:status-list:{topics.client_token(issuer_did)}"


def issuer_of_status_url(url: str) -> str | None:
    """The did:key token in a ``urn:autoglm:status-list:...`` URL (None for other URLs)."""
    prefix = "urn:autoglm:status-list:"
    return url[len(prefix):] if url.startswith(prefix) else None


__all__ = [
    "HELLO", "PRESENT", "EVENT", "REPORT", "ANNOUNCE", "PRESENCE", "HEARTBEAT", "CONFIG", "NOTICE",
    "STATUS_LIST", "NOTICE_REVOKED", "NOTICE_REAUTH", "NOTICE_NOT_ADMITTED", "APPLIED", "FAILED",
    "ALL_STATUS_LISTS", "token", "status_list_topic", "status_list_url",
    "issuer_of_status_url",
]
