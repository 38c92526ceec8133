"""Coordination protocol shared by device and coordinator: message types and device topics (on top of the signed envelopes of docs/PROTOCOL.md).

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

import re

from sdk.messaging import topics
from sdk.messaging.status import STATUS_LIST, issuer_of_status_url, status_list_topic, status_list_url
from sdk.messaging.topics import ROOT, validate_id

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


# Device topics:
#     autoglm/v1/dev/{device}/presence    retained presence (online/offline, will message)
#     autoglm/v1/dev/{device}/events      device events
#     autoglm/v1/dev/{device}/config      retained adaptation config for the device
#     autoglm/v1/dev/{device}/cmd         commands to the device (requests)


def device_presence(device: str) -> str:
    return f"{ROOT}/dev/{validate_id(device, what='device id')}/presence"


def device_events(device: str) -> str:
    return f"{ROOT}/dev/{validate_id(device, what='device id')}/events"


def device_config(device: str) -> str:
    return f"{ROOT}/dev/{validate_id(device, what='device id')}/config"


def device_commands(device: str) -> str:
    return f"{ROOT}/dev/{validate_id(device, what='device id')}/cmd"


#: Subscription filters over all devices.
ALL_PRESENCE = f"{ROOT}/dev/+/presence"
ALL_EVENTS = f"{ROOT}/dev/+/events"
ALL_CONFIGS = f"{ROOT}/dev/+/config"

_DEVICE_TOPIC = re.compile(rf"^{re.escape(ROOT)}/dev/([^/]+)/(presence|events|config|cmd)$")


def parse_device_topic(topic: str) -> tuple[str, str] | None:
    """``(device_id, kind)`` for a device topic, else None."""
    m = _DEVICE_TOPIC.match(topic)
    return (m.group(1), m.group(2)) if m else None


__all__ = [
    "HELLO", "PRESENT", "EVENT", "REPORT", "ANNOUNCE", "PRESENCE", "HEARTBEAT", "CONFIG", "NOTICE",
    "STATUS_LIST", "NOTICE_REVOKED", "NOTICE_REAUTH", "NOTICE_NOT_ADMITTED", "APPLIED", "FAILED",
    "ALL_STATUS_LISTS", "token", "status_list_topic", "status_list_url",
    "issuer_of_status_url", "device_presence", "device_events", "device_config", "device_commands",
    "ALL_PRESENCE", "ALL_EVENTS", "ALL_CONFIGS", "parse_device_topic",
]
