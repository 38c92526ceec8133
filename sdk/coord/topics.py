"""The MQTT topic layout and validated builders (ids can never inject wildcards or levels).

    autoglm/v1/dev/{device}/presence    retained presence (online/offline, will message)
    autoglm/v1/dev/{device}/events      device events
    autoglm/v1/dev/{device}/config      retained adaptation config for the device
    autoglm/v1/dev/{device}/cmd         commands to the device (requests)
    autoglm/v1/inf/req/{node}           inference requests to one node
    autoglm/v1/inf/ads/{node}           retained inference node advertisements
    autoglm/v1/reply/{client}           replies and stream chunks for one client
"""

from __future__ import annotations

import re

ROOT = "autoglm/v1"
MAX_ID_LEN = 128
MAX_TOPIC_BYTES = 1024

_BAD_ID = re.compile(r"[+#/\x00-\x1f\x7f\s]")


def validate_id(value: str, *, what: str = "id") -> str:
    """Return ``value`` if it is safe as one topic level, else raise ``ValueError``."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value.encode("utf-8")) > MAX_ID_LEN:
        raise ValueError(f"{what} longer than {MAX_ID_LEN} bytes")
    if _BAD_ID.search(value):
        raise ValueError(f"{what} {value!r} contains '+', '#', '/', whitespace or a control character")
    if value.startswith("$"):
        raise ValueError(f"{what} {value!r} must not start with '$'")
    return value


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid concrete topic to publish to (no wildcards)."""
    if not isinstance(topic, str):
        raise TypeError("topic must be a str")
    if not topic or "\x00" in topic or len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise ValueError(f"invalid topic {topic!r}")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic {topic!r} contains a wildcard")
    return topic


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid MQTT subscription filter."""
    if not isinstance(topic_filter, str):
        raise TypeError("topic filter must be a str")
    if not topic_filter or "\x00" in topic_filter or len(topic_filter.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise ValueError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be the whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level in {topic_filter!r}")
    return topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """True if ``topic`` matches the MQTT filter ``topic_filter``."""
    if topic_filter == topic:
        return True
    if "+" not in topic_filter and "#" not in topic_filter:
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def client_token(did: str) -> str:
    """A topic-safe token for a DID (its method-specific id, e.g. ``z6Mk...``)."""
    ident = did.partition("#")[0].rsplit(":", 1)[-1]
    return validate_id(ident, what="client token")


def device_presence(device: str) -> str:
    return f"{ROOT}/dev/{validate_id(device, what='device id')}/presence"


def device_events(device: str) -> str:
    return f"{ROOT}/dev/{validate_id(device, what='device id')}/events"


def device_config(device: str) -> str:
    return f"{ROOT}/dev/{validate_id(device, what='device id')}/config"


def device_commands(device: str) -> str:
    return f"{ROOT}/dev/{validate_id(device, what='device id')}/cmd"


def inference_requests(node: str) -> str:
    return f"{ROOT}/inf/req/{validate_id(node, what='node id')}"


def inference_ad(node: str) -> str:
    return f"{ROOT}/inf/ads/{validate_id(node, what='node id')}"


def reply_topic(client: str) -> str:
    return f"{ROOT}/reply/{validate_id(client, what='client id')}"


def status_list(issuer: str) -> str:
    """Where an issuer publishes its status list credential (retained); ``issuer`` is its token."""
    return f"{ROOT}/status/{validate_id(issuer, what='issuer id')}"


#: Subscription filters over all devices / nodes.
ALL_PRESENCE = f"{ROOT}/dev/+/presence"
ALL_EVENTS = f"{ROOT}/dev/+/events"
ALL_CONFIGS = f"{ROOT}/dev/+/config"
ALL_INFERENCE_ADS = f"{ROOT}/inf/ads/+"
ALL_STATUS_LISTS = f"{ROOT}/status/+"

_DEVICE_TOPIC = re.compile(rf"^{re.escape(ROOT)}/dev/([^/]+)/(presence|events|config|cmd)$")


def parse_device_topic(topic: str) -> tuple[str, str] | None:
    """``(device_id, kind)`` for a device topic, else None."""
    m = _DEVICE_TOPIC.match(topic)
    return (m.group(1), m.group(2)) if m else None


__all__ = [
    "ROOT",
    "MAX_ID_LEN",
    "validate_id",
    "validate_topic",
    "validate_filter",
    "matches",
    "client_token",
    "device_presence",
    "device_events",
    "device_config",
    "device_commands",
    "inference_requests",
    "inference_ad",
    "reply_topic",
    "ALL_PRESENCE",
    "ALL_EVENTS",
    "ALL_CONFIGS",
    "ALL_INFERENCE_ADS",
    "parse_device_topic",
]
