"""Coordination protocol shared by device and coordinator: message types, device topics and the
config document (on top of the signed envelopes of docs/PROTOCOL.md).

    device → coordinator  dev/{coord}/cmd       coord.hello   (request)  {nonce}
                                                coord.present (request)  {challenge, vp, last_version,
                                                                          capabilities?, attributes?}
    device → coordinator  dev/{device}/events   coord.event     {type, fields, event_id?}
                                                coord.report    {version, status, reason?, apply_ms?}
                                                coord.announce  {capabilities?, attributes?}
    device → coordinator  dev/{device}/presence coord.presence  {state, ttl}  (retained; will = offline)
                                                coord.heartbeat {seq}
    coordinator → device  dev/{device}/config   coord.config    ConfigVersion document {device, version,
                                                                 changes, state, event_id, rules, created}
    coordinator → device  dev/{device}/cmd      coord.notice    {notice: revoked|reauth|not_admitted|expired,
                                                                 reason}
                                                coord.event_ack {event_id, reason?,
                                                                 status: processed|duplicate|rejected}
    device → coordinator  dev/{device}/events   coord.properties {properties}  (reported properties)
    operator → coordinator dev/{coord}/cmd      coord.operate (request, encrypted) {op, params}
    device → coordinator  dev/{coord}/cmd       coord.enroll / coord.renew / coord.rotate (requests)
    coordinator → device  dev/{device}/cmd      coord.call (request, encrypted) {method, args}
    device → coordinator  dev/{coord}/cmd       coord.ticket (request) {} -> {next_challenge, ticket_ttl}
    coordinator           dev/{coord}/presence  coord.presence  {state, boot, deployment} (retained)
    issuer/coordinator    status/{issuer}       coord.status_list  status list credential (retained)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdk.coord.errors import MalformedConfig
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
#: operator → coordinator (request on the coordinator's cmd topic): {op, params}
OPERATE = "coord.operate"
#: coordinator → device (request on the device's cmd topic): {method, args}
CALL = "coord.call"
#: device → coordinator (request on the coordinator's cmd topic): credential lifecycle
ENROLL = "coord.enroll"
RENEW = "coord.renew"
ROTATE = "coord.rotate"
#: device → coordinator (request on the coordinator's cmd topic, admitted devices): {} -> a fresh
#: resumption ticket {next_challenge, ticket_ttl, deployment}
TICKET = "coord.ticket"
#: device → coordinator (on its events topic): reported properties {properties}
PROPERTIES = "coord.properties"

ACK_PROCESSED = "processed"
ACK_DUPLICATE = "duplicate"
ACK_REJECTED = "rejected"

NOTICE_REVOKED = "revoked"
NOTICE_REAUTH = "reauth"
NOTICE_NOT_ADMITTED = "not_admitted"
#: the session's credential expired: authenticate again with a fresh one
NOTICE_EXPIRED = "expired"

APPLIED = "applied"
FAILED = "failed"

ALL_STATUS_LISTS = topics.ALL_STATUS_LISTS
STATUS_TREE = topics.STATUS_TREE


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


def coordinator_presence(coordinator: str) -> str:
    """A coordinator's retained presence (online/offline, its will), under the broadcast tree
    its devices read anyway (``topics.STATUS_TREE``, beside the status lists)."""
    return f"{ROOT}/status/{validate_id(coordinator, what='coordinator id')}/presence"


#: Subscription filters over all devices.
ALL_PRESENCE = f"{ROOT}/dev/+/presence"
ALL_EVENTS = f"{ROOT}/dev/+/events"
ALL_CONFIGS = f"{ROOT}/dev/+/config"

_DEVICE_TOPIC = re.compile(rf"^{re.escape(ROOT)}/dev/([^/]+)/(presence|events|config|cmd)$")


def parse_device_topic(topic: str) -> tuple[str, str] | None:
    """``(device_id, kind)`` for a device topic, else None."""
    m = _DEVICE_TOPIC.match(topic)
    return (m.group(1), m.group(2)) if m else None


MAX_RULE_NAMES = 256
MAX_EVENT_ID = 128


@dataclass(frozen=True)
class ConfigVersion:
    """One desired-state version for one device: the ``coord.config`` document.

    The coordinator commits it and signs its :meth:`to_body`; the device parses it back with
    :meth:`from_body`. Versions count from 1 per device and only grow.
    """

    did: str
    version: int
    changes: dict[str, Any]
    state: dict[str, Any]
    event_id: str | None = None
    rules: tuple[str, ...] = ()
    created: float = 0.0

    def to_body(self) -> dict[str, Any]:
        """The JSON document that the coordinator signs and sends."""
        return {"device": self.did, "version": self.version, "changes": self.changes,
                "state": self.state, "event_id": self.event_id, "rules": list(self.rules),
                "created": self.created}

    @classmethod
    def from_body(cls, body: Any) -> ConfigVersion:
        """Parse and check a config document; raises :class:`MalformedConfig` (a ``ValueError``)."""
        if not isinstance(body, Mapping):
            raise MalformedConfig("config document is not an object")
        device, version = body.get("device"), body.get("version")
        changes, state = body.get("changes"), body.get("state")
        if not isinstance(device, str) or not device:
            raise MalformedConfig("config names no device")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise MalformedConfig("config version must be a positive integer")
        if not isinstance(changes, dict) or not isinstance(state, dict):
            raise MalformedConfig("config changes and state must be objects")
        event_id = body.get("event_id")
        if event_id is not None and (not isinstance(event_id, str) or len(event_id) > MAX_EVENT_ID):
            raise MalformedConfig("config event_id must be a string")
        rules = body.get("rules") or ()
        if not isinstance(rules, (list, tuple)) or len(rules) > MAX_RULE_NAMES \
                or not all(isinstance(r, str) for r in rules):
            raise MalformedConfig("config rules must be a list of rule names")
        created = body.get("created", 0.0)
        if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
            raise MalformedConfig("config created must be a finite number")
        return cls(device, version, dict(changes), dict(state), event_id, tuple(rules), float(created))


__all__ = [
    "HELLO", "PRESENT", "EVENT", "REPORT", "ANNOUNCE", "PRESENCE", "HEARTBEAT", "CONFIG", "NOTICE",
    "STATUS_LIST", "NOTICE_REVOKED", "NOTICE_REAUTH", "NOTICE_NOT_ADMITTED", "APPLIED", "FAILED",
    "ALL_STATUS_LISTS", "token", "status_list_topic", "status_list_url",
    "issuer_of_status_url", "STATUS_TREE", "coordinator_presence", "device_presence", "device_events",
    "device_config", "device_commands",
    "ALL_PRESENCE", "ALL_EVENTS", "ALL_CONFIGS", "parse_device_topic", "NOTICE_EXPIRED", "ConfigVersion",
    "ACK_PROCESSED", "ACK_DUPLICATE", "ACK_REJECTED", "EVENT_ACK", "OPERATE", "CALL", "ENROLL", "RENEW",
    "ROTATE", "PROPERTIES",
]
